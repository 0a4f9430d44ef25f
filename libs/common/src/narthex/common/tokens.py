"""Access tokens: signing keys, issuing RS256 JWTs, and verifying them into a Principal."""

from __future__ import annotations

import math
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwt
from jose.backends.base import Key

# Named, not left to jose's fallback chain: the pure-python `rsa` backend is slow and
# has a history of timing side channels.
from jose.backends.cryptography_backend import CryptographyRSAKey
from jose.exceptions import ExpiredSignatureError

from narthex.common.errors import Unauthorized
from narthex.common.jwks import ALGORITHM, MIN_RSA_BITS, JwksCache, b64url_uint, thumbprint

__all__ = [
    "DEFAULT_LEEWAY",
    "DEFAULT_TTL",
    "MAX_TOKEN_LENGTH",
    "InvalidToken",
    "Principal",
    "SigningKey",
    "TokenVerifier",
    "issue_token",
]

DEFAULT_TTL = 900
DEFAULT_LEEWAY = 30
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


# -- signing ------------------------------------------------------------------------------------


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
        n, e = b64url_uint(numbers.n), b64url_uint(numbers.e)
        self.kid = thumbprint(n, e)
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
