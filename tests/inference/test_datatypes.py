"""The datatype table against tritonclient's, and the dtypes that have no OIP datatype."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.utils import triton_to_np_dtype

from narthex.inference.datatypes import DATATYPES, datatype_of, onnx_datatype


@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_datatype_table_agrees_with_tritonclient(datatype: str) -> None:
    assert DATATYPES[datatype] == np.dtype(triton_to_np_dtype(datatype))
    assert datatype_of(np.dtype(triton_to_np_dtype(datatype))) == datatype


def test_datatype_of_text_arrays_and_refusals() -> None:
    assert datatype_of(np.array(["a"]).dtype) == "BYTES"
    assert datatype_of(np.array([b"a"]).dtype) == "BYTES"
    with pytest.raises(ValueError, match="complex"):
        datatype_of(np.dtype(np.complex64))


def test_onnx_types_name_their_oip_datatype() -> None:
    assert onnx_datatype("tensor(float)") == "FP32"
    assert onnx_datatype("tensor(string)") == "BYTES"
    assert onnx_datatype("tensor(complex64)") == "tensor(complex64)"  # no OIP name: as is
