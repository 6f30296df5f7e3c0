"""Robust weight signatures: entries, quantization, the file format, algebra.

A :class:`Signature` maps parameter names to :class:`Entry` objects:

- ``kind="delta"``: a weight delta, dense float32 or :class:`Quantized` (packed codes,
  one f32 scale and offset per group), added to the target as ``w + α·δ``;
- ``kind="bn"``: a BatchNorm running mean/variance *replacement* (float32). Applying it
  blends ``(1 − e)·current + e·replace`` with ``e = α·weight`` clipped to [0, 1]; several
  signatures replacing the same buffer share the blend in proportion to their ``e``
  (normalised when they sum past 1). BatchNorm statistics are never added to.

File format (``format_version`` 1, a safetensors container): per delta entry ``P``
either the tensor ``P`` (F32) or ``P.codes`` (U8, bit-packed little-endian), ``P.scale``
and ``P.offset`` (F32, one per group); per BN entry ``P.replace`` (F32).
``__metadata__["robustpatch"]`` is a JSON object::

    {"format_version": 1, "kind": "signature", "name": ..., "method": ...,
     "entries": [{"name", "kind", "shape", "dtype", "encoding": "dense"|"quantized",
                  "bits", "scheme", "granularity", "group", "group_len", "weight",
                  "stats"}, ...],
     "fingerprints": {"architecture": ..., "base": ...}, "layers": ..., "source": ...,
     "provenance": ..., "effect": ..., "content_hash": "sha256:..."}

The content hash covers the entry specs and every tensor's name, dtype, shape and bytes
(not provenance/effect, which may be filled in later); it is verified on load.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import numpy as np

from . import _core
from .container import read_tensors, write_tensors
from .dtypes import PATCHABLE, label_of, widen
from .errors import FormatError, NonFiniteError

__all__ = [
    "FORMAT_VERSION",
    "SCHEMES",
    "GRANULARITIES",
    "Quantized",
    "Entry",
    "Signature",
    "load",
    "similarity",
    "detect",
    "is_bn_stat",
]

FORMAT_VERSION = 1
META_KEY = "robustpatch"
SCHEMES = ("affine", "symmetric", "log", "tanh")
GRANULARITIES = ("tensor", "channel", "group")
BN_SUFFIXES = ("running_mean", "running_var")

SignatureLike = Union["Signature", str, "os.PathLike[str]"]


def is_bn_stat(name: str) -> bool:
    """True for BatchNorm running statistics (``*.running_mean`` / ``*.running_var``)."""
    return name.rsplit(".", 1)[-1] in BN_SUFFIXES


# ---------------------------------------------------------------------------- entries


@dataclass(frozen=True, eq=False)
class Quantized:
    """A quantized delta: bit-packed codes plus one f32 scale/offset per group."""

    codes: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    bits: int
    scheme: str
    granularity: str
    group: int  # requested group size (granularity "group"), else 0
    group_len: int  # elements per contiguous group actually used
    numel: int

    def as_core(self) -> tuple:
        """The tuple the engine takes for a quantized delta."""
        return (
            self.codes,
            self.scale,
            self.offset,
            self.bits,
            self.scheme,
            self.group_len,
            self.numel,
        )

    def dequantize(self) -> np.ndarray:
        """Decoded values, flat float32."""
        return _core.dequantize(*self.as_core())

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.offset.nbytes


@dataclass(frozen=True, eq=False)
class Entry:
    """One tensor of a signature (see the module docstring for ``kind``)."""

    name: str
    kind: str  # "delta" | "bn"
    shape: tuple[int, ...]
    dtype: str  # dtype of the target tensor (F32, F16, BF16, F64 for BN buffers)
    values: np.ndarray | None = None  # dense f32 delta or BN replacement
    quant: Quantized | None = None
    weight: float = 1.0  # BN blend weight (scaled by algebra)
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_quantized(self) -> bool:
        return self.quant is not None

    @property
    def nbytes(self) -> int:
        """Bytes stored in the file for this entry."""
        return self.quant.nbytes if self.quant is not None else int(self.values.nbytes)

    def delta(self) -> Any:
        """The delta as the engine takes it (a flat f32 array or a quantized tuple)."""
        if self.quant is not None:
            return self.quant.as_core()
        return self.values.reshape(-1)

    def dense(self) -> np.ndarray:
        """Values as float32 with the entry's shape (decoded if quantized)."""
        if self.quant is not None:
            return self.quant.dequantize().reshape(self.shape)
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


def _check_finite(name: str, arr: np.ndarray, what: str) -> None:
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
    f32 = np.ascontiguousarray(widen(arr) if arr.dtype != np.float32 else arr)
    _check_finite(name, f32, "delta")
    return Entry(name, "delta", tuple(f32.shape), label, values=f32, stats=dict(stats or {}))


def bn_entry(name: str, replace_with: np.ndarray, dtype: str | None = None, weight=1.0) -> Entry:
    """A BatchNorm replacement entry (``replace_with`` = the robust model's values)."""
    arr = np.asarray(replace_with)
    label = dtype or _default_target(arr)
    f32 = np.ascontiguousarray(widen(arr) if arr.dtype != np.float32 else arr)
    _check_finite(name, f32, "BatchNorm replacement")
    return Entry(name, "bn", tuple(f32.shape), label, values=f32, weight=float(weight))


def group_len_for(shape: Sequence[int], granularity: str, group: int) -> int:
    """Elements per contiguous quantization group.

    ``tensor``: all elements; ``channel``: ``numel // shape[0]`` (one per output
    channel), except where a channel holds a single element (a bias or BatchNorm
    vector): one scale and offset per element would cost twice the float32 data, so
    such a tensor gets one scale; ``group``: ``group`` if it divides the element count,
    else the largest divisor of the count not above ``group`` (recorded in the file).
    """
    numel = math.prod(shape)
    if granularity == "tensor" or numel == 0 or len(shape) == 0:
        return max(numel, 1)
    if granularity == "channel":
        per_channel = numel // shape[0]
        return per_channel if per_channel > 1 else numel
    if granularity != "group":
        raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
    if group < 1:
        raise ValueError(f"group must be at least 1, got {group}")
    if numel <= group:
        return numel
    for g in range(group, 0, -1):
        if numel % g == 0:
            return g
    return 1  # pragma: no cover - 1 always divides


def quantize_entry(e: Entry, bits: int, scheme: str, granularity: str, group: int) -> Entry:
    """Quantize one delta entry (BN entries and empty tensors are returned unchanged)."""
    if e.kind != "delta" or e.numel == 0:
        return e
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
    dense = np.ascontiguousarray(e.dense().reshape(-1))
    glen = group_len_for(e.shape, granularity, group)
    codes, scale, offset = _core.quantize(dense, bits, scheme, glen)
    q = Quantized(
        codes,
        scale,
        offset,
        int(bits),
        scheme,
        granularity,
        group if granularity == "group" else 0,
        glen,
        e.numel,
    )
    return replace(e, values=None, quant=q)


# ---------------------------------------------------------------------------- signature


class Signature:
    """A robust weight signature: named delta/BN entries plus metadata.

    Build one with :func:`robustpatch.extract.extract`, :meth:`from_deltas` or
    :meth:`load`; compress with :meth:`quantize`; combine with ``+``, ``-`` and ``*``.
    """

    def __init__(
        self,
        entries: Iterable[Entry],
        *,
        name: str = "signature",
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self.entries: dict[str, Entry] = {}
        for e in entries:
            if e.name in self.entries:
                raise ValueError(f"duplicate entry {e.name!r}")
            self.entries[e.name] = e
        self.name = name
        self.meta: dict[str, Any] = dict(meta or {})
        self._check_file_names()

    # -- construction ---------------------------------------------------------------

    @classmethod
    def from_deltas(
        cls,
        deltas: Mapping[str, np.ndarray],
        *,
        bn: Mapping[str, np.ndarray] | None = None,
        dtypes: Mapping[str, str] | None = None,
        name: str = "signature",
        meta: Mapping[str, Any] | None = None,
    ) -> Signature:
        """A signature from plain arrays: ``deltas`` name → delta, ``bn`` name → replacement.

        ``dtypes`` gives the target dtype per name (default: the array's own dtype, so
        float32 deltas target float32 tensors).
        """
        dtypes = dtypes or {}
        entries = [dense_entry(k, v, dtypes.get(k)) for k, v in deltas.items()]
        entries += [bn_entry(k, v, dtypes.get(k)) for k, v in (bn or {}).items()]
        return cls(entries, name=name, meta=meta)

    def _check_file_names(self) -> None:
        seen: dict[str, str] = {}
        for e in self.entries.values():
            for t in e.file_tensors():
                if t in seen:
                    raise ValueError(
                        f"entries {seen[t]!r} and {e.name!r} both need the file tensor {t!r}"
                    )
                seen[t] = e.name

    # -- views ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> Entry:
        return self.entries[name]

    def __repr__(self) -> str:
        nq = sum(e.is_quantized for e in self.entries.values())
        return (
            f"Signature({self.name!r}, {len(self.entries)} entries, {nq} quantized, "
            f"{self.nbytes} bytes)"
        )

    @property
    def deltas(self) -> dict[str, Entry]:
        """The delta entries (not BatchNorm replacements)."""
        return {k: e for k, e in self.entries.items() if e.kind == "delta"}

    @property
    def bn(self) -> dict[str, Entry]:
        """The BatchNorm replacement entries."""
        return {k: e for k, e in self.entries.items() if e.kind == "bn"}

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data the signature stores."""
        return sum(e.nbytes for e in self.entries.values())

    @property
    def dense_nbytes(self) -> int:
        """Bytes the delta entries would take as float32 (the unquantized delta)."""
        return sum(4 * e.numel for e in self.deltas.values())

    @property
    def delta_ratio(self) -> float:
        """Stored bytes of the delta entries ÷ their float32 size (≈ 0.14 at 4 bits, G=128)."""
        stored = sum(e.nbytes for e in self.deltas.values())
        return stored / self.dense_nbytes if self.dense_nbytes else 1.0

    def compression_ratio(self, model_nbytes: int | None = None) -> float | None:
        """How many times smaller than the model it came from (``model_nbytes`` or the
        size recorded at extraction); None when unknown."""
        model_nbytes = model_nbytes or self.meta.get("source", {}).get("model_nbytes")
        if not model_nbytes or not self.nbytes:
            return None
        return float(model_nbytes) / self.nbytes

    def energy(self) -> dict[str, float]:
        """‖δ‖² per delta entry."""
        return {k: e.energy() for k, e in self.deltas.items()}

    @property
    def architecture_fingerprint(self) -> str:
        """sha256 over the names, shapes and dtypes of the tensors the signature touches."""
        h = hashlib.sha256()
        for k in sorted(self.entries):
            e = self.entries[k]
            h.update(json.dumps([k, list(e.shape), e.dtype]).encode())
        return "sha256:" + h.hexdigest()

    @property
    def base_fingerprint(self) -> str | None:
        """Hash over the pretrained tensors the signature was extracted against, if known."""
        return self.meta.get("fingerprints", {}).get("base")

    # -- transforms -------------------------------------------------------------------

    def quantize(
        self,
        bits: int = 4,
        scheme: str = "affine",
        granularity: str = "group",
        group: int = 128,
    ) -> Signature:
        """A quantized copy: every delta entry coded with ``bits`` bits (1–8).

        ``scheme``: affine (min/max), symmetric (absmax), log or tanh companding;
        ``granularity``: one scale per ``tensor``, per output ``channel``, or per
        ``group`` of ``group`` contiguous elements. BN replacements stay float32.
        Re-quantizing an already quantized signature decodes it first.
        """
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}; expected {GRANULARITIES}")
        entries = [quantize_entry(e, bits, scheme, granularity, group) for e in self]
        meta = copy.deepcopy(self.meta)
        meta["quantization"] = {
            "bits": bits,
            "scheme": scheme,
            "granularity": granularity,
            "group": group,
        }
        return Signature(entries, name=self.name, meta=meta)

    def dequantize(self) -> Signature:
        """An unquantized copy (dense float32 deltas)."""
        entries = [
            replace(e, values=np.ascontiguousarray(e.dense()), quant=None) if e.quant else e
            for e in self
        ]
        meta = copy.deepcopy(self.meta)
        meta.pop("quantization", None)
        return Signature(entries, name=self.name, meta=meta)

    def __iter__(self):
        return iter(self.entries.values())

    def select(self, names: Iterable[str]) -> Signature:
        """A signature holding only the named entries."""
        keep = set(names)
        return Signature(
            [e for e in self if e.name in keep], name=self.name, meta=copy.deepcopy(self.meta)
        )

    # -- algebra ----------------------------------------------------------------------

    def __add__(self, other: Signature) -> Signature:
        if not isinstance(other, Signature):
            return NotImplemented
        return combine([self, other], [1.0, 1.0], name=f"{_term(self)}+{_term(other)}")

    def __sub__(self, other: Signature) -> Signature:
        if not isinstance(other, Signature):
            return NotImplemented
        return combine([self, other], [1.0, -1.0], name=f"{_term(self)}-{_term(other)}")

    def __mul__(self, alpha: float) -> Signature:
        if not isinstance(alpha, (int, float, np.floating, np.integer)):
            return NotImplemented
        return combine([self], [float(alpha)], name=f"{float(alpha):g}*{_term(self)}")

    __rmul__ = __mul__

    def __neg__(self) -> Signature:
        return combine([self], [-1.0], name=f"-{_term(self)}")

    # -- files ------------------------------------------------------------------------

    def file_tensors(self) -> dict[str, np.ndarray]:
        """Every tensor the file holds, by file name, in entry order."""
        out: dict[str, np.ndarray] = {}
        for e in self:
            out.update(e.file_tensors())
        return out

    def header_meta(self) -> dict[str, Any]:
        """The JSON object stored under ``__metadata__["robustpatch"]``."""
        meta = copy.deepcopy(self.meta)
        fps = dict(meta.pop("fingerprints", {}) or {})
        fps["architecture"] = self.architecture_fingerprint
        fps.setdefault("base", None)
        out: dict[str, Any] = {"format_version": FORMAT_VERSION, "kind": "signature"}
        out["name"] = self.name
        out.update((k, v) for k, v in meta.items() if k not in _HEADER_KEYS)
        out["fingerprints"] = fps
        out["entries"] = [e.spec() for e in self]
        out["content_hash"] = self.content_hash
        return out

    @property
    def content_hash(self) -> str:
        """sha256 over entry specs and tensor names, dtypes, shapes and bytes."""
        return _content_hash([e.spec() for e in self], self.file_tensors())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the signature file atomically (see the module docstring for the format)."""
        path = Path(path)
        meta = json.dumps(self.header_meta(), default=_json_default)
        write_tensors(path, self.file_tensors(), {META_KEY: meta})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Signature:
        """Read and validate a signature file (FormatError / NonFiniteError if bad)."""
        header, tensors = read_tensors(path)
        raw = header.metadata.get(META_KEY)
        if raw is None:
            raise FormatError(f"{path}: not a robustpatch signature (no {META_KEY!r} metadata)")
        return from_parts(_parse_meta(raw, str(path)), tensors, where=str(path))


# ---------------------------------------------------------------------------- file parsing


def _json_default(x: Any) -> Any:
    """numpy scalars and arrays in metadata (provenance, effect) become plain JSON."""
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    raise TypeError(f"metadata value of type {type(x).__name__} is not JSON serializable")


def _content_hash(specs: list[dict[str, Any]], tensors: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(specs, sort_keys=True).encode())
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(json.dumps([name, arr.dtype.str, list(arr.shape)]).encode())
        h.update(memoryview(arr.reshape(-1).view(np.uint8)))
    return "sha256:" + h.hexdigest()


#: Deepest nesting accepted in robustpatch metadata JSON (ours is 4 levels deep): deeper
#: files are refused on load instead of overflowing the stack later (json, deepcopy).
MAX_META_DEPTH = 64


def parse_meta_json(raw: str, where: str, what: str = "robustpatch metadata") -> Any:
    """``json.loads`` for metadata read from a file: FormatError if it is not valid JSON
    or nests deeper than :data:`MAX_META_DEPTH` (never RecursionError)."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise FormatError(f"{where}: {what} is not valid JSON ({e})") from None
    except RecursionError:
        value = None
    else:
        stack = [(value, 1)]
        while stack:
            v, depth = stack.pop()
            if depth > MAX_META_DEPTH:
                break
            if isinstance(v, dict):
                stack.extend((x, depth + 1) for x in v.values())
            elif isinstance(v, list):
                stack.extend((x, depth + 1) for x in v)
        else:
            return value
    raise FormatError(f"{where}: {what} nests deeper than {MAX_META_DEPTH} levels")


def _parse_meta(raw: str, where: str) -> dict[str, Any]:
    meta = parse_meta_json(raw, where)
    if not isinstance(meta, dict):
        raise FormatError(f"{where}: robustpatch metadata is not a JSON object")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise FormatError(f"{where}: missing or invalid format_version")
    if version > FORMAT_VERSION:
        raise FormatError(
            f"{where}: signature format version {version} is newer than this robustpatch "
            f"supports ({FORMAT_VERSION}); upgrade robustpatch"
        )
    if version < 1:
        raise FormatError(f"{where}: invalid format_version {version}")
    if meta.get("kind", "signature") != "signature" or not isinstance(meta.get("entries"), list):
        raise FormatError(f"{where}: not a signature (no entries list)")
    return meta


def _want(tensors: Mapping[str, np.ndarray], name: str, dtype, numel: int, where: str):
    arr = tensors.get(name)
    if arr is None:
        raise FormatError(f"{where}: tensor {name!r} is missing")
    if arr.dtype != np.dtype(dtype):
        want = np.dtype(dtype)
        raise FormatError(f"{where}: tensor {name!r} has dtype {arr.dtype}, expected {want}")
    if arr.size != numel:
        raise FormatError(f"{where}: tensor {name!r} has {arr.size} elements, expected {numel}")
    return arr


def _entry_from_spec(s: Any, tensors: Mapping[str, np.ndarray], where: str) -> Entry:
    if not isinstance(s, dict) or not isinstance(s.get("name"), str):
        raise FormatError(f"{where}: malformed entry {s!r}")
    name, kind, dtype = s["name"], s.get("kind"), s.get("dtype")
    shape = s.get("shape")
    ok_shape = isinstance(shape, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    )
    if kind not in ("delta", "bn") or not ok_shape or not isinstance(dtype, str):
        raise FormatError(f"{where}: entry {name!r} has a bad kind, shape or dtype")
    shape_t, numel = tuple(shape), math.prod(shape)
    stats = s.get("stats") or {}
    if kind == "bn":
        arr = _want(tensors, f"{name}.replace", np.float32, numel, where).reshape(shape_t)
        weight = s.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise FormatError(f"{where}: entry {name!r} has a bad weight {weight!r}")
        return bn_entry(name, arr, dtype, weight)
    if s.get("encoding") == "dense":
        arr = _want(tensors, name, np.float32, numel, where).reshape(shape_t)
        return dense_entry(name, arr, dtype, stats)
    if s.get("encoding") != "quantized":
        raise FormatError(f"{where}: entry {name!r} has unknown encoding {s.get('encoding')!r}")
    return _quant_entry_from_spec(s, shape_t, numel, stats, tensors, where)


def _quant_entry_from_spec(s, shape, numel, stats, tensors, where) -> Entry:
    name = s["name"]
    bits, scheme, gran = s.get("bits"), s.get("scheme"), s.get("granularity")
    glen, group = s.get("group_len"), s.get("group", 0)
    if not (isinstance(bits, int) and 1 <= bits <= 8) or scheme not in SCHEMES:
        raise FormatError(f"{where}: entry {name!r} has bad bits/scheme ({bits!r}, {scheme!r})")
    if gran not in GRANULARITIES or not isinstance(glen, int) or glen < 1 or numel % glen:
        raise FormatError(f"{where}: entry {name!r} has a bad group length {glen!r}")
    codes = _want(tensors, f"{name}.codes", np.uint8, (numel * bits + 7) // 8, where)
    scale = _want(tensors, f"{name}.scale", np.float32, numel // glen, where)
    offset = _want(tensors, f"{name}.offset", np.float32, numel // glen, where)
    _check_finite(name, scale, "scale")
    _check_finite(name, offset, "offset")
    _check_decodable(name, scale.reshape(-1), offset.reshape(-1), bits, scheme, where)
    q = Quantized(
        codes.reshape(-1),
        scale.reshape(-1),
        offset.reshape(-1),
        bits,
        scheme,
        gran,
        int(group or 0),
        glen,
        numel,
    )
    return Entry(name, "delta", shape, s["dtype"], quant=q, stats=dict(stats))


def _check_decodable(name, scale, offset, bits: int, scheme: str, where: str) -> None:
    """What the quantizer guarantees, checked on load: every scale ≥ 0, and every group
    decodes (``level·scale + offset`` in f32) to finite values, so a crafted file cannot
    write Inf into a model."""
    if (scale < 0).any():
        g = int(np.flatnonzero(scale < 0)[0])
        raise FormatError(f"{where}: entry {name!r}: group {g} has a negative scale {scale[g]}")
    lo, hi = (-1.0, 1.0) if scheme in ("log", "tanh") else (0.0, float((1 << bits) - 1))
    with np.errstate(over="ignore", invalid="ignore"):
        ok = np.isfinite(np.float32(lo) * scale + offset) & np.isfinite(
            np.float32(hi) * scale + offset
        )
    if not ok.all():
        g = int(np.flatnonzero(~ok)[0])
        raise FormatError(
            f"{where}: entry {name!r}: group {g} (scale {scale[g]}, offset {offset[g]}) "
            "decodes past the float32 range"
        )


_HEADER_KEYS = ("format_version", "kind", "name", "entries", "content_hash")


def from_parts(
    meta: dict[str, Any], tensors: Mapping[str, np.ndarray], where: str = "signature"
) -> Signature:
    """Rebuild a signature from its parsed metadata and file tensors, verifying both."""
    entries = [_entry_from_spec(s, tensors, where) for s in meta["entries"]]
    sig_meta = {k: v for k, v in meta.items() if k not in _HEADER_KEYS}
    sig = Signature(entries, name=str(meta.get("name", "signature")), meta=sig_meta)
    extra = set(tensors) - set(sig.file_tensors())
    if extra:
        raise FormatError(f"{where}: unexpected tensors {sorted(extra)[:5]}")
    expected = meta.get("content_hash")
    if expected != sig.content_hash:
        raise FormatError(f"{where}: content hash mismatch (file modified?)")
    return sig


def load(path: str | os.PathLike[str]) -> Signature:
    """Read a signature file (same as :meth:`Signature.load`)."""
    return Signature.load(path)


def as_signature(x: SignatureLike) -> Signature:
    """A Signature, loading it if ``x`` is a path."""
    if isinstance(x, Signature):
        return x
    if isinstance(x, (str, os.PathLike)):
        return Signature.load(x)
    raise TypeError(f"expected a Signature or a path, got {type(x).__name__}")


def as_signatures(sigs: SignatureLike | Sequence[SignatureLike]) -> list[Signature]:
    """A list of Signatures from one or several signatures or paths."""
    if isinstance(sigs, (Signature, str, os.PathLike)):
        return [as_signature(sigs)]
    return [as_signature(s) for s in sigs]


# ---------------------------------------------------------------------------- algebra


def bn_blend_weights(weights: Sequence[float]) -> list[float]:
    """Effective blend weights for several replacements of one BN buffer.

    Each ``w`` is clipped below at 0 (a negative α never extrapolates statistics); when
    they sum past 1 they are scaled to sum to 1. The current value keeps ``1 − Σ``.
    """
    e = [max(float(w), 0.0) for w in weights]
    s = sum(e)
    return [w / s for w in e] if s > 1.0 else e


def _term(s: Signature) -> str:
    return f"({s.name})" if any(c in s.name for c in "+-*") else s.name


def combine(
    sigs: Sequence[Signature], coefs: Sequence[float], name: str | None = None
) -> Signature:
    """``Σ coef_k · sig_k`` as one unquantized signature.

    Deltas add (missing entries count as zero; shapes must agree). BN replacements
    combine so that applying the result at α=1 equals applying the parts with α=coef:
    replacement = Σ e_k·r_k / Σ e_k and weight = Σ e_k, with e_k = max(coef_k·w_k, 0).
    """
    if len(sigs) != len(coefs):
        raise ValueError(f"{len(sigs)} signatures but {len(coefs)} coefficients")
    for c in coefs:
        if not math.isfinite(c):
            raise NonFiniteError(f"coefficient {c} is not finite")
    entries = _combine_deltas(sigs, coefs) + _combine_bn(sigs, coefs)
    if name is None:
        name = "+".join(f"{c:g}*{_term(s)}" if c != 1 else _term(s) for s, c in zip(sigs, coefs))
    bases = {s.base_fingerprint for s in sigs}
    meta = {
        "method": "combination",
        "components": [
            {"name": s.name, "content_hash": s.content_hash, "coef": c} for s, c in zip(sigs, coefs)
        ],
        "fingerprints": {"base": bases.pop() if len(bases) == 1 else None},
    }
    sizes = [s.meta.get("source", {}).get("model_nbytes") for s in sigs]
    if any(sizes):
        meta["source"] = {"model_nbytes": max(x for x in sizes if x)}
    return Signature(entries, name=name, meta=meta)


def _combine_deltas(sigs: Sequence[Signature], coefs: Sequence[float]) -> list[Entry]:
    out: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for s, c in zip(sigs, coefs):
        for k, e in s.deltas.items():
            d = e.dense().astype(np.float32, copy=False)
            if k in out:
                if out[k].shape != d.shape:
                    raise ValueError(f"{k}: shapes differ ({out[k].shape} vs {d.shape})")
                out[k] = out[k] + np.float32(c) * d
            else:
                out[k] = np.float32(c) * d
                dtypes[k] = e.dtype
    return [dense_entry(k, v, dtypes[k]) for k, v in out.items()]


def _combine_bn(sigs: Sequence[Signature], coefs: Sequence[float]) -> list[Entry]:
    parts: dict[str, list[tuple[float, Entry]]] = {}
    for s, c in zip(sigs, coefs):
        for k, e in s.bn.items():
            parts.setdefault(k, []).append((max(c * e.weight, 0.0), e))
    out = []
    for k, ps in parts.items():
        total = sum(w for w, _ in ps)
        if total <= 0:
            continue
        shapes = {e.shape for _, e in ps}
        if len(shapes) > 1:
            raise ValueError(f"{k}: BatchNorm replacement shapes differ {sorted(shapes)}")
        acc = sum(np.float64(w) * e.values.astype(np.float64) for w, e in ps if w > 0)
        out.append(bn_entry(k, (acc / total).astype(np.float32), ps[0][1].dtype, total))
    return out


def _cosine(
    a: Signature, b: Signature, energies: dict[int, dict[str, float]], *, union: bool
) -> float:
    """Cosine of two signatures' deltas, from the stored (possibly packed) values.

    ``union``: over every tensor either holds (one the other lacks, or holds with another
    size, counts as zero there); else over the tensors both hold.
    """
    shared = [k for k, e in a.deltas.items() if k in b.deltas and b[k].numel == e.numel]
    ea, eb = energies[id(a)], energies[id(b)]
    dot = sum(_core.dot(a[k].delta(), b[k].delta()) for k in shared)
    na = sum(ea.values()) if union else sum(ea[k] for k in shared)
    nb = sum(eb.values()) if union else sum(eb[k] for k in shared)
    return float(dot / math.sqrt(na * nb)) if na > 0 and nb > 0 else 0.0


def similarity(sigs: Sequence[SignatureLike]) -> np.ndarray:
    """Cosine similarity matrix of signatures over the union of their delta entries.

    A tensor one signature lacks counts as zero in it, so two signatures that agree on
    the tensors they share but differ in coverage score below 1. Computed from the
    stored (possibly quantized) values without decoding them.
    """
    sigs = as_signatures(sigs)
    energies = {id(s): s.energy() for s in sigs}
    n = len(sigs)
    out = np.eye(n)
    for i in range(n):
        if not any(energies[id(sigs[i])].values()):
            out[i, i] = 0.0
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = _cosine(sigs[i], sigs[j], energies, union=True)
    return out


def detect(
    x: Signature | Mapping[str, np.ndarray],
    library: Mapping[str, SignatureLike] | Sequence[SignatureLike],
) -> list[tuple[str, float]]:
    """Rank known signatures by cosine similarity to ``x``, best first.

    ``x`` is a signature or a mapping name → delta array (e.g. the weight difference of
    an unknown fine-tune to its clean twin); ``library`` maps names to signatures (or is
    a list of signatures, named by their ``name``). Unlike :func:`similarity`, each
    score covers only the tensors ``x`` and that signature share: a query usually holds
    more tensors than any signature.
    """
    if not isinstance(x, Signature):
        x = Signature.from_deltas({k: v for k, v in x.items() if not is_bn_stat(k)}, name="query")
    if isinstance(library, Mapping):
        named = [(k, as_signature(v)) for k, v in library.items()]
    else:
        named = [(s.name, s) for s in as_signatures(library)]
    energies = {id(x): x.energy(), **{id(s): s.energy() for _, s in named}}
    scores = [(k, _cosine(x, s, energies, union=False)) for k, s in named]
    return sorted(scores, key=lambda t: -t[1])


def is_patchable(label: str) -> bool:
    """True for dtypes the engine patches (F32, F16, BF16)."""
    return label in PATCHABLE
