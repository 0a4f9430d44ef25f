"""JWTs made by hand, as a forger or a broken issuer would make them, and read without checks:
for the tests and benchmarks that prove an edge refuses them. Tokens auth would issue come
from `narthex.common.tokens.issue_token`, not from here."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from narthex.common.tokens import SigningKey

__all__ = [
    "b64url",
    "b64url_decode",
    "b64url_json",
    "public_pem",
    "rs256",
    "unsigned",
    "unverified",
]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url_json(value: Mapping[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a JWT, decoded without checking anything."""
    header, payload, _ = token.split(".")
    return json.loads(b64url_decode(header)), json.loads(b64url_decode(payload))


def rs256(key: SigningKey, claims: Mapping[str, Any], *, kid: str | None = None) -> str:
    """A JWT signed with `key` exactly as given: no claim is added, checked or fixed; `kid`
    (default: the key's own) may name another key."""
    header = {"alg": "RS256", "typ": "JWT", "kid": key.kid if kid is None else kid}
    signing_input = f"{b64url_json(header)}.{b64url_json(claims)}".encode()
    signature = key.private_key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input.decode()}.{b64url(signature)}"


def unsigned(claims: Mapping[str, Any], **header: str) -> str:
    """`alg: none`, no signature: what a verifier that trusts the header would accept."""
    return f"{b64url_json({'alg': 'none', 'typ': 'JWT', **header})}.{b64url_json(claims)}."


def public_pem(jwk: Mapping[str, Any]) -> bytes:
    """An RSA JWK as a PEM public key (what HAProxy's jwt_verify reads, and the secret of
    the HS256 key-confusion attack)."""
    numbers = rsa.RSAPublicNumbers(
        int.from_bytes(b64url_decode(jwk["e"]), "big"),
        int.from_bytes(b64url_decode(jwk["n"]), "big"),
    )
    return numbers.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
