"""Token and key security: RS256 JWT issue/verify, the JWKS cache, and API key hashing."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import math
import re
import secrets
import string
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwt
from jose.backends.base import Key

# Named, not left to jose's fallback chain: the pure-python `rsa` backend is slow and
# has a history of timing side channels.
from jose.backends.cryptography_backend import CryptographyRSAKey
from jose.exceptions import ExpiredSignatureError

from narthex.common.deadline import unbounded_context
from narthex.common.errors import ServiceUnavailable, Unauthorized

__all__ = [
    "ApiKey",
    "InvalidToken",
    "JwksCache",
    "JwksUnavailable",
    "Principal",
    "SigningKey",
    "TokenVerifier",
    "cache_key",
    "generate_api_key",
    "hash_secret",
    "issue_token",
    "looks_like_api_key",
    "parse_api_key",
    "secret_matches",
]

log = structlog.get_logger("narthex.security")

ALGORITHM = "RS256"
DEFAULT_TTL = 900
DEFAULT_LEEWAY = 30
MIN_RSA_BITS = 2048
# Our tokens are well under 2 KiB; the cap keeps base64/JSON work on hostile input bounded.
MAX_TOKEN_LENGTH = 8 * 1024
_MAX_KID_LENGTH = 256
# Checked by a regex before jose sees the token, so junk costs a few microseconds.
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")

# Every check jose has, and every claim required: a missing `exp` or `aud` must be a
# rejection, not a silently skipped check (jose's defaults skip them).
_DECODE_OPTIONS: dict[str, Any] = {
    "verify_signature": True,
    "verify_aud": True,
    "verify_iat": True,
    "verify_exp": True,
    "verify_nbf": True,
    "verify_iss": True,
    "verify_sub": True,
    "verify_jti": True,
    "verify_at_hash": True,
    "require_aud": True,
    "require_iat": True,
    "require_exp": True,
    "require_nbf": True,
    "require_iss": True,
    "require_sub": True,
    "require_jti": True,
}


# -- errors ---------------------------------------------------------------------------------


class InvalidToken(Unauthorized):
    """A token we will not accept. The client learns only that; `reason` is for our logs."""

    type_slug, title = "invalid-token", "Invalid or expired token"
    # One detail for every failure: naming the failed check would tell an attacker
    # which part of a forgery to fix next.
    GENERIC_DETAIL = "The access token is invalid or has expired."

    def __init__(self, reason: str = "invalid token") -> None:
        super().__init__(
            self.GENERIC_DETAIL,
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
        self.reason = reason


class JwksUnavailable(ServiceUnavailable):
    """No signing keys to check tokens with: the caller's token may be fine, so 503, not 401."""

    type_slug, title = "jwks-unavailable", "Token signing keys unavailable"

    def __init__(self, retry_after: int = 5) -> None:
        super().__init__(
            "The keys that verify access tokens cannot be loaded right now.",
            headers={"Retry-After": str(max(1, retry_after))},
        )
        self.retry_after = max(1, retry_after)


# -- signing keys ---------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_uint(value: int) -> str:
    return _b64url(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _thumbprint(n: str, e: str) -> str:
    # RFC 7638: the required members only, sorted, no whitespace.
    canonical = json.dumps({"e": e, "kty": "RSA", "n": n}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode("ascii")).digest())


class SigningKey:
    """An RSA private key that signs narthex tokens, named by its RFC 7638 thumbprint.

    Deriving `kid` from the key means the same key has the same kid on every replica and
    after every restart, with nothing extra to store.
    """

    __slots__ = ("_jose_key", "_public_jwk", "kid", "private_key")

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        if private_key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA signing keys need at least {MIN_RSA_BITS} bits")
        self.private_key = private_key
        numbers = private_key.public_key().public_numbers()
        n, e = _b64url_uint(numbers.n), _b64url_uint(numbers.e)
        self.kid = _thumbprint(n, e)
        self._public_jwk = {"kty": "RSA", "use": "sig", "alg": ALGORITHM, "kid": self.kid}
        self._public_jwk |= {"n": n, "e": e}
        # Built once: jose would otherwise re-wrap the key on every token it signs.
        self._jose_key = CryptographyRSAKey(private_key, ALGORITHM)

    @classmethod
    def generate(cls, bits: int = MIN_RSA_BITS) -> SigningKey:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=bits))

    @classmethod
    def from_pem(cls, pem: bytes) -> SigningKey:
        private_key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(private_key, rsa.RSAPrivateKey):
            raise ValueError("not an RSA private key")
        return cls(private_key)

    def to_pem(self) -> bytes:
        """PKCS#8 PEM, unencrypted: protecting it at rest is the file system's job."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_jwk(self) -> dict[str, str]:
        return dict(self._public_jwk)

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid!r}, bits={self.private_key.key_size})"


def issue_token(
    key: SigningKey,
    *,
    issuer: str,
    audience: str,
    subject: str,
    plan: str,
    roles: Iterable[str],
    scopes: Iterable[str],
    ttl: int = DEFAULT_TTL,
    now: float | None = None,
    client_id: str | None = None,
) -> str:
    """An RS256 JWT for `subject`, valid from now for `ttl` seconds, its header naming the kid.

    `client_id` (RFC 9068) names the API key the token was exchanged for, so that a
    verifier can refuse every token minted from a key once the key is revoked.
    """
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    scope_list = sorted(set(scopes))
    # `scope` is space-separated (OAuth 2), so a scope with whitespace would split in two.
    if any(not s or s != "".join(s.split()) for s in scope_list):
        raise ValueError("scopes must be non-empty and contain no whitespace")
    issued_at = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "plan": plan,
        "roles": sorted(set(roles)),
        "scope": " ".join(scope_list),
        "jti": secrets.token_urlsafe(16),
        "iat": issued_at,
        "nbf": issued_at,
        "exp": issued_at + ttl,
    }
    if client_id is not None:
        if not client_id:
            raise ValueError("client_id must be non-empty")
        claims["client_id"] = client_id
    return jwt.encode(claims, key._jose_key, algorithm=ALGORITHM, headers={"kid": key.kid})


# -- JWKS -----------------------------------------------------------------------------------


def _usable_keys(document: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """kid -> JWK for the RS256 signing keys of a JWKS document; ValueError if there are none."""
    entries = document.get("keys") if isinstance(document, Mapping) else None
    if not isinstance(entries, list):
        raise ValueError("JWKS document has no 'keys' list")
    keys: dict[str, dict[str, Any]] = {}
    for entry in entries:
        # Anything that is not an RS256 signing key is ignored rather than fatal, so a
        # JWKS that also publishes other keys still works.
        if not isinstance(entry, Mapping):
            continue
        kid, n, e = entry.get("kid"), entry.get("n"), entry.get("e")
        if (
            entry.get("kty") != "RSA"
            or entry.get("alg", ALGORITHM) != ALGORITHM
            or entry.get("use", "sig") != "sig"
            or not isinstance(kid, str)
            or not kid
            or not isinstance(n, str)
            or not isinstance(e, str)
            or kid in keys
        ):
            continue
        try:
            modulus = int.from_bytes(_b64url_decode(n), "big")
            exponent = int.from_bytes(_b64url_decode(e), "big")
            rsa.RSAPublicNumbers(exponent, modulus).public_key()
        except ValueError:
            continue
        if modulus.bit_length() < MIN_RSA_BITS:
            continue
        keys[kid] = dict(entry)
    if not keys:
        raise ValueError("JWKS document has no usable RS256 signing key")
    return keys


class JwksCache:
    """The verification keys of a JWKS endpoint, fetched lazily and shared by all requests.

    - Cold: the first `key()` fetches and waits. Stale (older than `refresh_interval`):
      the known keys keep serving while one background fetch renews them.
    - Unknown kid: one refresh, but at most once per `unknown_kid_cooldown` since the last
      fetch of any kind, so tokens with made-up kids cannot turn into a fetch storm.
    - Single flight: concurrent callers share the one fetch in progress.
    - A failed fetch keeps the keys we have (retried after `failure_backoff`); with no keys
      at all `key()` raises JwksUnavailable, since a 401 would blame a token we cannot check.
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[Mapping[str, Any]]],
        *,
        refresh_interval: float = 300.0,
        unknown_kid_cooldown: float = 30.0,
        failure_backoff: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._refresh_interval = refresh_interval
        self._cooldown = unknown_kid_cooldown
        self._failure_backoff = failure_backoff
        self._clock = clock
        self._keys: dict[str, dict[str, Any]] = {}
        self._loaded_at: float | None = None
        self._attempted_at = -math.inf
        self._failed = False
        self._inflight: asyncio.Task[None] | None = None
        self.fetches = 0

    @classmethod
    def static(cls, document: Mapping[str, Any]) -> JwksCache:
        """A cache over a fixed key set (tests, single-process tools): it never refetches."""

        async def same() -> Mapping[str, Any]:
            return document

        cache = cls(same, refresh_interval=math.inf, unknown_kid_cooldown=math.inf)
        cache.load(document)
        return cache

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def load(self, document: Mapping[str, Any]) -> None:
        """Replace the key set with `document`'s (ValueError if it has no usable key)."""
        self._keys = _usable_keys(document)
        self._loaded_at = self._clock()
        self._failed = False

    async def refresh(self) -> bool:
        """Fetch now (or join the fetch under way); True if the key set is fresh after it."""
        await asyncio.shield(self._start_fetch())
        return not self._failed

    async def key(self, kid: str) -> Mapping[str, Any] | None:
        now = self._clock()
        if self._is_stale(now):
            task = self._start_fetch()
            if not self._keys:
                await asyncio.shield(task)
        found = self._keys.get(kid)
        if found is None:
            # A fetch under way may bring the kid (rotation), so wait for it at no extra cost.
            if self._inflight is not None:
                await asyncio.shield(self._inflight)
            elif now - self._attempted_at >= self._cooldown:
                await asyncio.shield(self._start_fetch())
            found = self._keys.get(kid)
        if not self._keys:
            wait = self._attempted_at + self._failure_backoff - self._clock()
            raise JwksUnavailable(retry_after=math.ceil(wait))
        return found

    def _is_stale(self, now: float) -> bool:
        if self._loaded_at is not None and now - self._loaded_at < self._refresh_interval:
            return False
        if self._inflight is not None:
            return True
        return not self._failed or now - self._attempted_at >= self._failure_backoff

    def _start_fetch(self) -> asyncio.Task[None]:
        if self._inflight is None:
            self._attempted_at = self._clock()
            # Shared by every caller: not bounded by the deadline of the one that started it.
            task = asyncio.get_running_loop().create_task(
                self._fetch_and_load(), context=unbounded_context()
            )
            self._inflight = task
            task.add_done_callback(self._fetch_done)
        return self._inflight

    def _fetch_done(self, task: asyncio.Task[None]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _fetch_and_load(self) -> None:
        self.fetches += 1
        try:
            document = await self._fetch()
            self.load(document)
        # Whatever the fetch raised (network, HTTP status, a bad document), the keys we
        # already have are still the best answer; the failure is only worth a warning.
        except Exception as exc:
            self._failed = True
            log.warning(
                "jwks fetch failed, keeping the keys already loaded",
                error=f"{type(exc).__name__}: {exc}",
                keys=len(self._keys),
            )


# -- verification ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token speaks for, and what it allows."""

    tenant: str
    plan: str
    roles: frozenset[str]
    scopes: frozenset[str]
    token_id: str
    expires_at: float
    # Kept so the token can be forwarded to internal services; out of repr so that
    # logging a Principal never logs a bearer credential.
    token: str = field(repr=False)
    # The API key the token was minted from (its `client_id`); None for tokens that
    # name none.
    key_id: str | None = None

    def has_role(self, role: str) -> bool:
        return role in self.roles

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes


def _numeric_date(claims: Mapping[str, Any], name: str) -> float:
    value = claims.get(name)
    # jose accepts anything int() accepts ("123", 1.5, True); we take JSON numbers only.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken(f"{name} is not a number")
    try:
        number = float(value)
    except OverflowError:
        raise InvalidToken(f"{name} is out of range") from None
    if not math.isfinite(number):
        raise InvalidToken(f"{name} is out of range")
    return number


def _non_empty_str(claims: Mapping[str, Any], name: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidToken(f"{name} is not a non-empty string")
    return value


class TokenVerifier:
    """Checks narthex JWTs against a JwksCache; remembers the tokens it has accepted.

    `clock` is wall-clock time (exp/nbf are Unix times); injectable for tests. The time
    checks are made against it as well as by jose, so the cache and a fresh verification
    always agree on when a token stops being valid.
    """

    def __init__(
        self,
        jwks: JwksCache,
        *,
        issuer: str,
        audience: str,
        cache_size: int = 10_000,
        leeway: int = DEFAULT_LEEWAY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.jwks = jwks
        self.issuer = issuer
        self.audience = audience
        self._cache_size = cache_size
        self._leeway = leeway
        self._clock = clock
        self._options = {**_DECODE_OPTIONS, "leeway": leeway}
        # The same token string is presented again and again until it expires; the
        # signature check is the expensive part, so accepted tokens are remembered.
        self._cache: OrderedDict[str, Principal] = OrderedDict()
        # kid -> (the JWK mapping it was built from, jose's key): rebuilt only when the
        # JwksCache hands out a different mapping for the kid (a reload).
        self._jose_keys: dict[str, tuple[Mapping[str, Any], Key]] = {}

    async def verify(self, token: str) -> Principal:
        # Before the cache lookup, which would otherwise hash an arbitrarily long string.
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("too long")
        cached = self._cache.get(token)
        if cached is not None:
            # The dict key is the whole token string, so an entry is only ever returned
            # for exactly the token that was verified.
            if self._clock() <= cached.expires_at + self._leeway:
                self._cache.move_to_end(token)
                return cached
            del self._cache[token]
            raise InvalidToken("expired")
        principal = await self._verify(token)
        if self._cache_size > 0:
            self._cache[token] = principal
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return principal

    async def _verify(self, token: str) -> Principal:
        if not _JWT_SHAPE.fullmatch(token):
            raise InvalidToken("malformed")
        try:
            header = jwt.get_unverified_header(token)
        except Exception:  # jose wraps its own errors, but this is hostile input: never a 500
            raise InvalidToken("malformed header") from None
        # Pinned before any key is touched: this is what defeats `alg: none` and
        # HS256-signed-with-the-public-key, whatever jose would do with them.
        if header.get("alg") != ALGORITHM:
            raise InvalidToken("algorithm not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > _MAX_KID_LENGTH:
            raise InvalidToken("missing kid")
        # RFC 7515: a critical extension we do not understand means reject.
        if "crit" in header:
            raise InvalidToken("unsupported critical header")
        jwk_data = await self.jwks.key(kid)
        if jwk_data is None:
            raise InvalidToken("unknown kid")
        try:
            claims = jwt.decode(
                token,
                self._jose_key(kid, jwk_data),
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                options=self._options,
            )
        except ExpiredSignatureError:
            raise InvalidToken("expired") from None
        except Exception as exc:  # every jose failure, and anything odd in it, is a 401
            raise InvalidToken(f"rejected: {type(exc).__name__}: {exc}") from None
        return self._principal(token, claims)

    def _jose_key(self, kid: str, jwk_data: Mapping[str, Any]) -> Key:
        known = self._jose_keys.get(kid)
        if known is not None and known[0] is jwk_data:
            return known[1]
        built = CryptographyRSAKey(dict(jwk_data), ALGORITHM)
        if len(self._jose_keys) >= 64:  # kids only ever come from the JWKS, but stay bounded
            self._jose_keys.clear()
        self._jose_keys[kid] = (jwk_data, built)
        return built

    def _principal(self, token: str, claims: Mapping[str, Any]) -> Principal:
        now = self._clock()
        expires_at = _numeric_date(claims, "exp")
        not_before = _numeric_date(claims, "nbf")
        _numeric_date(claims, "iat")
        if now > expires_at + self._leeway:
            raise InvalidToken("expired")
        if not_before > now + self._leeway:
            raise InvalidToken("not yet valid")
        roles = claims.get("roles")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise InvalidToken("roles is not a list of strings")
        scope = claims.get("scope")
        if not isinstance(scope, str):
            raise InvalidToken("scope is not a string")
        client_id = claims.get("client_id")
        if client_id is not None and (not isinstance(client_id, str) or not client_id):
            raise InvalidToken("client_id is not a non-empty string")
        return Principal(
            tenant=_non_empty_str(claims, "sub"),
            plan=_non_empty_str(claims, "plan"),
            roles=frozenset(roles),
            scopes=frozenset(scope.split()),
            token_id=_non_empty_str(claims, "jti"),
            expires_at=expires_at,
            token=token,
            key_id=client_id,
        )


# -- API keys -------------------------------------------------------------------------------

API_KEY_PREFIX = "nx_"
_KEY_ID_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits
_KEY_ID_LENGTH = 16
_SECRET_LENGTH = 40
_ENV = re.compile(r"[a-z]{2,8}")
# No part can contain "_", so the split into env, id and secret is unambiguous.
_API_KEY = re.compile(r"nx_([a-z]{2,8})_([a-z0-9]{16})_([A-Za-z0-9]{40})")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A parsed `nx_<env>_<id>_<secret>` key. Only the secret's hash is ever stored."""

    env: str
    key_id: str
    secret: str = field(repr=False)

    def __post_init__(self) -> None:
        # Validated here so that every ApiKey prints as a key parse_api_key accepts.
        if _API_KEY.fullmatch(f"nx_{self.env}_{self.key_id}_{self.secret}") is None:
            raise ValueError("not a valid API key")

    @property
    def prefix(self) -> str:
        """`nx_<env>_<id>`: names the key in listings and logs without revealing it."""
        return f"{API_KEY_PREFIX}{self.env}_{self.key_id}"

    def __str__(self) -> str:
        return f"{self.prefix}_{self.secret}"


def generate_api_key(env: str) -> ApiKey:
    if _ENV.fullmatch(env) is None:
        raise ValueError("env must be 2 to 8 lowercase letters")
    key_id = "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(_KEY_ID_LENGTH))
    secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(_SECRET_LENGTH))
    return ApiKey(env, key_id, secret)


def parse_api_key(value: str) -> ApiKey | None:
    match = _API_KEY.fullmatch(value)
    if match is None:
        return None
    env, key_id, secret = match.groups()
    return ApiKey(env, key_id, secret)


def looks_like_api_key(value: str) -> bool:
    """Tells an API key from a JWT in `Authorization: Bearer` (a JWT starts with `eyJ`)."""
    return value.startswith(API_KEY_PREFIX)


def hash_secret(pepper: str, secret: str) -> str:
    # The secret has ~238 random bits, so a fast hash is enough; the pepper (kept out of
    # the database) makes a stolen table useless on its own.
    return hashlib.sha256((pepper + secret).encode("utf-8")).hexdigest()


def secret_matches(pepper: str, secret: str, stored_hash: str) -> bool:
    # Compared as bytes: compare_digest refuses non-ASCII str, and a stored value is data.
    computed = hash_secret(pepper, secret).encode("ascii")
    return hmac.compare_digest(computed, stored_hash.encode("utf-8"))


def cache_key(api_key: str) -> str:
    """What the gateway files an exchanged token under, so the key itself is never kept."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()
