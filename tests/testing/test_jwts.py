"""Hand-made JWTs: what they claim is what was given, and only a real signature verifies."""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives import serialization
from jose import jwt

from narthex.common.tokens import InvalidToken, SigningKey
from narthex.testing.jwts import public_pem, rs256, unsigned, unverified
from tests.support import tokens

CLAIMS = {"iss": "narthex-auth", "aud": "narthex", "sub": "t_acme", "exp": 2_000_000_000}


def test_rs256_signs_exactly_the_claims_given_under_the_kid_given() -> None:
    token = rs256(tokens.KEY, CLAIMS)
    assert unverified(token) == ({"alg": "RS256", "typ": "JWT", "kid": tokens.KEY.kid}, CLAIMS)
    pem = public_pem(tokens.KEY.public_jwk())
    assert jwt.decode(token, pem.decode(), algorithms=["RS256"], audience="narthex") == CLAIMS
    assert unverified(rs256(tokens.KEY, CLAIMS, kid="another"))[0]["kid"] == "another"


async def test_a_real_key_verifies_and_another_key_under_its_kid_does_not() -> None:
    now = int(time.time())
    claims = {**unverified(tokens.token(["tenant"], ["inference"]))[1], "exp": now + 60}
    verifier = tokens.verifier()
    assert (await verifier.verify(rs256(tokens.KEY, claims))).tenant == "t_acme"
    stranger = SigningKey.generate()
    with pytest.raises(InvalidToken):
        await verifier.verify(rs256(stranger, claims, kid=tokens.KEY.kid))
    with pytest.raises(InvalidToken):
        await verifier.verify(unsigned(claims, kid=tokens.KEY.kid))


def test_unsigned_is_alg_none_with_an_empty_signature() -> None:
    token = unsigned(CLAIMS, kid="k1")
    assert token.endswith(".")
    assert unverified(token) == ({"alg": "none", "typ": "JWT", "kid": "k1"}, CLAIMS)


def test_public_pem_is_the_keys_own_public_key() -> None:
    own = tokens.KEY.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert public_pem(tokens.KEY.public_jwk()) == own
