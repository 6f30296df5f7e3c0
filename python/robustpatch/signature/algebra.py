"""Computations over signatures as weighted terms: the (signature, α) pairs apply
patches with, fusing sums into one dense signature, BatchNorm blending, similarity.

Every signature-like (a :class:`Signature`, a scaled one, a :class:`SignatureSum`, a path)
becomes a list of ``(weight-1 signature, coefficient)`` terms (:func:`terms`); nothing
here decodes a quantized entry except :func:`combine`, which is asked to.

>>> import numpy as np
>>> a = Signature.from_deltas({"w": np.array([1, 2], np.float32)}, name="a")
>>> b = Signature.from_deltas({"w": np.array([4, 0], np.float32)}, name="b")
>>> [(s.name, x) for s, x in terms([0.5 * a + b], 2.0)]
[('a', 1.0), ('b', 2.0)]
>>> combine([a, b], [1.0, -0.5])["w"].dense()
array([-1.,  2.], dtype=float32)
>>> round(float(similarity([a, b])[0, 1]), 4)
0.4472
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .. import _core, validate
from .._warn import warn
from ..dtypes import label_of, narrow, widen
from ..errors import InvalidArgumentError, MismatchError, NonFiniteError, ZeroSignatureWarning
from .entry import Entry, bn_entry, dense_entry, is_bn_stat
from .model import Signature, SignatureLike, Term, as_signature, as_signatures, sum_name

__all__ = [
    "terms",
    "combine",
    "bn_blend_weights",
    "blend_bn",
    "blend_bn_array",
    "similarity",
    "detect",
]


def terms(sigs: SignatureLike | Sequence[SignatureLike], alphas: Any = 1.0) -> list[Term]:
    """``(weight-1 signature, effective α)`` pairs for ``Σ α_k · sig_k``.

    ``sigs``: signatures, scaled signatures, sums or paths; ``alphas``: one per item,
    or one for all (checked by :func:`robustpatch.validate.alphas`). A scaled signature
    contributes its stored entries at ``α · weight``; a sum, each of its terms. This is
    where public patch functions check their α: the products are checked too.
    """
    items = as_signatures(sigs)
    out: list[Term] = []
    for item, a in zip(items, validate.alphas(len(items), alphas)):
        for sig, coef in item.terms():
            out.append((sig, validate.alpha(a * coef, f"alpha for {sig.name!r} (α × weight)")))
    return out


def _flatten(sigs: SignatureLike | Sequence[SignatureLike], coefs: Any) -> list[Term]:
    items = as_signatures(sigs)  # one path is one signature, not its characters
    return terms(items, validate.alphas(len(items), coefs, "coefficient"))


# ---------------------------------------------------------------------------- combine


def combine(
    sigs: SignatureLike | Sequence[SignatureLike], coefs: Any, name: str | None = None
) -> Signature:
    """``Σ coef_k · sig_k`` as one dense (unquantized) weight-1 signature.

    Deltas are decoded and added in float32 (missing entries count as zero; shapes must
    agree). BN replacements combine so that applying the result at α=1 equals applying
    the parts with α=coef: replacement = Σ e_k·r_k / Σ e_k and weight = Σ e_k, with
    e_k = max(coef_k·w_k, 0). Entry stats are dropped (they measured the parts); each
    component's base fingerprint and provenance are kept in ``meta["components"]``.
    Warns (:class:`~robustpatch.errors.ZeroSignatureWarning`) when the sum is zero, and
    (``UserWarning``) when components touching the same tensors were extracted from
    different base models.
    """
    parts = _flatten(sigs, coefs)
    entries = _combine_deltas(parts) + _combine_bn(parts)
    _warn_other_bases(parts)
    if parts and not any(e.kind == "bn" or np.any(e.values) for e in entries):
        warn(
            f"the combination {sum_name(parts)!r} is zero: its components cancel",
            ZeroSignatureWarning,
        )
    bases = {s.base_fingerprint for s, _ in parts}
    meta: dict[str, Any] = {
        "method": "combination",
        "components": [_component(s, c) for s, c in parts],
        "fingerprints": {"base": bases.pop() if len(bases) == 1 else None},
    }
    sizes = [s.meta.get("source", {}).get("model_nbytes") for s, _ in parts]
    if any(sizes):
        meta["source"] = {"model_nbytes": max(x for x in sizes if x)}
    return Signature(entries, name=name or sum_name(parts), meta=meta)


def _component(s: Signature, coef: float) -> dict[str, Any]:
    """What a combination records of one part: enough to tell where it came from."""
    out = {"name": s.name, "content_hash": s.content_hash, "coef": coef}
    out["base"] = s.base_fingerprint
    if isinstance(s.meta.get("provenance"), dict):
        out["provenance"] = s.meta["provenance"]
    return out


def _warn_other_bases(parts: Sequence[Term]) -> None:
    """Warn when two components touch the same tensors but name different base models.
    (A fingerprint covers the tensors a signature touches, so signatures from one base
    over other layers differ too: only equal tensor sets are compared.)"""
    seen: dict[frozenset[str], Signature] = {}
    for s, _ in parts:
        first = seen.setdefault(frozenset(s.deltas), s)
        if None not in (first.base_fingerprint, s.base_fingerprint) and (
            first.base_fingerprint != s.base_fingerprint
        ):
            warn(
                f"{first.name!r} and {s.name!r} touch the same tensors but were extracted "
                "from different base models (their base fingerprints differ)"
            )
            return


def _combine_deltas(parts: Sequence[Term]) -> list[Entry]:
    out: dict[str, np.ndarray] = {}
    first: dict[str, Entry] = {}
    origin: dict[str, str] = {}
    for s, c in parts:
        for k, e in s.deltas.items():
            with np.errstate(over="ignore", invalid="ignore"):  # checked below, by name
                d = np.float32(c) * e.dense().astype(np.float32, copy=False)
            if k not in out:
                out[k], first[k], origin[k] = d, e, s.name
            elif first[k].shape != e.shape:
                raise MismatchError(
                    f"{k}: shape {first[k].shape} in {origin[k]!r} but {e.shape} in {s.name!r}"
                )
            elif first[k].dtype != e.dtype:  # which one the sum is for would depend on order
                raise MismatchError(
                    f"{k}: made for {first[k].dtype} in {origin[k]!r} but {e.dtype} in {s.name!r}"
                )
            else:
                with np.errstate(over="ignore", invalid="ignore"):
                    out[k] = out[k] + d
    for k, v in out.items():
        if not np.isfinite(v).all():
            raise NonFiniteError(
                f"{k}: the combination passes the float32 range (coefficient × delta, or "
                f"their sum, above {float(np.finfo(np.float32).max):.3g})"
            )
    return [dense_entry(k, v, first[k].dtype) for k, v in out.items()]


def _combine_bn(parts: Sequence[Term]) -> list[Entry]:
    grouped: dict[str, list[tuple[float, Entry]]] = {}
    for s, c in parts:
        for k, e in s.bn.items():
            grouped.setdefault(k, []).append((max(c * e.weight, 0.0), e))
    out = []
    for k, ps in grouped.items():
        total = sum(w for w, _ in ps)
        if total <= 0:
            continue
        shapes = {e.shape for _, e in ps}
        if len(shapes) > 1:
            raise MismatchError(f"{k}: BatchNorm replacement shapes differ {sorted(shapes)}")
        dtypes = {e.dtype for _, e in ps}
        if len(dtypes) > 1:  # which one the blend is for would depend on order
            raise MismatchError(f"{k}: BatchNorm replacements made for dtypes {sorted(dtypes)}")
        acc = sum(np.float64(w) * e.values.astype(np.float64) for w, e in ps if w > 0)
        out.append(bn_entry(k, (acc / total).astype(np.float32), ps[0][1].dtype, total))
    return out


# ---------------------------------------------------------------------------- BatchNorm


def bn_blend_weights(weights: Sequence[float]) -> list[float]:
    """Effective blend weights for several replacements of one BN buffer.

    Each ``w`` is clipped below at 0 (a negative α never extrapolates statistics); when
    they sum past 1 they are scaled to sum to 1. The current value keeps ``1 − Σ``.

    >>> bn_blend_weights([0.5, -1.0]), bn_blend_weights([1.5, 0.5])
    ([0.5, 0.0], [0.75, 0.25])
    """
    e = [max(float(w), 0.0) for w in weights]
    s = sum(e)
    return [w / s for w in e] if s > 1.0 else e


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


def blend_bn_array(
    buffer: np.ndarray, replacements: Sequence[np.ndarray], weights: Sequence[float]
) -> np.ndarray:
    """:func:`blend_bn` of a buffer in its own dtype (F64/F32/F16, BF16 as uint16 bits),
    returned in that dtype: blended in float64, bf16 rounded to nearest even."""
    label = label_of(buffer)
    current = widen(buffer, label) if label == "BF16" else buffer
    out = blend_bn(current.astype(np.float64), replacements, weights)
    return narrow(out.astype(np.float32), label) if label == "BF16" else out.astype(buffer.dtype)


# ---------------------------------------------------------------------------- similarity


class _Deltas:
    """A signature-like's delta entries per tensor, as (coefficient, entry) terms, with
    ``‖Σ c·δ‖²`` per tensor computed from the stored (possibly packed) values."""

    def __init__(self, x: Any) -> None:
        self.by_name: dict[str, list[tuple[float, Entry]]] = {}
        for sig, c in x.terms():
            for k, e in sig.deltas.items():
                self.by_name.setdefault(k, []).append((c, e))
        self.energy = {k: _dot(ts, ts) for k, ts in self.by_name.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.by_name[name][0][1].shape)


def _dot(xs: Sequence[tuple[float, Entry]], ys: Sequence[tuple[float, Entry]]) -> float:
    """``⟨Σ c_x·x, Σ c_y·y⟩`` over the terms whose shapes agree."""
    return sum(
        cx * cy * float(_core.dot(ex.delta(), ey.delta()))
        for cx, ex in xs
        for cy, ey in ys
        if tuple(ex.shape) == tuple(ey.shape)
    )


def _cosine(a: _Deltas, b: _Deltas, *, union: bool) -> float:
    """Cosine of two signature-likes' deltas.

    ``union``: over every tensor either holds (one the other lacks, or holds in another
    shape, counts as zero there); else over the tensors both hold in one shape (the
    same element count in another shape is another tensor: a transposed one, say).
    """
    shared = [k for k in a.by_name if k in b.by_name and a.shape(k) == b.shape(k)]
    dot = sum(_dot(a.by_name[k], b.by_name[k]) for k in shared)
    na = sum(a.energy.values()) if union else sum(a.energy[k] for k in shared)
    nb = sum(b.energy.values()) if union else sum(b.energy[k] for k in shared)
    if na <= 0 or nb <= 0:
        return 0.0
    return min(1.0, max(-1.0, float(dot / math.sqrt(na * nb))))  # rounding may pass ±1


def similarity(sigs: Sequence[SignatureLike]) -> np.ndarray:
    """Cosine similarity matrix of signatures over the union of their delta entries.

    A tensor one signature lacks counts as zero in it, so two signatures that agree on
    the tensors they share but differ in coverage score below 1; one tensor in two shapes
    is a :class:`~robustpatch.errors.MismatchError`, as in :func:`combine`. Scaled signatures and
    sums count with their coefficients. Computed as one Gram matrix: per tensor, the
    signatures' stored (possibly packed) values are decoded a tile of
    :data:`SIMILARITY_TILE` elements at a time (never a whole tensor), and each tile
    adds its products to the matrix in one BLAS call; so every signature is decoded
    once, not once per pair, and a library of hundreds compares in seconds.
    """
    items = as_signatures(sigs)
    forms = [_tensor_terms(s) for s in items]
    _check_shapes(forms, [getattr(s, "name", "a sum") for s in items])
    n = len(forms)
    gram = np.zeros((n, n))
    for key in dict.fromkeys(k for f in forms for k in f):
        rows = [i for i in range(n) if key in forms[i]]
        terms = [forms[i][key] for i in rows]
        for start, stop in _tiles(key[1], [e for ts in terms for _, e in ts]):
            block = np.zeros((len(rows), stop - start))
            for r, ts in enumerate(terms):
                for c, e in ts:  # in float64: c·δ may pass the float32 range
                    block[r] += np.multiply(_decoded(e, start, stop), c, dtype=np.float64)
            gram[np.ix_(rows, rows)] += block @ block.T
    norms = np.sqrt(np.diag(gram))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(np.outer(norms, norms) > 0, gram / np.outer(norms, norms), 0.0)
    np.fill_diagonal(out, (norms > 0).astype(float))
    return np.clip(out, -1.0, 1.0, out=out)  # rounding may pass ±1


#: Elements per tile of :func:`similarity` (a multiple of every group length involved).
SIMILARITY_TILE = 1 << 14


def _tensor_terms(x: Any) -> dict[tuple[str, int], list[tuple[float, Entry]]]:
    """A signature-like's delta entries as (coefficient, entry) terms per (tensor name,
    element count)."""
    out: dict[tuple[str, int], list[tuple[float, Entry]]] = {}
    for sig, c in x.terms():
        for k, e in sig.deltas.items():
            if e.numel:
                out.setdefault((k, e.numel), []).append((c, e))
    return out


def _check_shapes(
    forms: list[dict[tuple[str, int], list[tuple[float, Entry]]]], names: list[str]
) -> None:
    """One tensor name, one shape across the signatures, as :func:`combine` requires: two
    shapes of one name are two different tensors, not one to compare."""
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for form, label in zip(forms, names):
        for (name, _), terms in form.items():
            for _, e in terms:
                seen, where = shapes.setdefault(name, (tuple(e.shape), label))
                if seen != tuple(e.shape):
                    raise MismatchError(
                        f"{name}: shape {seen} in {where!r} but {tuple(e.shape)} in {label!r}"
                    )


def _tiles(numel: int, entries: Sequence[Entry]) -> Iterator[tuple[int, int]]:
    """Element ranges that start on a group and a byte boundary in every entry."""
    unit = 1
    for e in entries:
        if e.quant is not None:
            unit = math.lcm(unit, e.quant.group_len, 8)
    step = max(unit, SIMILARITY_TILE - SIMILARITY_TILE % unit)
    for start in range(0, numel, step):
        yield start, min(start + step, numel)


def _decoded(e: Entry, start: int, stop: int) -> np.ndarray:
    """Elements ``start:stop`` of an entry, decoded (float32) from its packed codes."""
    if e.quant is None:  # float32, or a streamed file's bf16 bits
        values = e.values.reshape(-1)[start:stop]
        return widen(values, "BF16") if values.dtype == np.uint16 else values
    return _core.dequantize(e.quant.tensor, start, stop)


def detect(
    x: SignatureLike | Mapping[str, np.ndarray],
    library: Mapping[str, SignatureLike] | Sequence[SignatureLike],
) -> list[tuple[str, float]]:
    """Rank known signatures by cosine similarity to ``x``, best first.

    ``x`` is a signature (or sum) or a mapping name → delta array (e.g. the weight
    difference of an unknown fine-tune to its clean twin); ``library`` maps names to
    signatures (or is a list of signatures, named by their ``name``). Unlike
    :func:`similarity`, each score covers only the tensors ``x`` and that signature
    share: a query usually holds more tensors than any signature.
    """
    if isinstance(x, Mapping):
        if not all(isinstance(k, str) for k in x):
            raise InvalidArgumentError("a query's tensor names must be strings")
        x = Signature.from_deltas({k: v for k, v in x.items() if not is_bn_stat(k)}, name="query")
    x = as_signature(x)
    _check_shapes([_tensor_terms(x)], [getattr(x, "name", "the query")])
    query = _Deltas(x)
    if isinstance(library, Mapping):
        named = [(k, as_signature(v)) for k, v in library.items()]
    else:
        named = [(s.name, s) for s in as_signatures(library)]
    scores = []
    for k, s in named:
        known = _Deltas(s)
        _warn_if_nothing_compared(k, query, known)
        scores.append((k, _cosine(query, known, union=False)))
    return sorted(scores, key=lambda t: -t[1])


def _warn_if_nothing_compared(name: str, query: _Deltas, known: _Deltas) -> None:
    """A score of 0 that measures nothing (no shared tensor, or no change in the query on
    them) reads like "orthogonal": say which it is."""
    shared = [k for k in query.by_name if k in known.by_name and query.shape(k) == known.shape(k)]
    if not shared:
        why = "shares no tensor (name and shape) with the query"
    elif not any(query.energy[k] > 0 for k in shared):
        why = "is compared on tensors where the query is zero"
    else:
        return
    warn(f"{name!r} {why}: its cosine 0 measures nothing")
