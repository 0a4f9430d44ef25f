"""What a limited request costs: its body decoded once, its items counted, and the canonical
form of what was counted, which is what goes upstream.

The upstreams read bodies more leniently than a plain UTF-8 parser: FastAPI's `json.loads`
takes a UTF-8 BOM and UTF-16/32 (with or without a BOM), inference undoes gzip and deflate.
A gateway that counted with a stricter parser, charged 1 for what it could not read and
forwarded the bytes anyway would let any such body through at the price of one item. So
the gateway never forwards a body it did not count: it undoes the content codings
(`narthex.common.codings`, the decoder and caps inference uses), decodes the text (the
Content-Type's `charset`, else what `json.loads` detects: BOM or the zero-byte pattern),
parses it, counts, and forwards UTF-8 JSON with no BOM and no `Content-Encoding`; any body
it cannot read is refused here with a 4xx. Open Inference Protocol requests with binary
tensors (`Inference-Header-Content-Length`) have only their JSON header decoded and counted;
the tensor bytes after it go on as they are, behind the canonical header.

Plain UTF-8 JSON, the common case, is parsed once with orjson and forwarded untouched.
"""

from __future__ import annotations

import asyncio
import codecs
import json
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

import orjson

from narthex.common.codings import UnsupportedMediaType, decode_content
from narthex.gateway.errors import InvalidBody

__all__ = ["Counted", "count", "count_request", "forwarded_headers"]

HEADER_LENGTH: Final = b"inference-header-content-length"
JSON_TYPE: Final = b"application/json"
BINARY_TYPE: Final = b"application/octet-stream"
# The encodings JSON may come in (RFC 8259 §8.1 and its predecessor, what json.loads
# detects), by Python codec name; ASCII is UTF-8's subset.
_UNICODE: Final = frozenset(
    {"utf-8", "ascii", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"}
)
_BOM: Final = "\ufeff"


class Counted(NamedTuple):
    """A limited request's body as it goes upstream, and what it costs.

    `document` is the parsed JSON (the OIP header for a binary request), None without a
    body. `header_length` is the OIP JSON header's length in `body` when binary tensors
    follow it. `rewritten`: the request headers must be rewritten to describe `body`
    (no `Content-Encoding`, one Content-Type, the header length), because the body
    changed or the client's headers did not say what it is.
    """

    body: bytes
    cost: int
    document: Any = None
    header_length: int | None = None
    rewritten: bool = False


class _Described(NamedTuple):
    """What a request's headers say about its body."""

    content_type: bytes | None
    codings: list[str]
    header_lengths: list[bytes]


def _describe(raw_headers: Sequence[tuple[bytes, bytes]]) -> _Described:
    content_type: bytes | None = None
    codings: list[str] = []
    lengths: list[bytes] = []
    for name, value in raw_headers:
        if name == b"content-type":
            if content_type is not None:
                raise InvalidBody("the request has more than one Content-Type")
            content_type = value
        elif name == b"content-encoding":
            codings.append(value.decode("latin-1"))
        elif name == HEADER_LENGTH:
            lengths.append(value)
    return _Described(content_type, codings, lengths)


def count_request(
    raw_headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
    field: str,
    *,
    binary_tensors: bool = False,
    limit: int,
) -> Counted:
    """Decode `body` (read with `raw_headers`), count the items at `field`, and give the
    body to forward. `binary_tensors`: an Open Inference Protocol route, whose cost is the
    batch dimension of its inputs. `limit` caps the decoded body. 4xx on a body that cannot
    be decoded or is not JSON."""
    if not body:
        return Counted(body, 1)
    return _count(_describe(raw_headers), body, field, binary_tensors, limit)


async def count(
    raw_headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
    field: str,
    *,
    binary_tensors: bool = False,
    limit: int,
) -> Counted:
    """`count_request`, with a compressed body decoded in a worker thread: inflating up to
    `limit` bytes takes milliseconds (zlib lets go of the GIL meanwhile), which the event
    loop, serving every other request, should not wait out."""
    if not body:
        return Counted(body, 1)
    described = _describe(raw_headers)
    if described.codings:
        return await asyncio.to_thread(_count, described, body, field, binary_tensors, limit)
    return _count(described, body, field, binary_tensors, limit)


def _count(
    described: _Described, body: bytes, field: str, binary_tensors: bool, limit: int
) -> Counted:
    content_type, codings, lengths = described
    charset = _charset(content_type) if content_type is not None else None
    decoded = decode_content(body, codings, limit=limit) if codings else body
    rewritten = bool(codings) or content_type != JSON_TYPE

    header_length = _header_length(lengths, len(decoded), binary_tensors)
    if header_length is None:
        forward, document = _canonical_json(decoded, charset)
        cost = _batch(document) if binary_tensors else _items(document, field)
        rewritten = rewritten or forward is not body
        return Counted(forward, cost, document, None, rewritten)
    header = decoded[:header_length]
    canonical, document = _canonical_json(header, charset)
    if canonical is not header:
        decoded = canonical + decoded[header_length:]
    return Counted(decoded, _batch(document), document, len(canonical), rewritten=True)


def forwarded_headers(
    headers: list[tuple[bytes, bytes]], counted: Counted
) -> list[tuple[bytes, bytes]]:
    """`headers` (those going upstream) describing `counted.body`: no content coding, one
    Content-Type, and the OIP header length of the canonical header."""
    if not counted.rewritten:
        return headers
    kept = [
        (name, value)
        for name, value in headers
        if name not in (b"content-encoding", b"content-type", HEADER_LENGTH)
    ]
    if counted.header_length is None:
        kept.append((b"content-type", JSON_TYPE))
    else:
        kept.append((b"content-type", BINARY_TYPE))
        kept.append((HEADER_LENGTH, b"%d" % counted.header_length))
    return kept


# -- decoding ------------------------------------------------------------------------------


def _charset(content_type: bytes) -> str | None:
    """The Content-Type's `charset`, as a Python codec name; 415 for one that JSON is never
    written in (or that Python does not know)."""
    for param in content_type.split(b";")[1:]:
        name, _, value = param.partition(b"=")
        if name.strip().lower() != b"charset":
            continue
        label = value.strip().strip(b'"').decode("latin-1")
        try:
            codec = codecs.lookup(label).name
        except LookupError:
            codec = ""
        if codec not in _UNICODE:
            raise UnsupportedMediaType(
                f"unsupported charset {label[:40]!r}: JSON is read as UTF-8, UTF-16 or UTF-32"
            )
        return codec
    return None


def _canonical_json(raw: bytes, charset: str | None) -> tuple[bytes, Any]:
    """(UTF-8 JSON without a BOM, the document): `raw` itself when it is that already."""
    # Valid UTF-8 JSON never begins with these: a UTF-8 BOM (EF), a UTF-16/32 BOM (FF, FE,
    # 00), or a NUL in its first two bytes (how json.loads spots UTF-16/32 without a BOM).
    wide = raw[:1] in (b"\xef", b"\xff", b"\xfe", b"\x00") or raw[1:2] == b"\x00"
    if not wide and charset in (None, "utf-8", "ascii"):
        try:
            document = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidBody(f"the request body is not valid JSON: {exc}") from None
        if charset == "ascii" and not raw.isascii():
            raise InvalidBody("the request body is not ASCII, as its charset says")
        return raw, document
    text = _text(raw, charset)
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidBody(f"the request body is not valid JSON: {exc}") from None
    return text.encode(), document


def _text(raw: bytes, charset: str | None) -> str:
    """`raw` decoded as its charset says, or as `json.loads` would find it, BOM removed."""
    detected: str = json.detect_encoding(raw)
    if charset is None:
        encoding = detected
    elif charset == "utf-8":
        encoding = "utf-8-sig"
    elif charset in ("utf-16", "utf-32"):
        # No byte order named: the BOM's, or the zero bytes' (JSON begins with ASCII).
        encoding = detected if detected.startswith(charset) else charset
    else:
        encoding = charset
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError:
        raise InvalidBody(f"the request body is not valid {encoding.upper()} text") from None
    # The utf-8-sig, utf-16 and utf-32 codecs take the BOM off; those with a byte order
    # named leave it in the text.
    return text[1:] if encoding.endswith(("le", "be")) and text.startswith(_BOM) else text


def _header_length(values: list[bytes], size: int, binary_tensors: bool) -> int | None:
    """The OIP JSON header's length, None when the whole body is JSON."""
    if not binary_tensors or not values:
        return None
    if len(set(values)) > 1:
        raise InvalidBody("Inference-Header-Content-Length is given twice, differently")
    text = values[0].strip()
    # The same rule as inference's: plain ASCII digits, nothing int() would also take.
    if not (text.isdigit() and len(text) <= 18):
        raise InvalidBody("Inference-Header-Content-Length must be a non-negative integer")
    length = int(text)
    if length > size:
        raise InvalidBody(
            f"Inference-Header-Content-Length is {length} but the request body is {size} bytes"
        )
    return length


# -- counting ------------------------------------------------------------------------------


def _items(document: Any, field: str) -> int:
    """The length of the list at `field`; a single value (a text) is one item, and so is a
    body the upstream will refuse for its shape (it serves nothing)."""
    value = document.get(field) if type(document) is dict else None
    return len(value) if type(value) is list and value else 1


def _batch(document: Any) -> int:
    """An inference request's batch: the largest first dimension among its inputs (the
    upstream refuses inputs whose batches differ)."""
    inputs = document.get("inputs") if type(document) is dict else None
    batch = 1
    if type(inputs) is list:
        for tensor in inputs:
            shape = tensor.get("shape") if type(tensor) is dict else None
            # Exact types, as inference checks them: True is no dimension.
            if type(shape) is list and shape and type(shape[0]) is int and shape[0] > batch:
                batch = shape[0]
    return batch
