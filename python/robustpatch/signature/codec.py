"""The signature file: header metadata, its validating parser, the content hash.

A signature file (``format_version`` 1) is a safetensors container: per delta entry
``P`` either the tensor ``P`` (F32, or BF16/F16 where that holds every value exactly:
see :func:`compact`) or ``P.codes`` (U8, bit-packed little-endian),
``P.scale`` and ``P.offset`` (F32, one per group); per BN entry ``P.replace`` (F32).
``__metadata__["robustpatch"]`` is a JSON object::

    {"format_version": 1, "kind": "signature", "name": ..., "method": ...,
     "entries": [{"name", "kind", "shape", "dtype", "encoding": "dense"|"quantized",
                  "bits", "scheme", "granularity", "group", "group_len", "weight",
                  "stats"}, ...],
     "fingerprints": {"architecture": ..., "base": ...}, "layers": ..., "source": ...,
     "provenance": ..., "effect": ..., "content_hash": "tensors-blake3:..."}

The content hash covers the entry specs and every tensor's name, dtype, shape and bytes
(not provenance/effect, which may be filled in later); it is verified on load with the
algorithm its prefix names. Files written now carry ``tensors-blake3``: BLAKE3 over the
specs and one line per tensor holding the BLAKE3 of its stored bytes
(:class:`TensorDigests`), so a writer hashes each tensor as it writes it; dense deltas
are always stored compact, so :meth:`Signature.content_hash` of the values is the
file's. Files written
before keep ``blake3`` or ``sha256`` over one stream of the tensors, dense deltas as
float32 values (:class:`ContentHasher`). Every
key, type, length and scale is checked before a tensor is trusted (:func:`parse_meta`,
:func:`from_parts`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from .. import _core
from .._format.safetensors import Header, TensorInfo, read_header_from, read_tensor, write_tensors
from .._io.inputs import open_input
from ..dtypes import NUMPY_OF_LABEL, label_of, widen
from ..errors import FormatError, InvalidArgumentError, NonFiniteError, shown
from ..validate import GRANULARITIES, SCHEMES
from .entry import Entry, Quantized, bn_entry, check_finite, dense_entry

if TYPE_CHECKING:
    from .model import Signature

__all__ = [
    "FORMAT_VERSION",
    "META_KEY",
    "MAX_META_DEPTH",
    "content_hash",
    "header_meta",
    "save",
    "load",
    "parse_meta",
    "parse_meta_json",
    "from_parts",
    "json_default",
    "quantized_parts",
]

FORMAT_VERSION = 1
META_KEY = "robustpatch"

#: Top-level metadata keys the codec writes itself (not kept in ``Signature.meta``).
HEADER_KEYS = ("format_version", "kind", "name", "entries", "content_hash")


def json_default(x: Any) -> Any:
    """numpy scalars and arrays in metadata (provenance, effect) become plain JSON."""
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    raise InvalidArgumentError(
        f"metadata value of type {type(x).__name__} is not JSON serializable"
    )


#: Content hash algorithms: new hashes use the first; a stored hash names its own.
HASH_ALGORITHMS = ("tensors-blake3", "blake3", "sha256")
TENSORS_HASH = HASH_ALGORITHMS[0]


def hash_algorithm_of(stored: Any) -> str:
    """The algorithm a stored ``"<algorithm>:<hex>"`` hash was made with (the default for
    anything else: such a hash then fails to match)."""
    name = stored.split(":", 1)[0] if isinstance(stored, str) else None
    return name if name in HASH_ALGORITHMS else HASH_ALGORITHMS[0]


def stored_label(arr: np.ndarray) -> str:
    """The safetensors label a file tensor is stored under (uint8 codes: ``U8``)."""
    return "U8" if arr.dtype == np.uint8 else label_of(arr)


def tensor_digest(arr: np.ndarray) -> str:
    """BLAKE3 (hex) of a file tensor's bytes as stored: one line of a ``tensors-blake3``
    content hash."""
    h = _core.Blake3()
    h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
    return h.hexdigest()


class TensorDigests:
    """A ``tensors-blake3`` content hash from its parts: BLAKE3 over the entry specs
    (sorted-key JSON), then, per file tensor in name order, the JSON line
    ``[name, label, shape, digest]`` (its safetensors label and shape as stored, and
    :func:`tensor_digest` of its bytes). Tensors may be digested in any order and on any
    thread, so a writer hashes each as it writes it and never reads the file back."""

    def __init__(self, specs: list[dict[str, Any]]) -> None:
        self.specs = specs
        self.lines: dict[str, str] = {}

    def add(self, name: str, label: str, shape: tuple[int, ...] | list[int], digest: str) -> None:
        self.lines[name] = json.dumps([name, label, list(shape), digest])

    def hexdigest(self) -> str:
        h = _core.Blake3()
        h.update(json.dumps(self.specs, sort_keys=True).encode())
        for name in sorted(self.lines):
            h.update(self.lines[name].encode())
        return f"{TENSORS_HASH}:{h.hexdigest()}"


class ContentHasher:
    """An older (``blake3`` or ``sha256``) content hash, fed piece by piece: the entry
    specs, then each tensor (in name order) as its name, dtype and shape followed by its
    bytes (dense deltas as float32 values), which may come in blocks (a streamed
    signature is verified without being held in memory)."""

    def __init__(self, specs: list[dict[str, Any]], algorithm: str) -> None:
        self.algorithm = algorithm
        self.h = _core.Blake3() if algorithm == "blake3" else hashlib.sha256()
        self.h.update(json.dumps(specs, sort_keys=True).encode())

    def tensor(self, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.h.update(json.dumps([name, np.dtype(dtype).str, list(shape)]).encode())

    def update(self, data: memoryview | bytes | np.ndarray) -> None:
        if isinstance(data, memoryview):
            data = np.frombuffer(data, np.uint8)
        self.h.update(data)

    def update_values(self, block: memoryview | np.ndarray, label: str) -> bool:
        """Add the float32 form of ``block`` (raw bytes of ``label`` values: F32, F16
        or BF16, whole elements), widened by the engine for BLAKE3; returns whether every
        value is finite."""
        raw = np.frombuffer(block, np.uint8)
        if self.algorithm == "blake3":
            return self.h.update_widened(raw, label)
        values = widen(raw.view(NUMPY_OF_LABEL[label]), label)
        self.h.update(values.view(np.uint8))
        return bool(np.isfinite(values).all())

    def hexdigest(self) -> str:
        return f"{self.algorithm}:{self.h.hexdigest()}"


def content_hash(
    specs: list[dict[str, Any]],
    tensors: Mapping[str, np.ndarray],
    algorithm: str = TENSORS_HASH,
) -> str:
    """The content hash of a signature's entry specs and file tensors: for
    ``tensors-blake3`` the tensors as the file stores them (:func:`stored_tensors`),
    for the older algorithms as :meth:`Signature.file_tensors` gives them."""
    if algorithm == TENSORS_HASH:
        digests = TensorDigests(specs)
        for name, arr in tensors.items():
            digests.add(name, stored_label(arr), arr.shape, tensor_digest(arr))
        return digests.hexdigest()
    hasher = ContentHasher(specs, algorithm)
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        hasher.tensor(name, arr.dtype, arr.shape)
        hasher.update(arr.reshape(-1).view(np.uint8))
    return hasher.hexdigest()


def stored_tensors(sig: Signature) -> dict[str, np.ndarray]:
    """The tensors the file of ``sig`` holds, as it holds them: each dense delta in the
    narrowest dtype that keeps it exact (:func:`compact`)."""
    tensors = sig.file_tensors()
    for e in sig:
        if e.kind == "delta" and e.quant is None:
            tensors[e.name] = compact(e.values)
    return tensors


def signature_hash(sig: Signature, stored: Mapping[str, np.ndarray] | None = None) -> str:
    """The content hash of ``sig`` with its own algorithm (``stored``: its
    :func:`stored_tensors`, when the caller has them)."""
    specs = [e.spec() for e in sig]
    if sig.hash_algorithm != TENSORS_HASH:
        return content_hash(specs, sig.file_tensors(), sig.hash_algorithm)
    return content_hash(specs, stored if stored is not None else stored_tensors(sig))


#: Deepest nesting accepted in robustpatch metadata JSON (ours is 4 levels deep): deeper
#: files are refused on load instead of overflowing the stack later (json, deepcopy).
MAX_META_DEPTH = 64


def parse_meta_json(raw: str, where: str, what: str = "robustpatch metadata") -> Any:
    """``json.loads`` for metadata read from a file: FormatError if it is not valid JSON
    or nests deeper than :data:`MAX_META_DEPTH` (never RecursionError). NaN and Infinity
    are read, as files of earlier releases may hold them (robustpatch no longer writes
    them: :func:`encode_meta`; a signature's provenance reads them as text:
    :func:`nonfinite_as_text`)."""
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


def nonfinite_as_text(value: Any) -> Any:
    """``value`` with each NaN or infinite float replaced by its JSON name (``"NaN"``,
    ``"Infinity"``, ``"-Infinity"``): what files of earlier releases hold in their
    provenance then reads, prints and saves again as strict JSON. Entries are not
    passed through here: the content hash covers them as written."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: nonfinite_as_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nonfinite_as_text(v) for v in value]
    return value


def parse_meta(raw: str, where: str) -> dict[str, Any]:
    meta = parse_meta_json(raw, where)
    if not isinstance(meta, dict):
        raise FormatError(f"{where}: robustpatch metadata is not a JSON object")
    meta = {k: v if k == "entries" else nonfinite_as_text(v) for k, v in meta.items()}
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise FormatError(f"{where}: missing or invalid format_version")
    if not isinstance(meta.get("name", ""), str):
        raise FormatError(f"{where}: the signature's name is not a string")
    if version > FORMAT_VERSION:
        raise FormatError(
            f"{where}: signature format version {version} is newer than this robustpatch "
            f"supports ({FORMAT_VERSION}); upgrade robustpatch"
        )
    if version < 1:
        raise FormatError(f"{where}: invalid format_version {version}")
    if meta.get("kind", "signature") != "signature" or not isinstance(meta.get("entries"), list):
        raise FormatError(f"{where}: not a signature (no entries list)")
    for s in meta["entries"]:
        check_spec(s, where)
    check_described(meta, where)
    return meta


def check_described(meta: dict[str, Any], where: str) -> None:
    """The optional keys robustpatch reads back have the types it writes: the content
    hash covers the entries and tensors, not these."""
    for key in ("fingerprints", "source"):
        if key in meta and not isinstance(meta[key], dict):
            raise FormatError(f"{where}: {key!r} in the metadata is not a JSON object")
    if meta.get("method") is not None and not isinstance(meta["method"], str):
        raise FormatError(f"{where}: 'method' in the metadata is not a string")
    for key in ("architecture", "base"):
        fp = meta.get("fingerprints", {}).get(key)
        if fp is not None and not isinstance(fp, str):
            raise FormatError(f"{where}: fingerprint {key!r} is not a string")
    nbytes = meta.get("source", {}).get("model_nbytes")
    if nbytes is not None and not (_is_int(nbytes) and nbytes >= 0):
        raise FormatError(f"{where}: source model_nbytes {shown(nbytes)} is not a byte count")
    for key in ("skipped", "dropped"):
        if key in meta and not isinstance(meta[key], list):
            raise FormatError(f"{where}: {key!r} in the metadata is not a list")


def check_spec(s: Any, where: str) -> None:
    """An entry's description has the fields every reader relies on, of their types
    (a full load and a streamed one alike)."""
    if not isinstance(s, dict) or not isinstance(s.get("name"), str):
        raise FormatError(f"{where}: malformed entry {shown(s)}")
    shape = s.get("shape")
    ok_shape = isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)
    if s.get("kind") not in ("delta", "bn") or not ok_shape or not isinstance(s.get("dtype"), str):
        raise FormatError(f"{where}: entry {shown(s['name'])} has a bad kind, shape or dtype")
    if not isinstance(s.get("stats", {}), dict):
        raise FormatError(f"{where}: entry {shown(s['name'])} has stats that are not a JSON object")


def _want(tensors: Mapping[str, np.ndarray], name: str, dtype, numel: int, where: str, flat=False):
    """File tensor ``name``, checked: its dtype, its element count and (``flat``, as
    the quantized parts are written) one dimension."""
    arr = tensors.get(name)
    if arr is None:
        raise FormatError(f"{where}: tensor {shown(name)} is missing")
    if arr.dtype != np.dtype(dtype):
        want = np.dtype(dtype)
        raise FormatError(f"{where}: tensor {shown(name)} has dtype {arr.dtype}, expected {want}")
    if arr.size != numel:
        raise FormatError(
            f"{where}: tensor {shown(name)} has {arr.size} elements, expected {numel}"
        )
    if flat and arr.ndim != 1:
        raise FormatError(f"{where}: tensor {shown(name)} has shape {list(arr.shape)}, not 1-D")
    return arr


#: The dtypes a dense delta may be stored in (uint16: bfloat16 bits), narrowest first.
_COMPACT = (np.dtype(np.uint16), np.dtype(np.float16))


def _dense_values(tensors: Mapping[str, np.ndarray], name: str, numel: int, where: str):
    """A dense delta as float32, stored as F32 or (compact, exact) as BF16/F16."""
    arr = tensors.get(name)
    stored = arr.dtype if arr is not None and arr.dtype in _COMPACT else np.dtype(np.float32)
    arr = _want(tensors, name, stored, numel, where)
    if stored == np.uint16:
        return widen(arr, "BF16")
    return arr.astype(np.float32, copy=False)


def compact(values: np.ndarray) -> np.ndarray:
    """``values`` (float32; or bfloat16 bits as uint16, or float16, as a streamed
    signature's views hold them) in the narrowest dtype that holds every one exactly:
    bfloat16 bits (uint16) or float16 if either round-trips bit for bit, else float32.

    >>> compact(np.array([0.5, -2.0], np.float32)).dtype, compact(np.array([0.1], np.float32)).dtype
    (dtype('uint16'), dtype('float32'))
    """
    narrow = values.dtype in (np.uint16, np.float16)
    flat = widen(values) if narrow else np.ascontiguousarray(values, np.float32)
    label, bits = _core.compact(flat)  # one pass when bfloat16 holds every value
    if label == "BF16":
        return bits.reshape(flat.shape)
    if label == "F16":
        return bits.view(np.float16).reshape(flat.shape)
    return flat


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry_from_spec(s: Any, tensors: Mapping[str, np.ndarray], where: str) -> Entry:
    check_spec(s, where)
    name, kind, dtype, shape = s["name"], s["kind"], s["dtype"], s["shape"]
    shape_t, numel = tuple(shape), math.prod(shape)
    stats = s.get("stats", {})
    if kind == "bn":
        arr = _want(tensors, f"{name}.replace", np.float32, numel, where).reshape(shape_t)
        weight = s.get("weight", 1.0)
        if not _finite_number(weight):
            raise FormatError(f"{where}: entry {shown(name)} has a bad weight {shown(weight)}")
        return bn_entry(name, arr, dtype, weight)
    if s.get("encoding") == "dense":
        arr = _dense_values(tensors, name, numel, where).reshape(shape_t)
        return dense_entry(name, arr, dtype, stats)
    if s.get("encoding") != "quantized":
        raise FormatError(
            f"{where}: entry {shown(name)} has unknown encoding {shown(s.get('encoding'))}"
        )
    return _quant_entry_from_spec(s, shape_t, numel, stats, tensors, where)


def _quant_entry_from_spec(s, shape, numel, stats, tensors, where) -> Entry:
    name = s["name"]
    bits, scheme, gran = s.get("bits"), s.get("scheme"), s.get("granularity")
    glen, group = s.get("group_len"), s.get("group", 0)
    if not (_is_int(bits) and 1 <= bits <= 8) or scheme not in SCHEMES:
        raise FormatError(
            f"{where}: entry {shown(name)} has bad bits/scheme ({shown(bits)}, {shown(scheme)})"
        )
    if gran not in GRANULARITIES or not _is_int(glen) or glen < 1 or numel % glen:
        raise FormatError(f"{where}: entry {shown(name)} has a bad group length {shown(glen)}")
    if not _is_int(group) or group < 0:
        raise FormatError(f"{where}: entry {shown(name)} has a bad group size {shown(group)}")
    codes = _want(tensors, f"{name}.codes", np.uint8, (numel * bits + 7) // 8, where, flat=True)
    scale = _want(tensors, f"{name}.scale", np.float32, numel // glen, where, flat=True)
    offset = _want(tensors, f"{name}.offset", np.float32, numel // glen, where, flat=True)
    check_finite(name, scale, "scale")
    check_finite(name, offset, "offset")
    parts = (codes.reshape(-1), scale.reshape(-1), offset.reshape(-1))
    try:  # the engine checks what its quantizer guarantees: scales ≥ 0, finite decodes
        tensor = _core.QuantTensor(*parts, bits, scheme, glen, numel)
    except InvalidArgumentError as e:
        raise FormatError(f"{where}: entry {shown(name)}: {e}") from None
    q = Quantized(tensor, gran, group)
    return Entry(name, "delta", shape, s["dtype"], quant=q, stats=dict(stats))


def from_parts(
    meta: dict[str, Any],
    tensors: Mapping[str, np.ndarray],
    where: str = "signature",
    check_hash: bool = True,
    built: Callable[[Entry], object] = lambda e: None,
) -> Signature:
    """Rebuild a signature from its parsed metadata and file tensors, verifying both
    (``check_hash=False``: all but the content hash, which the caller has verified).
    ``built`` sees each entry once it is built and validated."""
    from .model import Signature

    entries = []
    for s in meta["entries"]:
        try:
            entries.append(_entry_from_spec(s, tensors, where))
        except NonFiniteError as e:  # name the file: several signatures may be loaded
            raise NonFiniteError(f"{where}: {e}") from None
        built(entries[-1])
    sig_meta = {k: v for k, v in meta.items() if k not in HEADER_KEYS}
    sig = Signature(entries, name=str(meta.get("name", "signature")), meta=sig_meta)
    extra = set(tensors) - set(sig.file_tensors())
    if extra:
        raise FormatError(f"{where}: unexpected tensors {sorted(extra)[:5]}")
    expected = meta.get("content_hash")
    sig.hash_algorithm = hash_algorithm_of(expected)
    if check_hash and expected != sig.content_hash:
        raise FormatError(f"{where}: content hash mismatch (file modified?)")
    return sig


def header_meta(sig: Signature) -> dict[str, Any]:
    """The JSON object stored under ``__metadata__["robustpatch"]``."""
    return header_object(sig.name, sig.meta, [e.spec() for e in sig], sig.content_hash)


def header_object(
    name: str, meta: Mapping[str, Any], specs: list[dict[str, Any]], content_hash: str
) -> dict[str, Any]:
    """:func:`header_meta` from its parts (a streamed writer has no Signature)."""
    try:
        meta = copy.deepcopy(dict(meta))
    except RecursionError:
        raise InvalidArgumentError(
            f"signature metadata nests deeper than {MAX_META_DEPTH} levels; not saved"
        ) from None
    fps = meta.pop("fingerprints", None) or {}
    if not isinstance(fps, Mapping):
        raise InvalidArgumentError(f"fingerprints must be a mapping, got {shown(fps)}")
    fps = dict(fps)
    fps["architecture"] = architecture_fingerprint(specs)
    fps.setdefault("base", None)
    out: dict[str, Any] = {"format_version": FORMAT_VERSION, "kind": "signature"}
    out["name"] = name
    out.update((k, v) for k, v in meta.items() if k not in HEADER_KEYS)
    out["fingerprints"] = fps
    out["entries"] = specs
    out["content_hash"] = content_hash
    return out


def architecture_fingerprint(specs: list[dict[str, Any]]) -> str:
    """sha256 over the names, shapes and dtypes of the tensors the entries touch."""
    h = hashlib.sha256()
    for s in sorted(specs, key=lambda s: s["name"]):
        h.update(json.dumps([s["name"], list(s["shape"]), s["dtype"]]).encode())
    return "sha256:" + h.hexdigest()


def save(sig: Signature, path: Path) -> Path:
    """Write ``sig`` (weight 1) to ``path`` atomically; each dense delta is stored in the
    narrowest dtype that holds it exactly (:func:`compact`), and the content hash is
    over the tensors as stored."""
    tensors = stored_tensors(sig)
    specs = [e.spec() for e in sig]
    obj = header_object(sig.name, sig.meta, specs, signature_hash(sig, tensors))
    write_tensors(path, tensors, {META_KEY: encode_meta(obj)})
    return path


def encode_meta(obj: dict[str, Any]) -> str:
    """A signature header's metadata as strict JSON, checked as a load checks it: no
    file is written that its own load would refuse (InvalidArgumentError instead)."""
    try:
        raw = json.dumps(obj, default=json_default, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:  # NaN, a cycle, a key not a str
        raise InvalidArgumentError(f"signature metadata cannot be saved: {e}") from None
    try:
        parse_meta(raw, "signature metadata")
    except FormatError as e:
        raise InvalidArgumentError(f"{e}; not saved") from None
    return raw


def read_signature_header(f: BinaryIO, where: str) -> tuple[Header, dict[str, Any]]:
    """The safetensors header of an open signature file and its validated robustpatch
    metadata (FormatError when the file is not a signature)."""
    header = read_header_from(f, where)
    raw = header.metadata.get(META_KEY)
    if raw is None:
        raise FormatError(f"{where}: not a robustpatch signature (no {META_KEY!r} metadata)")
    return header, parse_meta(raw, where)


def load(path: Path) -> Signature:
    """Read and validate a signature file (FormatError / NonFiniteError if bad).

    Quantized parts are read into immutable ``bytes``, so each QuantTensor holds views
    of them instead of a second copy."""
    with open_input(path) as f:
        header, meta = read_signature_header(f, str(path))
        frozen = quantized_parts(meta, header)
        tensors = {
            t.name: (_read_frozen if t.name in frozen else read_tensor)(f, header, t)
            for t in header.tensors
        }
    return from_parts(meta, tensors, where=str(path))


def quantized_parts(meta: dict[str, Any], header: Header) -> set[str]:
    """The file tensors of the quantized delta entries (their codes, scales and offsets;
    checked when the entries are built)."""
    quantized = [
        s for s in meta["entries"] if isinstance(s, dict) and s.get("encoding") == "quantized"
    ]
    names = {s["name"] for s in quantized if isinstance(s.get("name"), str)}
    parts = {f"{n}.{p}" for n in names for p in ("codes", "scale", "offset")}
    return parts & header.by_name().keys()


def _read_frozen(f, header: Header, t: TensorInfo) -> np.ndarray:
    """Tensor ``t`` as a read-only view of immutable bytes read from ``f`` (copied only
    where the bytes are misaligned for its dtype)."""
    f.seek(header.data_start + t.begin)
    data = f.read(t.nbytes)
    if len(data) != t.nbytes:
        raise FormatError(f"tensor {t.name!r}: file ended after {len(data)} of {t.nbytes} bytes")
    arr = np.frombuffer(data, NUMPY_OF_LABEL[t.dtype]).reshape(t.shape)
    return arr if arr.flags.aligned else arr.copy()


def _finite_number(x: Any) -> bool:
    """A JSON number that is a finite float (an integer too large for a float is not)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False
