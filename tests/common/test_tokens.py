"""narthex.common.tokens and the JWKS cache it reads (narthex.common.jwks), with real RSA keys
and real tokens, forged ones built by hand; time is a clock the test drives."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from structlog.testing import capture_logs

from narthex.common.errors import ServiceUnavailable, Unauthorized
from narthex.common.jwks import JwksCache, JwksUnavailable, thumbprint
from narthex.common.tokens import InvalidToken, Principal, SigningKey, TokenVerifier, issue_token
from narthex.testing.clock import ManualClock

ISS = "https://auth.narthex.test"
AUD = "narthex"
LEEWAY = 30
REQUIRED = ("exp", "iat", "nbf", "iss", "aud", "sub", "jti")


# -- helpers --------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: Any) -> str:
    return b64url(json.dumps(value).encode())


def unb64json(segment: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def claims(now: float | None = None, **overrides: Any) -> dict[str, Any]:
    """A complete, valid claim set; an override of None removes the claim."""
    issued = int(time.time() if now is None else now)
    body: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "tenant-1",
        "plan": "standard",
        "roles": ["tenant"],
        "scope": "predict usage",
        "jti": secrets.token_urlsafe(16),
        "iat": issued,
        "nbf": issued,
        "exp": issued + 900,
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def forge(
    key: SigningKey,
    body: Mapping[str, Any] | str,
    *,
    kid: str | None = None,
    header: Mapping[str, Any] | None = None,
) -> str:
    """An RS256 JWT signed with `cryptography` directly, not via jose: any header, any body."""
    head = dict(header) if header is not None else {"alg": "RS256", "typ": "JWT"}
    head.setdefault("kid", kid or key.kid)
    payload = b64url(body.encode()) if isinstance(body, str) else b64json(body)
    signing_input = f"{b64json(head)}.{payload}"
    signature = key.private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


def jwks_of(*keys: SigningKey) -> dict[str, Any]:
    return {"keys": [k.public_jwk() for k in keys]}


async def rejected(verifier: TokenVerifier, token: str) -> InvalidToken:
    """Verification fails with InvalidToken (pytest.raises lets any other exception through)."""
    with pytest.raises(InvalidToken) as caught:
        await verifier.verify(token)
    problem = caught.value
    assert problem.status == 401
    assert problem.detail == InvalidToken.GENERIC_DETAIL
    assert problem.headers == {"WWW-Authenticate": 'Bearer error="invalid_token"'}
    return problem


class FakeJwksEndpoint:
    """The injected fetch: serves `document`, counts calls, can fail or be held open."""

    def __init__(self, *keys: SigningKey) -> None:
        self.document: dict[str, Any] = jwks_of(*keys)
        self.calls = 0
        self.fail = False
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> Mapping[str, Any]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ConnectionError("auth service unreachable")
        return self.document


class CountingJwks(JwksCache):
    """Counts key lookups, which only an uncached verification makes."""

    lookups = 0

    async def key(self, kid: str) -> Mapping[str, Any] | None:
        self.lookups += 1
        return await super().key(kid)


@pytest.fixture(scope="module")
def weak_rsa() -> rsa.RSAPrivateKey:
    # Deliberately breakable: it exists to prove that such keys are refused.
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(scope="module")
def other_key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def verifier(key: SigningKey) -> TokenVerifier:
    return TokenVerifier(JwksCache.static(jwks_of(key)), issuer=ISS, audience=AUD)


def token_for(key: SigningKey, **kwargs: Any) -> str:
    options: dict[str, Any] = {
        "issuer": ISS,
        "audience": AUD,
        "subject": "tenant-1",
        "plan": "standard",
        "roles": ["tenant", "admin"],
        "scopes": ["predict", "usage"],
    }
    options.update(kwargs)
    return issue_token(key, **options)


# -- signing keys ---------------------------------------------------------------------------


def test_kid_is_the_rfc7638_thumbprint() -> None:
    # The worked example of RFC 7638, section 3.1.
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc"
        "_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR"
        "0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTW"
        "hAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    assert thumbprint(n, "AQAB") == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_public_jwk_and_stable_kid(key: SigningKey, other_key: SigningKey) -> None:
    jwk = key.public_jwk()
    assert set(jwk) == {"kty", "use", "alg", "kid", "n", "e"}
    assert (jwk["kty"], jwk["use"], jwk["alg"], jwk["kid"]) == ("RSA", "sig", "RS256", key.kid)
    assert all("=" not in jwk[m] for m in ("n", "e", "kid"))
    assert jwk["e"] == "AQAB"
    numbers = key.private_key.public_key().public_numbers()
    n = base64.urlsafe_b64decode(jwk["n"] + "=" * (-len(jwk["n"]) % 4))
    assert int.from_bytes(n, "big") == numbers.n
    canonical = json.dumps({"e": jwk["e"], "kty": "RSA", "n": jwk["n"]}, separators=(",", ":"))
    assert key.kid == b64url(hashlib.sha256(canonical.encode()).digest())

    pem = key.to_pem()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    reloaded = SigningKey.from_pem(pem)
    assert reloaded.kid == key.kid
    assert reloaded.public_jwk() == jwk
    assert other_key.kid != key.kid
    assert "PRIVATE" not in repr(key)


def test_signing_key_refuses_weak_and_non_rsa_keys(weak_rsa: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError, match="2048"):
        SigningKey(weak_rsa)
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="RSA"):
        SigningKey.from_pem(ec_pem)


# -- issue and verify -----------------------------------------------------------------------


async def test_round_trip(key: SigningKey, verifier: TokenVerifier) -> None:
    token = token_for(key)
    header_segment, payload_segment, _ = token.split(".")
    header = unb64json(header_segment)
    assert header["alg"] == "RS256"
    assert header["kid"] == key.kid
    body = unb64json(payload_segment)
    assert set(REQUIRED) | {"plan", "roles", "scope"} <= set(body)
    assert body["exp"] - body["iat"] == 900
    assert body["nbf"] == body["iat"]
    assert abs(body["iat"] - time.time()) < 5
    assert (body["iss"], body["aud"], body["sub"]) == (ISS, AUD, "tenant-1")
    assert body["scope"] == "predict usage"
    assert body["roles"] == ["admin", "tenant"]

    principal = await verifier.verify(token)
    assert principal == Principal(
        tenant="tenant-1",
        plan="standard",
        roles=frozenset({"tenant", "admin"}),
        scopes=frozenset({"predict", "usage"}),
        token_id=body["jti"],
        expires_at=float(body["exp"]),
        token=token,
    )
    assert principal.has_role("admin")
    assert not principal.has_role("root")
    assert principal.has_scope("usage")
    assert not principal.has_scope("keys")
    assert token not in repr(principal)


def test_issue_token_ttl_now_and_unique_jti(key: SigningKey) -> None:
    first = unb64json(token_for(key, ttl=60, now=1_700_000_000.7).split(".")[1])
    assert (first["iat"], first["nbf"], first["exp"]) == (1_700_000_000,) * 2 + (1_700_000_060,)
    second = unb64json(token_for(key, ttl=60, now=1_700_000_000).split(".")[1])
    assert first["jti"] != second["jti"]
    with pytest.raises(ValueError, match="whitespace"):
        token_for(key, scopes=["predict usage"])
    with pytest.raises(ValueError, match="ttl"):
        token_for(key, ttl=0)


async def test_hand_forged_token_with_valid_signature_passes(
    key: SigningKey, verifier: TokenVerifier
) -> None:
    # Guards the negative tests below: `forge` itself makes tokens the verifier accepts.
    principal = await verifier.verify(forge(key, claims()))
    assert principal.scopes == frozenset({"predict", "usage"})


@pytest.mark.parametrize("signature", ["", "AAAA"])
@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_alg_none_is_rejected(key: SigningKey, alg: str, signature: str) -> None:
    endpoint = FakeJwksEndpoint(key)
    verifier = TokenVerifier(JwksCache(endpoint), issuer=ISS, audience=AUD)
    header = {"alg": alg, "typ": "JWT", "kid": key.kid}
    token = f"{b64json(header)}.{b64json(claims())}.{signature}"
    await rejected(verifier, token)
    assert endpoint.calls == 0  # refused before any key was looked up


async def test_hs256_signed_with_the_public_key_is_rejected(key: SigningKey) -> None:
    endpoint = FakeJwksEndpoint(key)
    verifier = TokenVerifier(JwksCache(endpoint), issuer=ISS, audience=AUD)
    public_pem = key.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for secret in (public_pem, json.dumps(key.public_jwk()).encode()):
        header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
        signing_input = f"{b64json(header)}.{b64json(claims())}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        problem = await rejected(verifier, f"{signing_input}.{b64url(mac)}")
        assert problem.reason == "algorithm not allowed"
    assert endpoint.calls == 0


@pytest.mark.parametrize("alg", ["RS512", "PS256", "ES256", "rs256", None])
async def test_only_rs256_is_accepted(key: SigningKey, verifier: TokenVerifier, alg: str) -> None:
    header = {"typ": "JWT", "kid": key.kid} | ({"alg": alg} if alg else {})
    await rejected(verifier, forge(key, claims(), header=header))


async def test_expiry_and_not_before_respect_the_leeway(
    key: SigningKey, verifier: TokenVerifier
) -> None:
    now = time.time()
    await rejected(verifier, token_for(key, now=now - 900 - LEEWAY - 30))  # exp 60 s ago
    await verifier.verify(token_for(key, now=now - 900 - 10))  # exp 10 s ago: within leeway
    await rejected(verifier, forge(key, claims(nbf=int(now) + LEEWAY + 30)))
    await verifier.verify(forge(key, claims(nbf=int(now) + 10)))  # within leeway


@pytest.mark.parametrize(
    "overrides",
    [
        {"iss": "https://evil.test"},
        {"aud": "someone-else"},
        {"aud": ["someone-else", "another"]},
        {"sub": 42},
        {"sub": ""},
        {"jti": 7},
        {"roles": "admin"},
        {"roles": ["admin", 1]},
        {"roles": {"admin": True}},
        {"scope": ["predict"]},
        {"plan": None},
        {"plan": 3},
        {"roles": None},
        {"scope": None},
        {"exp": "99999999999"},
        {"exp": True},
        {"iat": "now"},
        {"nbf": [1]},
    ],
    ids=repr,
)
async def test_bad_claims_are_rejected(
    key: SigningKey, verifier: TokenVerifier, overrides: dict[str, Any]
) -> None:
    await rejected(verifier, forge(key, claims(**overrides)))


async def test_audience_list_containing_ours_passes(
    key: SigningKey, verifier: TokenVerifier
) -> None:
    await verifier.verify(forge(key, claims(aud=["other", AUD])))


@pytest.mark.parametrize("missing", REQUIRED)
async def test_each_required_claim_is_required(
    key: SigningKey, verifier: TokenVerifier, missing: str
) -> None:
    await rejected(verifier, forge(key, claims(**{missing: None})))


async def test_non_finite_numbers_are_rejected(key: SigningKey, verifier: TokenVerifier) -> None:
    body = json.dumps(claims(exp=0))
    for raw in ("1e999", "-1e999", "NaN", "Infinity"):
        await rejected(verifier, forge(key, body.replace('"exp": 0', f'"exp": {raw}')))
    await rejected(verifier, forge(key, body.replace('"exp": 0', f'"exp": {10**400}')))


async def test_unknown_kid_is_rejected(
    key: SigningKey, other_key: SigningKey, verifier: TokenVerifier
) -> None:
    problem = await rejected(verifier, token_for(other_key))
    assert problem.reason == "unknown kid"


async def test_tampered_payload_is_rejected(key: SigningKey, verifier: TokenVerifier) -> None:
    token = token_for(key)
    await verifier.verify(token)  # the original is good, and now cached
    header, payload, signature = token.split(".")
    body = unb64json(payload)
    body["sub"] = "tenant-2"
    problem = await rejected(verifier, f"{header}.{b64json(body)}.{signature}")
    assert "Signature" in problem.reason or "signature" in problem.reason


async def test_signature_by_another_key_under_our_kid_is_rejected(
    key: SigningKey, other_key: SigningKey, verifier: TokenVerifier
) -> None:
    await rejected(verifier, forge(other_key, claims(), kid=key.kid))


async def test_critical_header_extensions_are_rejected(
    key: SigningKey, verifier: TokenVerifier
) -> None:
    header = {"alg": "RS256", "typ": "JWT", "kid": key.kid, "crit": ["exp"], "exp": 1}
    await rejected(verifier, forge(key, claims(), header=header))


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b",
        "a.b.c",
        "a.b.c.d",
        "..",
        "eyJ.eyJ.",
        "é.é.é",
        "Bearer a.b.c",
        f"{b64url(b'not json')}.{b64json({})}.AAAA",
        f"{b64json([1, 2])}.{b64json({})}.AAAA",
        f"{b64json({'alg': 'RS256', 'kid': ''})}.{b64json({})}.AAAA",
        f"{b64json({'alg': 'RS256', 'kid': 5})}.{b64json({})}.AAAA",
        f"{b64json({'alg': 'RS256', 'kid': 'k' * 300})}.{b64json({})}.AAAA",
        f"{b64json({'alg': 'RS256'})}.{b64json({})}.AAAA",
        "x" * 100_000,
        "a." * 10_000 + "a",
        "[" * 5000 + "." + "a.a",
    ],
    ids=lambda t: repr(t[:24]) + f"...({len(t)})",
)
async def test_garbage_is_rejected(verifier: TokenVerifier, token: str) -> None:
    await rejected(verifier, token)


async def test_huge_but_validly_signed_token_is_rejected(
    key: SigningKey, verifier: TokenVerifier
) -> None:
    token = forge(key, claims(padding="p" * 9000))
    assert len(token) > 8 * 1024
    problem = await rejected(verifier, token)
    assert problem.reason == "too long"


def test_invalid_token_is_a_401_problem() -> None:
    problem = InvalidToken("nbf in the future")
    assert isinstance(problem, Unauthorized)
    assert problem.type_slug == "invalid-token"
    assert problem.title == "Invalid or expired token"
    assert "nbf" not in str(problem)  # the reason stays on our side
    assert str(problem) == InvalidToken.GENERIC_DETAIL
    assert problem.reason == "nbf in the future"


# -- the verified-token cache ---------------------------------------------------------------


async def test_cached_token_is_not_used_past_exp_plus_leeway(key: SigningKey) -> None:
    clock = ManualClock(float(int(time.time())))  # whole seconds, like iat and exp
    jwks = CountingJwks(FakeJwksEndpoint(key))
    verifier = TokenVerifier(jwks, issuer=ISS, audience=AUD, clock=clock)
    token = token_for(key, ttl=60, now=clock.now)
    principal = await verifier.verify(token)
    assert jwks.lookups == 1

    clock.advance(60 + LEEWAY)  # exactly exp + leeway: still acceptable
    assert await verifier.verify(token) is principal
    assert jwks.lookups == 1  # served from the cache

    clock.advance(1)
    problem = await rejected(verifier, token)
    assert problem.reason == "expired"
    # The entry is gone, and a full verification (which jose would pass: by the real
    # clock the token is fresh) is judged by the same clock and fails the same way.
    await rejected(verifier, token)
    assert jwks.lookups == 2


async def test_cache_only_answers_for_the_exact_token(key: SigningKey) -> None:
    jwks = CountingJwks(FakeJwksEndpoint(key))
    verifier = TokenVerifier(jwks, issuer=ISS, audience=AUD, cache_size=2)
    tokens = [token_for(key, subject=f"tenant-{i}") for i in range(3)]
    for token in tokens:
        await verifier.verify(token)
    assert jwks.lookups == 3
    assert (await verifier.verify(tokens[2])).tenant == "tenant-2"
    assert jwks.lookups == 3
    assert (await verifier.verify(tokens[0])).tenant == "tenant-0"  # evicted: verified again
    assert jwks.lookups == 4
    await rejected(verifier, tokens[2] + "A")
    await rejected(verifier, tokens[2][:-2])


async def test_cache_size_zero_disables_the_cache(key: SigningKey) -> None:
    jwks = CountingJwks(FakeJwksEndpoint(key))
    verifier = TokenVerifier(jwks, issuer=ISS, audience=AUD, cache_size=0)
    token = token_for(key)
    await verifier.verify(token)
    await verifier.verify(token)
    assert jwks.lookups == 2


# -- JwksCache ------------------------------------------------------------------------------


async def test_unknown_kids_cause_at_most_one_fetch_per_cooldown(key: SigningKey) -> None:
    clock = ManualClock(1000.0)
    endpoint = FakeJwksEndpoint(key)
    jwks = JwksCache(endpoint, unknown_kid_cooldown=30.0, clock=clock)
    verifier = TokenVerifier(jwks, issuer=ISS, audience=AUD)
    await verifier.verify(token_for(key))
    assert jwks.fetches == endpoint.calls == 1
    clock.advance(30.0)

    random_kid_tokens = [forge(key, claims(), kid=secrets.token_urlsafe(32)) for _ in range(100)]
    for token in random_kid_tokens[:50]:
        await rejected(verifier, token)
    await asyncio.gather(*(rejected(verifier, t) for t in random_kid_tokens[50:]))
    assert jwks.fetches == 2

    clock.advance(29.9)
    await rejected(verifier, random_kid_tokens[0])
    assert jwks.fetches == 2
    clock.advance(0.1)
    await rejected(verifier, random_kid_tokens[0])
    assert jwks.fetches == 3
    await verifier.verify(token_for(key))  # the known key is unaffected throughout
    assert jwks.fetches == 3


async def test_concurrent_cold_lookups_share_one_fetch(key: SigningKey) -> None:
    endpoint = FakeJwksEndpoint(key)
    endpoint.gate = asyncio.Event()
    jwks = JwksCache(endpoint)
    lookups = [asyncio.create_task(jwks.key(key.kid)) for _ in range(20)]
    unknown = [asyncio.create_task(jwks.key("rotated-in-later")) for _ in range(5)]
    await asyncio.sleep(0.01)
    assert endpoint.calls == 1
    endpoint.gate.set()
    found = await asyncio.gather(*lookups)
    assert all(jwk == key.public_jwk() for jwk in found)
    assert await asyncio.gather(*unknown) == [None] * 5
    assert jwks.fetches == 1


async def test_a_cancelled_caller_does_not_cancel_the_shared_fetch(key: SigningKey) -> None:
    endpoint = FakeJwksEndpoint(key)
    endpoint.gate = asyncio.Event()
    jwks = JwksCache(endpoint)
    impatient = asyncio.create_task(jwks.key(key.kid))
    patient = asyncio.create_task(jwks.key(key.kid))
    await asyncio.sleep(0.01)
    impatient.cancel()
    endpoint.gate.set()
    assert await patient is not None
    with pytest.raises(asyncio.CancelledError):
        await impatient
    assert jwks.fetches == 1


async def test_rotated_in_key_is_found_via_the_unknown_kid_refresh(
    key: SigningKey, other_key: SigningKey
) -> None:
    clock = ManualClock(1000.0)
    endpoint = FakeJwksEndpoint(key)
    verifier = TokenVerifier(JwksCache(endpoint, clock=clock), issuer=ISS, audience=AUD)
    await verifier.verify(token_for(key))
    clock.advance(31.0)
    endpoint.document = jwks_of(other_key, key)  # rotation: the new key is published
    principal = await verifier.verify(token_for(other_key))
    assert principal.tenant == "tenant-1"
    assert endpoint.calls == 2
    await verifier.verify(token_for(key))  # the previous key still verifies
    assert endpoint.calls == 2


async def test_stale_keys_serve_while_a_background_fetch_renews_them(
    key: SigningKey, other_key: SigningKey
) -> None:
    clock = ManualClock(1000.0)
    endpoint = FakeJwksEndpoint(key)
    jwks = JwksCache(endpoint, refresh_interval=300.0, clock=clock)
    assert await jwks.key(key.kid) is not None
    clock.advance(299.0)
    assert await jwks.key(key.kid) is not None
    assert endpoint.calls == 1
    clock.advance(1.0)
    endpoint.document = jwks_of(other_key)  # `key` was withdrawn
    assert await jwks.key(key.kid) is not None  # answered from the old set, at once
    await jwks.refresh()  # joins the background fetch already started
    assert endpoint.calls == 2
    assert jwks.kids == {other_key.kid}
    assert await jwks.key(key.kid) is None


async def test_failed_fetch_keeps_the_old_keys(key: SigningKey) -> None:
    clock = ManualClock(1000.0)
    endpoint = FakeJwksEndpoint(key)
    jwks = JwksCache(endpoint, refresh_interval=300.0, failure_backoff=5.0, clock=clock)
    assert await jwks.key(key.kid) is not None
    endpoint.fail = True
    clock.advance(301.0)
    with capture_logs() as logs:
        assert await jwks.key(key.kid) is not None
        assert await jwks.refresh() is False
    assert endpoint.calls >= 2
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert warnings
    assert "ConnectionError" in warnings[0]["error"]
    assert await jwks.key(key.kid) == key.public_jwk()
    calls = endpoint.calls
    await jwks.key(key.kid)  # within the failure backoff: no new attempt
    assert endpoint.calls == calls
    clock.advance(5.0)
    endpoint.fail = False
    await jwks.key(key.kid)
    await jwks.refresh()
    assert await jwks.key(key.kid) is not None


async def test_bad_documents_count_as_failures(key: SigningKey) -> None:
    endpoint = FakeJwksEndpoint(key)
    jwks = JwksCache(endpoint, refresh_interval=0.0, failure_backoff=0.0)
    assert await jwks.key(key.kid) is not None
    documents: list[dict[str, Any]] = [
        {},
        {"keys": "nope"},
        {"keys": []},
        {"keys": [{"kty": "EC"}]},
    ]
    for document in documents:
        endpoint.document = document
        with capture_logs():
            assert await jwks.refresh() is False
        assert jwks.kids == {key.kid}


async def test_no_keys_and_failing_fetch_is_unavailable(key: SigningKey) -> None:
    clock = ManualClock(1000.0)
    endpoint = FakeJwksEndpoint(key)
    endpoint.fail = True
    jwks = JwksCache(endpoint, failure_backoff=5.0, clock=clock)
    verifier = TokenVerifier(jwks, issuer=ISS, audience=AUD)
    token = token_for(key)
    with capture_logs(), pytest.raises(JwksUnavailable) as caught:
        await verifier.verify(token)
    assert isinstance(caught.value, ServiceUnavailable)
    assert caught.value.status == 503
    assert caught.value.headers["Retry-After"] == "5"
    clock.advance(2.0)
    with pytest.raises(JwksUnavailable) as caught:
        await jwks.key(key.kid)
    assert caught.value.headers["Retry-After"] == "3"
    assert endpoint.calls == 1  # no fetch storm while the auth service is down
    clock.advance(3.0)
    endpoint.fail = False
    assert (await verifier.verify(token)).tenant == "tenant-1"
    assert endpoint.calls == 2


def test_only_rs256_rsa_signing_keys_are_kept(
    key: SigningKey, other_key: SigningKey, weak_rsa: rsa.RSAPrivateKey
) -> None:
    weak_n = weak_rsa.public_key().public_numbers().n
    ours = key.public_jwk()
    document = {
        "keys": [
            ours,
            {**other_key.public_jwk(), "alg": "RS512"},
            {**other_key.public_jwk(), "kid": "enc", "use": "enc"},
            {"kty": "EC", "kid": "ec", "crv": "P-256", "x": "AA", "y": "AA"},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "RSA", "kid": "weak", "n": b64url(weak_n.to_bytes(128, "big")), "e": "AQAB"},
            {"kty": "RSA", "kid": "broken", "n": "!!!", "e": "AQAB"},
            {**other_key.public_jwk(), "kid": ""},
            {k: v for k, v in other_key.public_jwk().items() if k != "alg"} | {"kid": "no-alg"},
            "not a key",
        ]
    }
    jwks = JwksCache.static(document)
    assert jwks.kids == {key.kid, "no-alg"}
    with pytest.raises(ValueError, match="usable"):
        jwks.load({"keys": [document["keys"][1]]})
    assert jwks.kids == {key.kid, "no-alg"}
