"""Shared test helpers."""

import numpy as np


def bf16_from_f32(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bits (uint16), nearest even: the reference for the kernels."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    nan = ((b >> 16) | 0x40).astype(np.uint16)
    return np.where(np.isnan(x), nan, rounded)


def bf16_to_f32(b: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bits (uint16) to float32, exactly."""
    return (b.astype(np.uint32) << 16).view(np.float32)
