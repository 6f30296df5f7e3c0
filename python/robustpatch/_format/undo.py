"""The undo record of a patched file (``<out>.rpundo``): a safetensors file.

Tensors: ``header`` (the source's header bytes), per patched tensor ``records/<name>/
positions`` and ``records/<name>/values`` (the engine's exact-undo record), ``bn/<name>``
(an original BatchNorm buffer's bytes), and ``sig<k>/<tensor>`` (the signatures
themselves). ``__metadata__["robustpatch.undo"]`` is the JSON of :class:`UndoRecord`.

:meth:`UndoRecord.parse` validates every key of that JSON (presence, type, range, the
lengths that must agree) as strictly as a signature file's metadata is validated, so a
crafted record is refused with one line naming the file and the problem.

Three checks then run, in this order. The record's own digest (``record_digest``: BLAKE3,
or sha256 in records written before, over its tensors and its metadata without that
field) is verified before anything is used, so a damaged or edited record is a
FormatError. The CRC-32 ``checksum`` of each patched tensor is verified as the patched
file is read (it changed since: MismatchError).
The ``digest`` of each original tensor (and ``source_header_digest`` of the original
header; BLAKE3, or sha256 in records written before) is verified on the restored bytes
before they are written, so a record that does not restore the source is a
MismatchError naming the tensor, and nothing is renamed into place. A digest detects
damage and edits; it is not a signature: whoever rewrites a record can recompute it.

Records of format version 1 (before these digests) are still read and removed: they
carry no digest, so only their CRCs are verified (the patched tensors), not the
restored bytes.
:class:`UndoWriter` writes a record while a file is patched; :class:`UndoSidecar` is a
record loaded for :func:`robustpatch.remove_file`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .. import _core, validate
from .._io.atomic import AtomicFile
from .._io.inputs import open_input
from .._io.ranged import pwrite_all, start_writeback
from ..dtypes import NUMPY_OF_LABEL, label_of
from ..errors import FormatError, InvalidArgumentError, MismatchError, NonFiniteError, shown
from ..signature import Signature, from_parts, json_default, parse_meta_json
from ..signature.codec import parse_meta
from .safetensors import (
    Header,
    TensorInfo,
    check_header_size,
    encode_header,
    read_header_from,
    read_tensor,
)

__all__ = [
    "UNDO_KEY",
    "UNDO_SUFFIX",
    "UNDO_VERSION",
    "TensorEntry",
    "UndoRecord",
    "UndoWriter",
    "UndoSidecar",
    "undo_path_for",
    "checksum",
    "digest",
    "record_digest",
    "read_record",
]

UNDO_KEY = "robustpatch.undo"
UNDO_SUFFIX = ".rpundo"
UNDO_VERSION = 3  # 2: digests (version 1 records have none); 3: signatures by reference
KINDS = ("delta", "bn")

#: Largest size a record may claim for a file (the format's offsets are 64-bit).
_MAX_SIZE = (1 << 63) - 1
_CHECKSUM = re.compile(r"crc32:[0-9a-f]{8}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DIGEST = re.compile(r"(sha256|blake3):[0-9a-f]{64}")
_SUM_WIDTH = "crc32:00000000"  # a checksum's width, for the header bound
_DIGEST_WIDTH = "sha256:" + "0" * 64
#: Bytes of a record hashed per read when its digest is verified.
_HASH_CHUNK = 8 << 20


def undo_path_for(path: str | Path) -> Path:
    """Where the undo record of a patched file lives: ``<path>.rpundo``."""
    return Path(str(path) + UNDO_SUFFIX)


def checksum(arr: np.ndarray) -> str:
    """CRC-32 of a tensor's bytes: detects a patched file changed since (not tampering)."""
    data = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
    return f"crc32:{zlib.crc32(data):08x}"


def digest(data: np.ndarray | bytes, algorithm: str = "blake3") -> str:
    """Hash of a tensor's (or a header's) bytes: what a restore must reproduce. New
    records use BLAKE3 (the engine's, parallel); records written before hold sha256."""
    raw = data if isinstance(data, bytes) else np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if algorithm == "sha256":
        return "sha256:" + hashlib.sha256(memoryview(raw)).hexdigest()
    h = _core.Blake3()
    h.update(np.frombuffer(raw, np.uint8) if isinstance(raw, bytes) else raw)
    return "blake3:" + h.hexdigest()


class _RecordHasher:
    """The record digest, fed tensor by tensor in file order, then the metadata.

    Each tensor counts as the JSON line ``[name, dtype, shape]`` followed by its bytes
    (their length follows from a validated header), the metadata as sorted-key JSON
    without ``record_digest``: so it covers every byte the record's reader uses. New
    records use BLAKE3 (the engine's: a large record hashes at memory speed); records
    written before hold sha256, verified with it.
    """

    def __init__(self, algorithm: str = "blake3") -> None:
        self.algorithm = algorithm
        self.h = _core.Blake3() if algorithm == "blake3" else hashlib.sha256()

    def tensor(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        self.h.update(json.dumps([name, dtype, list(shape)]).encode() + b"\n")

    def update(self, data: memoryview | bytes) -> None:
        self.h.update(np.frombuffer(data, np.uint8) if isinstance(data, memoryview) else data)

    def finish(self, meta: dict[str, Any]) -> str:
        rest = {k: v for k, v in meta.items() if k != "record_digest"}
        self.h.update(json.dumps(rest, sort_keys=True).encode())
        return f"{self.algorithm}:{self.h.hexdigest()}"


def _algorithm_of(record_digest: object) -> str:
    """The hash a record digest was made with (BLAKE3 unless it says sha256)."""
    return "sha256" if str(record_digest).startswith("sha256:") else "blake3"


def record_digest(meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> str:
    """The record digest of a record's metadata and tensors (in file order), with the
    algorithm of the digest ``meta`` holds (BLAKE3 if none)."""
    hasher = _RecordHasher(_algorithm_of(meta.get("record_digest")))
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        hasher.tensor(name, _label(arr), tuple(arr.shape))
        hasher.update(memoryview(arr.reshape(-1).view(np.uint8)))
    return hasher.finish(meta)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the patched file that the record restores."""

    name: str
    kind: str  # "delta": records/<name>/*; "bn": bn/<name>
    dtype: str  # its safetensors dtype in the patched (and source) file
    checksum: str  # of its patched bytes
    digest: str | None = None  # of its original bytes (None in a version 1 record)


@dataclass(frozen=True)
class UndoRecord:
    """The metadata of an undo record: what was applied and to which file."""

    source_size: int
    patched_size: int
    patched_header_sha256: str
    alphas: list[float]
    signatures: list[dict[str, Any]]  # each signature's file metadata (from_parts checks it)
    tensors: list[TensorEntry]
    source_header_digest: str | None = None  # None in a version 1 record
    record_digest: str | None = None
    #: Signatures kept by reference, not embedded: ``{"index": k, "file": path}``, the
    #: path relative to the record's folder (version 3; the others are embedded).
    signature_refs: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        """The record's JSON: version 2 (as before) unless it refers to signatures.

        Built from the fields as they are (their values are JSON already), not through
        ``asdict``, which deep-copies every signature's metadata: a writer renders the
        record four times, and for a full-model signature the copies cost more than the
        rest of the record's bookkeeping."""
        meta = {f.name: getattr(self, f.name) for f in fields(self)}
        meta["tensors"] = [asdict(e) for e in self.tensors]
        if not self.signature_refs:
            del meta["signature_refs"]
        version = UNDO_VERSION if self.signature_refs else 2
        return json.dumps({"format_version": version, "kind": "undo", **meta})

    @classmethod
    def parse(cls, raw: str, where: str) -> UndoRecord:
        """Validate the record's JSON (FormatError naming ``where`` and the problem)."""
        meta = parse_meta_json(raw, where, "undo metadata")
        check = _Checker(where)
        if not isinstance(meta, dict):
            raise check.fail("undo metadata is not a JSON object")
        version = _check_version(check, meta)
        if meta.get("kind", "undo") != "undo":
            raise check.fail(f"kind is {shown(meta.get('kind'))}, not 'undo'")
        signatures = check.list_of(meta, "signatures", dict, "objects")
        alphas = check.list_of(meta, "alphas", (int, float), "numbers")
        if len(alphas) != len(signatures):
            raise check.fail(f"{len(alphas)} alphas for {len(signatures)} signatures")
        for a in alphas:
            try:
                validate.alpha(a)
            except (InvalidArgumentError, NonFiniteError) as e:
                raise check.fail(str(e)) from None
        digests = version >= 2
        refs = check.list_of(meta, "signature_refs", dict, "objects") if version >= 3 else []
        _check_refs(check, refs, len(signatures))
        return cls(
            source_size=check.size(meta, "source_size"),
            patched_size=check.size(meta, "patched_size"),
            patched_header_sha256=check.text(meta, "patched_header_sha256", _SHA256),
            alphas=[float(a) for a in alphas],
            signatures=signatures,
            tensors=_tensor_entries(
                check, check.list_of(meta, "tensors", dict, "objects"), digests
            ),
            source_header_digest=check.digest(meta, "source_header_digest", digests),
            record_digest=check.digest(meta, "record_digest", digests),
            signature_refs=refs,
        )

    def applied(self) -> list[dict[str, Any]]:
        """Each signature's name, content hash and α, and whether the record embeds it."""
        referenced = {r["index"] for r in self.signature_refs}
        return [
            {
                "name": m.get("name"),
                "hash": m.get("content_hash"),
                "alpha": a,
                "embedded": k not in referenced,
            }
            for k, (m, a) in enumerate(zip(self.signatures, self.alphas))
        ]


def _check_refs(check: _Checker, refs: list[dict[str, Any]], n: int) -> None:
    """Each reference names a new signature index and a file path."""
    seen = set()
    for r in refs:
        k, file = r.get("index"), r.get("file")
        if not _is(k, int) or not 0 <= k < n or k in seen or not isinstance(file, str) or not file:
            raise check.fail(f"bad signature reference {shown(r)}")
        seen.add(k)


class _Checker:
    """Type and range checks of JSON values, each failing as one FormatError line."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, problem: str) -> FormatError:
        return FormatError(f"{self.where}: bad undo record: {problem}")

    def get(self, obj: dict[str, Any], key: str, what: str = "") -> Any:
        if key not in obj:
            raise self.fail(f"missing key {key!r}{what}")
        return obj[key]

    def list_of(self, obj: dict[str, Any], key: str, kind: Any, kinds: str) -> list[Any]:
        value = self.get(obj, key)
        if not isinstance(value, list) or not all(_is(v, kind) for v in value):
            raise self.fail(f"{key} must be a list of {kinds}, got {shown(value)}")
        return value

    def size(self, obj: dict[str, Any], key: str) -> int:
        value = self.get(obj, key)
        if not _is(value, int) or not 0 <= value <= _MAX_SIZE:
            raise self.fail(f"{key} must be a byte count from 0 to 2**63-1, got {shown(value)}")
        return value

    def text(self, obj: dict[str, Any], key: str, form: re.Pattern[str], what: str = "") -> str:
        value = self.get(obj, key, what)
        if not isinstance(value, str) or not form.fullmatch(value):
            raise self.fail(f"{key}{what} is malformed: {shown(value)}")
        return value

    def digest(self, obj: dict[str, Any], key: str, present: bool, what: str = "") -> str | None:
        """A ``sha256:<hex>`` digest, required where ``present`` (else ignored: None)."""
        return self.text(obj, key, _DIGEST, what) if present else None


def _is(value: Any, kind: Any) -> bool:
    """isinstance, except that a JSON ``true``/``false`` is never a number."""
    return isinstance(value, kind) and not isinstance(value, bool)


def _check_version(check: _Checker, meta: dict[str, Any]) -> int:
    version = meta.get("format_version")
    if not _is(version, int) or version < 1:
        raise check.fail(f"missing or invalid format_version {shown(version)}")
    if version > UNDO_VERSION:
        raise FormatError(
            f"{check.where}: undo format version {version} is newer than this robustpatch "
            f"supports ({UNDO_VERSION}); upgrade robustpatch"
        )
    return version


def _tensor_entries(check: _Checker, raw: list[dict[str, Any]], digests: bool) -> list[TensorEntry]:
    out, seen = [], set()
    for e in raw:
        name = check.get(e, "name", " in a tensors entry")
        if not isinstance(name, str) or name in seen:
            raise check.fail(f"tensors entry name {shown(name)} is not a new string")
        seen.add(name)
        at = f" of tensor {shown(name)}"
        kind, dtype = check.get(e, "kind", at), check.get(e, "dtype", at)
        if kind not in KINDS:
            raise check.fail(f"kind{at} is {shown(kind)}, not one of {list(KINDS)}")
        if not isinstance(dtype, str) or dtype not in NUMPY_OF_LABEL:
            raise check.fail(f"dtype{at} is {shown(dtype)}, not a safetensors float dtype")
        sum_ = check.text(e, "checksum", _CHECKSUM, at)
        out.append(TensorEntry(name, kind, dtype, sum_, check.digest(e, "digest", digests, at)))
    return out


# ---------------------------------------------------------------------------- writing


def _label(arr: np.ndarray) -> str:
    """safetensors label of an array in the record (uint16 is plain ``U16`` there)."""
    if arr.dtype == np.uint16:
        return "U16"
    return "U8" if arr.dtype == np.uint8 else label_of(arr)


def _signature_meta(sig: Signature) -> dict[str, Any]:
    """A signature's file metadata as plain JSON values (numpy scalars converted)."""
    return json.loads(json.dumps(sig.header_meta(), default=json_default))


class UndoWriter:
    """Writes an undo record while a file is patched.

    Each tensor's record goes to disk as soon as the tensor is patched, so memory holds
    one tensor's record, never the whole file's. The safetensors header comes last,
    into space reserved at the front: its size is bounded in advance (every name, dtype,
    shape rank and checksum width is known; offsets and lengths are counted at 20
    digits) and the rest is padded with spaces, as the format allows.
    """

    def __init__(
        self,
        af: AtomicFile,
        sigs: list[Signature],
        alphas: list[float],
        touched: list[tuple[TensorInfo, str]],
        src_header: bytes,
        sizes: tuple[int, int],
        new_header: bytes,
        refs: Mapping[int, Path] | None = None,
    ) -> None:
        """``refs``: signatures (by index) kept by reference to their file, not embedded."""
        af.file.flush()
        self.fd = af.file.fileno()
        self.durable = af.durable
        self.elements = 0  # undo-record elements written
        self.infos: list[TensorInfo] = []
        self.entries: list[TensorEntry] = []
        self.sig_tensors: dict[str, np.ndarray] = {}
        refs = refs or {}
        for k, sig in enumerate(sigs):
            if k not in refs:
                self.sig_tensors.update({f"sig{k}/{n}": a for n, a in sig.file_tensors().items()})
        self.record = UndoRecord(
            source_size=sizes[0],
            patched_size=sizes[1],
            patched_header_sha256=hashlib.sha256(new_header).hexdigest(),
            alphas=list(alphas),
            signatures=[_signature_meta(s) for s in sigs],
            tensors=[
                TensorEntry(t.name, kind, t.dtype, _SUM_WIDTH, _DIGEST_WIDTH) for t, kind in touched
            ],
            source_header_digest=digest(src_header),
            record_digest=_DIGEST_WIDTH,
            signature_refs=[
                {"index": k, "file": os.path.relpath(os.path.abspath(p), af.path.parent.absolute())}
                for k, p in sorted(refs.items())
            ],
        )
        self.hasher = _RecordHasher()
        self.data_start = _reserved_header(self.record, touched, self.sig_tensors)
        _check_readable(self.record, self.data_start - 8, f"{af.path}: the undo record")
        self.offset = 0  # bytes of the data buffer written so far
        self._put("header", np.frombuffer(src_header, np.uint8))

    def _put(self, name: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        end = self.offset + arr.nbytes
        info = TensorInfo(name, _label(arr), tuple(arr.shape), self.offset, end)
        self.infos.append(info)
        data = memoryview(arr.reshape(-1).view(np.uint8))
        self.hasher.tensor(name, info.dtype, info.shape)
        self.hasher.update(data)
        at = self.data_start + self.offset
        pwrite_all(self.fd, data, at)
        if self.durable:
            start_writeback(self.fd, at, arr.nbytes)
        self.offset = end

    def delta(
        self, t: TensorInfo, positions: np.ndarray, values: np.ndarray, sum_: str, orig: str
    ) -> None:
        """Record a patched tensor: its engine record, patched checksum and original digest."""
        self._put(f"records/{t.name}/positions", positions)
        self._put(f"records/{t.name}/values", values)
        self.elements += len(positions)
        self.entries.append(TensorEntry(t.name, "delta", t.dtype, sum_, orig))

    def bn(self, t: TensorInfo, original: np.ndarray, sum_: str, orig: str) -> None:
        """Record a blended BatchNorm buffer: its original bytes, patched checksum and
        original digest."""
        self._put(f"bn/{t.name}", np.ascontiguousarray(original).reshape(-1).view(np.uint8))
        self.entries.append(TensorEntry(t.name, "bn", t.dtype, sum_, orig))

    def finish(self) -> None:
        """Append the signatures and write the header: the record is then complete."""
        for name, arr in self.sig_tensors.items():
            self._put(name, arr)
        done = replace(self.record, tensors=self.entries, record_digest=None)
        done = replace(done, record_digest=self.hasher.finish(json.loads(done.to_json())))
        text = encode_header(self.infos, {UNDO_KEY: done.to_json()})[8:].rstrip(b" ")
        if 8 + len(text) > self.data_start:  # cannot happen: the reservation is a bound
            raise AssertionError("the undo record's header outgrew its reserved space")
        size = self.data_start - 8
        pwrite_all(self.fd, size.to_bytes(8, "little") + text.ljust(size), 0)


def _check_readable(record: UndoRecord, header_size: int, what: str) -> None:
    """Refuse, before it is written, a record that :meth:`UndoSidecar.load` would refuse:
    it nests each signature's metadata two levels deeper than the signature file."""
    try:
        parse_meta_json(record.to_json(), what, "metadata")
    except FormatError as e:
        raise InvalidArgumentError(f"{e} (a signature's metadata nests too deep)") from None
    check_header_size(header_size, what)


def _reserved_header(
    record: UndoRecord, touched: list[tuple[TensorInfo, str]], sigs: dict[str, np.ndarray]
) -> int:
    """An upper bound on the record's header size, rounded up to 8 bytes."""
    big = 10**19  # more digits than any real offset, length or dimension
    bound = [TensorInfo("header", "U8", (big,), big, big)]
    for t, kind in touched:
        names = [f"records/{t.name}/positions", f"records/{t.name}/values"]
        for n in names if kind == "delta" else [f"bn/{t.name}"]:
            bound.append(TensorInfo(n, "BF16", (big,), big, big))
    bound += [TensorInfo(n, "BF16", (big,) * a.ndim, big, big) for n, a in sigs.items()]
    n = len(encode_header(bound, {UNDO_KEY: record.to_json()}))
    return n + (-n % 8)


# ---------------------------------------------------------------------------- reading


@dataclass
class UndoSidecar:
    """A validated undo record: metadata, signatures and small tensors in memory; the
    per-tensor records are read from ``file`` one at a time (:meth:`delta_record`)."""

    path: Path
    record: UndoRecord
    signatures: list[Signature]
    source_header: bytes
    header: Header
    file: BinaryIO

    @classmethod
    def load(
        cls,
        path: Path,
        f: BinaryIO,
        signature_files: Sequence[str | os.PathLike[str]] = (),
        background: bool = False,
    ) -> UndoSidecar:
        """Validate and load the record in ``f`` (the open file at ``path``); signatures
        it refers to are found among ``signature_files``, else where the record says
        (``background``: verified in a second thread, see
        :func:`robustpatch.signature.streamed.open_signature`)."""
        where = str(path)
        header, record = _read_record(path, f)
        sig_tensors = [t for t in header.tensors if t.name.startswith("sig")]
        loaded = {t.name: read_tensor(f, header, t) for t in sig_tensors}
        refs = {r["index"]: r["file"] for r in record.signature_refs}
        finder = _SignatureFinder(path, signature_files, background)
        sigs = [
            finder.find(meta, refs[k])
            if k in refs
            else _signature(meta, _prefixed(loaded, f"sig{k}/"), f"{where} (signature {k})")
            for k, meta in enumerate(record.signatures)
        ]
        source = read_tensor(f, header, header.by_name()["header"]).tobytes()
        side = cls(path, record, sigs, source, header, f)
        side.check_restored("the original header", record.source_header_digest, source)
        return side

    def check_restored(self, what: str, expected: str | None, data: np.ndarray | bytes) -> None:
        """Restored bytes match the original's digest (a version 1 record has none)."""
        if expected is not None and digest(data, expected.split(":", 1)[0]) != expected:
            raise MismatchError(
                f"{self.path}: {what} differs from the original's digest after restoring: "
                "the record does not restore this file"
            )

    def read(self, name: str) -> np.ndarray:
        return read_tensor(self.file, self.header, self.header.by_name()[name])

    def delta_record(self, t: TensorInfo) -> tuple[np.ndarray, np.ndarray]:
        """The engine's record of patched tensor ``t``: (positions, original bits), each
        checked against ``t`` (FormatError naming the record's tensor)."""
        where = f"{self.path}: bad undo record: records/{t.name}"
        pos, vals = self.read(f"records/{t.name}/positions"), self.read(f"records/{t.name}/values")
        itemsize = np.dtype(NUMPY_OF_LABEL[t.dtype]).itemsize
        if pos.dtype != np.uint32 or pos.ndim != 1:
            raise FormatError(f"{where}/positions is not a list of uint32")
        if vals.dtype.kind != "u" or vals.dtype.itemsize != itemsize or vals.shape != pos.shape:
            raise FormatError(f"{where}/values does not hold one {t.dtype} per position")
        numel = t.nbytes // itemsize
        if pos.size and int(pos.max()) >= numel:
            raise FormatError(
                f"{where}/positions: position {int(pos.max())} is outside a tensor of "
                f"{numel} elements"
            )
        return pos, vals

    def bn_original(self, t: TensorInfo) -> np.ndarray:
        """The original bytes of a BatchNorm buffer, as the buffer's dtype and shape."""
        raw = self.read(f"bn/{t.name}").tobytes()
        if len(raw) != t.nbytes:
            raise FormatError(f"{self.path}: bad undo record: bn/{t.name} holds {len(raw)} bytes")
        return np.frombuffer(raw, NUMPY_OF_LABEL[t.dtype]).reshape(t.shape)


def _read_record(path: Path, f: BinaryIO) -> tuple[Header, UndoRecord]:
    """The record's header and validated metadata, its digest and tensor names checked."""
    where = str(path)
    header = read_header_from(f, where)
    raw = header.metadata.get(UNDO_KEY)
    if raw is None:
        raise FormatError(f"{where}: not a robustpatch undo record")
    record = UndoRecord.parse(raw, where)
    if record.record_digest is not None:
        _check_record_digest(f, header, json.loads(raw), record.record_digest, where)
    _check_tensor_names(where, header, record)
    return header, record


def read_record(path: Path) -> UndoRecord:
    """The validated metadata of the record at ``path`` (signatures not loaded)."""
    with open_input(path) as f:
        return _read_record(path, f)[1]


class _SignatureFinder:
    """Finds a signature a record refers to by content hash: among the files the user
    gave, else at the path the record holds (relative to the record's folder)."""

    def __init__(
        self, record: Path, given: Sequence[str | os.PathLike[str]], background: bool
    ) -> None:
        from ..signature.streamed import open_signature

        self.record = record
        self.open = lambda p: open_signature(p, background=background)
        self.given = [self.open(p) for p in given]

    def find(self, meta: dict[str, Any], file: str) -> Signature:
        want, name = meta.get("content_hash"), shown(meta.get("name"))
        for sig in self.given:
            if sig.content_hash == want:
                return sig
        if self.given:
            raise MismatchError(
                f"{self.record}: none of the signatures given is {name} ({want}), which "
                "the record was made with"
            )
        where = self.record.parent / file
        if not where.exists():
            raise FileNotFoundError(
                f"{self.record} refers to signature {name} ({want}) at {where}, which does "
                "not exist: give it with --signature"
            )
        sig = self.open(where)
        if sig.content_hash != want:
            raise MismatchError(
                f"{where} is not the signature {self.record} was made with: content hash "
                f"{sig.content_hash}, expected {want} (give the right one with --signature)"
            )
        return sig


def _check_record_digest(
    f: BinaryIO, header: Header, meta: dict[str, Any], expected: str, where: str
) -> None:
    """The record's own digest, over every tensor's bytes as stored and its metadata."""
    hasher = _RecordHasher(_algorithm_of(expected))
    for t in header.tensors:
        hasher.tensor(t.name, t.dtype, t.shape)
        at, end = header.data_start + t.begin, header.data_start + t.end
        while at < end:
            f.seek(at)
            block = f.read(min(_HASH_CHUNK, end - at))
            if not block:
                raise FormatError(f"{where}: tensor {shown(t.name)}: the file ends early")
            hasher.update(block)
            at += len(block)
    if hasher.finish(meta) != expected:
        raise FormatError(
            f"{where}: bad undo record: its record digest does not match its contents "
            "(the record was changed or damaged)"
        )


def _signature(meta: dict[str, Any], tensors: dict[str, np.ndarray], where: str) -> Signature:
    """A signature stored in the record, validated as a signature file's would be."""
    return from_parts(parse_meta(json.dumps(meta), where), tensors, where=where)


def _prefixed(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {n[len(prefix) :]: a for n, a in tensors.items() if n.startswith(prefix)}


def _check_tensor_names(where: str, header: Header, record: UndoRecord) -> None:
    """The record's file holds exactly the tensors its metadata implies."""
    want = {"header"}
    for e in record.tensors:
        if e.kind == "delta":
            want |= {f"records/{e.name}/positions", f"records/{e.name}/values"}
        else:
            want.add(f"bn/{e.name}")
    sig_prefixes = tuple(f"sig{k}/" for k in range(len(record.signatures)))
    have = {t.name for t in header.tensors if not t.name.startswith(sig_prefixes)}
    for problem, names in (("is missing", want - have), ("is unknown", have - want)):
        if names:
            name = shown(sorted(names)[0])
            raise FormatError(f"{where}: bad undo record: tensor {name} {problem}")
