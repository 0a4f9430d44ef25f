"""Tensor element types: the Open Inference Protocol names, their numpy dtypes, ONNX's names.

Shared by the wire codec (`oip`), the model repository and loaded models, so that none of
them takes its types from another's module.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final, Literal

import numpy as np

__all__ = ["DATATYPES", "DataType", "datatype_of", "onnx_datatype"]

# OIP datatype -> numpy dtype. The byte order is spelled out because the wire is
# little-endian whatever the host is; on the (little-endian) hosts we run on these are the
# native dtypes, so `np.frombuffer` views need no conversion. BF16 is left out: numpy has no
# such dtype without ml_dtypes, and no narthex model uses it.
DATATYPES: Final[Mapping[str, np.dtype[Any]]] = MappingProxyType(
    {
        "BOOL": np.dtype("?"),
        "UINT8": np.dtype("u1"),
        "UINT16": np.dtype("<u2"),
        "UINT32": np.dtype("<u4"),
        "UINT64": np.dtype("<u8"),
        "INT8": np.dtype("i1"),
        "INT16": np.dtype("<i2"),
        "INT32": np.dtype("<i4"),
        "INT64": np.dtype("<i8"),
        "FP16": np.dtype("<f2"),
        "FP32": np.dtype("<f4"),
        "FP64": np.dtype("<f8"),
        "BYTES": np.dtype("O"),
    }
)
_BY_KIND: Final = {
    (dt.kind, dt.itemsize): name for name, dt in DATATYPES.items() if name != "BYTES"
}

# The datatypes a model's config may declare for its tensors (a subset of DATATYPES).
DataType = Literal["BOOL", "INT8", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]

_ONNX_TO_OIP: Final = {
    "tensor(bool)": "BOOL",
    "tensor(int8)": "INT8",
    "tensor(uint8)": "UINT8",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The OIP datatype for a numpy dtype; str, bytes and object arrays are BYTES."""
    if dtype.kind in "OUS":
        return "BYTES"
    try:
        return _BY_KIND[dtype.kind, dtype.itemsize]
    except KeyError:
        # A server-side bug (a model output narthex cannot represent), not the client's.
        raise ValueError(f"no Open Inference Protocol datatype for numpy dtype {dtype}") from None


def onnx_datatype(onnx_type: str) -> str:
    """The Open Inference Protocol datatype of an ONNX Runtime type string."""
    return _ONNX_TO_OIP.get(onnx_type, onnx_type)
