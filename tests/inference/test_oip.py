"""The OIP v2 codec against tritonclient's own encoder and decoder, plus hand-made bad bodies."""

from __future__ import annotations

import gzip
import struct
import zlib
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import triton_to_np_dtype

from narthex.common.codings import decode_content
from narthex.inference import oip
from narthex.inference.oip import OipError, OutputTensor

Client = httpclient.InferenceServerClient
_RNG_SEED = 20240611

# Every datatype narthex speaks, with values that exercise its range.
_NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"]
_FLOATS = ["FP16", "FP32", "FP64"]


def _sample(datatype: str, shape: tuple[int, ...] = (3, 4)) -> npt.NDArray[Any]:
    rng = np.random.default_rng(_RNG_SEED)
    count = int(np.prod(shape))
    if datatype == "BYTES":
        words = [b"", b"plain", "h\u00e9llo \u2603 \U0001f600".encode(), b"x" * 300, b"a b"]
        return np.array([words[i % len(words)] for i in range(count)], dtype=object).reshape(shape)
    dtype = np.dtype(triton_to_np_dtype(datatype))
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, size=count, dtype=dtype, endpoint=True)
        if count:
            array[0], array[-1] = info.min, info.max
        return array.reshape(shape)
    return (rng.standard_normal(count) * 1000).astype(dtype).reshape(shape)


def _body(inputs: list[Any], **kwargs: Any) -> tuple[bytes, int | None]:
    body, json_size = Client.generate_request_body(inputs, **kwargs)
    return body, json_size


def _input(name: str, array: npt.NDArray[Any], datatype: str, *, binary: bool) -> Any:
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def _assert_same(got: npt.NDArray[Any], want: npt.NDArray[Any]) -> None:
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    if want.dtype.kind == "f":
        assert np.array_equal(got, want, equal_nan=True)
    else:
        assert got.tolist() == want.tolist()


def _parse(body: bytes, header_length: int | None) -> Any:
    return Client.parse_response_body(body, header_length=header_length)


def _decode_one(array: npt.NDArray[Any], datatype: str, *, binary: bool) -> oip.InputTensor:
    body, length = _body([_input("x", array, datatype, binary=binary)])
    (tensor,) = oip.decode_request(body, length).inputs
    return tensor


# -- requests from tritonclient ----------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", [*_NUMERIC, *_FLOATS, "BYTES"])
def test_every_datatype_decodes_as_tritonclient_sent_it(datatype: str, binary: bool) -> None:
    array = _sample(datatype)
    tensor = _decode_one(array, datatype, binary=binary)
    assert (tensor.name, tensor.datatype, tensor.shape) == ("x", datatype, (3, 4))
    _assert_same(tensor.data, array)
    if datatype == "BYTES":
        assert all(type(item) is bytes for item in tensor.data.flat)


@pytest.mark.parametrize("datatype", _FLOATS)
def test_binary_floats_carry_nan_and_inf(datatype: str) -> None:
    # JSON cannot carry them, binary can; refusing them is the runtime's job, per model.
    array = np.array([np.nan, np.inf, -np.inf, -0.0, 1.5], dtype=triton_to_np_dtype(datatype))
    tensor = _decode_one(array, datatype, binary=True)
    _assert_same(tensor.data, array)
    assert np.signbit(tensor.data[3])


def test_json_nan_from_tritonclient_is_refused_as_invalid_json() -> None:
    body, length = _body([_input("x", np.array([np.nan], np.float32), "FP32", binary=False)])
    assert b"NaN" in body
    with pytest.raises(OipError, match="not valid JSON"):
        oip.decode_request(body, length)


def test_binary_tensor_data_is_a_view_and_aligned_even_at_an_odd_offset() -> None:
    odd = np.array([True, False, True])  # 3 bytes push the next tensor off alignment
    floats = np.arange(5, dtype=np.float64)
    body, length = _body(
        [_input("a", odd, "BOOL", binary=True), _input("b", floats, "FP64", binary=True)]
    )
    a, b = oip.decode_request(body, length).inputs
    _assert_same(a.data, odd)
    _assert_same(b.data, floats)
    assert b.data.flags.aligned
    assert not a.data.flags.writeable  # a view of the body, not a copy


def test_mixed_request_keeps_order_id_parameters_and_output_choices() -> None:
    arrays = {
        "ids": (np.array([[1, 2, 3]], dtype=np.int64), "INT64", True),
        "text": (np.array([b"caf\xc3\xa9", b""], dtype=object), "BYTES", False),
        "scores": (np.array([[0.5, -1.25]], dtype=np.float32), "FP32", False),
        "mask": (np.array([[True, False, True]]), "BOOL", True),
    }
    inputs = [_input(n, a, d, binary=b) for n, (a, d, b) in arrays.items()]
    outputs = [
        httpclient.InferRequestedOutput("probs", binary_data=False),
        httpclient.InferRequestedOutput("label", binary_data=True),
    ]
    body, length = _body(
        inputs, outputs=outputs, request_id="req-7", priority=2, parameters={"tenant_tag": "t1"}
    )
    assert length is not None
    request = oip.decode_request(body, length)
    assert request.id == "req-7"
    assert request.parameters == {"priority": 2, "tenant_tag": "t1"}
    assert [t.name for t in request.inputs] == list(arrays)
    for tensor, (array, datatype, _) in zip(request.inputs, arrays.values(), strict=True):
        assert tensor.datatype == datatype
        _assert_same(tensor.data, array)
    assert request.outputs == (
        oip.RequestedOutput("probs", binary=False),
        oip.RequestedOutput("label", binary=True),
    )
    assert request.binary_output_default is False


def test_no_outputs_named_means_all_of_them_in_binary() -> None:
    body, length = _body([_input("x", np.ones(2, np.float32), "FP32", binary=False)])
    assert length is None  # all JSON: no header length
    request = oip.decode_request(body, None)
    assert request.outputs == ()
    assert request.binary_output_default is True  # tritonclient's default
    assert request.id is None


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", ["FP32", "INT64", "BYTES", "BOOL"])
def test_zero_element_tensors_are_accepted(datatype: str, binary: bool) -> None:
    # A zero-sized batch is valid OIP; whether a model runs one is the caller's decision.
    array = _sample(datatype, (0, 3))
    tensor = _decode_one(array, datatype, binary=binary)
    assert tensor.shape == (0, 3)
    _assert_same(tensor.data, array)


def test_json_data_may_be_nested_row_major() -> None:
    doc = {
        "inputs": [
            {"name": "a", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3], [4, 5, 6.5]]},
            {"name": "b", "shape": [2, 1], "datatype": "BYTES", "data": [["x"], ["\u00e9"]]},
            {"name": "c", "shape": [2, 0], "datatype": "INT8", "data": [[], []]},
            {"name": "d", "shape": [], "datatype": "INT32", "data": [7]},
        ]
    }
    a, b, c, d = oip.decode_request(orjson.dumps(doc), None).inputs
    _assert_same(a.data, np.array([[1, 2, 3], [4, 5, 6.5]], dtype=np.float32))
    _assert_same(b.data, np.array([[b"x"], ["\u00e9".encode()]], dtype=object))
    assert c.data.shape == (2, 0)
    _assert_same(d.data, np.array(7, dtype=np.int32))


def test_max_elements_counts_every_input() -> None:
    inputs = [
        _input("a", np.zeros((2, 3), np.float32), "FP32", binary=True),
        _input("b", np.zeros(4, np.int64), "INT64", binary=False),
    ]
    body, length = _body(inputs)
    assert len(oip.decode_request(body, length, max_elements=10).inputs) == 2
    with pytest.raises(OipError, match=r"more than 9 tensor elements \(input 'b' alone has 4\)"):
        oip.decode_request(body, length, max_elements=9)


# -- responses read by tritonclient ------------------------------------------------------


def _response(outputs: list[OutputTensor], request_id: str | None = "r1") -> Any:
    body, length = oip.encode_response(
        model_name="fraud", model_version="2", request_id=request_id, outputs=outputs
    )
    return body, length, _parse(body, length)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", [*_NUMERIC, *_FLOATS, "BYTES"])
def test_every_datatype_encodes_for_tritonclient(datatype: str, binary: bool) -> None:
    array = _sample(datatype, (2, 3))
    _, length, result = _response([OutputTensor("y", array, binary)])
    assert (length is not None) is binary
    got = result.as_numpy("y")
    if datatype == "BYTES" and not binary:
        # tritonclient reads JSON BYTES back as str.
        array = np.array([item.decode() for item in array.flat], dtype=object).reshape(2, 3)
    _assert_same(got, array)
    meta = result.get_response()
    assert (meta["model_name"], meta["model_version"], meta["id"]) == ("fraud", "2", "r1")


def test_mixed_response_with_scalar_empty_and_noncontiguous_outputs() -> None:
    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    outputs = [
        OutputTensor("t", matrix.T, binary=True),  # a non-contiguous view
        OutputTensor("s", np.array(0.25, dtype=np.float64), binary=False),
        OutputTensor("e", np.zeros((0, 4), np.float32), binary=True),
        OutputTensor("ej", np.zeros((0, 2), np.int64), binary=False),
        OutputTensor("b", np.array([True, False]), binary=True),
        OutputTensor("n", matrix[:, ::2], binary=False),
    ]
    body, length, result = _response(outputs, request_id=None)
    assert length is not None
    assert "id" not in result.get_response()
    for out in outputs:
        _assert_same(result.as_numpy(out.name), out.data)
    header = orjson.loads(body[:length])
    assert [o["name"] for o in header["outputs"]] == [o.name for o in outputs]


def test_all_json_response_has_no_header_length() -> None:
    body, length = oip.encode_response(
        model_name="m",
        model_version="1",
        request_id="abc",
        outputs=[OutputTensor("p", np.array([[0.1, 0.9]], np.float32))],
        parameters={"executor": "cpu"},
    )
    assert length is None
    doc = orjson.loads(body)
    assert doc["parameters"] == {"executor": "cpu"}
    assert doc["outputs"] == [
        {"name": "p", "datatype": "FP32", "shape": [1, 2], "data": [0.1, 0.9]}
    ]
    _assert_same(_parse(body, None).as_numpy("p"), np.array([[0.1, 0.9]], np.float32))


def test_nan_and_inf_outputs_exact_in_binary_null_in_json() -> None:
    array = np.array([np.nan, np.inf, 1.0], np.float32)
    _, _, result = _response([OutputTensor("b", array, True), OutputTensor("j", array, False)])
    _assert_same(result.as_numpy("b"), array)
    _assert_same(result.as_numpy("j"), np.array([np.nan, np.nan, 1.0], np.float32))


def test_str_elements_from_onnxruntime_encode_as_utf8() -> None:
    labels = np.array(["fraud", "l\u00e9git", ""], dtype=object)
    _, _, result = _response([OutputTensor("b", labels, True), OutputTensor("j", labels, False)])
    assert result.as_numpy("b").tolist() == [b"fraud", "l\u00e9git".encode(), b""]
    assert result.as_numpy("j").tolist() == ["fraud", "l\u00e9git", ""]


def test_non_utf8_bytes_cannot_go_as_json() -> None:
    raw = np.array([b"\xff\xfe"], dtype=object)
    _, _, result = _response([OutputTensor("b", raw, True)])
    assert result.as_numpy("b").tolist() == [b"\xff\xfe"]
    with pytest.raises(OipError, match=r"'b' holds bytes that are not UTF-8.*binary_data"):
        oip.encode_response(
            model_name="m", model_version="1", request_id=None, outputs=[OutputTensor("b", raw)]
        )


def test_an_output_dtype_without_a_datatype_is_a_server_error() -> None:
    with pytest.raises(ValueError, match="no Open Inference Protocol datatype"):
        oip.encode_response(
            model_name="m",
            model_version="1",
            request_id=None,
            outputs=[OutputTensor("c", np.zeros(2, np.complex64))],
        )


# -- output selection --------------------------------------------------------------------

_RESULTS: dict[str, npt.NDArray[Any]] = {
    "label": np.array([1], np.int64),
    "probs": np.array([[0.2, 0.8]], np.float32),
}


def _request_for(outputs: list[Any] | None) -> oip.InferRequest:
    body, length = _body(
        [_input("x", np.ones(1, np.float32), "FP32", binary=True)], outputs=outputs
    )
    return oip.decode_request(body, length)


def test_selection_all_outputs_follow_binary_data_output() -> None:
    selected = oip.select_outputs(_request_for(None), _RESULTS)
    assert [(o.name, o.binary) for o in selected] == [("label", True), ("probs", True)]
    request = oip.decode_request(b'{"inputs": []}', None)
    selected = oip.select_outputs(request, _RESULTS)
    assert [(o.name, o.binary) for o in selected] == [("label", False), ("probs", False)]


def test_selection_named_outputs_in_request_order_each_with_its_own_binary_flag() -> None:
    request = _request_for(
        [
            httpclient.InferRequestedOutput("probs", binary_data=False),
            httpclient.InferRequestedOutput("label", binary_data=True),
        ]
    )
    oip.check_outputs(request, _RESULTS)
    selected = oip.select_outputs(request, _RESULTS)
    assert [(o.name, o.binary) for o in selected] == [("probs", False), ("label", True)]
    body, length = oip.encode_response(
        model_name="m", model_version="1", request_id=request.id, outputs=selected
    )
    result = _parse(body, length)
    _assert_same(result.as_numpy("probs"), _RESULTS["probs"])
    _assert_same(result.as_numpy("label"), _RESULTS["label"])


def test_selection_without_a_binary_data_parameter_uses_the_request_default() -> None:
    doc = {
        "inputs": [],
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "probs"}, {"name": "label", "parameters": {"binary_data": False}}],
    }
    request = oip.decode_request(orjson.dumps(doc), None)
    selected = oip.select_outputs(request, _RESULTS)
    assert [(o.name, o.binary) for o in selected] == [("probs", True), ("label", False)]


def test_unknown_output_is_refused() -> None:
    request = _request_for([httpclient.InferRequestedOutput("logits")])
    with pytest.raises(OipError, match=r"unknown output 'logits' \(the model has: label, probs\)"):
        oip.check_outputs(request, ["probs", "label"])
    with pytest.raises(OipError, match="unknown output 'logits'"):
        oip.select_outputs(request, _RESULTS)


def test_classification_extension_is_refused() -> None:
    body, length = _body(
        [_input("x", np.ones(1, np.float32), "FP32", binary=True)],
        outputs=[httpclient.InferRequestedOutput("probs", class_count=3)],
    )
    with pytest.raises(OipError, match="'probs': the classification extension is not supported"):
        oip.decode_request(body, length)


# -- end to end through tritonclient's encoder and decoder -------------------------------


def test_round_trip_identity_model() -> None:
    arrays = {
        "f": (_sample("FP16"), "FP16"),
        "s": (_sample("BYTES"), "BYTES"),
        "u": (_sample("UINT64"), "UINT64"),
    }
    inputs = [_input(n, a, d, binary=n != "u") for n, (a, d) in arrays.items()]
    body, length = _body(inputs, request_id="e2e")
    request = oip.decode_request(body, length)
    results = {t.name: t.data for t in request.inputs}  # the "model" echoes its inputs
    out_body, out_length = oip.encode_response(
        model_name="echo",
        model_version="3",
        request_id=request.id,
        outputs=oip.select_outputs(request, results),
    )
    result = _parse(out_body, out_length)
    assert result.get_response()["id"] == "e2e"
    for name, (array, _) in arrays.items():
        _assert_same(result.as_numpy(name), array)


# -- refusals ----------------------------------------------------------------------------


def _one(**fields: Any) -> bytes:
    tensor = {"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}
    tensor.update(fields)
    return orjson.dumps({"inputs": [{k: v for k, v in tensor.items() if v is not _DROP}]})


_DROP = object()

_BAD_JSON = [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"{}", "'inputs' is required and must be a list"),
    (b'{"inputs": {}}', "'inputs' is required and must be a list"),
    (b'{"inputs": [1]}', r"inputs\[0\] must be an object"),
    (b'{"id": 5, "inputs": []}', "'id' must be a string"),
    (b'{"parameters": [], "inputs": []}', "'parameters' of the request must be an object"),
    (
        b'{"parameters": {"binary_data_output": 1}, "inputs": []}',
        "'binary_data_output' must be a boolean",
    ),
    (_one(name=_DROP), r"inputs\[0\] needs a non-empty string 'name'"),
    (_one(name=""), r"inputs\[0\] needs a non-empty string 'name'"),
    (_one(datatype=_DROP), "input 'x' needs a string 'datatype'"),
    (_one(datatype="BF16"), "input 'x' has unsupported datatype 'BF16'"),
    (_one(datatype="float32"), "unsupported datatype 'float32'"),
    (_one(shape=_DROP), "input 'x' needs a 'shape' list"),
    (_one(shape=[-2]), r"shape must be non-negative integers, got \[-2\]"),
    (_one(shape=[2.0]), "shape must be non-negative integers"),
    (_one(shape=[True, 2]), "shape must be non-negative integers"),
    (_one(shape=["2"]), "shape must be non-negative integers"),
    (_one(shape=[1] * 33), "33 dimensions, more than 32"),
    (_one(shape=[0, 1 << 62], data=[]), r"shape \[0, 4611686018427387904\] is too large"),
    (_one(shape=[2**21] * 2, data=[]), "is too large"),
    (_one(data=_DROP), "'x' has neither 'data' nor binary_data_size"),
    (_one(data=5), "'data' must be a list"),
    (_one(data=[1.0, 2.0, 3.0]), r"'data' has 3 elements but shape \[2\] needs 2"),
    (_one(shape=[2, 2], data=[1, 2, 3]), r"has 3 elements but shape \[2, 2\] needs 4"),
    (_one(shape=[2, 2], data=[[1, 2], [3]]), "not a rectangular nested list"),
    (_one(shape=[2, 2], data=[[1, 2], [3, [4]]]), "not a rectangular nested list"),
    (_one(shape=[2, 2], data=[[1, 2], 3]), "not a rectangular nested list"),
    (_one(shape=[4], data=[[1, 2], [3, 4]]), r"nested as \[2, 2\] but the shape is \[4\]"),
    (_one(data=["1.0", 2.0]), "FP32 data must be numbers, got string"),
    (_one(data=[True, 2.0]), "FP32 data must be numbers, got boolean"),
    (_one(data=[None, 2.0]), "FP32 data must be numbers, got null"),
    (_one(data=[{}, 2.0]), "FP32 data must be numbers, got object"),
    (_one(datatype="INT64", data=[1.5, 2]), "INT64 data must be integers, got non-integer"),
    (_one(datatype="INT64", data=[1.0, 2]), "INT64 data must be integers, got non-integer"),
    (_one(datatype="INT32", data=[True, 2]), "INT32 data must be integers, got boolean"),
    (_one(datatype="BOOL", data=[1, 0]), "BOOL data must be booleans, got integer"),
    (_one(datatype="BYTES", data=["a", 1]), "BYTES data must be strings, got integer"),
    (_one(datatype="UINT8", data=[300, 1]), "a value is out of range for UINT8"),
    (_one(datatype="UINT32", data=[-1, 1]), "a value is out of range for UINT32"),
    (_one(datatype="INT8", data=[-129, 1]), "a value is out of range for INT8"),
    (_one(datatype="INT64", data=[2**63, 1]), "a value is out of range for INT64"),
    (_one(datatype="FP32", data=[1e39, 1]), "a value is out of range for FP32"),
    (_one(datatype="FP16", data=[70000, 1]), "a value is out of range for FP16"),
    (_one(parameters=[]), "'parameters' of input 'x' must be an object"),
    (_one(parameters={"shared_memory_region": "r"}), "input 'x': shared memory is not supported"),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [1]},'
        b' {"name": "x", "shape": [1], "datatype": "INT8", "data": [1]}]}',
        "input 'x' is given twice",
    ),
    (b'{"inputs": [], "outputs": {}}', "'outputs' must be a list"),
    (b'{"inputs": [], "outputs": ["y"]}', r"outputs\[0\] must be an object"),
    (b'{"inputs": [], "outputs": [{}]}', r"outputs\[0\] needs a non-empty string 'name'"),
    (b'{"inputs": [], "outputs": [{"name": "y"}, {"name": "y"}]}', "'y' is requested twice"),
    (
        b'{"inputs": [], "outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]}',
        "output 'y': binary_data must be a boolean",
    ),
    (
        b'{"inputs": [], "outputs": [{"name": "y", "parameters": {"shared_memory_region": "r"}}]}',
        "output 'y': shared memory is not supported",
    ),
]


@pytest.mark.parametrize(("body", "message"), _BAD_JSON)
def test_bad_json_requests_are_refused_with_a_precise_message(body: bytes, message: str) -> None:
    with pytest.raises(OipError, match=message) as caught:
        oip.decode_request(body, None)
    assert caught.value.message == str(caught.value)


def _binary(header: dict[str, Any], payload: bytes) -> tuple[bytes, int]:
    head = orjson.dumps(header)
    return head + payload, len(head)


def _tensor(datatype: str, shape: list[int], size: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "x",
                "shape": shape,
                "datatype": datatype,
                "parameters": {"binary_data_size": size},
            }
        ]
    }


def _strings(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


_BAD_BINARY = [
    (
        _binary(_tensor("FP32", [2], 4), b"\0" * 4),
        "binary_data_size is 4 but 2 FP32 elements take 8",
    ),
    (_binary(_tensor("FP32", [2], 8), b"\0" * 4), "binary_data_size 8 runs past the end"),
    (_binary(_tensor("FP32", [1], 4), b"\0" * 6), "2 bytes after the binary inputs belong to no"),
    (_binary(_tensor("FP32", [1], -4), b"\0" * 4), "binary_data_size must be a non-negative"),
    (_binary(_tensor("FP32", [1], 4.0), b"\0" * 4), "binary_data_size must be a non-negative"),
    (_binary(_tensor("FP32", [1], True), b"\0" * 4), "binary_data_size must be a non-negative"),
    (_binary(_tensor("BOOL", [2], 2), b"\x01\x02"), "BOOL bytes must be 0 or 1"),
    (_binary(_tensor("BYTES", [2], 4), _strings(b"")), "4 is too small for 2 BYTES elements"),
    (
        _binary(_tensor("BYTES", [2], 13), _strings(b"abc") + b"\x09\0\0\0ab"),
        "BYTES element 1 runs past binary_data_size",
    ),
    (
        _binary(_tensor("BYTES", [2], 12), _strings(b"ab", b"") + b"zz"),
        "2 bytes of BYTES data are left after 2 elements",
    ),
    (
        _binary(_tensor("BYTES", [2], 9), _strings(b"ab", b"c")[:9]),
        "BYTES data ends inside element 1's length",
    ),
    (
        _binary(
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [1],
                        "datatype": "INT8",
                        "data": [1],
                        "parameters": {"binary_data_size": 1},
                    }
                ]
            },
            b"\x01",
        ),
        "'x' has both 'data' and binary_data_size",
    ),
]


@pytest.mark.parametrize(("request_", "message"), _BAD_BINARY)
def test_bad_binary_requests_are_refused_with_a_precise_message(
    request_: tuple[bytes, int], message: str
) -> None:
    body, length = request_
    with pytest.raises(OipError, match=message):
        oip.decode_request(body, length)


def test_binary_bytes_elements_stop_at_their_own_tensor() -> None:
    # The second tensor's bytes must not be read as the end of the first's last element.
    header = {
        "inputs": [
            {"name": "a", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}},
            {"name": "b", "shape": [1], "datatype": "UINT8", "parameters": {"binary_data_size": 1}},
        ]
    }
    body, length = _binary(header, b"\x03\0\0\0ab" + b"c")
    with pytest.raises(OipError, match="'a': BYTES element 0 runs past binary_data_size"):
        oip.decode_request(body, length)


def test_header_length_must_fit_the_body_and_binary_needs_it() -> None:
    body, length = _body([_input("x", np.ones(2, np.float32), "FP32", binary=True)])
    assert length is not None
    with pytest.raises(OipError, match=f"is {len(body) + 1} but the request body is {len(body)}"):
        oip.decode_request(body, len(body) + 1)
    with pytest.raises(OipError, match="is -1 but"):
        oip.decode_request(body, -1)
    with pytest.raises(OipError, match="has no Inference-Header-Content-Length header"):
        oip.decode_request(body[:length], None)
    with pytest.raises(OipError, match="not valid JSON"):
        oip.decode_request(body, length - 1)  # the header cut short


def test_header_length_parsing() -> None:
    assert oip.parse_header_length(None) is None
    assert oip.parse_header_length("123") == 123
    assert oip.parse_header_length(" 7 ") == 7
    for bad in ["", "-1", "+5", "1_000", "12a", "\u0661\u0662", "1" * 19]:
        with pytest.raises(OipError, match="must be a non-negative integer"):
            oip.parse_header_length(bad)


# -- compressed bodies -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data, wbits=-zlib.MAX_WBITS)),
        (" GZIP ", gzip.compress),
        ("identity", lambda data: data),
        (None, lambda data: data),
    ],
    ids=["gzip", "deflate-zlib", "deflate-raw", "gzip-case", "identity", "none"],
)
def test_compressed_request_round_trip(encoding: str | None, compress: Any) -> None:
    # What tritonclient's request_compression_algorithm does to the body.
    array = _sample("FP32", (16, 16))
    body, length = _body([_input("x", array, "FP32", binary=True)])
    plain = decode_content(compress(body), encoding, limit=len(body))
    assert plain == body
    _assert_same(oip.decode_request(plain, length).inputs[0].data, array)
