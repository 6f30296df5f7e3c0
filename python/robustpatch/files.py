"""Patch safetensors model files on disk, and restore them bit for bit.

``apply_file`` streams: untouched tensors are copied by byte range in the kernel
(``os.copy_file_range``), touched ones are mapped one at a time (private copy-on-write),
patched by the engine and written. Memory stays near the largest touched tensor. The
output goes to a temporary file in its folder, is fsynced and renamed into place, so the
destination holds either the complete result or what it held before.

The patched file keeps the source's layout and metadata and adds
``__metadata__["robustpatch.applied"]`` (a JSON list of ``{name, hash, alpha}``).
Next to it, ``<out>.rpundo`` (a safetensors file) holds what ``remove_file`` needs to
restore the source exactly: the source's header bytes, the engine's undo record per
tensor, the original BatchNorm buffers, and the signatures themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _core
from .container import (
    AtomicFile,
    Header,
    TensorInfo,
    TensorReader,
    commit_all,
    copy_range,
    encode_header,
    parse_header,
    pwrite_all,
    read_header,
    read_tensors,
    same_file,
    write_tensors_to,
)
from .dtypes import NUMPY_OF_LABEL, kernel_view
from .errors import FormatError, MismatchError
from .patch import Alphas, NumpyTarget, Plan, blend_bn, check_plan, make_plan, normalize_alphas
from .signature import (
    Signature,
    SignatureLike,
    _json_default,
    as_signatures,
    from_parts,
    parse_meta_json,
)

__all__ = ["apply_file", "remove_file", "undo_path_for", "applied_signatures", "FileReport"]

APPLIED_KEY = "robustpatch.applied"
UNDO_KEY = "robustpatch.undo"
UNDO_SUFFIX = ".rpundo"
UNDO_VERSION = 1

Progress = Callable[[int], object]


@dataclass
class FileReport:
    """What :func:`apply_file` / :func:`remove_file` did."""

    out: Path
    undo: Path | None
    tensors: int  # tensors patched (or restored)
    bn_buffers: int
    bytes_written: int
    record_elements: int  # elements held by the undo record


def undo_path_for(path: str | os.PathLike[str]) -> Path:
    """Where the undo record of a patched file lives: ``<path>.rpundo``."""
    return Path(str(path) + UNDO_SUFFIX)


def applied_signatures(header: Header) -> list[dict[str, Any]]:
    """The signatures recorded in a patched file's metadata (empty if none)."""
    raw = header.metadata.get(APPLIED_KEY)
    if raw is None:
        return []
    value = parse_meta_json(raw, "model", f"{APPLIED_KEY} metadata")
    if not isinstance(value, list):
        raise FormatError(f"{APPLIED_KEY} metadata is not a list")
    return value


def _refuse_same(src: Path, out: Path) -> None:
    if same_file(src, out):
        raise ValueError(f"output path {str(out)!r} is the input; write to another file")
    if same_file(undo_path_for(out), src):
        raise ValueError(f"the undo record {undo_path_for(out)} would overwrite the input")


def _file_spec(tensors: dict[str, TensorInfo]):
    def spec(name: str):
        t = tensors.get(name)
        return None if t is None else (t.dtype, t.shape)

    return spec


def _checksum(arr: np.ndarray) -> str:
    """CRC-32 of a tensor's bytes: detects a patched file changed since (not tampering)."""
    data = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
    return f"crc32:{zlib.crc32(data):08x}"


class _Undo:
    """The sidecar's content, accumulated while patching."""

    def __init__(self, plan: Plan, src_header: bytes, src_size: int) -> None:
        self.plan = plan
        self.src_header = src_header
        self.src_size = src_size
        self.tensors: dict[str, np.ndarray] = {}
        self.entries: list[dict[str, Any]] = []

    def add_delta(self, t: TensorInfo, rec: tuple[np.ndarray, np.ndarray], sum_: str) -> None:
        pos, vals = rec
        self.tensors[f"records/{t.name}/positions"] = pos
        self.tensors[f"records/{t.name}/values"] = vals
        self.entries.append({"name": t.name, "kind": "delta", "dtype": t.dtype, "checksum": sum_})

    def add_bn(self, t: TensorInfo, original: np.ndarray, sum_: str) -> None:
        self.tensors[f"bn/{t.name}"] = np.ascontiguousarray(original).reshape(-1).view(np.uint8)
        self.entries.append({"name": t.name, "kind": "bn", "dtype": t.dtype, "checksum": sum_})

    def write(self, f, patched_header: bytes, patched_size: int) -> None:
        tensors: dict[str, np.ndarray] = {"header": np.frombuffer(self.src_header, np.uint8)}
        tensors.update(self.tensors)
        sig_meta = []
        for k, sig in enumerate(self.plan.sigs):
            sig_meta.append(json.loads(json.dumps(sig.header_meta(), default=_json_default)))
            tensors.update({f"sig{k}/{n}": a for n, a in sig.file_tensors().items()})
        meta = {
            "format_version": UNDO_VERSION,
            "kind": "undo",
            "source_size": self.src_size,
            "patched_size": patched_size,
            "patched_header_sha256": hashlib.sha256(patched_header).hexdigest(),
            "alphas": self.plan.alphas,
            "signatures": sig_meta,
            "tensors": self.entries,
        }
        labels = {k: "U16" for k, a in tensors.items() if a.dtype == np.uint16}
        write_tensors_to(f, tensors, {UNDO_KEY: json.dumps(meta)}, labels)


def apply_file(
    src: str | os.PathLike[str],
    sigs: SignatureLike | Sequence[SignatureLike],
    alphas: Alphas = 1.0,
    out: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    undo: bool = True,
    durable: bool = True,
    progress: Progress | None = None,
) -> FileReport:
    """Write ``src`` patched with ``Σ α_k·sig_k`` to ``out`` (atomically).

    With ``undo`` (default) an undo record is written to ``<out>.rpundo`` so that
    :func:`remove_file` restores ``src`` bit for bit. Refuses ``out == src``, and a model
    whose names/shapes/dtypes do not match the signatures unless ``force=True``; on any
    error nothing is left at ``out`` and ``src`` is untouched. ``durable=False`` skips
    the fsyncs (the rename stays atomic for readers, but a power cut may lose the
    output). ``progress`` is called with byte counts as the output is written.
    """
    if out is None:
        raise ValueError("apply_file needs an output path (out=...)")
    src, out = Path(src), Path(out)
    _refuse_same(src, out)
    sigs = as_signatures(sigs)
    plan = make_plan(sigs, normalize_alphas(len(sigs), alphas))
    header = read_header(src)
    check_plan(plan, _file_spec(header.by_name()), force)
    applied = applied_signatures(header) + [
        {"name": s.name, "hash": s.content_hash, "alpha": a} for s, a in zip(sigs, plan.alphas)
    ]
    meta = dict(header.metadata)
    meta[APPLIED_KEY] = json.dumps(applied)
    new_header = encode_header(header.tensors, meta)
    with open(src, "rb") as fsrc:
        src_header = _read_exact(fsrc, 0, header.data_start)
        record = _Undo(plan, src_header, header.file_size) if undo else None
        reader = TensorReader(fsrc.fileno(), header)

        def patch(t: TensorInfo) -> np.ndarray:
            return _patch_tensor(reader, t, plan, record)

        with AtomicFile(out, durable) as fout:
            size = _stream(fsrc, fout, header, new_header, plan, patch, progress)
            undo_file = _commit_with_undo(fout, record, new_header, size, durable)
    return FileReport(out, undo_file, len(plan.deltas), len(plan.bn), size, _records(record))


def _records(record: _Undo | None) -> int:
    if record is None:
        return 0
    return sum(len(a) for k, a in record.tensors.items() if k.endswith("/positions"))


def _commit_with_undo(
    fout: AtomicFile, record: _Undo | None, new_header: bytes, size: int, durable: bool
) -> Path | None:
    """Commit the patched file and its undo record as a pair (see :func:`commit_all`:
    concurrent writers of the same output never leave one's model with the other's
    record). Returns the undo record's path, or None without a record."""
    if record is None:
        fout.commit()
        return None
    path = undo_path_for(fout.path)
    with AtomicFile(path, durable) as af:
        record.write(af.file, new_header, size)
        try:
            commit_all([af, fout])
        except BaseException:
            if not af.tmp.exists() and fout.tmp.exists():  # the record landed, the model not
                path.unlink(missing_ok=True)
            raise
    return path


def _read_exact(f, offset: int, n: int) -> bytes:
    f.seek(offset)
    data = f.read(n)
    if len(data) != n:
        raise FormatError(f"file ended after {len(data)} of {n} bytes")
    return data


def _stream(
    fsrc, fout: AtomicFile, header: Header, new_header: bytes, plan: Plan, patch, progress
) -> int:
    """Write ``new_header`` and the data buffer of ``fsrc`` into ``fout``.

    Tensors in ``plan`` go through ``patch(t)`` (which returns the array to write) on
    this thread while a second thread copies every other byte range in the kernel, so
    patching overlaps the copy. Returns the size written.
    """
    tick = _locked(progress)
    shift = len(new_header) - header.data_start
    sfd, dfd = fsrc.fileno(), fout.file.fileno()
    fout.file.flush()
    pwrite_all(dfd, new_header, 0)
    touched = [t for t in header.tensors if t.name in plan.deltas or t.name in plan.bn]
    ranges, pos = [], header.data_start
    for t in touched:
        ranges.append((pos, header.data_start + t.begin - pos))
        pos = header.data_start + t.end
    ranges.append((pos, header.file_size - pos))
    stop = threading.Event()

    def copy_all() -> None:
        for offset, length in ranges:
            copy_range(sfd, dfd, offset, length, offset + shift, tick, stop.is_set)

    with ThreadPoolExecutor(1) as pool:
        copying = pool.submit(copy_all)
        try:
            for t in touched:
                arr = patch(t)
                pwrite_all(dfd, arr.reshape(-1).view(np.uint8).data, len(new_header) + t.begin)
                tick(t.nbytes)
        except BaseException:
            stop.set()
            raise
        finally:
            error = copying.exception()
        if error is not None:
            raise error
    size = os.fstat(dfd).st_size
    if size != len(new_header) + header.file_size - header.data_start:
        raise OSError(f"{fout.path}: wrote {size} bytes, expected more")
    return size


def _locked(progress: Progress | None) -> Progress:
    if progress is None:
        return lambda n: None
    lock = threading.Lock()

    def tick(n: int) -> None:
        with lock:
            progress(n)

    return tick


def _patch_tensor(reader: TensorReader, t: TensorInfo, plan: Plan, record: _Undo | None):
    arr = kernel_view(reader.load(t))
    if t.name in plan.deltas:
        ds, al = plan.deltas[t.name]
        rec = _core.apply(arr, ds, al, record=record is not None)
        if record is not None:
            record.add_delta(t, rec, _checksum(arr))
    else:
        target = NumpyTarget({t.name: arr})
        rs, ws = plan.bn[t.name]
        original = arr.copy()
        target.write_values(t.name, blend_bn(target.read_values(t.name), rs, ws))
        if record is not None:
            record.add_bn(t, original, _checksum(arr))
    return arr


# ---------------------------------------------------------------------------- remove


@dataclass
class _Sidecar:
    meta: dict[str, Any]
    tensors: dict[str, np.ndarray]
    plan: Plan
    entries: dict[str, dict[str, Any]]


def _load_sidecar(path: Path) -> _Sidecar:
    header, tensors = read_tensors(path)
    raw = header.metadata.get(UNDO_KEY)
    if raw is None:
        raise FormatError(f"{path}: not a robustpatch undo record")
    meta = parse_meta_json(raw, str(path), "undo metadata")
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int) or version < 1:
        raise FormatError(f"{path}: missing or invalid format_version")
    if version > UNDO_VERSION:
        raise FormatError(
            f"{path}: undo format version {version} is newer than this robustpatch supports "
            f"({UNDO_VERSION}); upgrade robustpatch"
        )
    sigs = []
    for k, sm in enumerate(meta["signatures"]):
        prefix = f"sig{k}/"
        part = {n[len(prefix) :]: a for n, a in tensors.items() if n.startswith(prefix)}
        sigs.append(from_parts(sm, part, where=f"{path} (signature {k})"))
    plan = make_plan(sigs, [float(a) for a in meta["alphas"]])
    entries = {e["name"]: e for e in meta["tensors"]}
    return _Sidecar(meta, tensors, plan, entries)


def remove_file(
    patched: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    undo: str | os.PathLike[str] | None = None,
    durable: bool = True,
    progress: Progress | None = None,
) -> FileReport:
    """Restore the file :func:`apply_file` patched: ``out`` becomes bit-identical to the
    source (same sha256). ``undo`` defaults to ``<patched>.rpundo``. Refuses a patched
    file that changed since (size, header or touched tensors differ). Written
    atomically like :func:`apply_file`."""
    if out is None:
        raise ValueError("remove_file needs an output path (out=...)")
    patched, out = Path(patched), Path(out)
    if same_file(patched, out):
        raise ValueError(f"output path {str(out)!r} is the input; write to another file")
    side_path = Path(undo) if undo else undo_path_for(patched)
    if not side_path.exists():
        raise FileNotFoundError(
            f"no undo record at {side_path} (was {patched} written with undo=False?)"
        )
    side = _load_sidecar(side_path)
    header = read_header(patched)
    with open(patched, "rb") as fsrc:
        _verify_patched(fsrc, header, side)
        original = side.tensors["header"].tobytes()
        orig = parse_header(original, side.meta["source_size"])
        _same_layout(header, orig)
        reader = TensorReader(fsrc.fileno(), header)

        def restore(t: TensorInfo) -> np.ndarray:
            return _restore_tensor(reader, t, side)

        with AtomicFile(out, durable) as fout:
            size = _stream(fsrc, fout, header, original, side.plan, restore, progress)
            fout.commit()
    return FileReport(out, None, len(side.plan.deltas), len(side.plan.bn), size, 0)


def _verify_patched(fsrc, header: Header, side: _Sidecar) -> None:
    if header.file_size != side.meta["patched_size"]:
        raise MismatchError("the patched file's size differs from the undo record's")
    got = hashlib.sha256(_read_exact(fsrc, 0, header.data_start)).hexdigest()
    if got != side.meta["patched_header_sha256"]:
        raise MismatchError("the patched file's header differs from the undo record's")
    if set(side.entries) != set(side.plan.deltas) | set(side.plan.bn):
        raise FormatError("the undo record's tensors do not match its signatures")


def _same_layout(patched: Header, orig: Header) -> None:
    a = [(t.name, t.dtype, t.shape, t.begin, t.end) for t in patched.tensors]
    b = [(t.name, t.dtype, t.shape, t.begin, t.end) for t in orig.tensors]
    if a != b or patched.file_size - patched.data_start != orig.file_size - orig.data_start:
        raise FormatError("the undo record's original layout does not match the patched file")


def _restore_tensor(reader: TensorReader, t: TensorInfo, side: _Sidecar) -> np.ndarray:
    plan = side.plan
    arr = kernel_view(reader.load(t))
    entry = side.entries[t.name]
    if _checksum(arr) != entry["checksum"]:
        raise MismatchError(f"{t.name}: tensor changed since it was patched")
    if entry["kind"] == "bn":
        raw = side.tensors[f"bn/{t.name}"]
        return np.frombuffer(raw.tobytes(), NUMPY_OF_LABEL[t.dtype]).reshape(t.shape)
    ds, al = plan.deltas[t.name]
    pos = side.tensors[f"records/{t.name}/positions"]
    vals = side.tensors[f"records/{t.name}/values"]
    _core.remove(arr, ds, al, pos, vals)
    return arr


def load_undo_signatures(path: str | os.PathLike[str]) -> tuple[list[Signature], list[float]]:
    """The signatures and α an undo record holds (for ``inspect``)."""
    side = _load_sidecar(Path(path))
    return side.plan.sigs, side.plan.alphas
