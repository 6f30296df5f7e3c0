"""The signature of one tensor from its pretrained, clean and robust arrays: the
projection ``Δr − (⟨Δr, d⟩/‖d‖²)·d`` (``Δr = robust − pretrained``, ``d = clean −
pretrained``) or the difference ``robust − clean``, by the engine's fused kernel in one
or two passes over the stored dtype, and in float64 for float64 checkpoints. What
:mod:`robustpatch.extraction` chooses tensors and writes signatures with."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _core
from .errors import NonFiniteError

__all__ = ["Values", "project", "difference"]


@dataclass
class Values:
    """One tensor's signature, its stats, and the squared norm it is judged against
    (‖Δr‖² for the projection, ‖robust‖² for the difference)."""

    sig: np.ndarray
    stats: dict[str, float]
    reference: float
    pretrained_digest: str | None = None  # the pretrained tensor's digest, when taken


def project(p: np.ndarray, c: np.ndarray, r: np.ndarray) -> Values:
    """The projection, with the pretrained tensor's digest (the base fingerprint's)."""
    if p.dtype == np.float64:
        return _wide(p, c, r)
    sig, stats = _core.project(p, c, r, hash_pretrained=True)
    digest = stats.get("pretrained_digest")
    stats = {
        "energy": float(stats["norm2_sig"]),
        "coef": float(stats["coef"]),
        "robust_energy": float(stats["norm2_r"]),
        "clean_energy": float(stats["norm2_d"]),
    }
    return Values(sig, stats, stats["robust_energy"], digest)


def difference(c: np.ndarray, r: np.ndarray) -> Values:
    """``robust − clean`` in float32 by the engine's fused projection with the clean
    tensor as the base: its clean delta is then zero, so is the coefficient, and the
    kernel returns ``Δr = r − c`` exactly as numpy's float32 subtraction rounds it, in
    one pass over the stored dtype (no widened copies), with ‖robust‖² (the near-zero
    warning's reference) summed in the same pass."""
    if c.dtype == np.float64:
        return _wide(None, c, r)
    d, stats = _core.project(c, c, r)
    return Values(d, {"energy": float(stats["norm2_sig"])}, float(stats["norm2_robust"]))


def _wide(p: np.ndarray | None, c: np.ndarray, r: np.ndarray) -> Values:
    """The projection (or, without ``p``, the difference) of float64 tensors, in float64
    and rounded once to the float32 a signature stores: rounding the weights first lost
    every change below float32's step at the weight's size, and read values past the
    float32 range as NaN. (No fingerprint digest: the engine hashes 16/32-bit tensors.)"""
    limit = float(np.finfo(np.float32).max)
    for w in (c, r) if p is None else (p, c, r):
        if not np.isfinite(w).all() or np.abs(w).max(initial=0) > limit:
            raise NonFiniteError("float64 weights hold NaN or Inf, or pass the float32 range")
    dr = r - c if p is None else r - p
    d = None if p is None else c - p
    norm2_d = 0.0 if d is None else float(d.ravel() @ d.ravel())
    coef = float(dr.ravel() @ d.ravel()) / norm2_d if norm2_d > 0 else 0.0
    wide = dr if d is None else dr - coef * d
    if np.abs(wide).max(initial=0) > limit:
        raise NonFiniteError("the float64 weights' difference passes the float32 range")
    sig = wide.astype(np.float32)
    energy = float(np.square(sig, dtype=np.float64).sum())
    robust = float(np.square(r, dtype=np.float64).sum())
    if p is None:
        return Values(sig, {"energy": energy}, robust)
    stats = {
        "energy": energy,
        "coef": coef,
        "robust_energy": float(dr.ravel() @ dr.ravel()),
        "clean_energy": norm2_d,
    }
    return Values(sig, stats, stats["robust_energy"])
