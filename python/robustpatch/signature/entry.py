"""Signature entries: one tensor each, a dense or quantized delta or a BatchNorm
replacement, and the functions that build and quantize them.

``kind="delta"``: a weight delta, dense float32 or :class:`Quantized` (packed codes, one
f32 scale and offset per group), added to the target as ``w + α·δ``. ``kind="bn"``: a
BatchNorm running mean/variance *replacement* (float32), blended into the target (see
:func:`robustpatch.signature.algebra.blend_bn`); statistics are never added to.

>>> e = quantize_entry(dense_entry("w", np.arange(8, dtype=np.float32)), 4, "affine", "group", 4)
>>> e.is_quantized, e.quant.group_len, e.nbytes
(True, 4, 20)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .. import _core
from .._warn import warn
from ..dtypes import PATCHABLE, label_of, widen
from ..errors import InvalidArgumentError, NonFiniteError

__all__ = [
    "Quantized",
    "Entry",
    "dense_entry",
    "bn_entry",
    "group_len_for",
    "quantize_entry",
    "warn_if_groups_cost_more",
    "is_bn_stat",
    "check_finite",
]

BN_SUFFIXES = ("running_mean", "running_var")


def is_bn_stat(name: str) -> bool:
    """True for BatchNorm running statistics (``*.running_mean`` / ``*.running_var``)."""
    return name.rsplit(".", 1)[-1] in BN_SUFFIXES


@dataclass(frozen=True, eq=False)
class Quantized:
    """A quantized delta: the engine's :class:`~robustpatch._core.QuantTensor` (bit-packed
    codes, one f32 scale/offset per group, validated once when built) and how its groups
    were chosen."""

    tensor: _core.QuantTensor
    granularity: str
    group: int  # requested group size (granularity "group"), else 0

    codes = property(lambda self: self.tensor.codes, doc="Packed codes (read-only).")
    scale = property(lambda self: self.tensor.scale, doc="One scale per group (read-only).")
    offset = property(lambda self: self.tensor.offset, doc="One offset per group (read-only).")
    bits = property(lambda self: self.tensor.bits)
    scheme = property(lambda self: self.tensor.scheme)
    group_len = property(lambda self: self.tensor.group_len, doc="Elements per group used.")
    numel = property(lambda self: self.tensor.numel)

    def as_core(self) -> _core.QuantTensor:
        """The object the engine takes for a quantized delta."""
        return self.tensor

    def dequantize(self) -> np.ndarray:
        """Decoded values, flat float32."""
        return _core.dequantize(self.tensor)

    @property
    def nbytes(self) -> int:
        return self.tensor.nbytes


@dataclass(frozen=True, eq=False)
class Entry:
    """One tensor of a signature (see the module docstring for ``kind``)."""

    name: str
    kind: str  # "delta" | "bn"
    shape: tuple[int, ...]
    dtype: str  # dtype of the target tensor (F32, F16, BF16, F64 for BN buffers)
    values: np.ndarray | None = None  # dense f32 delta or BN replacement
    quant: Quantized | None = None
    weight: float = 1.0  # BN blend weight (a combined replacement carries Σ e_k)
    stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # What a file stores and a load requires: a name and a dtype label, as strings.
        if not isinstance(self.name, str):
            raise InvalidArgumentError(f"a tensor name must be a string, got {self.name!r}")
        if not isinstance(self.dtype, str):
            raise InvalidArgumentError(
                f"{self.name}: the target dtype must be a label such as 'F32', got {self.dtype!r}"
            )

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_quantized(self) -> bool:
        return self.quant is not None

    @property
    def nbytes(self) -> int:
        """Bytes stored in the file for this entry (a dense delta in the narrowest dtype
        that holds it exactly, as a file stores it)."""
        if self.quant is not None:
            return self.quant.nbytes
        if self.kind == "delta" and self.values.dtype == np.float32:
            return self._compact_nbytes
        return int(self.values.nbytes)

    @functools.cached_property
    def _compact_nbytes(self) -> int:
        label, _ = _core.compact(np.ascontiguousarray(self.values).reshape(-1))
        return self.numel * (4 if label == "F32" else 2)

    def delta(self) -> Any:
        """The delta as the engine takes it (a flat f32 array or a QuantTensor)."""
        if self.quant is not None:
            return self.quant.as_core()
        return self.values.reshape(-1)

    def dense(self) -> np.ndarray:
        """Values as float32 with the entry's shape (decoded if quantized; widened where a
        streamed file holds them as bfloat16 bits or float16)."""
        if self.quant is not None:
            return self.quant.dequantize().reshape(self.shape)
        if self.values.dtype != np.float32:
            label = "BF16" if self.values.dtype == np.uint16 else "F16"
            return widen(self.values, label).reshape(self.shape)
        return self.values

    def energy(self) -> float:
        """Squared L2 norm ‖δ‖² (computed from the codes when quantized)."""
        if self.numel == 0:
            return 0.0
        d = self.delta()
        return float(_core.dot(d, d))

    def file_tensors(self) -> dict[str, np.ndarray]:
        """The tensors this entry occupies in a signature file."""
        if self.kind == "bn":
            return {f"{self.name}.replace": self.values}
        if self.quant is not None:
            q = self.quant
            return {
                f"{self.name}.codes": q.codes,
                f"{self.name}.scale": q.scale,
                f"{self.name}.offset": q.offset,
            }
        return {self.name: self.values}

    def spec(self) -> dict[str, Any]:
        """The JSON description of this entry stored in the file."""
        d: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "encoding": "quantized" if self.quant is not None else "dense",
        }
        if self.quant is not None:
            q = self.quant
            d.update(
                bits=q.bits,
                scheme=q.scheme,
                granularity=q.granularity,
                group=q.group,
                group_len=q.group_len,
            )
        if self.kind == "bn":
            d["weight"] = self.weight
        if self.stats:
            d["stats"] = dict(self.stats)
        return d


def check_finite(name: str, arr: np.ndarray, what: str) -> None:
    if arr.size and not np.isfinite(arr).all():
        i = int(np.flatnonzero(~np.isfinite(arr.reshape(-1)))[0])
        raise NonFiniteError(f"{name}: {what} holds NaN or Inf at flat index {i}")


def _default_target(arr: np.ndarray) -> str:
    label = label_of(arr)
    return label if label in PATCHABLE else "F32"


def dense_entry(
    name: str,
    values: np.ndarray,
    dtype: str | None = None,
    stats: Mapping[str, float] | None = None,
) -> Entry:
    """A dense delta entry (``values`` converted to float32, checked finite)."""
    arr = np.asarray(values)
    label = dtype or _default_target(arr)
    f32 = _contiguous_f32(arr)
    check_finite(name, f32, "delta")
    return Entry(name, "delta", tuple(f32.shape), label, values=f32, stats=dict(stats or {}))


def bn_entry(name: str, replace_with: np.ndarray, dtype: str | None = None, weight=1.0) -> Entry:
    """A BatchNorm replacement entry (``replace_with`` = the robust model's values)."""
    arr = np.asarray(replace_with)
    label = dtype or _default_target(arr)
    f32 = _contiguous_f32(arr)
    check_finite(name, f32, "BatchNorm replacement")
    return Entry(name, "bn", tuple(f32.shape), label, values=f32, weight=float(weight))


def _contiguous_f32(arr: np.ndarray) -> np.ndarray:
    """``arr`` as C-contiguous float32, its shape kept (0-d included, which
    ``np.ascontiguousarray`` would make 1-d)."""
    return np.asarray(widen(arr) if arr.dtype != np.float32 else arr, order="C")


def group_len_for(shape: Sequence[int], granularity: str, group: int) -> int:
    """Elements per contiguous quantization group (arguments already validated).

    ``tensor``: all elements; ``channel``: ``numel // shape[0]`` (one per output
    channel), except where a channel holds a single element (a bias or BatchNorm
    vector): one scale and offset per element would cost twice the float32 data, so
    such a tensor gets one scale; ``group``: ``group`` if it divides the element count,
    else the largest divisor of the count not above ``group`` (recorded in the file).

    >>> group_len_for((4, 6), "channel", 0), group_len_for((10,), "group", 4)
    (6, 2)
    """
    numel = math.prod(shape)
    if granularity == "tensor" or numel == 0 or len(shape) == 0:
        return max(numel, 1)
    if granularity == "channel":
        per_channel = numel // shape[0]
        return per_channel if per_channel > 1 else numel
    if numel <= group:
        return numel
    return next(g for g in range(group, 0, -1) if numel % g == 0)


def warn_if_groups_cost_more(e: Entry, bits: int, granularity: str, group: int) -> None:
    """Warn when no group of up to ``group`` elements divides the tensor and the groups
    that do take more bits a weight than float32 (each stores an f32 scale and offset)."""
    if e.kind != "delta" or e.numel == 0 or granularity != "group":
        return
    glen = group_len_for(e.shape, granularity, group)
    if glen < min(group, e.numel) and bits + 64 / glen > 32:
        warn(
            f"{e.name}: no group of up to {group} elements divides its {e.numel}, so groups of "
            f"{glen} take {bits + 64 / glen:g} bits a weight, more than float32's 32; "
            "quantize it with granularity='channel' or 'tensor'"
        )


def quantize_entry(e: Entry, bits: int, scheme: str, granularity: str, group: int) -> Entry:
    """Quantize one delta entry (BN entries and empty tensors are returned unchanged).

    The arguments come validated from :meth:`Signature.quantize`; the engine still
    refuses bits or a group length it cannot code. Callers warn with
    :func:`warn_if_groups_cost_more` (in the caller's thread: ``extract_to`` quantizes in
    a thread of its own).
    """
    if e.kind != "delta" or e.numel == 0:
        return e
    dense = np.ascontiguousarray(e.dense().reshape(-1))
    glen = group_len_for(e.shape, granularity, group)
    tensor = _core.quantize(dense, bits, scheme, glen)
    q = Quantized(tensor, granularity, group if granularity == "group" else 0)
    return replace(e, values=None, quant=q)
