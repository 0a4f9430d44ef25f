"""Request content codings (gzip, deflate) undone under caps: one decoder for every service.

The gateway decodes a limited request's body to count its items and forwards it decoded;
inference decodes Open Inference Protocol bodies sent to it directly. Both use
`decode_content`, so both accept the same codings within the same caps:

- the decoded body may not exceed `limit` bytes (decompression stops one byte past it, so
  a small "zip bomb" costs no more than `limit` bytes of memory);
- at most `MAX_CODINGS` codings may be stacked (`Content-Encoding: gzip, deflate`);
- a gzip body may hold at most `MAX_GZIP_MEMBERS` members back to back. Each member costs a
  fresh decompressor, and the input is fed in bounded pieces, so a body of many tiny
  members decodes in linear time (handing zlib the whole rest of the body per member, as
  `unused_data` does, is quadratic in the member count).

Refusals are problems a client may see: 415 for a coding not offered, 413 for a body that
decodes past the cap, 400 for a corrupt or truncated one.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import Final

from narthex.common.errors import BadRequest, PayloadTooLarge, Problem

__all__ = [
    "MAX_CODINGS",
    "MAX_GZIP_MEMBERS",
    "UnsupportedMediaType",
    "content_codings",
    "decode_content",
]

MAX_CODINGS: Final = 2
# HTTP clients write one member; concatenated files a few. bgzip-style streams of many
# 64 KiB members are not something an API client sends.
MAX_GZIP_MEMBERS: Final = 16
# zlib is fed this much input at a time: what is left over at a member's end (copied by
# zlib into `unused_data`) is at most this, whatever the body's size.
_FEED: Final = 64 << 10
_GZIP: Final = 16 + zlib.MAX_WBITS
_NAMES: Final = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate", "identity": "identity"}


class UnsupportedMediaType(Problem):
    status, type_slug, title = 415, "unsupported-media-type", "Unsupported media type"


def content_codings(values: Iterable[str]) -> list[str]:
    """The codings that `Content-Encoding` header values name, in the order applied, without
    `identity`; 415 for one not offered, or more than `MAX_CODINGS`."""
    codings: list[str] = []
    for value in values:
        for token in value.split(","):
            name = token.strip().lower()
            if not name:
                continue
            coding = _NAMES.get(name)
            if coding is None:
                shown = token.strip()[:40]
                raise UnsupportedMediaType(
                    f"unsupported Content-Encoding {shown!r} (supported: gzip, deflate)"
                )
            if coding != "identity":
                codings.append(coding)
    if len(codings) > MAX_CODINGS:
        raise UnsupportedMediaType(
            f"the body has {len(codings)} content codings; at most {MAX_CODINGS} are accepted"
        )
    return codings


def decode_content(
    body: bytes, content_encoding: Iterable[str] | str | None, *, limit: int
) -> bytes:
    """`body` with its `Content-Encoding` (gzip, deflate, identity, or a list of them) undone,
    at most `limit` bytes once decoded."""
    if content_encoding is None:
        values: Iterable[str] = ()
    elif isinstance(content_encoding, str):
        values = (content_encoding,)
    else:
        values = content_encoding
    codings = content_codings(values)
    if not codings and len(body) > limit:
        raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
    # Codings are listed in the order they were applied: undo the last one first.
    for coding in reversed(codings):
        body = _gunzip(body, limit) if coding == "gzip" else _inflate(body, limit)
    return body


def _inflate(body: bytes, limit: int) -> bytes:
    # HTTP's "deflate" is the zlib format (what tritonclient sends), but some clients send a
    # raw deflate stream; a zlib header is recognisable by its checksum.
    looks_zlib = len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0
    wbits = zlib.MAX_WBITS if looks_zlib else -zlib.MAX_WBITS
    chunks: list[bytes] = []
    end, _ = _stream(body, 0, wbits, "deflate", limit, 0, chunks)
    if end != len(body):
        raise BadRequest("the deflate request body has data after its end")
    return b"".join(chunks)


def _gunzip(body: bytes, limit: int) -> bytes:
    chunks: list[bytes] = []
    position = total = 0
    for _ in range(MAX_GZIP_MEMBERS):
        position, total = _stream(body, position, _GZIP, "gzip", limit, total, chunks)
        # gzip allows several members back to back; anything else after the end is corrupt.
        if position == len(body):
            return b"".join(chunks)
    raise BadRequest(f"the gzip request body has more than {MAX_GZIP_MEMBERS} members")


def _stream(
    body: bytes, start: int, wbits: int, name: str, limit: int, total: int, out: list[bytes]
) -> tuple[int, int]:
    """Decode the one compressed stream that begins at `start`, appending to `out`: where it
    ends in `body`, and the decoded total so far (`total` before it), within `limit`."""
    view = memoryview(body)
    decompressor = zlib.decompressobj(wbits)
    position = start
    while not decompressor.eof:
        if position >= len(body):
            raise BadRequest(f"the {name} request body is truncated")
        piece = view[position : position + _FEED]
        try:
            # max_length one past the room left: reaching it means the cap is exceeded.
            chunk = decompressor.decompress(piece, limit - total + 1)
        except zlib.error:
            raise BadRequest(f"the {name} request body is corrupt") from None
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"the request body decompresses to more than {limit} bytes")
        out.append(chunk)
        # Below max_length zlib takes the whole piece, or stops at the stream's end and
        # leaves the rest of the piece (at most _FEED bytes) in unused_data.
        position += len(piece) - len(decompressor.unused_data)
    return position, total
