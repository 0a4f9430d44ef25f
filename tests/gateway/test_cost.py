"""A limited request's body decoded once: every encoding an upstream reads is counted exactly,
and what is forwarded is the UTF-8 JSON that was counted (or the request is refused)."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from narthex.common.codings import UnsupportedMediaType
from narthex.common.errors import PayloadTooLarge
from narthex.gateway.cost import (
    BINARY_TYPE,
    HEADER_LENGTH,
    JSON_TYPE,
    count,
    count_request,
    forwarded_headers,
)
from narthex.gateway.errors import InvalidBody

LIMIT = 1 << 20
TEXTS = {"input": [f"text {i} \u00e9\u2603\U0001f600" for i in range(40)], "model": "minilm"}
PLAIN = json.dumps(TEXTS, ensure_ascii=False)

Encoder = Callable[[str], bytes]
ENCODINGS: dict[str, tuple[Encoder, bytes | None]] = {
    # name: (text -> body, Content-Type)
    "utf-8": (str.encode, JSON_TYPE),
    "utf-8, no content-type": (str.encode, None),
    "utf-8, text/plain": (str.encode, b"text/plain"),
    "utf-8 charset": (str.encode, b"application/json; charset=UTF-8"),
    "utf-8 BOM": (lambda t: b"\xef\xbb\xbf" + t.encode(), JSON_TYPE),
    "utf-8 BOM, charset": (
        lambda t: b"\xef\xbb\xbf" + t.encode(),
        b"application/json;charset=utf-8",
    ),
    "utf-16 BOM": (lambda t: t.encode("utf-16"), JSON_TYPE),
    "utf-16-le": (lambda t: t.encode("utf-16-le"), JSON_TYPE),
    "utf-16-be": (lambda t: t.encode("utf-16-be"), JSON_TYPE),
    "utf-16-be BOM": (lambda t: ("\ufeff" + t).encode("utf-16-be"), JSON_TYPE),
    "utf-16-le, charset utf-16": (
        lambda t: t.encode("utf-16-le"),
        b'application/json; charset="utf-16"',
    ),
    "utf-16-be, charset utf-16": (
        lambda t: t.encode("utf-16-be"),
        b"application/json; charset=utf-16",
    ),
    "utf-16-le BOM, charset utf-16le": (
        lambda t: ("\ufeff" + t).encode("utf-16-le"),
        b"application/json; charset=UTF-16LE",
    ),
    "utf-32 BOM": (lambda t: t.encode("utf-32"), JSON_TYPE),
    "utf-32-le": (lambda t: t.encode("utf-32-le"), JSON_TYPE),
    "utf-32-be": (lambda t: t.encode("utf-32-be"), JSON_TYPE),
    "utf-32-be, charset": (lambda t: t.encode("utf-32-be"), b"application/json; charset=utf-32be"),
}


def headers_for(
    content_type: bytes | None, *extra: tuple[bytes, bytes]
) -> list[tuple[bytes, bytes]]:
    found = [] if content_type is None else [(b"content-type", content_type)]
    return [*found, *extra]


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_every_text_encoding_json_loads_reads_is_counted_and_forwarded_as_utf8(name: str) -> None:
    encode, content_type = ENCODINGS[name]
    body = encode(PLAIN)
    assert json.loads(body) == TEXTS  # what FastAPI (the upstream) would have read
    counted = count_request(headers_for(content_type), body, "input", limit=LIMIT)
    assert counted.cost == 40
    assert counted.body == PLAIN.encode()  # canonical: UTF-8, no BOM
    assert counted.document == TEXTS
    forwarded = forwarded_headers([(b"x-other", b"1"), *headers_for(content_type)], counted)
    if name == "utf-8":
        assert counted.body is body  # the fast path: untouched
        assert not counted.rewritten
    else:
        assert counted.rewritten
        assert forwarded == [(b"x-other", b"1"), (b"content-type", JSON_TYPE)]


def thirds(data: bytes) -> list[bytes]:
    cut = len(data) // 3
    return [data[:cut], data[cut : 2 * cut], data[2 * cut :]]


COMPRESSORS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "gzip": ("gzip", gzip.compress),
    "x-gzip": ("x-gzip", gzip.compress),
    "deflate": ("deflate", zlib.compress),
    "raw deflate": ("deflate", lambda b: zlib.compress(b, wbits=-zlib.MAX_WBITS)),
    "gzip members": (
        "gzip",
        lambda b: b"".join(gzip.compress(part) for part in thirds(b)),
    ),
    "gzip then deflate": ("gzip, deflate", lambda b: zlib.compress(gzip.compress(b))),
}


@pytest.mark.parametrize("coding", list(COMPRESSORS))
@pytest.mark.parametrize("text", ["utf-8", "utf-8 BOM", "utf-16 BOM", "utf-32-be"])
def test_compressed_bodies_are_decoded_counted_and_forwarded_plain(coding: str, text: str) -> None:
    encode, content_type = ENCODINGS[text]
    header, compress = COMPRESSORS[coding]
    body = compress(encode(PLAIN))
    raw = headers_for(content_type, (b"content-encoding", header.encode()))
    counted = count_request(raw, body, "input", limit=LIMIT)
    assert (counted.cost, counted.body) == (40, PLAIN.encode())
    forwarded = forwarded_headers(raw, counted)
    assert all(name != b"content-encoding" for name, _ in forwarded)


def oip_binary(batch: int, header_encoding: str = "utf-8") -> tuple[bytes, int, bytes]:
    """An OIP request with an FP32 [batch, 4] tensor after its JSON header: (body, header
    length, the tensor bytes)."""
    tensor = bytes(range(16)) * batch
    header = {
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": [batch, 4],
                "parameters": {"binary_data_size": len(tensor)},
            }
        ]
    }
    encoded = json.dumps(header).encode(header_encoding)
    return encoded + tensor, len(encoded), tensor


@pytest.mark.parametrize("header_encoding", ["utf-8", "utf-16", "utf-32-le"])
@pytest.mark.parametrize("coding", [None, "gzip", "deflate"])
def test_oip_binary_tensors_count_the_header_and_go_on_as_they_are(
    header_encoding: str, coding: str | None
) -> None:
    body, length, tensor = oip_binary(23, header_encoding)
    raw = [(b"content-type", BINARY_TYPE), (HEADER_LENGTH, b"%d" % length)]
    if coding is not None:
        body = gzip.compress(body) if coding == "gzip" else zlib.compress(body)
        raw.append((b"content-encoding", coding.encode()))
    counted = count_request(raw, body, "inputs", binary_tensors=True, limit=LIMIT)
    assert counted.cost == 23
    assert counted.header_length is not None
    header, tail = counted.body[: counted.header_length], counted.body[counted.header_length :]
    assert tail == tensor
    assert orjson.loads(header)["inputs"][0]["shape"] == [23, 4]
    assert header.startswith(b"{")  # UTF-8, no BOM
    assert forwarded_headers(raw, counted) == [
        (b"content-type", BINARY_TYPE),
        (HEADER_LENGTH, b"%d" % counted.header_length),
    ]


def test_oip_json_inputs_count_the_largest_batch() -> None:
    doc = {
        "inputs": [
            {"name": "a", "datatype": "BYTES", "shape": [3], "data": ["x", "y", "z"]},
            {"name": "b", "datatype": "FP32", "shape": [7, 1], "data": [0.0] * 7},
        ]
    }
    body = json.dumps(doc).encode("utf-16")
    counted = count_request([], body, "inputs", binary_tensors=True, limit=LIMIT)
    assert counted.cost == 7
    assert counted.body == json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("raw", "body", "error", "message"),
    [
        ([], b"instances=1&x=2", InvalidBody, "not valid JSON"),
        ([], b"\xef\xbb\xbf\xef\xbb\xbf{}", InvalidBody, "not valid JSON"),  # two BOMs
        (
            [(b"content-type", b"application/json; charset=latin-1")],
            b"{}",
            UnsupportedMediaType,
            "charset",
        ),
        (
            [(b"content-type", b"application/json; charset=klingon")],
            b"{}",
            UnsupportedMediaType,
            "charset",
        ),
        (
            [(b"content-type", b"application/json; charset=utf-8")],
            "{}".encode("utf-16"),
            InvalidBody,
            "UTF-8",
        ),
        (
            [(b"content-type", b"application/json; charset=us-ascii")],
            '{"a":"\u00e9"}'.encode(),
            InvalidBody,
            "ASCII",
        ),
        ([], b'{"a": "\\ud800"}', InvalidBody, "not valid JSON"),  # a lone surrogate
        ([], '{"a": 1}'.encode("utf-16-le")[:-1], InvalidBody, "not valid UTF-16-LE"),
        ([], b'{"a": NaN}', InvalidBody, "not valid JSON"),  # json.loads would take it
        ([(b"content-encoding", b"br")], b"{}", UnsupportedMediaType, "br"),
        (
            [(b"content-encoding", b"gzip")],
            gzip.compress(b"{}")[:-3],
            InvalidBody.__mro__[1],
            "truncated",
        ),
        (
            [(b"content-encoding", b"gzip")],
            gzip.compress(b" " * (LIMIT + 1)),
            PayloadTooLarge,
            "decompresses",
        ),
        (
            [(b"content-type", b"application/json"), (b"content-type", b"text/plain")],
            b"{}",
            InvalidBody,
            "Content-Type",
        ),
    ],
)
def test_a_body_that_cannot_be_counted_is_refused(
    raw: list[tuple[bytes, bytes]], body: bytes, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        count_request(raw, body, "instances", limit=LIMIT)


@pytest.mark.parametrize(
    ("lengths", "message"),
    [
        ([b"-1"], "non-negative integer"),
        ([b"+5"], "non-negative integer"),
        ([b"1_0"], "non-negative integer"),
        ([b"999999"], "is 999999 but the request body is"),
        ([b"5", b"6"], "twice"),
    ],
)
def test_a_bad_header_length_is_refused(lengths: list[bytes], message: str) -> None:
    body, _, _ = oip_binary(2)
    raw = [(HEADER_LENGTH, value) for value in lengths]
    with pytest.raises(InvalidBody, match=message):
        count_request(raw, body, "inputs", binary_tensors=True, limit=LIMIT)


def test_the_header_length_is_ignored_where_the_route_has_no_binary_tensors() -> None:
    body = orjson.dumps({"instances": [1, 2, 3]})
    counted = count_request([(HEADER_LENGTH, b"3")], body, "instances", limit=LIMIT)
    assert counted.cost == 3


def test_an_empty_body_costs_one_and_goes_on() -> None:
    counted = count_request([(b"content-encoding", b"gzip")], b"", "instances", limit=LIMIT)
    assert (counted.cost, counted.body, counted.rewritten) == (1, b"", False)


def test_the_decoded_cap_is_the_one_given() -> None:
    body = orjson.dumps({"instances": ["x" * 100]})
    assert count_request([], body, "instances", limit=len(body)).cost == 1
    with pytest.raises(PayloadTooLarge):
        count_request(
            [(b"content-encoding", b"gzip")], gzip.compress(body), "instances", limit=len(body) - 1
        )


def _duplicate_keys() -> Any:
    # orjson and json.loads both keep the last value of a repeated key: the count follows it.
    return b'{"input": ["a"], "input": ["a", "b", "c"]}'


def test_a_repeated_key_counts_as_the_upstream_reads_it() -> None:
    body = _duplicate_keys()
    assert len(json.loads(body)["input"]) == 3
    assert count_request([], body, "input", limit=LIMIT).cost == 3


async def test_a_compressed_body_is_counted_off_the_event_loop_alike() -> None:
    body = gzip.compress(PLAIN.encode("utf-16"))
    raw = [(b"content-encoding", b"gzip"), (b"content-type", JSON_TYPE)]
    assert await count(raw, body, "input", limit=LIMIT) == count_request(
        raw, body, "input", limit=LIMIT
    )
