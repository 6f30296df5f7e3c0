"""Extract a signature from three checkpoints: pretrained, clean fine-tune, robust fine-tune.

Sources may be dicts of numpy arrays, torch state dicts or modules, ``.safetensors``
files, sharded checkpoints (their ``*.index.json``), or ``.pt``/``.pth`` state dicts.
Tensors are read one at a time (files through mmap, each tensor's pages dropped once
read), so :func:`extract` holds about one tensor plus the signature, and
:func:`extract_to`, which writes each entry to the file as it is computed, about a few
tensors.

Per tensor the signature is, with ``method="projection"`` (the paper's),
``Δr − (⟨Δr, d⟩/‖d‖²)·d`` where ``Δr = robust − pretrained`` and ``d = clean −
pretrained``; with ``method="difference"`` it is ``robust − clean``. BatchNorm running
statistics are not differenced: the signature carries the robust model's values as
replacements; BatchNorm counters are ignored. A tensor whose signature is zero everywhere
(it did not change) is skipped, not stored, and listed in ``meta["skipped"]``.

Depth ("leading layers") follows the module structure, never a file's byte order: a
torch module's or state dict's own order, else a natural sort of module paths
(``layers.2`` before ``layers.10``) with output heads (``lm_head``, ``classifier``,
``head``, ``fc``) last. Buffers (BatchNorm statistics and counters, normalisation
``mean``/``std``, a torch module's registered buffers) are never counted as layers.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _core, validate
from ._format.shards import load_index
from ._io.atomic import check_destinations
from ._io.prefetch import prefetched
from ._warn import warn
from .dtypes import widen
from .errors import (
    InvalidArgumentError,
    MismatchError,
    NonFiniteError,
    SelectionError,
    ZeroSignatureWarning,
)
from .projection import Values, difference, project
from .selection import Layers, choose_layers, layer_units
from .signature import Entry, Signature, bn_entry, dense_entry
from .signature.codec import json_default, parse_meta_json
from .signature.entry import quantize_entry, warn_if_groups_cost_more
from .signature.writer import SignatureWriter
from .sources import DictSource, FileSource, Source, open_source, reads_as_index

__all__ = [
    "extract",
    "extract_to",
    "Extracted",
    "open_source",
    "Source",
    "DictSource",
    "FileSource",
]

#: A signature whose norm is at most this share of its reference norm (‖Δr‖ for the
#: projection, ‖robust‖ for the difference) counts as zero: extract warns.
ZERO_SIGNATURE_RTOL = 1e-6


# ---------------------------------------------------------------------------- extraction


@dataclass
class _Trio:
    pre: Source | None
    clean: Source
    robust: Source

    def is_buffer(self, name: str) -> bool:
        return self.clean.is_buffer(name) or self.robust.is_buffer(name)

    def params(self, unit: Sequence[str]) -> int:
        return sum(math.prod(self.clean.spec(n)[1]) for n in unit if not self.is_buffer(n))

    def release(self, name: str) -> None:
        for src in (self.pre, self.clean, self.robust):
            if src is not None and src.spec(name) is not None:
                src.release(name)


def _signature_values(trio: _Trio, name: str, method: str) -> Values | None:
    """The signature of one tensor, or None when it has no pretrained counterpart."""
    try:
        return _values_of(trio, name, method)
    except NonFiniteError as e:  # the engine's message cannot name the tensor
        raise NonFiniteError(f"{name}: {e}") from None


def _values_of(trio: _Trio, name: str, method: str) -> Values | None:
    c, r = trio.clean.get(name), trio.robust.get(name)
    if method == "difference":
        return difference(c, r)
    pspec = trio.pre.spec(name) if trio.pre is not None else None
    if pspec is None or pspec != trio.clean.spec(name):
        return None
    return project(trio.pre.get(name), c, r)


def _candidates(trio: _Trio, order: Sequence[str] | None) -> list[str]:
    names = [n for n in trio.clean.names if trio.clean.is_float(n)]
    if order is not None:
        rank = {n: i for i, n in enumerate(order)}
        names.sort(key=lambda n: rank.get(n, len(rank)))
    for n in names:
        rs, cs = trio.robust.spec(n), trio.clean.spec(n)
        if rs is None:
            raise _missing(n, "clean", "robust", trio.robust)
        if rs != cs:
            raise MismatchError(f"{n}: clean {cs} and robust {rs} differ in dtype or shape")
    _check_robust_only(trio, set(names))
    return names


def _missing(name: str, has: str, lacks: str, source: Source) -> MismatchError:
    """A float tensor of one checkpoint the other lacks, saying why where it knows (held
    as an int tensor, or tied to another name)."""
    why = source.other.get(name)
    return MismatchError(
        f"tensor {name!r} is in the {has} model but not in the {lacks} one"
        + (f" (the {lacks} model {why})" if why else "")
    )


def _check_robust_only(trio: _Trio, clean_floats: set[str]) -> None:
    """A float tensor of the robust model that the clean one lacks (or holds as another
    kind) is refused, as the reverse is: it was left out of the signature silently."""
    for n in trio.robust.names:
        if trio.robust.is_float(n) and n not in clean_floats:
            cs, rs = trio.clean.spec(n), trio.robust.spec(n)
            if cs is None:
                raise _missing(n, "robust", "clean", trio.clean)
            raise MismatchError(f"{n}: clean {cs} and robust {rs} differ in dtype or shape")


def _unit_energies(trio: _Trio, units: list[list[str]], bn: set[str], progress) -> list[float]:
    energies = []
    for unit in units:
        e = 0.0
        for n in unit:
            if n not in bn:
                got = _signature_values(trio, n, "projection")
                e += got.stats["energy"] if got else 0.0
                trio.release(n)
            progress(1)
        energies.append(e)
    return energies


#: The base-model fingerprint's label. The fingerprint is the BLAKE3 of one JSON line
#: ``[name, shape, dtype, digest]`` per pretrained tensor the signature touches, in name
#: order, where ``digest`` is the tensor's XXH3-128 digest (``_core.tensor_digest``:
#: over the digests of its blocks of 4096 elements), which the projection takes in the
#: pass that reads the tensor. Signatures written before carry ``blake3:`` or
#: ``sha256:`` over names, shapes, dtypes and bytes in one stream; a fingerprint is
#: compared only with one of its own label.
FINGERPRINT_LABEL = "tensors-xxh3-128"


def _fingerprint(
    src: Source | None, names: Iterable[str], digests: Mapping[str, str]
) -> str | None:
    """The fingerprint of the pretrained tensors ``names`` (see :data:`FINGERPRINT_LABEL`);
    ``digests`` holds those already hashed, the others are read and hashed here."""
    if src is None:
        return None
    lines = []
    for n in sorted(names):
        spec = src.spec(n)
        if spec is None:
            continue
        digest = digests.get(n) or _tensor_digest(src, n)
        lines.append(json.dumps([n, list(spec[1]), spec[0], digest]) + "\n")
    h = _core.Blake3()
    h.update("".join(lines).encode())
    return f"{FINGERPRINT_LABEL}:{h.hexdigest()}"


def _tensor_digest(src: Source, name: str) -> str:
    t = np.ascontiguousarray(src.get(name))
    digest = _core.tensor_digest(t.reshape(-1).view(np.uint8), t.itemsize)
    src.release(name)
    return digest


def _share(what: str, value: Any) -> float:
    """``value`` as a float in (0, 1], or a one-line error naming ``what``."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not ok or not 0 < value <= 1:
        raise SelectionError(f"{what} must be a number in (0, 1], got {value!r}")
    return float(value)


@dataclass
class _Plan:
    """What extract reads and takes: the checkpoints, their float tensors in depth order
    (``names``), the selected ones (``chosen``) and the layer info recorded for them."""

    trio: _Trio
    method: str
    names: list[str]
    chosen: list[str]
    bn: set[str]
    layer_info: dict[str, Any]
    tick: Callable[[int], object]


def _check_extras(provenance: Any, effect: Any, order: Any, progress: Any) -> list[str] | None:
    """The optional arguments of an extraction, checked before any work (a wrong type
    was a TypeError, and provenance's NaN an error after the whole extraction); returns
    ``order`` as a list (any iterable of names: ``state_dict().keys()``, a generator)."""
    for key, value in (("provenance", provenance), ("effect", effect)):
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise InvalidArgumentError(f"{key} must be a mapping, got {type(value).__name__}")
        try:  # as the header holds it: at the top level, nested as deep as a load allows
            parse_meta_json(json.dumps({key: value}, default=json_default, allow_nan=False), key)
        except (TypeError, ValueError, RecursionError) as e:  # FormatError is a ValueError
            raise InvalidArgumentError(f"{key} cannot be saved in a signature: {e}") from None
    if progress is not None and not callable(progress):
        raise InvalidArgumentError(f"progress must be callable, got {type(progress).__name__}")
    if order is None:
        return None
    if isinstance(order, (str, bytes)) or not isinstance(order, Iterable):
        raise InvalidArgumentError(f"order must be tensor names, got {type(order).__name__}")
    names = list(order)
    if not all(isinstance(n, str) for n in names):
        raise InvalidArgumentError("order must be tensor names (strings)")
    return names


def _plan(pretrained, clean, robust, layers, method, energy, param_budget, order, progress):
    """Check the arguments, open the checkpoints and choose the tensors."""
    if method not in ("projection", "difference"):
        raise InvalidArgumentError(
            f"unknown method {method!r}; expected 'projection' or 'difference'"
        )
    share = _share("energy share", energy)
    budget = None if param_budget is None else _share("param_budget", param_budget)
    if pretrained is None and method == "projection":
        raise InvalidArgumentError("method 'projection' needs the pretrained checkpoint")
    trio = _Trio(
        open_source(pretrained) if pretrained is not None else None,
        open_source(clean),
        open_source(robust),
    )
    tick = progress or (lambda n: None)
    names = _candidates(trio, order)
    bn = trio.clean.bn | trio.robust.bn
    units = layer_units(names, trio.clean.spec, trio.is_buffer)
    chosen, layer_info = choose_layers(
        names,
        units,
        [trio.params(u) for u in units],
        layers,
        method=method,
        share=share,
        param_budget=budget,
        energies=lambda: _unit_energies(trio, units, bn, tick),
    )
    if method == "projection":
        _check_pretrained(trio, [n for n in chosen if n not in bn])
    return _Plan(trio, method, names, chosen, bn, layer_info, tick)


def _check_pretrained(trio: _Trio, names: list[str]) -> None:
    """A chosen tensor that the pretrained checkpoint holds in another dtype or shape is
    refused, as a clean/robust mismatch is: the projection needs the very tensor both
    fine-tunes started from (one the pretrained lacks, e.g. a new head, is skipped)."""
    for n in names:
        ps, cs = trio.pre.spec(n), trio.clean.spec(n)
        if ps is None and n in trio.pre.other and n not in trio.pre.tied:  # an int tensor
            raise MismatchError(
                f"{n}: the pretrained model {trio.pre.other[n]}, the fine-tunes as a float "
                "tensor; give the checkpoint they started from (or method 'difference')"
            )
        if ps is not None and ps != cs:
            raise MismatchError(
                f"{n}: pretrained {ps} and clean {cs} differ in dtype or shape; give the "
                "checkpoint the fine-tunes started from (or method 'difference')"
            )


def extract(
    pretrained: Any,
    clean: Any,
    robust: Any,
    layers: Layers = "auto",
    *,
    method: str = "projection",
    energy: float = 0.9,
    param_budget: float | None = None,
    name: str = "signature",
    provenance: Mapping[str, Any] | None = None,
    effect: Mapping[str, Any] | None = None,
    order: Sequence[str] | None = None,
    progress: Callable[[int], object] | None = None,
) -> Signature:
    """Extract a robust weight signature.

    ``layers`` chooses the tensors, in units of leading weight layers (a weight layer
    with the BatchNorm and bias-only modules after it; buffers are never layers):

    - ``"auto"`` (default): with ``method="projection"``, the fewest leading layers that
      hold ``energy`` of the signature's energy, but never more than those holding
      :data:`~robustpatch.selection.AUTO_PARAM_BUDGET` (a quarter) of the model's
      parameters: the paper's shallow-layer patch; with ``method="difference"``, every
      tensor (every changed tensor is kept);
    - ``"all"``; an int: that many leading layers;
    - a regex or a list of regexes, searched in each tensor name and its module path
      (``re.search``) on whole dot-separated components: ``model\\.layers\\.[01]``
      selects layers 0 and 1, not 10–19; anchor with ``^``/``$`` to the name's start
      and end. An invalid regex raises :class:`~robustpatch.errors.SelectionError`.

    ``param_budget`` (a share in (0, 1], with ``layers="auto"`` only) takes leading
    layers in depth order while they hold at most that share of the parameters
    (buffers not counted), at least one layer. Depth follows the model's structure (see
    the module docstring); ``order`` (a list of names, e.g. ``list(model.state_dict())``)
    overrides it.

    ``method``: ``"projection"`` or ``"difference"`` (``pretrained`` may then be None).
    Tensors whose signature is zero everywhere are skipped and listed in
    ``meta["skipped"]`` (with those lacking a pretrained counterpart); with the
    difference method, changed tensors the selection left out are listed in
    ``meta["dropped"]``. A signature whose norm is at most :data:`ZERO_SIGNATURE_RTOL`
    of ‖Δr‖ (projection) or ‖robust‖ (difference) raises a
    :class:`~robustpatch.errors.ZeroSignatureWarning`; one with no entry left is an
    error. The choice, per-tensor stats, fingerprints and ``provenance`` are recorded in
    the metadata. ``progress`` is called with increments, as tqdm's ``update``: the number
    of tensors just read (1 each), whose running sum reaches the tensors examined.

    To write the signature to a file without holding it in memory, use
    :func:`extract_to`.
    """
    order = _check_extras(provenance, effect, order, progress)
    plan = _plan(pretrained, clean, robust, layers, method, energy, param_budget, order, progress)
    tally = _Tally()
    entries = list(_entries(plan, tally))
    meta = _meta(plan, tally, provenance, effect)
    _warn_if_zero(name, tally, method)
    return Signature(entries, name=name, meta=meta)


@dataclass(frozen=True)
class Extracted:
    """What :func:`extract_to` wrote: the file, the signature's name, its number of
    entries, the bytes of tensor data it stores, and its metadata (as
    ``Signature.meta``)."""

    path: Path
    name: str
    entries: int
    nbytes: int
    meta: dict[str, Any]


def extract_to(
    path: str | os.PathLike[str],
    pretrained: Any,
    clean: Any,
    robust: Any,
    layers: Layers = "auto",
    *,
    bits: int | None = None,
    scheme: str = "affine",
    granularity: str = "group",
    group: int = 128,
    durable: bool = False,
    **options: Any,
) -> Extracted:
    """:func:`extract` straight into the signature file ``path``, each entry written as
    it is produced (quantized first when ``bits`` is given, as
    :meth:`~robustpatch.signature.Signature.quantize` takes it): memory stays near a
    few tensors, not the signature. ``options`` are the keyword options of
    :func:`extract` (``method``, ``energy``, ``param_budget``, ``name``, ``provenance``,
    ``effect``, ``order``, ``progress``). The file holds the signature that
    ``extract(...).save(path)`` (or ``extract(...).quantize(bits, ...).save(path)``)
    writes, byte for byte unless it is large (its data is then written once, behind
    header room padded with spaces: see :mod:`~robustpatch.signature.writer`). It appears
    whole or not at all (an error leaves ``path`` as it was), by an atomic rename, after an
    fsync with ``durable`` (like ``apply_file``, and like ``safetensors`` and
    ``torch.save``, it does not fsync by default)."""
    path = validate.output_file(path, "signature path")
    check_destinations(checkpoint_files(pretrained, clean, robust), [path])
    quant = None if bits is None else _quant_args(bits, scheme, granularity, group)
    # extract's own signature checks the options (an unknown one is a TypeError) and
    # fills in their defaults: they are declared once, there.
    call = inspect.signature(extract).bind(pretrained, clean, robust, layers, **options)
    call.apply_defaults()
    a = call.arguments
    if not isinstance(a["name"], str):
        raise InvalidArgumentError(f"name must be a string, got {a['name']!r}")
    a["order"] = _check_extras(a["provenance"], a["effect"], a["order"], a["progress"])
    plan = _plan(
        pretrained,
        clean,
        robust,
        layers,
        a["method"],
        a["energy"],
        a["param_budget"],
        a["order"],
        a["progress"],
    )
    tally = _Tally()
    entries = _entries(plan, tally)
    if quant is not None:
        entries = (quantize_entry(e, *quant) for e in entries)
    with SignatureWriter(path, durable, expected_entries=len(plan.chosen)) as out:
        with prefetched(entries, "robustpatch-extract") as computed:
            for e in computed:  # the next entry is computed while this one is written
                if quant is not None:
                    warn_if_groups_cost_more(e, quant[0], quant[2], quant[3])
                out.add(e)
        meta = _meta(plan, tally, a["provenance"], a["effect"])
        if quant is not None:
            meta["quantization"] = dict(zip(("bits", "scheme", "granularity", "group"), quant))
        _warn_if_zero(a["name"], tally, a["method"])
        out.commit(a["name"], meta)
        return Extracted(path, a["name"], len(out), out.nbytes, meta)


def checkpoint_files(*checkpoints: Any) -> list[Path]:
    """The files the checkpoints given as paths read: each file, and a sharded
    checkpoint's index and shards (an index that cannot be read names only itself:
    reading it is left to the extraction, which reports why)."""
    files: list[Path] = []
    for c in checkpoints:
        if not isinstance(c, (str, os.PathLike)):
            continue  # a state dict or module in memory
        files.append(Path(c))
        if reads_as_index(c):  # as the extraction will read it
            try:
                index = load_index(c)
            except (OSError, ValueError):  # FormatError, InvalidArgumentError among them
                continue
            files += [index.path, *(index.shard_path(s) for s in index.shards)]
    return files


def _quant_args(bits: Any, scheme: Any, granularity: Any, group: Any) -> tuple[int, str, str, int]:
    """The quantization arguments, checked as :meth:`Signature.quantize` checks them."""
    return (
        validate.bits(bits),
        validate.scheme(scheme),
        validate.granularity(granularity),
        validate.group(group),
    )


@dataclass
class _Tally:
    names: list[str] = field(default_factory=list)  # the entries produced
    digests: dict[str, str] = field(default_factory=dict)  # pretrained digests taken
    skipped: list[str] = field(default_factory=list)
    energy: float = 0.0  # ‖signature‖² over the stored deltas
    reference: float = 0.0  # the matching ‖Δr‖² or ‖robust‖² over the selected deltas
    weights: int = 0  # selected tensors that are no BatchNorm statistics
    unmatched: int = 0  # of those, the ones with no pretrained counterpart
    changed_bn: int = 0  # BatchNorm statistics whose robust values differ from clean's


def _entries(plan: _Plan, tally: _Tally) -> Iterator[Entry]:
    """Each selected tensor's entry in depth order, as it is computed (the sources'
    pages released behind it); unchanged tensors are tallied as skipped."""
    trio = plan.trio
    for n in plan.chosen:
        label = _target_dtype(trio.clean.spec(n)[0], n in plan.bn)
        entry = None
        if n in plan.bn:
            robust = widen(trio.robust.get(n))
            entry = bn_entry(n, robust, label)
            tally.changed_bn += not np.array_equal(robust, widen(trio.clean.get(n)))
        else:
            tally.weights += 1
            got = _signature_values(trio, n, plan.method)
            tally.unmatched += got is None
            if got is not None:
                tally.reference += got.reference
                if got.pretrained_digest is not None:
                    tally.digests[n] = got.pretrained_digest
            if got is None or not _any_nonzero(got):
                tally.skipped.append(n)
            else:
                entry = _delta_entry(n, got, label)
                tally.energy += got.stats["energy"]
        trio.release(n)
        if entry is not None:
            tally.names.append(n)
            yield entry
        plan.tick(1)


def _any_nonzero(got: Values) -> bool:
    """Whether the signature has a nonzero element. Its energy ‖δ‖² is summed in float64,
    where the square of every nonzero float32 is positive: a finite energy answers without
    a pass over the values."""
    energy = got.stats["energy"]
    return energy > 0 if math.isfinite(energy) else bool(np.any(got.sig))


def _target_dtype(source: str, bn: bool) -> str:
    """The dtype a signature entry targets: the clean checkpoint's, except that a float64
    weight's signature targets float32 (the engine patches F32, F16 and BF16; a float64
    model is cast to float32 to be patched), while BatchNorm buffers keep theirs."""
    return "F32" if source == "F64" and not bn else source


def _delta_entry(name: str, got: Values, label: str) -> Entry:
    """The dense entry of a tensor's signature. The engine refuses a non-finite
    signature, and the energy it reports is ‖δ‖² over the very values stored (a NaN or
    Inf among them would make it non-finite): a finite energy spares the pass that
    :func:`dense_entry` makes to look for one."""
    if math.isfinite(got.stats["energy"]):
        values = got.sig
        return Entry(name, "delta", tuple(values.shape), label, values=values, stats=got.stats)
    return dense_entry(name, got.sig, label, got.stats)


def _meta(plan: _Plan, tally: _Tally, provenance, effect) -> dict[str, Any]:
    """The signature's metadata (SelectionError if no entry was produced)."""
    trio = plan.trio
    if tally.weights and tally.unmatched == tally.weights:  # a wrong checkpoint, surely
        raise SelectionError(
            f"nothing to extract: the pretrained checkpoint holds none of the "
            f"{tally.weights} selected weight tensors (is it the model both were fine-tuned from?)"
        )
    if not tally.names or (len(tally.skipped) == tally.weights and not tally.changed_bn):
        raise SelectionError(
            f"nothing to extract: the {len(plan.chosen)} selected tensors are unchanged "
            "(robust equals clean) or have no pretrained counterpart"
        )
    meta = {
        "method": plan.method,
        "layers": plan.layer_info,
        "skipped": tally.skipped,
        "fingerprints": {"base": _fingerprint(trio.pre, tally.names, tally.digests)},
        "source": {
            "model_nbytes": trio.robust.float_nbytes(),
            "model_tensors": len(plan.names),
        },
        "provenance": dict(provenance or {}),
    }
    if trio.clean.tied:  # patching the name kept patches its twins too
        meta["tied"] = dict(trio.clean.tied)
    if plan.method == "difference":
        meta["dropped"] = _dropped(trio, plan.names, set(plan.chosen), plan.tick)
    if effect:
        meta["effect"] = dict(effect)
    return meta


def _dropped(trio: _Trio, names: list[str], chosen: set[str], tick) -> list[str]:
    """Tensors left out of the selection whose robust values differ from the clean ones."""
    out = []
    for n in names:
        if n not in chosen:
            if np.any(widen(trio.robust.get(n)) != widen(trio.clean.get(n))):
                out.append(n)
            trio.release(n)
            tick(1)
    return out


def _warn_if_zero(name: str, tally: _Tally, method: str) -> None:
    if not tally.weights or tally.energy > ZERO_SIGNATURE_RTOL**2 * tally.reference:
        return  # BatchNorm statistics alone have no norm to compare
    what = "robust - pretrained" if method == "projection" else "the robust weights"
    warn(
        f"signature {name!r} is zero or near zero: its norm {math.sqrt(tally.energy):.3g} is "
        f"at most {ZERO_SIGNATURE_RTOL:g} x the norm of {what} "
        f"({math.sqrt(tally.reference):.3g}); are the clean and robust checkpoints the same?",
        ZeroSignatureWarning,
    )
