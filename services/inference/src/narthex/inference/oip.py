"""The Open Inference Protocol v2 REST codec, with Triton's binary tensor data extension.

Pure logic, no web framework: the routes hand in the body and the
`Inference-Header-Content-Length` header, get an `InferRequest` back, and hand the computed
tensors to `encode_response`. The wire format is the KServe v2 protocol as `tritonclient.http`
speaks it: a JSON header, then (binary extension) the raw tensors appended in input order,
each announced by `parameters.binary_data_size`. Numbers are little-endian and row-major,
BOOL is one byte per element, and a BYTES tensor is each element as a 4-byte little-endian
length followed by its bytes. Every refusal is an `OipError` whose message is safe to show
the client (the routes answer 400 `{"error": message}`).

Numeric tensors never go through a per-element Python loop: binary data is viewed in place
with `np.frombuffer`, JSON data is type-checked with one `set(map(type, ...))` pass and
converted by numpy, and JSON responses are written by orjson straight from the arrays.
BYTES tensors have variable-length elements and are the one per-element loop, kept tight.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import orjson

from narthex.inference.datatypes import DATATYPES, datatype_of

__all__ = [
    "BINARY_CONTENT_TYPE",
    "HEADER_LENGTH",
    "JSON_CONTENT_TYPE",
    "InferRequest",
    "InputTensor",
    "OipError",
    "OutputTensor",
    "RequestedOutput",
    "check_outputs",
    "decode_request",
    "encode_response",
    "parse_header_length",
    "select_outputs",
]

# The header (request and response) that gives the byte length of the JSON part when binary
# tensors follow it; absent when the whole body is JSON.
HEADER_LENGTH: Final = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE: Final = "application/json"
BINARY_CONTENT_TYPE: Final = "application/octet-stream"

# Which JSON value types each datatype accepts. Integers are fine for floating point (JSON
# writers emit `1` for 1.0), but not the other way round, and a boolean is never a number:
# `type(True) is bool`, so exact type sets keep the two apart.
_JSON_TYPES: Final[Mapping[str, frozenset[type]]] = MappingProxyType(
    {
        name: frozenset(
            {bool}
            if name == "BOOL"
            else {str}
            if name == "BYTES"
            else {int, float}
            if dt.kind == "f"
            else {int}
        )
        for name, dt in DATATYPES.items()
    }
)
_JSON_NAMES: Final = {
    bool: "boolean",
    int: "integer",
    float: "non-integer number",
    str: "string",
    list: "array",
    dict: "object",
    type(None): "null",
}
_EXPECTED: Final = {
    frozenset({bool}): "booleans",
    frozenset({str}): "strings",
    frozenset({int, float}): "numbers",
    frozenset({int}): "integers",
}

# numpy 2 allows 64 dimensions, ONNX Runtime fewer in practice; 32 is far above any model.
_MAX_DIMS: Final = 32
# No request body holds 2**40 elements; the bound keeps absurd shapes away from numpy.
_MAX_SPAN: Final = 1 << 40
_U32: Final = struct.Struct("<I")
# Triton's shared-memory extension (the tensor lives in a region the server maps): not offered.
_SHARED_MEMORY: Final = frozenset(
    {"shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"}
)


class OipError(Exception):
    """A request that breaks the protocol; `message` is safe to send back to the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class InputTensor:
    """One decoded input: `data` has `shape` and the datatype's dtype.

    Binary numeric data is a read-only view into the request body (no copy); BYTES data is
    an object array of `bytes`.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: npt.NDArray[Any]


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """An output the client named; `binary` is its `binary_data` parameter, if it gave one."""

    name: str
    binary: bool | None


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A decoded inference request.

    `parameters` is the request's `parameters` object as sent (sequence ids, priority,
    timeout, custom keys: the caller decides what it honours). `outputs` is empty when the
    client named none, meaning "all of them".
    """

    id: str | None
    parameters: Mapping[str, Any]
    inputs: tuple[InputTensor, ...]
    outputs: tuple[RequestedOutput, ...]
    binary_output_default: bool


@dataclass(frozen=True, slots=True)
class OutputTensor:
    """A computed output to send: its datatype follows `data.dtype` (see `datatype_of`)."""

    name: str
    data: npt.NDArray[Any]
    binary: bool = False


def parse_header_length(value: str | None) -> int | None:
    """The `Inference-Header-Content-Length` header as an int; None when it is absent."""
    if value is None:
        return None
    text = value.strip()
    # int() would also take "+5", "1_000" and non-ASCII digits.
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise OipError(f"{HEADER_LENGTH} must be a non-negative integer, got {value[:40]!r}")
    return int(text)


def decode_request(
    body: bytes, header_length: int | None, *, max_elements: int | None = None
) -> InferRequest:
    """Decode an inference request body (already decompressed).

    `header_length` is the `Inference-Header-Content-Length` value: the JSON header is that
    many bytes and binary tensors follow; None means the whole body is JSON.
    `max_elements` bounds the total number of tensor elements over all inputs, checked
    from the declared shapes before any data is decoded.
    Zero-element tensors (a 0 in the shape) are valid here; whether a model takes an empty
    batch is the caller's decision.
    """
    size = len(body)
    if header_length is None:
        header: bytes | memoryview = body
        cursor = size
    else:
        if header_length < 0 or header_length > size:
            raise OipError(
                f"{HEADER_LENGTH} is {header_length} but the request body is {size} bytes"
            )
        header = memoryview(body)[:header_length]
        cursor = header_length
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise OipError(f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise OipError("the inference request must be a JSON object")

    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise OipError("'id' must be a string")
    parameters = _parameters(doc, "the request")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise OipError("parameter 'binary_data_output' must be a boolean")

    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list):
        raise OipError("'inputs' is required and must be a list")
    inputs: list[InputTensor] = []
    seen: set[str] = set()
    total = 0
    for index, raw in enumerate(raw_inputs):
        if not isinstance(raw, dict):
            raise OipError(f"inputs[{index}] must be an object")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise OipError(f"inputs[{index}] needs a non-empty string 'name'")
        if name in seen:
            raise OipError(f"input {name!r} is given twice")
        seen.add(name)
        datatype = raw.get("datatype")
        if not isinstance(datatype, str):
            raise OipError(f"input {name!r} needs a string 'datatype'")
        dtype = DATATYPES.get(datatype)
        if dtype is None:
            raise OipError(
                f"input {name!r} has unsupported datatype {datatype[:20]!r}"
                f" (supported: {', '.join(DATATYPES)})"
            )
        shape, count = _shape(raw.get("shape"), name)
        total += count
        if max_elements is not None and total > max_elements:
            raise OipError(
                f"the request has more than {max_elements} tensor elements"
                f" (input {name!r} alone has {count})"
            )
        params = _parameters(raw, f"input {name!r}")
        if not _SHARED_MEMORY.isdisjoint(params):
            raise OipError(f"input {name!r}: shared memory is not supported")
        binary_size = params.get("binary_data_size")
        if binary_size is None:
            if "data" not in raw:
                raise OipError(f"input {name!r} has neither 'data' nor binary_data_size")
            data = _from_json(raw["data"], name, datatype, dtype, shape, count)
        else:
            if "data" in raw:
                raise OipError(f"input {name!r} has both 'data' and binary_data_size")
            if header_length is None:
                raise OipError(
                    f"input {name!r} has binary_data_size but the request has no"
                    f" {HEADER_LENGTH} header"
                )
            if type(binary_size) is not int or binary_size < 0:
                raise OipError(f"input {name!r}: binary_data_size must be a non-negative integer")
            if cursor + binary_size > size:
                raise OipError(
                    f"input {name!r}: binary_data_size {binary_size} runs past the end of the"
                    f" body ({size - cursor} bytes left)"
                )
            data = _from_binary(body, cursor, binary_size, name, datatype, dtype, shape, count)
            cursor += binary_size
        inputs.append(InputTensor(name=name, datatype=datatype, shape=shape, data=data))
    if cursor != size:
        raise OipError(f"{size - cursor} bytes after the binary inputs belong to no input")

    return InferRequest(
        id=request_id,
        parameters=parameters,
        inputs=tuple(inputs),
        outputs=_requested_outputs(doc.get("outputs")),
        binary_output_default=binary_default,
    )


def check_outputs(request: InferRequest, available: Iterable[str]) -> None:
    """Refuse a request that names an output the model does not have (before computing)."""
    names = set(available)
    for output in request.outputs:
        if output.name not in names:
            raise OipError(
                f"unknown output {output.name!r} (the model has: {', '.join(sorted(names))})"
            )


def select_outputs(
    request: InferRequest, results: Mapping[str, npt.NDArray[Any]]
) -> list[OutputTensor]:
    """The outputs to send, in order, each marked binary or JSON as the request asks.

    The named outputs in the order named, or every result in the model's order when none was
    named. An output is binary if its own `binary_data` says so, else if the request's
    `binary_data_output` does.
    """
    default = request.binary_output_default
    if not request.outputs:
        return [OutputTensor(name, data, default) for name, data in results.items()]
    check_outputs(request, results)
    return [
        OutputTensor(out.name, results[out.name], default if out.binary is None else out.binary)
        for out in request.outputs
    ]


def encode_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Sequence[OutputTensor],
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """The response body and its JSON header length.

    The length is None when every output is JSON: the body is then all JSON
    (`JSON_CONTENT_TYPE`). Otherwise the binary outputs follow the header in output order
    and the routes send `BINARY_CONTENT_TYPE` with the length in `HEADER_LENGTH`.
    A BYTES output holding non-UTF-8 bytes cannot be sent as JSON: OipError (ask for binary).
    NaN and Inf cannot be written in JSON either: they come out as null, which tritonclient
    reads back as NaN; binary outputs carry them exactly.
    """
    entries: list[dict[str, Any]] = []
    blobs: list[bytes | memoryview] = []
    for out in outputs:
        array = out.data
        datatype = datatype_of(array.dtype)
        entry: dict[str, Any] = {"name": out.name, "datatype": datatype, "shape": list(array.shape)}
        if out.binary:
            blob = _to_binary(array, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = _bytes_to_json(array, out.name)
        else:
            # orjson writes C-contiguous native arrays of these dtypes directly (FP16 and BOOL
            # included), in row-major order once flattened.
            entry["data"] = np.ascontiguousarray(array.reshape(-1), dtype=DATATYPES[datatype])
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = dict(parameters)
    doc["outputs"] = entries
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


# -- request helpers ---------------------------------------------------------------------


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise OipError(f"'parameters' of {where} must be an object")
    return params


def _shape(raw: object, name: str) -> tuple[tuple[int, ...], int]:
    """The shape and its element count."""
    if not isinstance(raw, list):
        raise OipError(f"input {name!r} needs a 'shape' list")
    if len(raw) > _MAX_DIMS:
        raise OipError(f"input {name!r} has {len(raw)} dimensions, more than {_MAX_DIMS}")
    # Exact types, not isinstance(): True is an int to Python but not a dimension.
    if raw and (set(map(type, raw)) != {int} or min(raw) < 0):
        raise OipError(f"input {name!r}: shape must be non-negative integers, got {raw}")
    count = span = 1
    for dim in raw:
        count *= dim
        span *= dim or 1
    # Data sizes bound a non-empty tensor's shape, but not an empty one's: [0, 2**62] has no
    # elements and numpy still cannot make an array of that shape.
    if span > _MAX_SPAN:
        raise OipError(f"input {name!r}: shape {raw} is too large")
    return tuple(raw), count


def _requested_outputs(raw: object) -> tuple[RequestedOutput, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise OipError("'outputs' must be a list")
    outputs: list[RequestedOutput] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise OipError(f"outputs[{index}] must be an object")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise OipError(f"outputs[{index}] needs a non-empty string 'name'")
        if name in seen:
            raise OipError(f"output {name!r} is requested twice")
        seen.add(name)
        params = _parameters(item, f"output {name!r}")
        if "classification" in params:
            raise OipError(
                f"output {name!r}: the classification extension is not supported;"
                " request the raw output and take the top classes client-side"
            )
        if not _SHARED_MEMORY.isdisjoint(params):
            raise OipError(f"output {name!r}: shared memory is not supported")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise OipError(f"output {name!r}: binary_data must be a boolean")
        outputs.append(RequestedOutput(name=name, binary=binary))
    return tuple(outputs)


def _from_json(
    data: object,
    name: str,
    datatype: str,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    count: int,
) -> npt.NDArray[Any]:
    if not isinstance(data, list):
        raise OipError(f"input {name!r}: 'data' must be a list")
    flat: list[Any] | npt.NDArray[Any] = data
    kinds = set(map(type, data))
    if list in kinds:
        # Nested lists: numpy finds the nesting; a ragged one leaves lists as elements.
        try:
            nested = np.array(data, dtype=object)
        except ValueError:
            raise OipError(f"input {name!r}: 'data' is not a rectangular nested list") from None
        kinds = set(map(type, nested.flat))
        if list in kinds:
            raise OipError(f"input {name!r}: 'data' is not a rectangular nested list")
        if nested.shape != shape:
            raise OipError(
                f"input {name!r}: 'data' is nested as {list(nested.shape)} but the shape is"
                f" {list(shape)} (send it flat or nested exactly as the shape)"
            )
        flat = nested.reshape(-1)
    elif len(data) != count:
        raise OipError(
            f"input {name!r}: 'data' has {len(data)} elements but shape {list(shape)} needs {count}"
        )
    allowed = _JSON_TYPES[datatype]
    wrong = kinds - allowed
    if wrong:
        got = ", ".join(sorted(_JSON_NAMES.get(kind, kind.__name__) for kind in wrong))
        raise OipError(f"input {name!r}: {datatype} data must be {_EXPECTED[allowed]}, got {got}")
    if datatype == "BYTES":
        # JSON strings are text; the tensor holds their UTF-8 bytes. orjson has already
        # refused lone surrogates, so encode() cannot fail.
        return np.array([item.encode() for item in flat], dtype=object).reshape(shape)
    try:
        # Out-of-range ints raise OverflowError (numpy 2); floats overflowing FP16/FP32 turn
        # into inf, caught below since JSON itself cannot carry inf.
        with np.errstate(over="ignore", invalid="ignore"):
            array = np.array(flat, dtype=dtype)
    except OverflowError:
        raise OipError(f"input {name!r}: a value is out of range for {datatype}") from None
    if dtype.kind == "f" and count and not np.isfinite(array).all():
        raise OipError(f"input {name!r}: a value is out of range for {datatype}")
    return array.reshape(shape)


def _from_binary(
    body: bytes,
    start: int,
    size: int,
    name: str,
    datatype: str,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    count: int,
) -> npt.NDArray[Any]:
    if datatype == "BYTES":
        return _unpack_bytes(body, start, size, name, count).reshape(shape)
    expected = count * dtype.itemsize
    if size != expected:
        raise OipError(
            f"input {name!r}: binary_data_size is {size} but {count} {datatype} elements"
            f" take {expected} bytes"
        )
    if count == 0:
        return np.empty(shape, dtype=dtype)
    if datatype == "BOOL":
        raw = np.frombuffer(body, dtype=np.uint8, count=count, offset=start)
        # Any other byte would make a numpy bool that is neither True nor False.
        if raw.max() > 1:
            raise OipError(f"input {name!r}: BOOL bytes must be 0 or 1")
        array = raw.view(np.bool_)
    else:
        array = np.frombuffer(body, dtype=dtype, count=count, offset=start)
        # The tensor's offset in the body is arbitrary; an unaligned view works in numpy but
        # is slow and not every consumer accepts it.
        if not array.flags.aligned:
            array = array.copy()
    return array.reshape(shape)


def _unpack_bytes(body: bytes, start: int, size: int, name: str, count: int) -> npt.NDArray[Any]:
    end = start + size
    # Every element has a 4-byte length: refuse a size that cannot hold them before looping.
    if size < 4 * count:
        raise OipError(
            f"input {name!r}: binary_data_size {size} is too small for {count} BYTES elements"
        )
    # The hot loop checks nothing: an element running past this tensor leaves `pos` beyond
    # `end` (slicing clamps, reading a length past the body raises), and only then does
    # `_bytes_error` walk the data again to say what is wrong.
    items: list[bytes] = []
    append = items.append
    unpack = _U32.unpack_from
    pos = start
    try:
        for _ in range(count):
            (length,) = unpack(body, pos)
            pos += 4
            append(body[pos : pos + length])
            pos += length
    except struct.error:
        pos = -1
    if pos != end:
        raise _bytes_error(body, start, end, name, count)
    return np.array(items, dtype=object)


def _bytes_error(body: bytes, start: int, end: int, name: str, count: int) -> OipError:
    pos = start
    for i in range(count):
        if pos + 4 > end:
            return OipError(f"input {name!r}: BYTES data ends inside element {i}'s length")
        pos += 4 + _U32.unpack_from(body, pos)[0]
        if pos > end:
            return OipError(f"input {name!r}: BYTES element {i} runs past binary_data_size")
    return OipError(
        f"input {name!r}: {end - pos} bytes of BYTES data are left after {count} elements"
    )


# -- response helpers --------------------------------------------------------------------


def _to_binary(array: npt.NDArray[Any], datatype: str) -> bytes | memoryview:
    if datatype != "BYTES":
        # The array's memory as flat bytes (len() is the byte size), which bytes.join reads
        # in place: the tensor is copied once, into the response.
        contiguous = np.ascontiguousarray(array, dtype=DATATYPES[datatype])
        return contiguous.reshape(-1).view(np.uint8).data
    pack = _U32.pack
    parts: list[bytes] = []
    append = parts.append
    for item in array.reshape(-1).tolist():
        value = item if type(item) is bytes else _element_bytes(item)
        append(pack(len(value)))
        append(value)
    return b"".join(parts)


def _element_bytes(item: object) -> bytes:
    # ONNX Runtime returns string tensors as str; numpy bytes_/str_ arrays give these too.
    if isinstance(item, str):
        return item.encode()
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    raise ValueError(f"a BYTES output element must be str or bytes, not {type(item).__name__}")


def _bytes_to_json(array: npt.NDArray[Any], name: str) -> list[str]:
    texts: list[str] = []
    append = texts.append
    try:
        for item in array.reshape(-1).tolist():
            append(item if type(item) is str else _element_bytes(item).decode())
    except UnicodeDecodeError:
        raise OipError(
            f"output {name!r} holds bytes that are not UTF-8 text; request it with binary_data"
        ) from None
    return texts
