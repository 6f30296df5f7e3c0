"""Extract a signature from three checkpoints: pretrained, clean fine-tune, robust fine-tune.

Sources may be dicts of numpy arrays, torch state dicts or modules, ``.safetensors``
files, sharded checkpoints (their ``*.index.json``), or ``.pt``/``.pth`` state dicts.
Tensors are read one at a time (files through mmap), so memory stays near one tensor
plus the signature.

Per tensor the signature is, with ``method="projection"`` (the paper's),
``Δr − (⟨Δr, d⟩/‖d‖²)·d`` where ``Δr = robust − pretrained`` and ``d = clean −
pretrained``; with ``method="difference"`` it is ``robust − clean``. BatchNorm running
statistics are not differenced: the signature carries the robust model's values as
replacements; BatchNorm counters are ignored.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from . import _core
from .container import read_header
from .dtypes import NUMPY_OF_LABEL, PATCHABLE, label_of, widen
from .errors import FormatError
from .signature import Entry, Signature, bn_entry, dense_entry, is_bn_stat

__all__ = ["extract", "open_source", "Source", "layer_units"]

Layers = Union[str, int, Sequence[str]]


# ---------------------------------------------------------------------------- sources


class Source:
    """A checkpoint read lazily: names in model order, float tensors as numpy arrays."""

    def __init__(self, names: list[str], bn: set[str], where: str) -> None:
        self.names = names
        self.bn = bn
        self.where = where

    def spec(self, name: str) -> tuple[str, tuple[int, ...]] | None:
        raise NotImplementedError

    def get(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def is_float(self, name: str) -> bool:
        spec = self.spec(name)
        return spec is not None and spec[0] in PATCHABLE + ("F64",)

    def float_nbytes(self) -> int:
        """Bytes of all float tensors (the size of the model)."""
        total = 0
        for n in self.names:
            spec = self.spec(n)
            if spec and self.is_float(n):
                total += math.prod(spec[1]) * NUMPY_OF_LABEL[spec[0]].itemsize
        return total


class DictSource(Source):
    """A mapping name → numpy array (non-float arrays are ignored)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], bn: set[str] | None = None, where=""):
        self.arrays = {k: v for k, v in arrays.items() if _is_float_array(v)}
        names = list(self.arrays)
        super().__init__(names, set(bn or ()) | {k for k in names if is_bn_stat(k)}, where)

    def spec(self, name: str) -> tuple[str, tuple[int, ...]] | None:
        a = self.arrays.get(name)
        return None if a is None else (label_of(a), tuple(a.shape))

    def get(self, name: str) -> np.ndarray:
        a = self.arrays[name]
        if a.dtype.name == "bfloat16":
            a = a.view(np.uint16)
        return np.ascontiguousarray(a)


def _is_float_array(a: Any) -> bool:
    return isinstance(a, np.ndarray) and (
        a.dtype.kind == "f" or a.dtype.name == "bfloat16" or a.dtype == np.uint16
    )


class FileSource(Source):
    """One or several safetensors files (a sharded checkpoint), read through mmap."""

    def __init__(self, files: Sequence[Path], where: str) -> None:
        self._where: dict[str, tuple[int, Any]] = {}
        self._maps: list[mmap.mmap] = []
        self._headers = []
        for i, f in enumerate(files):
            h = read_header(f)
            self._headers.append(h)
            with open(f, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                self._maps.append(mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ))
            for t in h.tensors:
                if t.name in self._where:
                    raise FormatError(f"{where}: tensor {t.name!r} appears in two shards")
                self._where[t.name] = (i, t)
        names = _model_order(self._headers)
        super().__init__(names, {n for n in names if is_bn_stat(n)}, where)

    def spec(self, name: str) -> tuple[str, tuple[int, ...]] | None:
        hit = self._where.get(name)
        return None if hit is None else (hit[1].dtype, hit[1].shape)

    def get(self, name: str) -> np.ndarray:
        i, t = self._where[name]
        dtype = NUMPY_OF_LABEL[t.dtype]
        start = self._headers[i].data_start + t.begin
        if start % dtype.itemsize:
            buf = self._maps[i][start : start + t.nbytes]
            return np.frombuffer(buf, dtype).reshape(t.shape)
        arr = np.frombuffer(self._maps[i], dtype, count=t.nbytes // dtype.itemsize, offset=start)
        return arr.reshape(t.shape)


def _model_order(headers: list[Any]) -> list[str]:
    """Tensor names in model order, as well as a file can tell.

    Writers that keep insertion order (robustpatch, most of the lab) leave the model's
    order in the byte offsets; ``safetensors.torch.save_file`` sorts by dtype then name,
    which carries no order, and then names are sorted naturally (``layer2`` < ``layer10``).
    """
    in_file = [t for h in headers for t in h.tensors]
    runs_sorted = all(a.name <= b.name for a, b in zip(in_file, in_file[1:]) if a.dtype == b.dtype)
    if in_file and not runs_sorted:
        return [t.name for t in in_file]
    return sorted((t.name for t in in_file), key=_natural_key)


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _index_files(path: Path) -> list[Path]:
    try:
        index = json.loads(path.read_text())
        files = sorted(set(index["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FormatError(f"{path}: not a safetensors index (weight_map missing): {e}") from None
    return [path.parent / f for f in files]


def open_source(obj: Any) -> Source:
    """A :class:`Source` for a dict of arrays, a torch module/state dict, or a file path."""
    if isinstance(obj, Source):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        if path.suffix == ".json":
            return FileSource(_index_files(path), str(path))
        if path.suffix in (".pt", ".pth", ".bin"):
            from .torch_bridge import load_torch_file, numpy_state

            arrays, bn = numpy_state(load_torch_file(str(path)))
            return DictSource(arrays, bn, str(path))
        return FileSource([path], str(path))
    from .torch_bridge import is_torch_object

    if is_torch_object(obj):
        from .torch_bridge import numpy_state

        arrays, bn = numpy_state(obj)
        return DictSource(arrays, bn, type(obj).__name__)
    if isinstance(obj, Mapping):
        return DictSource(obj, where="dict")
    raise TypeError(f"cannot read a checkpoint from a {type(obj).__name__}")


# ---------------------------------------------------------------------------- layers


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def layer_units(names: Sequence[str], specs: Callable[[str], tuple]) -> list[list[str]]:
    """Group tensor names into leading-layer units, in model order.

    A *weight layer* is a module holding a tensor of 2+ dimensions (conv, linear,
    embedding); a unit is one weight layer plus the modules that follow it up to the
    next weight layer (its BatchNorm, bias-only modules...). Modules before the first
    weight layer join the first unit.
    """
    modules: dict[str, list[str]] = {}
    for n in names:
        modules.setdefault(_module(n), []).append(n)
    units: list[list[str]] = []
    has_weight = False  # whether the last unit already holds a weight layer
    for tensors in modules.values():
        is_weight_layer = any(len(specs(t)[1]) >= 2 for t in tensors)
        if not units or (is_weight_layer and has_weight):
            units.append([])
            has_weight = False
        units[-1].extend(tensors)
        has_weight = has_weight or is_weight_layer
    return units


def _select_pattern(names: Sequence[str], patterns: Sequence[str]) -> set[str]:
    regs = [re.compile(p) for p in patterns]
    chosen = {n for n in names if any(r.fullmatch(n) or r.fullmatch(_module(n)) for r in regs)}
    if not chosen:
        raise ValueError(f"layers {list(patterns)} match no tensor")
    # A selected module's BatchNorm statistics come with it.
    modules = {_module(n) for n in chosen}
    return chosen | {n for n in names if is_bn_stat(n) and _module(n) in modules}


# ---------------------------------------------------------------------------- extraction


@dataclass
class _Trio:
    pre: Source | None
    clean: Source
    robust: Source


def _signature_values(
    trio: _Trio, name: str, method: str
) -> tuple[np.ndarray, dict[str, float]] | None:
    """The signature of one tensor and its stats, or None when it must be skipped."""
    c, r = trio.clean.get(name), trio.robust.get(name)
    if method == "difference":
        d = widen(r) - widen(c)
        return d, {"energy": float(_core.dot(d.reshape(-1), d.reshape(-1)))}
    pspec = trio.pre.spec(name) if trio.pre is not None else None
    if pspec is None or pspec != trio.clean.spec(name):
        return None
    p = trio.pre.get(name)
    if p.dtype == np.float64:
        p, c, r = (x.astype(np.float32) for x in (p, c, r))
    sig, stats = _core.project(p, c, r)
    return sig, {
        "energy": float(stats["norm2_sig"]),
        "coef": float(stats["coef"]),
        "robust_energy": float(stats["norm2_r"]),
        "clean_energy": float(stats["norm2_d"]),
    }


def _candidates(trio: _Trio, order: Sequence[str] | None) -> list[str]:
    names = [n for n in trio.clean.names if trio.clean.is_float(n)]
    if order is not None:
        rank = {n: i for i, n in enumerate(order)}
        names.sort(key=lambda n: rank.get(n, len(rank)))
    for n in names:
        rs, cs = trio.robust.spec(n), trio.clean.spec(n)
        if rs is None:
            raise ValueError(f"tensor {n!r} is in the clean model but not in the robust one")
        if rs != cs:
            raise ValueError(f"{n}: clean {cs} and robust {rs} differ in dtype or shape")
    return names


def _auto_units(
    trio: _Trio, units: list[list[str]], bn: set[str], method: str, share: float, progress
) -> tuple[int, list[float]]:
    energies = []
    for unit in units:
        e = 0.0
        for n in unit:
            if n not in bn:
                got = _signature_values(trio, n, method)
                e += got[1]["energy"] if got else 0.0
            progress(1)
        energies.append(e)
    total = sum(energies)
    if total <= 0:
        return len(units), energies
    cum = 0.0
    for k, e in enumerate(energies, 1):
        cum += e
        if cum >= share * total * (1 - 1e-12):
            return k, energies
    return len(units), energies


def _choose(
    trio: _Trio,
    names: list[str],
    bn: set[str],
    layers: Layers,
    method: str,
    share: float,
    progress,
) -> tuple[list[str], dict[str, Any]]:
    units = layer_units(names, trio.clean.spec)
    if isinstance(layers, str) and layers in ("auto", "all"):
        if layers == "all":
            return names, {"mode": "all", "units": len(units), "of": len(units)}
        k, energies = _auto_units(trio, units, bn, method, share, progress)
        total = sum(energies) or 1.0
        info = {
            "mode": "auto",
            "share": share,
            "units": k,
            "of": len(units),
            "energy_kept": sum(energies[:k]) / total,
            "unit_energy": [e / total for e in energies],
            "modules": list(dict.fromkeys(_module(n) for u in units[:k] for n in u)),
        }
        return [n for u in units[:k] for n in u], info
    if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        if layers < 1:
            raise ValueError(f"layers must be at least 1, got {layers}")
        k = min(int(layers), len(units))
        return [n for u in units[:k] for n in u], {"mode": "count", "units": k, "of": len(units)}
    patterns = [layers] if isinstance(layers, str) else list(layers)
    chosen = _select_pattern(names, patterns)
    return [n for n in names if n in chosen], {"mode": "names", "patterns": patterns}


def _fingerprint(src: Source | None, names: Iterable[str]) -> str | None:
    if src is None:
        return None
    h = hashlib.sha256()
    for n in sorted(names):
        spec = src.spec(n)
        if spec is None:
            continue
        h.update(json.dumps([n, list(spec[1]), spec[0]]).encode())
        h.update(memoryview(np.ascontiguousarray(src.get(n)).reshape(-1).view(np.uint8)))
    return "sha256:" + h.hexdigest()


def extract(
    pretrained: Any,
    clean: Any,
    robust: Any,
    layers: Layers = "auto",
    *,
    method: str = "projection",
    energy: float = 0.9,
    name: str = "signature",
    provenance: Mapping[str, Any] | None = None,
    effect: Mapping[str, Any] | None = None,
    order: Sequence[str] | None = None,
    progress: Callable[[int], object] | None = None,
) -> Signature:
    """Extract a robust weight signature.

    ``layers``: ``"auto"`` (the fewest leading layers holding ``energy`` of the
    signature's energy), ``"all"``, a number of leading weight layers, or a regex / list
    of regexes matched (fully) against tensor or module names. ``method``:
    ``"projection"`` or ``"difference"`` (``pretrained`` may then be None). The choice,
    per-tensor stats, fingerprints and ``provenance`` are recorded in the metadata.
    Leading layers follow the model's order: a dict's or state dict's own order, a
    file's byte order when its writer kept it, else natural name order; ``order`` (a
    list of names, e.g. ``list(model.state_dict())``) overrides it. ``progress`` is
    called with the number of tensors done.
    """
    if method not in ("projection", "difference"):
        raise ValueError(f"unknown method {method!r}; expected 'projection' or 'difference'")
    if not 0 < energy <= 1:
        raise ValueError(f"energy share must be in (0, 1], got {energy}")
    if pretrained is None and method == "projection":
        raise ValueError("method 'projection' needs the pretrained checkpoint")
    trio = _Trio(
        open_source(pretrained) if pretrained is not None else None,
        open_source(clean),
        open_source(robust),
    )
    tick = progress or (lambda n: None)
    names = _candidates(trio, order)
    bn = trio.clean.bn | trio.robust.bn
    chosen, layer_info = _choose(trio, names, bn, layers, method, energy, tick)
    entries, skipped = _entries(trio, chosen, bn, method, tick)
    meta = {
        "method": method,
        "layers": layer_info,
        "skipped": skipped,
        "fingerprints": {"base": _fingerprint(trio.pre, [e.name for e in entries])},
        "source": {
            "model_nbytes": trio.robust.float_nbytes(),
            "model_tensors": len(names),
        },
        "provenance": dict(provenance or {}),
    }
    if effect:
        meta["effect"] = dict(effect)
    if not entries:
        raise ValueError("no tensor selected: nothing to extract")
    return Signature(entries, name=name, meta=meta)


def _entries(
    trio: _Trio, chosen: list[str], bn: set[str], method: str, tick
) -> tuple[list[Entry], list[str]]:
    entries: list[Entry] = []
    skipped: list[str] = []
    for n in chosen:
        label = trio.clean.spec(n)[0]
        if n in bn:
            entries.append(bn_entry(n, widen(trio.robust.get(n)), label))
        else:
            got = _signature_values(trio, n, method)
            if got is None:
                skipped.append(n)
            else:
                entries.append(dense_entry(n, got[0], label, got[1]))
        tick(1)
    return entries, skipped
