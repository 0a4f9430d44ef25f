"""narthex.common.apikeys: the key format, generation, parsing and the peppered hash."""

from __future__ import annotations

import hashlib

import pytest

from narthex.common.apikeys import (
    ApiKey,
    cache_key,
    generate_api_key,
    hash_secret,
    looks_like_api_key,
    parse_api_key,
    secret_matches,
)


def test_api_key_round_trip() -> None:
    key = generate_api_key("live")
    text = str(key)
    assert text.startswith("nx_live_")
    assert key.prefix == f"nx_live_{key.key_id}"
    assert text == f"{key.prefix}_{key.secret}"
    assert len(key.key_id) == 16
    assert set(key.key_id) <= set("abcdefghijklmnopqrstuvwxyz0123456789")
    assert len(key.secret) == 40
    assert key.secret.isalnum()
    assert key.secret.isascii()
    assert parse_api_key(text) == key
    assert looks_like_api_key(text)
    assert key.secret not in repr(key)


def test_generated_keys_differ() -> None:
    keys = [generate_api_key("test") for _ in range(50)]
    assert len({str(k) for k in keys}) == 50
    assert len({k.key_id for k in keys}) == 50
    assert len({k.secret for k in keys}) == 50


@pytest.mark.parametrize("env", ["", "a", "toolonger", "Live", "li_ve", "l1ve"])
def test_generate_refuses_bad_env(env: str) -> None:
    with pytest.raises(ValueError, match="env"):
        generate_api_key(env)


SECRET = "A" * 20 + "b" * 10 + "0123456789"
KEY_ID = "abcdefgh12345678"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "nx_",
        "xx_live_" + KEY_ID + "_" + SECRET,
        "NX_live_" + KEY_ID + "_" + SECRET,
        " nx_live_" + KEY_ID + "_" + SECRET,
        "nx_live_" + KEY_ID + "_" + SECRET + "\n",
        "nx_live_" + KEY_ID,
        "nx_live_" + KEY_ID + "_",
        "nx__" + KEY_ID + "_" + SECRET,
        "nx_live__" + SECRET,
        "nx_live_" + KEY_ID + "_" + SECRET[:-1],
        "nx_live_" + KEY_ID + "_" + SECRET + "A",
        "nx_live_" + KEY_ID + "_" + SECRET[:-1] + "_",
        "nx_live_" + KEY_ID + "_" + SECRET[:20] + "_" + SECRET[21:],
        "nx_live_" + KEY_ID + "_" + SECRET[:-1] + "-",
        "nx_live_" + KEY_ID + "_" + SECRET[:-1] + "é",
        "nx_live_" + KEY_ID.upper() + "_" + SECRET,
        "nx_live_" + KEY_ID[:-1] + "_" + SECRET,
        "nx_l_" + KEY_ID + "_" + SECRET,
        "nx_toolonger_" + KEY_ID + "_" + SECRET,
        "nx_live_extra_" + KEY_ID + "_" + SECRET,
        "eyJhbGciOiJSUzI1NiJ9.e30.AAAA",
    ],
)
def test_parse_rejects(value: str) -> None:
    assert parse_api_key(value) is None


def test_parse_accepts_the_exact_format() -> None:
    parsed = parse_api_key(f"nx_live_{KEY_ID}_{SECRET}")
    assert parsed == ApiKey("live", KEY_ID, SECRET)
    with pytest.raises(ValueError, match="API key"):
        ApiKey("live", KEY_ID, SECRET + "_x")


def test_looks_like_api_key() -> None:
    assert looks_like_api_key("nx_anything")
    assert not looks_like_api_key("eyJhbGciOiJSUzI1NiJ9.e30.AAAA")
    assert not looks_like_api_key("NX_live")
    assert not looks_like_api_key("")


def test_hash_secret_and_secret_matches() -> None:
    key = generate_api_key("test")
    stored = hash_secret("pepper", key.secret)
    assert stored == hashlib.sha256(("pepper" + key.secret).encode()).hexdigest()
    assert secret_matches("pepper", key.secret, stored)
    wrong_last = "y" if key.secret.endswith("x") else "x"  # always a different secret
    assert not secret_matches("pepper", key.secret[:-1] + wrong_last, stored)
    assert not secret_matches("other-pepper", key.secret, stored)
    assert not secret_matches("pepper", key.secret, stored.upper())
    assert not secret_matches("pepper", key.secret, "")
    assert not secret_matches("pepper", key.secret, "é" * 64)


def test_cache_key_hashes_the_whole_key() -> None:
    key = str(generate_api_key("test"))
    assert cache_key(key) == hashlib.sha256(key.encode()).hexdigest()
    assert key not in cache_key(key)
    assert cache_key(key) != cache_key(str(generate_api_key("test")))
