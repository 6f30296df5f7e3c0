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
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .. import _core
from .._io.atomic import AtomicFile
from .._io.inputs import in_thread_on_dup, open_input
from .._io.ranged import pwrite_all, start_writeback
from ..dtypes import NUMPY_OF_LABEL, label_of
from ..errors import FormatError, InvalidArgumentError, MismatchError, shown
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
from .undo_record import UNDO_VERSION, TensorEntry, UndoRecord

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
_SUM_WIDTH = "crc32:00000000"  # a checksum's width, for the header bound
_DIGEST_WIDTH = "sha256:" + "0" * 64
#: Bytes of a record hashed per read when its digest is verified.
_HASH_CHUNK = 8 << 20


def undo_path_for(path: str | Path) -> Path:
    """Where the undo record of a patched file lives: ``<path>.rpundo``."""
    return Path(str(path) + UNDO_SUFFIX)


def checksum(arr: np.ndarray) -> str:
    """CRC-32 of a tensor's bytes: detects a patched file changed since (not tampering)."""
    data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    return f"crc32:{_core.crc32(data):08x}"  # zlib's CRC-32, by the engine


def digest(data: np.ndarray | bytes, algorithm: str = "blake3") -> str:
    """Hash of a tensor's (or a header's) bytes: what a restore must reproduce. New
    records take a tensor's as ``xxh3-128`` (the engine's tensor digest, over blocks of
    4096 elements: it checks that a restore reproduced the bytes, which a record's own
    BLAKE3 digest already guards, at several times BLAKE3's speed) and a header's as
    BLAKE3; records written before hold BLAKE3 or sha256 for both."""
    raw = data if isinstance(data, bytes) else np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if algorithm == "xxh3-128":
        itemsize = 1 if isinstance(data, bytes) else data.itemsize
        return "xxh3-128:" + _core.tensor_digest(np.frombuffer(raw, np.uint8), itemsize)
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
                tensors = sig.file_tensors()
                self.sig_tensors.update({f"sig{k}/{n}": a for n, a in tensors.items()})
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
                # real paths: a folder reached through a link resolves ".." from its target
                {
                    "index": k,
                    "file": os.path.relpath(os.path.realpath(p), os.path.realpath(af.path.parent)),
                }
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
    seal: Future[None] | None = None  # the record digest's check, when left to a thread
    # the signature files found where the record says (read while restoring: never outputs)
    found_files: tuple[Path, ...] = ()

    @classmethod
    def load(
        cls,
        path: Path,
        f: BinaryIO,
        signature_files: Sequence[str | os.PathLike[str]] = (),
        background: bool = False,
        defer_digest: bool = False,
    ) -> UndoSidecar:
        """Validate and load the record in ``f`` (the open file at ``path``); signatures
        it refers to are found among ``signature_files``, else where the record says
        (``background``: verified in a second thread, see
        :func:`robustpatch.signature.streamed.open_signature`). ``defer_digest`` checks
        the record digest in a second thread too: the caller must pass :meth:`sealed`
        before it commits anything restored with this record. Either way a record that
        fails its digest is the error reported, whatever else its damage broke."""
        where = str(path)
        header, record = _read_record(path, f, check_digest=not defer_digest)
        seal = _start_digest_check(f, header, record, where) if defer_digest else None
        try:
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
            side = cls(path, record, sigs, source, header, f, seal, tuple(finder.found))
            side.check_restored("the original header", record.source_header_digest, source)
        except BaseException:
            if seal is not None:
                seal.result()
            raise
        return side

    def sealed(self) -> None:
        """Wait for the record digest's check (FormatError if the record's bytes
        changed since it was written); at once if it was checked on loading."""
        if self.seal is not None:
            self.seal.result()

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


def _read_record(path: Path, f: BinaryIO, check_digest: bool = True) -> tuple[Header, UndoRecord]:
    """The record's header and validated metadata, its tensor names and (with
    ``check_digest``) its digest checked."""
    where = str(path)
    header = read_header_from(f, where)
    raw = header.metadata.get(UNDO_KEY)
    if raw is None:
        raise FormatError(f"{where}: not a robustpatch undo record")
    record = UndoRecord.parse(raw, where)
    if check_digest and record.record_digest is not None:
        _check_record_digest(f.fileno(), header, json.loads(raw), record.record_digest, where)
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
        self.given_paths = ", ".join(os.fspath(p) for p in given)
        self.found: list[Path] = []

    def find(self, meta: dict[str, Any], file: str) -> Signature:
        want, name = meta.get("content_hash"), shown(meta.get("name"))
        for sig in self.given:
            if sig.content_hash == want:
                return sig
        # else where the record says (the signatures given may be the others it refers to)
        none_given = f"; none of those given ({self.given_paths}) is it" if self.given else ""
        where = self.record.parent / file
        if not where.exists():
            raise FileNotFoundError(
                f"{self.record} refers to signature {name} ({want}) at {where}, which does "
                f"not exist{none_given}: give it with --signature"
            )
        sig = self.open(where)
        if sig.content_hash != want:
            raise MismatchError(
                f"{where} is not the signature {self.record} was made with: content hash "
                f"{sig.content_hash}, expected {want}{none_given} (give the right one with "
                "--signature)"
            )
        self.found.append(where)
        return sig


def _start_digest_check(
    f: BinaryIO, header: Header, record: UndoRecord, where: str
) -> Future[None]:
    """:func:`_check_record_digest` in a thread, on a duplicate of ``f``'s descriptor
    (the caller may close ``f`` first) and by position (``f``'s offset is left alone)."""
    done: Future[None] = Future()
    if record.record_digest is None:
        done.set_result(None)
        return done
    meta = json.loads(header.metadata[UNDO_KEY])
    return in_thread_on_dup(
        f.fileno(),
        lambda own: _check_record_digest(own, header, meta, str(record.record_digest), where),
        "rp-record",
    )


def _check_record_digest(
    fd: int, header: Header, meta: dict[str, Any], expected: str, where: str
) -> None:
    """The record's own digest, over every tensor's bytes as stored (read from ``fd``
    by position) and its metadata."""
    hasher = _RecordHasher(_algorithm_of(expected))
    for t in header.tensors:
        hasher.tensor(t.name, t.dtype, t.shape)
        at, end = header.data_start + t.begin, header.data_start + t.end
        while at < end:
            block = os.pread(fd, min(_HASH_CHUNK, end - at), at)
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
