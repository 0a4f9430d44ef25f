"""The edge peers, configured to check what narthex's gateway checks, and the sanity step.

Every edge sits in front of the same trivial upstream (`bench.upstream`) and accepts the same
RS256 JWT, issued by narthex's auth: Envoy's jwt_authn and HAProxy's jwt_verify check its
signature against auth's published key, its issuer, audience and expiry, and each keeps a
per-tenant bucket keyed by the token's `sub` (Envoy's local_ratelimit with a dynamic
descriptor, HAProxy's stick table). The buckets are sized never to refuse at loopback
speeds, as the gateway's plan is: every request takes the whole path and is admitted.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.limits import UNLIMITED_PLAN
from bench.peers import install
from narthex.auth.signing import SigningKeyRing
from narthex.common.tokens import SigningKey, issue_token
from narthex.testing.jwts import public_pem, rs256, unsigned, unverified
from narthex.testing.platform import HOST, Admin, Edge, Spec, exchange, module_argv

ISSUER = "narthex-auth"
AUDIENCE = "narthex"
# The route every edge is timed on: limited at the gateway (plan, cost, one EVALSHA).
PATH = "/v1/models"
# Answered by each edge without a token, so a plain readiness poll finds it up.
READY = "/bench-ready"
# Per tenant; far above what one core can push, so nothing is ever refused.
BUCKET_TOKENS = 10_000_000
BUCKET_PER_SECOND = 1_000_000
# The sanity step's buckets: a tenant is refused within a few requests, another is not.
SMALL_TOKENS = 2
SMALL_PER_SECOND = 1
ENVOY_DYNAMIC_DESCRIPTORS = 10_000


@dataclass(frozen=True)
class Peer:
    """One edge of the table: how to start it, and what it leaves out that narthex does."""

    name: str
    spec: Spec
    lacks: str


def envoy_config(
    jwks: Mapping[str, Any],
    upstream_port: int,
    tokens: int = BUCKET_TOKENS,
    per_second: int = BUCKET_PER_SECOND,
) -> str:
    """Envoy's bootstrap as JSON (valid YAML) with `{port}` left for the launcher."""
    bucket = {"max_tokens": tokens, "tokens_per_fill": per_second, "fill_interval": "1s"}
    # Envoy takes from this listener-wide bucket as well: never the one that refuses.
    everyone = {"max_tokens": 10**9, "tokens_per_fill": 10**8, "fill_interval": "1s"}
    tenant = {"header_name": "x-tenant", "descriptor_key": "tenant"}
    always = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}
    http_filters = [
        {
            "name": "envoy.filters.http.jwt_authn",
            "typed_config": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                "providers": {
                    "narthex": {
                        "issuer": ISSUER,
                        "audiences": [AUDIENCE],
                        "local_jwks": {"inline_string": json.dumps(jwks)},
                        "forward": True,
                        "claim_to_headers": [{"header_name": "x-tenant", "claim_name": "sub"}],
                    }
                },
                "rules": [{"match": {"prefix": "/v1"}, "requires": {"provider_name": "narthex"}}],
            },
        },
        {
            "name": "envoy.filters.http.local_ratelimit",
            "typed_config": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                "stat_prefix": "tenant",
                "token_bucket": everyone,
                "filter_enabled": {**always, "runtime_key": "rl_enabled"},
                "filter_enforced": {**always, "runtime_key": "rl_enforced"},
                # A value left out is a wildcard: each tenant seen gets a bucket of its own.
                "descriptors": [{"entries": [{"key": "tenant"}], "token_bucket": bucket}],
                "max_dynamic_descriptors": ENVOY_DYNAMIC_DESCRIPTORS,
                "rate_limits": [{"actions": [{"request_headers": tenant}]}],
            },
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
            },
        },
    ]
    route = {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}
    manager = {
        "@type": "type.googleapis.com/"
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "edge",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": http_filters,
    }
    config = {
        "static_resources": {
            "listeners": [
                {
                    "address": {"socket_address": {"address": HOST, "port_value": "PORT"}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "upstream",
                    "connect_timeout": "1s",
                    "type": "STATIC",
                    "load_assignment": {
                        "cluster_name": "upstream",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": HOST,
                                                    "port_value": upstream_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        }
    }
    # The launcher replaces `{port}` textually; everything else in the JSON keeps its braces.
    return json.dumps(config).replace('"PORT"', "{port}")


def haproxy_config(pem: Path, upstream_port: int, per_second: int = BUCKET_PER_SECOND) -> str:
    """HAProxy's configuration; its port comes from the environment (`NARTHEX_PEER_PORT`)."""
    return f"""\
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    option http-keep-alive

backend per_tenant
    stick-table type string len 64 size 100k expire 60s store http_req_rate(1s)

backend upstream
    server up {HOST}:{upstream_port}

frontend edge
    bind {HOST}:"${{NARTHEX_PEER_PORT}}"
    http-request return status 200 if {{ path {READY} }}
    http-request set-var(txn.bearer) http_auth_bearer
    http-request deny deny_status 401 unless {{ var(txn.bearer) -m found }}
    http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')
    http-request deny deny_status 401 unless {{ var(txn.alg) -m str RS256 }}
    http-request set-var(txn.valid) var(txn.bearer),jwt_verify(txn.alg,"{pem}")
    http-request deny deny_status 401 unless {{ var(txn.valid) -m int 1 }}
    http-request set-var(txn.iss) var(txn.bearer),jwt_payload_query('$.iss')
    http-request deny deny_status 401 unless {{ var(txn.iss) -m str {ISSUER} }}
    http-request set-var(txn.aud) var(txn.bearer),jwt_payload_query('$.aud')
    http-request deny deny_status 401 unless {{ var(txn.aud) -m str {AUDIENCE} }}
    http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')
    http-request set-var(txn.now) date
    http-request deny deny_status 401 if {{ var(txn.exp),sub(txn.now) -m int le 0 }}
    http-request set-var(txn.sub) var(txn.bearer),jwt_payload_query('$.sub')
    http-request track-sc0 var(txn.sub) table per_tenant
    http-request deny deny_status 429 if {{ sc_http_req_rate(0) gt {per_second} }}
    default_backend upstream
"""


def peers(
    directory: Path, jwks: Mapping[str, Any], upstream_port: int, *, small: bool = False
) -> list[Peer]:
    """Envoy and HAProxy, installed if needed, configured in `directory`; `small`: with
    the sanity step's buckets."""
    (jwk,) = [k for k in jwks["keys"] if k.get("kty") == "RSA"][:1]
    suffix = "-small" if small else ""
    pem = directory / "jwt-public.pem"
    pem.write_bytes(public_pem(jwk))
    cfg = directory / f"haproxy{suffix}.cfg"
    cfg.write_text(
        haproxy_config(pem, upstream_port, SMALL_PER_SECOND)
        if small
        else haproxy_config(pem, upstream_port)
    )
    config = (
        envoy_config(jwks, upstream_port, SMALL_TOKENS, SMALL_PER_SECOND)
        if small
        else envoy_config(jwks, upstream_port)
    )
    envoy = Spec(
        f"envoy{suffix}",
        (
            str(install.envoy()),
            "--config-yaml",
            config,
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "warning",
        ),
        ready_path=READY,
    )
    haproxy = Spec(
        f"haproxy{suffix}",
        (str(install.haproxy()), "-db", "-f", str(cfg)),
        {"NARTHEX_PEER_PORT": "{port}"},
        ready_path=READY,
    )
    per_replica = (
        "limits per replica, not shared exactly across replicas; cost is requests, not items;"
        " no access log, spans or usage events"
    )
    return [Peer("envoy", envoy, per_replica), Peer("haproxy", haproxy, per_replica)]


def baseline(upstream_url: str) -> Peer:
    return Peer(
        "aiohttp-proxy",
        Spec(
            "baseline",
            module_argv("bench.baseline", "--upstream", upstream_url, "--port", "{port}"),
            ready_path="/",
        ),
        "no JWT, no limits, no quota: forwards only",
    )


def floor() -> Peer:
    return Peer(
        "python-floor",
        Spec("floor", module_argv("bench.floor", "--port", "{port}"), ready_path="/"),
        "answers from memory: no upstream, no checks; narthex's HTTP server alone",
    )


def forged(token: str) -> dict[str, str]:
    """Tokens each edge must refuse: the same claims signed by another key under the real
    key's kid; an expired one and one for another audience, signed by another key too (an
    edge must refuse them whatever it checks first)."""
    header, claims = unverified(token)
    other = SigningKey.generate()
    now = int(time.time())
    expired = {**claims, "exp": now - 600, "iat": now - 1200, "nbf": now - 1200}
    return {
        "forged signature": rs256(other, claims, kid=header["kid"]),
        "alg none": unsigned(claims),
        "expired (forged)": rs256(other, expired, kid=header["kid"]),
    }


def refuses(url: str, bad: Mapping[str, str], good: str) -> list[str]:
    """What is wrong with this edge's checks: accepts a bad token, refuses the good one."""
    problems: list[str] = []
    with httpx.Client(timeout=10.0) as client:
        for what, token in bad.items():
            status = client.get(url, headers={"Authorization": f"Bearer {token}"}).status_code
            if status < 400:
                problems.append(f"accepted a token with {what} (HTTP {status})")
        status = client.get(url).status_code
        if status < 400:
            problems.append(f"accepted a request without a token (HTTP {status})")
        status = client.get(url, headers={"Authorization": f"Bearer {good}"}).status_code
        if status != 200:
            problems.append(f"refused the good token (HTTP {status})")
    return problems


def unlimited_token(platform: Edge, gateway_url: str) -> str:
    """The operator's JWT, its tenant moved to a plan no benchmark can exhaust: every
    request takes the limiter's whole path and is admitted."""
    admin = Admin(gateway_url, platform.admin_key)
    try:
        plan = admin.create_plan("bench-peers", UNLIMITED_PLAN)
        admin.set_plan(platform.admin_tenant_id, plan)
    finally:
        admin.close()
    return exchange(gateway_url, platform.admin_key)


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used (Linux /proc). Per request it is the figure a
    shared machine disturbs least: a busy neighbour takes wall time, not this."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def tenant_tokens(platform: Edge, subjects: Sequence[str]) -> list[str]:
    """JWTs for other tenants, signed with auth's own current key (read from its keys
    directory), as auth would issue them."""
    key = SigningKeyRing(platform.directory / "keys", generate=False).signing_key()
    return [
        issue_token(
            key,
            issuer=ISSUER,
            audience=AUDIENCE,
            subject=subject,
            plan="bench",
            roles=["tenant"],
            scopes=["models:read"],
        )
        for subject in subjects
    ]


def per_tenant(url: str, noisy: str, quiet: str, tries: int = 6) -> str | None:
    """What is wrong with an edge's per-tenant bucket (None: nothing): `noisy` must be
    refused (429) within `tries` requests, and `quiet` admitted right after."""
    with httpx.Client(timeout=10.0) as client:
        statuses = [
            client.get(url, headers={"Authorization": f"Bearer {noisy}"}).status_code
            for _ in range(tries)
        ]
        other = client.get(url, headers={"Authorization": f"Bearer {quiet}"}).status_code
    if 429 not in statuses:
        return f"never refused one tenant past its bucket: {statuses}"
    if other != 200:
        return f"refused another tenant with its own bucket full: HTTP {other}"
    return None
