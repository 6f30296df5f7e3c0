"""Apply signatures to models, and remove them again bit for bit: one algorithm over
a :class:`Target`.

Targets: a dict of numpy arrays (:class:`NumpyTarget`: float32, float16, uint16 = bf16
bits or ``ml_dtypes.bfloat16``), a torch ``state_dict`` or ``nn.Module``
(:class:`~robustpatch.torch_bridge.TorchTarget`: CPU tensors patched in place through
zero-copy views; CUDA tensors with torch on the device), and a safetensors file streamed
into a new file (:class:`~robustpatch.files.FileTarget`, used by ``apply_file``).

Everything is checked before the first byte changes (names, shapes, dtypes, NaN); if
anything still fails midway, what was already patched in memory is rolled back (a file
target's output is discarded instead).

>>> from robustpatch.signature import Signature
>>> fog = Signature.from_deltas({"w": np.full(4, 0.1, np.float32)}, name="fog")
>>> noise = Signature.from_deltas({"w": np.full(4, 0.3, np.float32)}, name="noise")
>>> model = {"w": np.linspace(-1, 1, 4, dtype=np.float32)}
>>> before = model["w"].copy()
>>> undo = apply(model, [fog, noise], alphas=[1.0, 0.5])
>>> remove(model, undo)["tensors"]
1
>>> bool((model["w"] == before).all())  # the model is bit-identical to before
True
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Protocol, Union

import numpy as np

from . import _core
from .dtypes import PATCHABLE, kernel_view, label_of, narrow
from .errors import InvalidArgumentError, MismatchError, NonFiniteError
from .options import MEMORY_OPTIONS, PatchOptions
from .signature import Signature, SignatureLike, blend_bn, terms

__all__ = [
    "Undo",
    "apply",
    "remove",
    "subtract",
    "Target",
    "NumpyTarget",
    "EngineRecord",
    "Plan",
    "make_plan",
    "check_plan",
    "patch_target",
    "restore_target",
]

Alphas = Union[float, Sequence[float]]


@dataclass(frozen=True)
class EngineRecord:
    """The engine's exact-undo record of one tensor: the positions where ``(w + δ) − δ``
    does not give ``w`` back, and the original bits there (numpy arrays)."""

    positions: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.positions)


class Target(Protocol):
    """A model that apply/remove/subtract patch, tensor by tensor.

    :meth:`visit` yields the names to work on, in the order the target wants them (a
    streamed file: its own order); the per-tensor methods are called only for the name
    just yielded. Close the iterator when done (``contextlib.closing``): a streamed
    target then finishes or abandons its output.
    """

    def spec(self, name: str) -> tuple[str, tuple[int, ...]] | None: ...
    def span(self, name: str) -> tuple[int, int]: ...
    def check_writable(self, name: str) -> None: ...
    def visit(self, names: Sequence[str]) -> Iterator[str]: ...
    def add(
        self, name: str, deltas: Sequence[Any], alphas: Sequence[float], record: bool
    ) -> tuple[Any, int]: ...
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
            raise InvalidArgumentError(f"{name}: expected a numpy array, got {type(a).__name__}")
        return label_of(a), tuple(a.shape)

    def span(self, name: str) -> tuple[int, int]:
        """The bytes the array's elements occupy, from the lowest to past the highest
        (strides may be negative); empty for an empty array."""
        a = self.arrays[name]
        ptr = int(a.__array_interface__["data"][0])
        if not a.size:
            return ptr, ptr
        reach = [(n - 1) * s for n, s in zip(a.shape, a.strides)]
        return ptr + sum(min(r, 0) for r in reach), ptr + sum(max(r, 0) for r in reach) + a.itemsize

    def check_writable(self, name: str) -> None:
        a = self.arrays[name]
        if not a.flags.c_contiguous:
            raise InvalidArgumentError(f"{name}: array is not C-contiguous")
        if not a.flags.writeable:
            raise InvalidArgumentError(f"{name}: array is read-only")

    def visit(self, names: Sequence[str]) -> Iterator[str]:
        yield from names

    def add(
        self, name: str, deltas: Sequence[Any], alphas: Sequence[float], record: bool
    ) -> tuple[EngineRecord | None, int]:
        """The undo record (None unless ``record``) and the elements that overflowed."""
        rec, overflowed = _core.apply(self._array(name), list(deltas), list(alphas), record)
        return (None if rec is None else EngineRecord(*rec)), overflowed

    def subtract(
        self, name: str, deltas: Sequence[Any], alphas: Sequence[float], record: Any
    ) -> tuple[int, int]:
        arrays = () if record is None else (record.positions, record.values)
        return _core.remove(self._array(name), list(deltas), list(alphas), *arrays)

    def snapshot(self, name: str) -> np.ndarray:
        return self.arrays[name].copy()

    def restore(self, name: str, snap: np.ndarray) -> None:
        a = self.arrays[name]
        a[...] = snap.reshape(a.shape)

    def sample(self, name: str, positions: np.ndarray) -> bytes:
        """The bytes of the elements at ``positions`` (flat indices)."""
        return self.arrays[name].reshape(-1)[positions].tobytes()

    def read_values(self, name: str) -> np.ndarray:
        a = self._array(name)
        if label_of(a) == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return a.astype(np.float64)

    def write_values(self, name: str, x: np.ndarray) -> None:
        a = self._array(name)
        label = label_of(a)
        a[...] = narrow(x.astype(np.float32), label) if label == "BF16" else x.astype(a.dtype)


def as_target(obj: Any) -> Target:
    """Wrap a model (dict of arrays, torch module or state dict) as a patch target; a
    target already built is taken as it is (``TorchTarget(obj, torch_ops=True)``)."""
    from .torch_bridge import TorchTarget, is_torch_object

    if isinstance(obj, (NumpyTarget, TorchTarget)):
        return obj
    if is_torch_object(obj):
        return TorchTarget(obj)
    if isinstance(obj, Mapping):
        return NumpyTarget(obj)
    if isinstance(obj, (str, os.PathLike)):
        raise InvalidArgumentError(
            f"{os.fspath(obj)} is a file: files are patched with apply_file(src, sigs, alphas, "
            "out) and restored with remove_file(patched, out)"
        )
    raise InvalidArgumentError(
        f"cannot patch a {type(obj).__name__}; expected a dict of arrays or torch"
    )


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


def make_plan(sigs: Sequence[Signature], alphas: Sequence[float]) -> Plan:
    """Group the entries of several signatures per target tensor, in signature order
    (``alphas``: one validated α per weight-1 signature, as :func:`terms` gives)."""
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
    _check_one_kind(plan)
    return plan


def _check_one_kind(plan: Plan) -> None:
    """A tensor is either moved by deltas or blended as a BatchNorm buffer: given both,
    one would be lost (a file target applied the deltas alone)."""
    both = next((n for n in plan.deltas if n in plan.bn), None)
    if both is not None:
        kinds = {s.name: s.entries[both].kind for s in plan.sigs if both in s.entries}
        shown = ", ".join(f"{name!r} ({kind})" for name, kind in kinds.items())
        raise MismatchError(
            f"{both}: signatures give it both a delta and a BatchNorm replacement ({shown}); "
            "apply them one after the other"
        )


def check_plan(
    plan: Plan,
    spec_of: Any,
    force: bool = False,
    writable: Any = None,
    *,
    allow_dtype_change: bool = False,
    model: str | os.PathLike[str] | None = None,
) -> None:
    """Refuse (MismatchError) unless every touched tensor fits; ``force`` relaxes dtype
    and shape checks (the element count must still match); ``allow_dtype_change`` only
    the dtype check (a float tensor either way). ``model``: the file the tensors are
    in, named first in the error."""
    try:
        _check_fits(plan, spec_of, force, writable, allow_dtype_change)
    except MismatchError as e:
        if model is None:
            raise
        raise MismatchError(f"{os.fspath(model)}: {e}") from None


def _check_fits(
    plan: Plan, spec_of: Any, force: bool, writable: Any, allow_dtype_change: bool
) -> None:
    for sig in plan.sigs:
        for name, e in sig.entries.items():
            spec = spec_of(name)
            if spec is None:
                raise MismatchError(
                    f"the model has no tensor {name!r} (signature {sig.name!r} touches it)"
                )
            label, shape = spec
            if e.kind == "delta" and label not in PATCHABLE:
                raise MismatchError(
                    f"{name}: cannot patch a {label} tensor (F32, F16 or BF16 only)"
                )
            if e.kind == "bn" and label not in PATCHABLE + ("F64",):
                raise MismatchError(f"{name}: BatchNorm buffer has non-float dtype {label}")
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


# ---------------------------------------------------------------------------- the algorithm


class UndoSink(Protocol):
    """Where :func:`patch_target` keeps what removal needs, tensor by tensor."""

    def keep_delta(self, name: str, record: Any) -> None: ...
    def keep_bn(self, name: str, original: Any) -> None: ...


class UndoSource(Protocol):
    """Where :func:`restore_target` finds what :func:`patch_target` kept."""

    def delta_record(self, name: str) -> Any: ...
    def bn_original(self, name: str) -> Any: ...


@dataclass
class Overflow:
    """Elements a patch turned from finite into ±Inf or NaN, and the first tensor."""

    count: int = 0
    first: str = ""

    def add(self, name: str, n: int, label: str) -> None:
        if n and not self.count:
            self.first = f"{name!r} ({label})"
        self.count += n

    def check(self, allowed: bool) -> None:
        if self.count and not allowed:
            raise NonFiniteError(
                f"{self.count} elements overflow to Inf or NaN (first in tensor {self.first}): "
                "weight + α·δ is outside the tensor dtype's range; nothing was written "
                "(allow_nonfinite=True to write them anyway)"
            )


def patch_target(
    tgt: Target, plan: Plan, undo: UndoSink | None, allow_nonfinite: bool = False
) -> None:
    """Add the plan's fused deltas and blend its BatchNorm buffers, tensor by tensor,
    keeping each tensor's undo record in ``undo`` (None: keep nothing). Elements that
    overflow are counted by the same pass; unless ``allow_nonfinite``, NonFiniteError
    is raised once every tensor is done (the caller rolls back or discards)."""
    overflow = Overflow()
    with closing(tgt.visit(plan.names)) as names:
        for name in names:
            if name in plan.deltas:
                ds, al = plan.deltas[name]
                label = tgt.spec(name)
                record, overflowed = tgt.add(name, ds, al, record=undo is not None)
                if undo is not None:
                    undo.keep_delta(name, record)
                overflow.add(name, overflowed, label[0] if label else "?")
            else:
                rs, ws = plan.bn[name]
                original = tgt.snapshot(name) if undo is not None else None
                tgt.write_values(name, blend_bn(tgt.read_values(name), rs, ws))
                if undo is not None:
                    undo.keep_bn(name, original)
        overflow.check(allow_nonfinite)


def restore_target(tgt: Target, plan: Plan, undo: UndoSource) -> int:
    """Undo :func:`patch_target` exactly; returns the elements corrected from records."""
    corrected = 0
    with closing(tgt.visit(plan.names)) as names:
        for name in names:
            if name in plan.deltas:
                ds, al = plan.deltas[name]
                corrected += tgt.subtract(name, ds, al, undo.delta_record(name))[0]
            else:
                tgt.restore(name, undo.bn_original(name))
    return corrected


# ---------------------------------------------------------------------------- in memory


@dataclass(repr=False, eq=False)  # records are arrays: no field-by-field repr or ==
class Undo:
    """What :func:`remove` needs to restore a model in memory bit for bit.

    ``records``: per patched tensor, the engine's record of the elements plain
    subtraction would get wrong; ``bn``: the original BatchNorm buffers (small).
    """

    plan: Plan
    records: dict[str, Any] = field(default_factory=dict)
    bn: dict[str, Any] = field(default_factory=dict)
    specs: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    removed: bool = False
    # per patched tensor: a spread of element positions and their bytes once patched
    witness: dict[str, tuple[np.ndarray, bytes]] = field(default_factory=dict)

    def keep_delta(self, name: str, record: Any) -> None:
        self.records[name] = record

    def keep_bn(self, name: str, original: Any) -> None:
        self.bn[name] = original

    def delta_record(self, name: str) -> Any:
        return self.records[name]

    def bn_original(self, name: str) -> Any:
        return self.bn[name]

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
        return sum(len(r) for r in self.records.values() if r is not None)

    def __repr__(self) -> str:
        names = ", ".join(f"{a['name']!r} x {a['alpha']:g}" for a in self.applied)
        state = "removed" if self.removed else "applied"
        return (
            f"Undo({names}; {len(self.specs)} tensors, {self.record_elements} elements "
            f"recorded; {state})"
        )


def plan_for(sigs: SignatureLike | Sequence[SignatureLike], alphas: Any) -> Plan:
    """The plan of a public call: signatures loaded, α validated, scaled signatures and
    sums expanded into their stored terms (:func:`~robustpatch.signature.terms`)."""
    pairs = terms(sigs, alphas)
    return make_plan([s for s, _ in pairs], [a for _, a in pairs])


def apply(
    target: Any, sigs: SignatureLike | Sequence[SignatureLike], alphas: Alphas = 1.0, **checks: bool
) -> Undo:
    """Add ``Σ α_k · sig_k`` to ``target`` in place; returns the :class:`Undo` record.

    ``sigs``: one or several signatures (or paths to signature files); ``alphas``: one α
    per signature, or one for all. Deltas for the same tensor are fused (rounded once).
    BatchNorm running statistics are blended toward the signatures' replacements.
    Refuses (MismatchError) a model whose names/shapes/dtypes do not match unless
    ``force=True`` (``allow_dtype_change=True`` relaxes the dtype check alone). Nothing
    is modified when a check fails. A result that overflows the tensor's dtype (a finite
    weight becoming ±Inf) is refused (NonFiniteError, the model rolled back) unless
    ``allow_nonfinite=True``. ``checks``: those three keywords.
    """
    opts = PatchOptions.of(checks, "apply", MEMORY_OPTIONS)
    plan, tgt = _checked(target, sigs, alphas, opts)
    undo = Undo(plan, specs={n: tgt.spec(n) for n in plan.names})
    _patch_or_roll_back(tgt, undo, opts.allow_nonfinite)
    for name, (_, shape) in undo.specs.items():
        at = _witness_positions(math.prod(shape))
        undo.witness[name] = (at, tgt.sample(name, at))
    return undo


#: Elements per tensor whose patched bytes :func:`remove` checks before it restores.
WITNESSES = 64


def _witness_positions(numel: int) -> np.ndarray:
    """``WITNESSES`` flat positions spread over a tensor, first and last included."""
    return np.unique(np.linspace(0, max(numel - 1, 0), min(WITNESSES, numel), dtype=np.int64))


def _check_unchanged(tgt: Any, undo: Undo) -> None:
    """Refuse a removal from a tensor changed since the patch (reloaded, trained on):
    restoring it would mix record originals into new values. A spread of its elements
    must still hold the bytes the patch left (a change to a few elements only can pass)."""
    for name, (at, patched) in undo.witness.items():
        if tgt.sample(name, at) != patched:
            raise MismatchError(
                f"{name}: changed since the patch (its values are not the ones apply left); "
                "remove would not restore the original, so nothing was changed"
            )


def _checked(target: Any, sigs: Any, alphas: Alphas, opts: PatchOptions) -> tuple[Plan, Target]:
    """The plan of a public call and its target, checked before anything changes."""
    plan = plan_for(sigs, alphas)
    tgt = as_target(target)
    check_plan(
        plan,
        tgt.spec,
        opts.force,
        tgt.check_writable,
        allow_dtype_change=opts.allow_dtype_change,
    )
    _check_aliases(tgt, plan.names)
    return plan, tgt


def _patch_or_roll_back(tgt: Target, undo: Undo, allow_nonfinite: bool) -> None:
    """Run ``undo.plan`` on the target; on any failure put back what was patched."""
    try:
        patch_target(tgt, undo.plan, undo, allow_nonfinite)
    except BaseException:
        _rollback(tgt, undo)
        raise


def _check_aliases(tgt: Target, names: Sequence[str]) -> None:
    """Refuse to patch any byte twice: tied weights listed under two names, or two views
    that overlap (the second patch would add to the first, and no record restores it)."""
    spans = sorted((lo, hi, n) for n in names for lo, hi in [tgt.span(n)] if hi > lo)
    for (_, hi, first), (lo2, _, second) in zip(spans, spans[1:]):
        if lo2 < hi:
            raise MismatchError(
                f"{first!r} and {second!r} share memory (tied weights, or views that "
                "overlap): keep one of them in the signature (Signature.select)"
            )


def _rollback(tgt: Target, undo: Undo) -> None:
    for name, rec in undo.records.items():
        ds, al = undo.plan.deltas[name]
        tgt.subtract(name, ds, al, rec)
    for name, snap in undo.bn.items():
        tgt.restore(name, snap)


def remove(target: Any, undo: Undo) -> dict[str, int]:
    """Undo :func:`apply` on the same target: restores every touched tensor bit for bit.

    Returns counts: tensors restored, BN buffers restored, elements corrected from the
    record. Refuses, changing nothing, a target whose touched tensors changed name,
    shape or dtype, or values since the patch (checked on :data:`WITNESSES` elements
    spread over each tensor), and an undo record that was already used.
    """
    if undo.removed:
        raise InvalidArgumentError("this undo record was already used")
    tgt = as_target(target)
    for name, spec in undo.specs.items():
        found = tgt.spec(name)
        if found is None or (found[0], tuple(found[1])) != (spec[0], tuple(spec[1])):
            raise MismatchError(f"{name}: the target does not match the undo record ({found})")
        tgt.check_writable(name)
    _check_unchanged(tgt, undo)
    corrected = restore_target(tgt, undo.plan, undo)
    undo.removed = True
    return {"tensors": len(undo.records), "bn_buffers": len(undo.bn), "corrected": corrected}


def subtract(
    target: Any, sigs: SignatureLike | Sequence[SignatureLike], alphas: Alphas = 1.0, **checks: bool
) -> dict[str, int]:
    """Approximate removal without an undo record: ``w − Σ α·δ`` rounded once.

    Float addition is not invertible, so some elements may differ from the original by
    one unit in the last place; ``inconsistent`` counts the elements known to be wrong
    (a lower bound: most wrong elements cannot be detected without the record).
    BatchNorm buffers cannot be restored this way and are left as they are
    (``bn_left``). Prefer :func:`remove` with the record :func:`apply` returned. A result
    that overflows the tensor's dtype is refused (NonFiniteError, the model rolled back)
    unless ``allow_nonfinite=True``. ``checks``: ``force``, ``allow_dtype_change`` and
    ``allow_nonfinite``, as for :func:`apply`.
    """
    opts = PatchOptions.of(checks, "subtract", MEMORY_OPTIONS)
    plan, tgt = _checked(target, sigs, alphas, opts)
    # Adding −α·δ is the same rounding as subtracting α·δ (negation is exact), and the
    # add kernel counts overflow; its record (where re-adding α·δ misses w) is the set
    # of inconsistent elements, and lets a refusal roll back exactly.
    undo = Undo(_negated(plan))
    _patch_or_roll_back(tgt, undo, opts.allow_nonfinite)
    return {
        "tensors": len(plan.deltas),
        "inconsistent": undo.record_elements,
        "bn_left": len(plan.bn),
    }


def _negated(plan: Plan) -> Plan:
    """The plan's deltas with every α negated, without its BatchNorm blends."""
    deltas = {name: (ds, [-a for a in al]) for name, (ds, al) in plan.deltas.items()}
    return Plan(plan.sigs, [-a for a in plan.alphas], deltas)
