"""Content codings undone under caps: the one decoder the gateway and inference share."""

from __future__ import annotations

import gzip
import zlib

import pytest

from narthex.common import codings
from narthex.common.codings import (
    MAX_CODINGS,
    MAX_GZIP_MEMBERS,
    UnsupportedMediaType,
    content_codings,
    decode_content,
)
from narthex.common.errors import BadRequest, PayloadTooLarge


def raw_deflate(data: bytes) -> bytes:
    return zlib.compress(data, wbits=-zlib.MAX_WBITS)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, []),
        ("identity", []),
        ("gzip", ["gzip"]),
        (" X-GZIP ", ["gzip"]),
        ("deflate", ["deflate"]),
        ("gzip, identity", ["gzip"]),
        ("deflate, gzip", ["deflate", "gzip"]),
        (["deflate", "gzip"], ["deflate", "gzip"]),  # two header lines, in order
    ],
)
def test_content_codings_are_named_in_the_order_applied(
    header: str | list[str] | None, expected: list[str]
) -> None:
    values = [] if header is None else [header] if isinstance(header, str) else header
    assert content_codings(values) == expected


def test_codings_not_offered_or_stacked_too_deep_are_415() -> None:
    with pytest.raises(UnsupportedMediaType, match=r"'br' \(supported: gzip, deflate\)"):
        content_codings(["gzip, br"])
    assert UnsupportedMediaType.status == 415
    with pytest.raises(UnsupportedMediaType, match=f"at most {MAX_CODINGS}"):
        content_codings([", ".join(["gzip"] * (MAX_CODINGS + 1))])


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", raw_deflate),
        ("gzip, deflate", lambda data: zlib.compress(gzip.compress(data))),
        ("deflate, gzip", lambda data: gzip.compress(zlib.compress(data))),
        ("identity", lambda data: data),
        (None, lambda data: data),
    ],
    ids=[
        "gzip",
        "deflate-zlib",
        "deflate-raw",
        "gzip-then-deflate",
        "deflate-then-gzip",
        "id",
        "none",
    ],
)
def test_round_trip(encoding: str | None, compress: object) -> None:
    body = b'{"input": ["a", "b"]}' * 1000
    assert callable(compress)
    assert decode_content(compress(body), encoding, limit=len(body)) == body


def test_a_body_larger_than_the_feed_piece_decodes_whole() -> None:
    body = bytes(range(256)) * ((3 * codings._FEED) // 256 + 7)
    assert decode_content(gzip.compress(body), "gzip", limit=len(body)) == body
    members = gzip.compress(body) + gzip.compress(body[:1000])
    assert decode_content(members, "gzip", limit=len(body) + 1000) == body + body[:1000]


def test_decompression_bomb_is_refused() -> None:
    bomb = gzip.compress(b"\0" * (8 << 20))
    assert len(bomb) < 16 << 10
    with pytest.raises(PayloadTooLarge, match="decompresses to more than 1048576 bytes"):
        decode_content(bomb, "gzip", limit=1 << 20)
    with pytest.raises(PayloadTooLarge, match="decompresses to more than"):
        decode_content(zlib.compress(b"\0" * (8 << 20)), "deflate", limit=1 << 20)
    # Nested: the cap holds at every layer, not only the last.
    with pytest.raises(PayloadTooLarge):
        decode_content(gzip.compress(bomb), "gzip, gzip", limit=1 << 20)
    exact = gzip.compress(b"\0" * 100)
    assert decode_content(exact, "gzip", limit=100) == b"\0" * 100
    with pytest.raises(PayloadTooLarge, match="more than 99 bytes"):
        decode_content(exact, "gzip", limit=99)


def test_gzip_members_are_concatenated_and_limited_together() -> None:
    body = gzip.compress(b"abc") + gzip.compress(b"def")
    assert decode_content(body, "gzip", limit=6) == b"abcdef"
    with pytest.raises(PayloadTooLarge, match="more than 5 bytes"):
        decode_content(body, "gzip", limit=5)


def test_gzip_member_count_is_capped() -> None:
    # Many tiny members decoded in quadratic time on the event loop before the cap (and the
    # bounded feed): 40k of them fit in a 1 MiB body.
    member = gzip.compress(b"x")
    allowed = member * MAX_GZIP_MEMBERS
    assert decode_content(allowed, "gzip", limit=1 << 20) == b"x" * MAX_GZIP_MEMBERS
    with pytest.raises(BadRequest, match=f"more than {MAX_GZIP_MEMBERS} members"):
        decode_content(allowed + member, "gzip", limit=1 << 20)
    with pytest.raises(BadRequest, match="members"):
        decode_content(member * ((1 << 20) // len(member)), "gzip", limit=1 << 20)


@pytest.mark.parametrize(
    ("body", "encoding", "error", "message"),
    [
        (gzip.compress(b"x" * 100)[:-5], "gzip", BadRequest, "gzip request body is truncated"),
        (b"not gzip at all", "gzip", BadRequest, "gzip request body is corrupt"),
        (b"", "gzip", BadRequest, "gzip request body is truncated"),
        (gzip.compress(b"abc") + b"junk", "gzip", BadRequest, "gzip request body is corrupt"),
        (zlib.compress(b"abc") + b"junk", "deflate", BadRequest, "deflate request body has data"),
        (b"abc", "br", UnsupportedMediaType, r"unsupported Content-Encoding 'br'"),
        (b"abc", "gzip, br", UnsupportedMediaType, "unsupported Content-Encoding"),
        (b"x" * 11, "identity", PayloadTooLarge, "larger than 10 bytes"),
    ],
)
def test_bad_compressed_bodies_are_refused(
    body: bytes, encoding: str, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        decode_content(body, encoding, limit=10 if encoding == "identity" else 1000)
