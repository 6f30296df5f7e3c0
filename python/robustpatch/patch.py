"""Apply signatures to models in memory, and remove them again bit for bit.

Targets: a dict of numpy arrays (float32, float16, uint16 = bf16 bits or
``ml_dtypes.bfloat16``), a torch ``state_dict`` or ``nn.Module`` (CPU tensors patched in
place through zero-copy views; CUDA tensors with torch on the device). Files have their
own functions in :mod:`robustpatch.files`.

Everything is checked before the first byte changes (names, shapes, dtypes, NaN); if
anything still fails midway, what was already patched is rolled back.

    undo = apply(model, [fog, noise], alphas=[1.0, 0.5])
    remove(model, undo)            # the model is bit-identical to before
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Union

import numpy as np

from . import _core
from .dtypes import PATCHABLE, kernel_view, label_of, narrow
from .errors import MismatchError, NonFiniteError
from .signature import Signature, SignatureLike, as_signatures, bn_blend_weights

__all__ = ["Undo", "apply", "remove", "subtract", "Plan", "make_plan", "blend_bn"]

Alphas = Union[float, Sequence[float]]


class Target(Protocol):
    """What apply/remove need from a model."""

    def spec(self, name: str) -> tuple[str, tuple[int, ...]] | None: ...
    def address(self, name: str) -> int: ...
    def check_writable(self, name: str) -> None: ...
    def add(self, name: str, deltas: Sequence[Any], alphas: Sequence[float]) -> Any: ...
    def subtract(
        self, name: str, deltas: Sequence[Any], alphas: Sequence[float], record: Any
    ) -> tuple[int, int]: ...
    def snapshot(self, name: str) -> Any: ...
    def restore(self, name: str, snap: Any) -> None: ...
    def read_values(self, name: str) -> np.ndarray: ...
    def write_values(self, name: str, x: np.ndarray) -> None: ...


class NumpyTarget:
    """Patch target over a dict of numpy arrays, modified in place."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.arrays = arrays

    def _array(self, name: str) -> np.ndarray:
        return kernel_view(self.arrays[name])

    def spec(self, name: str) -> tuple[str, tuple[int, ...]] | None:
        a = self.arrays.get(name)
        if a is None:
            return None
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
        return label_of(a), tuple(a.shape)

    def address(self, name: str) -> int:
        return int(self.arrays[name].__array_interface__["data"][0])

    def check_writable(self, name: str) -> None:
        a = self.arrays[name]
        if not a.flags.c_contiguous:
            raise ValueError(f"{name}: array is not C-contiguous")
        if not a.flags.writeable:
            raise ValueError(f"{name}: array is read-only")

    def add(self, name: str, deltas: Sequence[Any], alphas: Sequence[float]) -> Any:
        return _core.apply(self._array(name), list(deltas), list(alphas))

    def subtract(
        self, name: str, deltas: Sequence[Any], alphas: Sequence[float], record: Any
    ) -> tuple[int, int]:
        return _core.remove(self._array(name), list(deltas), list(alphas), *(record or ()))

    def snapshot(self, name: str) -> np.ndarray:
        return self.arrays[name].copy()

    def restore(self, name: str, snap: np.ndarray) -> None:
        self.arrays[name][...] = snap

    def read_values(self, name: str) -> np.ndarray:
        a = self._array(name)
        if label_of(a) == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return a.astype(np.float64)

    def write_values(self, name: str, x: np.ndarray) -> None:
        a = self._array(name)
        label = label_of(a)
        a[...] = narrow(x.astype(np.float32), label) if label == "BF16" else x.astype(a.dtype)


def as_target(obj: Any, torch_ops: bool = False) -> Target:
    """Wrap a model (dict of arrays, torch module or state dict) as a patch target."""
    from .torch_bridge import TorchTarget, is_torch_object

    if is_torch_object(obj):
        return TorchTarget(obj, torch_ops=torch_ops)
    if isinstance(obj, Mapping):
        return NumpyTarget(obj)
    if isinstance(obj, (str, os.PathLike)):
        raise TypeError("files are patched with apply_file(src, sigs, alphas, out)")
    raise TypeError(f"cannot patch a {type(obj).__name__}; expected a dict of arrays or torch")


# ---------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """What to do to each tensor: fused deltas with their α, and BN blends."""

    sigs: list[Signature]
    alphas: list[float]
    deltas: dict[str, tuple[list[Any], list[float]]] = field(default_factory=dict)
    bn: dict[str, tuple[list[np.ndarray], list[float]]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.deltas) + list(self.bn)


def normalize_alphas(n: int, alphas: Alphas) -> list[float]:
    """One α per signature (a single number applies to all); all finite."""
    if isinstance(alphas, (int, float, np.floating, np.integer)):
        out = [float(alphas)] * n
    else:
        out = [float(a) for a in alphas]
    if len(out) != n:
        raise ValueError(f"{n} signatures but {len(out)} alphas")
    for a in out:
        if not math.isfinite(a):
            raise NonFiniteError(f"alpha {a} is not finite")
    return out


def make_plan(sigs: Sequence[Signature], alphas: Sequence[float]) -> Plan:
    """Group the entries of several signatures per target tensor, in signature order."""
    plan = Plan(list(sigs), list(alphas))
    for sig, a in zip(sigs, alphas):
        for name, e in sig.entries.items():
            if e.numel == 0:
                continue
            if e.kind == "delta":
                ds, al = plan.deltas.setdefault(name, ([], []))
                ds.append(e.delta())
                al.append(a)
            else:
                rs, ws = plan.bn.setdefault(name, ([], []))
                rs.append(e.values)
                ws.append(a * e.weight)
    return plan


def check_plan(
    plan: Plan,
    spec_of: Any,
    force: bool = False,
    writable: Any = None,
    *,
    allow_dtype_change: bool = False,
) -> None:
    """Refuse (MismatchError/TypeError) unless every touched tensor fits; ``force``
    relaxes dtype and shape checks (the element count must still match);
    ``allow_dtype_change`` only the dtype check (a float tensor either way)."""
    for sig in plan.sigs:
        for name, e in sig.entries.items():
            spec = spec_of(name)
            if spec is None:
                raise MismatchError(
                    f"the model has no tensor {name!r} (signature {sig.name!r} touches it)"
                )
            label, shape = spec
            if e.kind == "delta" and label not in PATCHABLE:
                raise TypeError(f"{name}: cannot patch a {label} tensor (F32, F16 or BF16 only)")
            if e.kind == "bn" and label not in PATCHABLE + ("F64",):
                raise TypeError(f"{name}: BatchNorm buffer has non-float dtype {label}")
            if label != e.dtype and not (force or allow_dtype_change):
                raise MismatchError(
                    f"{name}: the model's tensor is {label} but signature {sig.name!r} was made "
                    f"for {e.dtype} (allow_dtype_change=True to apply anyway)"
                )
            if tuple(shape) != e.shape:
                if math.prod(shape) != e.numel:
                    raise MismatchError(
                        f"{name}: the model's shape {list(shape)} does not match the "
                        f"signature's {list(e.shape)}"
                    )
                if not force:
                    raise MismatchError(
                        f"{name}: the model's shape {list(shape)} differs from the signature's "
                        f"{list(e.shape)} (same element count; force=True to apply anyway)"
                    )
            if writable is not None:
                writable(name)


def blend_bn(
    current: np.ndarray, replacements: Sequence[np.ndarray], weights: Sequence[float]
) -> np.ndarray:
    """``(1 − Σe)·current + Σ e_k·r_k`` in float64 (see :func:`bn_blend_weights`).

    With Σe = 1 the current value does not enter at all (so a NaN/Inf there is replaced).
    """
    e = bn_blend_weights(weights)
    keep = 1.0 - sum(e)
    out = np.zeros(current.shape, np.float64)
    if keep > 0:
        out += keep * current
    for w, r in zip(e, replacements):
        if w > 0:
            out += w * r.reshape(current.shape).astype(np.float64)
    return out


# ---------------------------------------------------------------------------- undo


@dataclass
class Undo:
    """What :func:`remove` needs to restore a target bit for bit.

    ``records``: per patched tensor, the engine's record of the elements plain
    subtraction would get wrong; ``bn``: the original BatchNorm buffers (small).
    """

    plan: Plan
    records: dict[str, Any] = field(default_factory=dict)
    bn: dict[str, Any] = field(default_factory=dict)
    specs: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    removed: bool = False

    @property
    def applied(self) -> list[dict[str, Any]]:
        """The signatures applied: name, content hash and α."""
        return [
            {"name": s.name, "hash": s.content_hash, "alpha": a}
            for s, a in zip(self.plan.sigs, self.plan.alphas)
        ]

    @property
    def record_elements(self) -> int:
        """Elements the record holds (the size of the exact-undo overhead)."""
        return sum(_record_len(r) for r in self.records.values())


def _record_len(r: Any) -> int:
    if r is None:
        return 0
    if isinstance(r, tuple) and r and isinstance(r[0], str):  # torch target records
        return int(len(r[1][0])) if r[0] == "np" and r[1] is not None else int(r[1].numel())
    return int(len(r[0]))


def apply(
    target: Any,
    sigs: SignatureLike | Sequence[SignatureLike],
    alphas: Alphas = 1.0,
    *,
    force: bool = False,
    torch_ops: bool = False,
) -> Undo:
    """Add ``Σ α_k · sig_k`` to ``target`` in place; returns the :class:`Undo` record.

    ``sigs``: one or several signatures (or paths to signature files); ``alphas``: one α
    per signature, or one for all. Deltas for the same tensor are fused (rounded once).
    BatchNorm running statistics are blended toward the signatures' replacements.
    Refuses (MismatchError) a model whose names/shapes/dtypes do not match unless
    ``force=True``. Nothing is modified when a check fails.
    """
    sigs = as_signatures(sigs)
    plan = make_plan(sigs, normalize_alphas(len(sigs), alphas))
    tgt = as_target(target, torch_ops=torch_ops)
    check_plan(plan, tgt.spec, force, tgt.check_writable)
    _check_aliases(tgt, plan.names)
    undo = Undo(plan, specs={n: tgt.spec(n) for n in plan.names})
    try:
        for name, (ds, al) in plan.deltas.items():
            undo.records[name] = tgt.add(name, ds, al)
        for name, (rs, ws) in plan.bn.items():
            undo.bn[name] = tgt.snapshot(name)
            tgt.write_values(name, blend_bn(tgt.read_values(name), rs, ws))
    except BaseException:
        _rollback(tgt, undo)
        raise
    return undo


def _check_aliases(tgt: Target, names: Sequence[str]) -> None:
    """Refuse to patch one storage twice (tied weights listed under two names)."""
    seen: dict[int, str] = {}
    for name in names:
        addr = tgt.address(name)
        if addr in seen:
            raise MismatchError(
                f"{seen[addr]!r} and {name!r} share memory (tied weights): keep one of them "
                "in the signature (Signature.select)"
            )
        seen[addr] = name


def _rollback(tgt: Target, undo: Undo) -> None:
    for name, rec in undo.records.items():
        ds, al = undo.plan.deltas[name]
        tgt.subtract(name, ds, al, rec)
    for name, snap in undo.bn.items():
        tgt.restore(name, snap)


def remove(target: Any, undo: Undo) -> dict[str, int]:
    """Undo :func:`apply` on the same target: restores every touched tensor bit for bit.

    Returns counts: tensors restored, BN buffers restored, elements corrected from the
    record. Refuses a target whose touched tensors changed name, shape or dtype, and an
    undo record that was already used.
    """
    if undo.removed:
        raise ValueError("this undo record was already used")
    tgt = as_target(target)
    for name, spec in undo.specs.items():
        found = tgt.spec(name)
        if found is None or (found[0], tuple(found[1])) != (spec[0], tuple(spec[1])):
            raise MismatchError(f"{name}: the target does not match the undo record ({found})")
        tgt.check_writable(name)
    corrected = 0
    for name, rec in undo.records.items():
        ds, al = undo.plan.deltas[name]
        corrected += tgt.subtract(name, ds, al, rec)[0]
    for name, snap in undo.bn.items():
        tgt.restore(name, snap)
    undo.removed = True
    return {"tensors": len(undo.records), "bn_buffers": len(undo.bn), "corrected": corrected}


def subtract(
    target: Any,
    sigs: SignatureLike | Sequence[SignatureLike],
    alphas: Alphas = 1.0,
    *,
    force: bool = False,
) -> dict[str, int]:
    """Approximate removal without an undo record: ``w − Σ α·δ`` rounded once.

    Float addition is not invertible, so some elements may differ from the original by
    one unit in the last place; ``inconsistent`` counts the elements known to be wrong
    (a lower bound: most wrong elements cannot be detected without the record).
    BatchNorm buffers cannot be restored this way and are left as they are
    (``bn_left``). Prefer :func:`remove` with the record :func:`apply` returned.
    """
    sigs = as_signatures(sigs)
    plan = make_plan(sigs, normalize_alphas(len(sigs), alphas))
    tgt = as_target(target)
    check_plan(plan, tgt.spec, force, tgt.check_writable)
    _check_aliases(tgt, plan.names)
    bad = 0
    for name, (ds, al) in plan.deltas.items():
        bad += tgt.subtract(name, ds, al, None)[1]
    return {"tensors": len(plan.deltas), "inconsistent": bad, "bn_left": len(plan.bn)}
