"""dtype glue between numpy, safetensors names and the engine.

The engine patches float32, float16 and bfloat16 tensors; numpy has no bfloat16, so
bf16 travels as ``uint16`` holding the bits (``ml_dtypes.bfloat16`` arrays are viewed
that way too). Labels are the safetensors dtype names (``F32``, ``F16``, ``BF16``...).
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidArgumentError

#: Float dtypes the engine can patch, by safetensors label.
PATCHABLE = ("F32", "F16", "BF16")

#: numpy dtype used to hold each safetensors dtype (BF16 as uint16 bits; F8 as raw bytes).
NUMPY_OF_LABEL: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(np.uint16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(np.uint8),
    "F8_E5M2": np.dtype(np.uint8),
}

_LABEL_OF_NUMPY = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.uint16): "BF16",  # the engine's convention: uint16 arrays hold bf16 bits
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint64): "U64",
    np.dtype(np.uint32): "U32",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}


def kernel_view(arr: np.ndarray) -> np.ndarray:
    """The array as the engine takes it: ``ml_dtypes.bfloat16`` is viewed as uint16 bits."""
    if arr.dtype.name == "bfloat16":
        return arr.view(np.uint16)
    return arr


def label_of(arr: np.ndarray) -> str:
    """safetensors dtype label of a numpy array (uint16 and bfloat16 read as ``BF16``)."""
    arr = kernel_view(arr)
    try:
        return _LABEL_OF_NUMPY[arr.dtype]
    except KeyError:
        raise InvalidArgumentError(f"unsupported dtype {arr.dtype}") from None


def widen(arr: np.ndarray, label: str | None = None) -> np.ndarray:
    """A float32 copy of a float array (bf16 bits widened exactly)."""
    arr = kernel_view(np.asarray(arr))
    label = label or label_of(arr)
    if label == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def narrow(x: np.ndarray, label: str) -> np.ndarray:
    """float32 ``x`` rounded (nearest even) to the dtype ``label`` (BF16 as uint16 bits)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if label == "BF16":
        b = x.view(np.uint32).astype(np.uint64)
        rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
        quiet_nan = ((b >> 16) | 0x40).astype(np.uint16)
        return np.where(np.isnan(x), quiet_nan, rounded)
    return x.astype(NUMPY_OF_LABEL[label])
