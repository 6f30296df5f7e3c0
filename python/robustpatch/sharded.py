"""Patch sharded Hugging Face checkpoints (``*.index.json`` + shards) and restore them.

A sharded checkpoint is patched shard by shard through the single-file engine
(:func:`robustpatch.files.apply_file`, which streams): each shard that a signature
touches is written patched with its own undo record beside it, each untouched shard is
hard-linked (copied where the filesystem cannot link), and a new index is written. The
output is a folder, built as a temporary folder beside it and renamed into place, so the
destination holds the complete result or what it held before, whatever happens to the
process.

The output folder holds the index, the shards, ``<shard>.rpundo`` for each patched
shard and :data:`RECORD_NAME`, the folder's undo record: the source index byte for
byte, the sha256 of the patched index, and for each shard either its undo record's name
or (linked shards) its size and header sha256. :func:`remove_sharded` restores every
shard bit for bit from it. Other files of the source folder (config, tokenizer) are
not carried over.

Signature files are opened for streaming (:mod:`robustpatch.signature.streamed`): a
dense task vector stays in its file, memory-mapped, and each shard reads only its
tensors' part, whose pages are dropped once the shard is written; memory stays near one
shard's part of the signatures, not all of them. Each patched shard's undo record embeds
the part of the signatures it used.

A linked shard shares its bytes with the source: modifying one in place modifies both.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import validate
from ._format import strict_json
from ._format.safetensors import Header
from ._format.shards import (
    INDEX_SUFFIX,
    RECORD_NAME,
    ShardedIndex,
    checkpoint_names,
    is_sharded,
    load_index,
)
from ._format.undo import undo_path_for
from ._io.atomic import _fsync_dir, _pid_alive, give_new_folder_mode, naming_errors, remove_stale
from .errors import FormatError, InvalidArgumentError, MismatchError, shown
from .signature import Signature
from .signature.algebra import terms
from .signature.streamed import StreamedSignature, open_signature
from .targets import check_plan, make_plan

if TYPE_CHECKING:
    from .files import FileReport, PatchCall

__all__ = [
    "RECORD_NAME",
    "apply_sharded",
    "remove_sharded",
    "checkpoint_bytes",
    "remove_stale_folders",
]

RECORD_FORMAT = "robustpatch-sharded-undo"
RECORD_VERSION = 1
APPLIED_KEY = "robustpatch.applied"


def checkpoint_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes a patch of ``path`` reads: the file's size, or a sharded checkpoint's shards'
    (its index validated: a bad one is the same one-line error a patch would give)."""
    if not is_sharded(path):
        return os.path.getsize(path)
    return sum(h.file_size for h in load_index(path).headers.values())


# ---------------------------------------------------------------------------- apply


def apply_sharded(
    src: str | os.PathLike[str], out: str | os.PathLike[str] | None, call: PatchCall
) -> FileReport:
    """:func:`robustpatch.files.apply_file` for a sharded checkpoint (its index or its
    folder): ``out`` is the folder to write. Everything is checked (index, shards,
    signatures against the tensors) before anything is written."""
    from .files import FileReport, apply_one

    opts, progress, sigs = call.opts, call.progress, call.sigs
    index = load_index(validate.path(src, "src"))
    _check_no_journals(index)
    out = _out_folder(out, "apply_file")
    pairs = terms(_opened(sigs), call.alphas)
    plan = make_plan(*_split(pairs))
    check_plan(
        plan,
        _spec_across(index),
        opts.force,
        allow_dtype_change=opts.allow_dtype_change,
        model=index.path,
    )
    _check_out_folder(out, [*_index_files(index), *_sig_paths(sigs)])
    shards: dict[str, dict[str, Any]] = {}
    written = elements = 0
    with _TempFolder(out, opts.durable) as tmp:
        for shard in index.shards:
            part = _part_for(pairs, index.tensors_of(shard))
            dst = tmp.path / shard
            if not part:
                header = index.headers[shard]
                shards[shard] = _link_untouched(index.shard_path(shard), dst, header, opts.durable)
                _tick(progress, index.headers[shard].file_size)
                continue
            sigs_of_shard, alphas_of_shard = _split(part)
            shard_call = replace(call, sigs=sigs_of_shard, alphas=alphas_of_shard)
            rep = apply_one(index.shard_path(shard), dst, shard_call)
            _release(pairs, index.tensors_of(shard))
            shards[shard] = {"undo": undo_path_for(shard).name}
            written += rep.bytes_written
            elements += rep.record_elements
        new_index = _patched_index(index, pairs)
        _write(tmp.path / index.path.name, new_index, opts.durable)
        if opts.undo:
            applied = _applied(pairs)
            _write(tmp.path / RECORD_NAME, _record(index, new_index, shards, applied), opts.durable)
        tmp.commit()
    record = out / RECORD_NAME if opts.undo else None
    return FileReport(out, record, len(plan.deltas), len(plan.bn), written, elements)


def _check_no_journals(index: ShardedIndex) -> None:
    """Refuse a checkpoint with a shard whose in-place patch was interrupted, as every
    single-file command does: an untouched shard is hard-linked into the output, and
    recovering the shard later would change the output through the link."""
    from .files import _check_no_journal

    _check_no_journal(*(index.shard_path(shard) for shard in index.shards))


def _spec_across(index: ShardedIndex):
    """The (dtype, shape) of a tensor of any shard, for :func:`check_plan`."""
    infos = {}
    for header in index.headers.values():
        infos.update(header.by_name())

    def spec(name: str):
        t = infos.get(name)
        return None if t is None else (t.dtype, t.shape)

    return spec


def _split(pairs: list[tuple[Signature, float]]) -> tuple[list[Signature], list[float]]:
    """Signatures and their α as two lists."""
    return [s for s, _ in pairs], [a for _, a in pairs]


def _part_for(pairs: list[tuple[Signature, float]], names: set[str]):
    """The signatures (restricted to ``names``) that touch a shard, with their α."""
    part = []
    for sig, a in pairs:
        mine = [n for n in sig.entries if n in names]
        if mine:
            part.append((sig.select(mine), a))
    return part


def _opened(sigs: Any) -> list[Any]:
    """The signatures, files opened for streaming: a dense task vector stays in its file
    (memory-mapped, verified in one streamed pass) and is read shard by shard."""
    many = sigs if isinstance(sigs, Sequence) and not isinstance(sigs, str) else [sigs]
    return [open_signature(s) if isinstance(s, (str, os.PathLike)) else s for s in many]


def _release(pairs: list[tuple[Signature, float]], names: set[str]) -> None:
    """Drop the pages of the streamed entries a shard has used."""
    for sig, _ in pairs:
        if isinstance(sig, StreamedSignature):
            for name in names & sig.entries.keys():
                sig.release(name)


def _sig_paths(sigs: Any) -> list[Path]:
    many = sigs if isinstance(sigs, Sequence) and not isinstance(sigs, str) else [sigs]
    return [Path(s) for s in many if isinstance(s, (str, os.PathLike))]


def applied_in_index(index: ShardedIndex) -> list[dict[str, Any]]:
    """The signatures a sharded checkpoint's index says were applied (empty if none)."""
    applied = index.metadata.get(APPLIED_KEY, [])
    if not isinstance(applied, list) or not all(isinstance(a, dict) for a in applied):
        raise FormatError(
            f"{index.path}: metadata {APPLIED_KEY} is not a list of {{name, hash, alpha}}"
        )
    return applied


def _applied(pairs: list[tuple[Signature, float]]) -> list[dict[str, Any]]:
    """What the index and the folder's record say a patch applied."""
    return [{"name": s.name, "hash": s.content_hash, "alpha": a} for s, a in pairs]


def _patched_index(index: ShardedIndex, pairs: list[tuple[Signature, float]]) -> bytes:
    """The source index with the applied signatures added to its metadata."""
    doc = json.loads(index.raw)
    meta = dict(doc.get("metadata") or {})
    meta[APPLIED_KEY] = applied_in_index(index) + _applied(pairs)
    doc["metadata"] = meta
    return (json.dumps(doc, indent=2) + "\n").encode()


def _record(
    index: ShardedIndex,
    new_index: bytes,
    shards: dict[str, dict[str, Any]],
    applied: list[dict[str, Any]],
) -> bytes:
    doc = {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "index": index.path.name,
        "source_index": index.raw.decode("utf-8"),
        "patched_index_sha256": hashlib.sha256(new_index).hexdigest(),
        "shards": shards,
        "applied": applied,  # what a removal takes out (readers before it ignore it)
    }
    return (json.dumps(doc, indent=1) + "\n").encode()


def _link_untouched(src: Path, dst: Path, header: Header, durable: bool) -> dict[str, Any]:
    """Link (or copy) an untouched shard; what a removal checks it against."""
    _link_or_copy(src, dst, durable)
    return {"size": header.file_size, "header_sha256": _header_sha256(dst, header)}


def _link_or_copy(src: Path, dst: Path, durable: bool) -> None:
    """Hard-link the file ``src`` names at ``dst`` (copy where links are refused). A
    symbolic link is resolved first: linked as it is (Linux's link(2) does not follow
    it), a relative one would point elsewhere from ``dst``'s folder, as in a Hugging
    Face cache snapshot, whose files are links to ``../../blobs/<hash>``."""
    src = Path(os.path.realpath(src))
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copyfile(src, dst)
        if durable:
            _fsync_file(dst)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _header_sha256(path: Path, header: Header) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(header.data_start)).hexdigest()


def _tick(progress: Any, n: int) -> None:
    if progress is not None:
        progress(n)


def _write(path: Path, data: bytes, durable: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())


# ---------------------------------------------------------------------------- remove


def remove_sharded(
    patched: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    undo: str | os.PathLike[str] | None = None,
    durable: bool = False,
    progress: Any = None,
) -> FileReport:
    """:func:`robustpatch.files.remove_file` for a sharded checkpoint that
    :func:`apply_sharded` wrote: ``out`` (a folder) gets the source's index and shards,
    bit for bit. ``undo`` defaults to the folder's :data:`RECORD_NAME`."""
    from .files import FileReport, remove_file

    index = load_index(validate.path(patched, "patched"))
    _check_no_journals(index)
    out = _out_folder(out, "remove_file")
    record_path = validate.path(undo, "undo") if undo else index.folder / RECORD_NAME
    record = _load_record(record_path, index)
    _check_out_folder(out, [*_index_files(index), record_path])
    tensors = bn = written = 0
    with _TempFolder(out, durable) as tmp:
        for shard, entry in record["shards"].items():
            src, dst = index.shard_path(shard), tmp.path / shard
            if "undo" not in entry:
                _check_untouched(src, index.headers[shard], entry)
                _link_or_copy(src, dst, durable)  # its header was just checked
                _tick(progress, entry["size"])
                continue
            rep = remove_file(
                src, dst, undo=index.folder / entry["undo"], durable=durable, progress=progress
            )
            tensors, bn, written = (
                tensors + rep.tensors,
                bn + rep.bn_buffers,
                written + rep.bytes_written,
            )
        _write(tmp.path / record["index"], record["source_index"].encode("utf-8"), durable)
        tmp.commit()
    return FileReport(out, None, tensors, bn, written, 0)


def load_folder_record(path: str | os.PathLike[str]) -> tuple[dict[str, Any], ShardedIndex]:
    """A sharded checkpoint's undo record (its :data:`RECORD_NAME`) and the index of its
    folder that it names, checked against each other as a removal checks them."""
    path = Path(path)
    doc = _read_record(path)
    named = doc.get("index")
    if not isinstance(named, str) or not named.endswith(INDEX_SUFFIX) or "/" in named:
        raise FormatError(f"{path}: bad undo record: it names no index ({shown(named)})")
    index = load_index(path.parent / named)
    _check_record(path, doc, index)
    return doc, index


def _load_record(path: Path, index: ShardedIndex) -> dict[str, Any]:
    """The folder's undo record, checked against the patched index it was written with."""
    doc = _read_record(path)
    _check_record(path, doc, index)
    return doc


def _read_record(path: Path) -> dict[str, Any]:
    """The folder's undo record, checked in itself."""
    if not path.exists():
        raise FileNotFoundError(
            errno.ENOENT, "no undo record (was it written with undo=False?)", os.fspath(path)
        )
    where = f"{path}: bad undo record"
    try:
        doc = strict_json.loads(path.read_bytes().decode("utf-8"))
    except strict_json.NonStandardNumber as e:
        raise FormatError(f"{where}: it holds {e}, which JSON does not allow") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{where} ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != RECORD_FORMAT:
        raise FormatError(f"{where}: not a sharded checkpoint's record")
    if doc.get("version") != RECORD_VERSION:
        raise FormatError(f"{where}: unknown version {doc.get('version')!r}")
    shards, source = doc.get("shards"), doc.get("source_index")
    if not isinstance(shards, dict) or not isinstance(source, str):
        raise FormatError(f"{where}: 'shards' or 'source_index' missing")
    for shard, entry in shards.items():
        _check_entry(shard, entry, where)
    from .files import is_applied_entry

    applied = doc.get("applied", [])  # absent from records of earlier releases
    if not isinstance(applied, list) or not all(map(is_applied_entry, applied)):
        raise FormatError(f"{where}: 'applied' is not a list of {{name, hash, alpha}}")
    return doc


def _check_record(path: Path, doc: dict[str, Any], index: ShardedIndex) -> None:
    """Whether ``doc`` was written with the patched ``index``."""
    where = f"{path}: bad undo record"
    if doc.get("index") != index.path.name:
        raise FormatError(f"{where}: it was written for index {shown(doc.get('index'))}")
    if hashlib.sha256(index.raw).hexdigest() != doc.get("patched_index_sha256"):
        raise MismatchError(f"{index.path}: the index changed since it was patched")
    if set(doc["shards"]) != set(index.shards):
        raise FormatError(f"{where}: its shards are not the index's")


def _check_entry(shard: str, entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: shard {shard!r} has no entry")
    if "undo" in entry:
        if entry["undo"] != undo_path_for(shard).name:
            raise FormatError(f"{where}: shard {shard!r} names undo record {entry['undo']!r}")
        return
    ok = isinstance(entry.get("size"), int) and isinstance(entry.get("header_sha256"), str)
    if not ok:
        raise FormatError(f"{where}: shard {shard!r} has neither an undo record nor a size")


def _check_untouched(path: Path, header: Header, entry: dict[str, Any]) -> None:
    if header.file_size != entry["size"] or _header_sha256(path, header) != entry["header_sha256"]:
        raise MismatchError(f"{path}: shard changed since the checkpoint was patched")


# ---------------------------------------------------------------------------- the folder


def _out_folder(out: Any, fn: str) -> Path:
    if out is None:
        raise InvalidArgumentError(f"{fn} needs an output path (out=...)")
    path = validate.path(out, "out")
    if path.name.endswith(INDEX_SUFFIX) or path.suffix == ".safetensors":
        raise InvalidArgumentError(
            f"{path}: a sharded checkpoint is written to a folder; give out=<folder>"
        )
    if path.name in ("", ".", ".."):
        raise InvalidArgumentError(f"out={os.fspath(out)!r}: name the output folder")
    return path


def _index_files(index: ShardedIndex) -> list[Path]:
    """What reading a sharded checkpoint reads: its folder, its index and every shard
    (each resolved by :func:`_check_out_folder`: a shard may be a link into another
    folder, the output's included)."""
    return [index.folder, index.path, *(index.shard_path(s) for s in index.shards)]


def _check_out_folder(out: Path, inputs: list[Path]) -> None:
    """Refuse an output folder that holds (or is) an input, or that exists without
    being a sharded checkpoint robustpatch wrote (it would be replaced whole)."""
    target = out.resolve()
    for p in inputs:
        q = p.resolve()
        if q == target or target in q.parents:
            raise InvalidArgumentError(f"output {out} holds the input {p}; write to another folder")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FileExistsError(errno.EEXIST, "exists and is not a folder", os.fspath(out))
    if out.exists() and any(out.iterdir()) and not _replaceable(out):
        raise FileExistsError(
            errno.EEXIST,
            "exists and is not a checkpoint robustpatch wrote (one readable index, its "
            "shards and their undo records, nothing else); not replacing it",
            os.fspath(out),
        )


def _replaceable(out: Path) -> bool:
    """Whether the existing folder ``out`` holds a sharded checkpoint and nothing else, as
    robustpatch writes one (with or without undo records): only such a folder is
    replaced whole."""
    # Any *.index.json: an output keeps its source index's name (model.index.json too).
    indexes = [p for p in out.iterdir() if p.name.endswith(INDEX_SUFFIX)]
    if len(indexes) != 1:
        return False
    try:
        index = load_index(indexes[0])
    except (OSError, ValueError):  # a damaged index
        return False
    return {p.name for p in out.iterdir()} <= checkpoint_names(index)


class _TempFolder:
    """A temporary folder beside ``out`` that becomes ``out`` on :meth:`commit` (an
    existing ``out`` is swapped out atomically where the kernel can, then deleted)."""

    def __init__(self, out: Path, durable: bool) -> None:
        self.out, self.durable = out, durable
        remove_stale_folders(out)
        prefix = f".{out.name}.rp{os.getpid()}."
        with naming_errors(out):  # a missing parent folder is the output's error
            self.path = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=out.parent))
        give_new_folder_mode(self.path)  # the checkpoint's folder, not a private one
        self.committed = False

    def __enter__(self) -> _TempFolder:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno is not None:
            named = [os.fspath(f) for f in (exc.filename, exc.filename2) if f is not None]
            if any(f.startswith(os.fspath(self.path)) for f in named):  # ours, not the user's
                where = named[0].replace(os.fspath(self.path), os.fspath(self.out), 1)
                raise type(exc)(exc.errno, exc.strerror, where) from None

    def commit(self) -> None:
        if self.durable:
            _fsync_dir(self.path)
        with naming_errors(self.out):
            if not self.out.exists():
                os.rename(self.path, self.out)
            elif _exchange(self.path, self.out):
                self.committed = True  # the new folder is in place: nothing to undo
                shutil.rmtree(self.path, ignore_errors=True)  # now the previous one
            else:
                _two_renames(self.path, self.out)
        self.committed = True
        if self.durable:
            _fsync_dir(self.out.parent)


def _two_renames(new: Path, out: Path) -> None:
    """Where the kernel cannot exchange two folders: the previous ``out`` aside (as
    ``.old``), ``new`` in its place, the previous one deleted; put back if the second
    rename fails. A crash between the two leaves ``out`` missing and its previous content
    at ``.old``, which the next write of ``out`` puts back (:func:`remove_stale_folders`)."""
    old = new.with_name(new.name[: -len(".tmp")] + ".old")
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    # Deleted under a temporary name: a ".old" exists only between the two renames, the
    # one moment when putting it back is right (never a part-deleted one).
    os.rename(old, new)
    shutil.rmtree(new, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def remove_stale_folders(out: Path) -> list[Path]:
    """Delete the temporary folders that killed writers of ``out`` left beside it (named
    ``.<name>.rp<pid>.<random>.tmp`` or ``.old``; see :func:`._io.atomic.remove_stale`).
    Where ``out`` is missing, a killed writer's ``.old`` folder is the previous ``out``
    (killed between the two renames of a commit): it is put back, not deleted."""
    pattern = re.compile(re.escape(f".{out.name}.rp") + r"(\d+)\.[A-Za-z0-9_]+\.(?:tmp|old)")
    if not (out.exists() or out.is_symlink()):
        _put_back_previous(out, pattern)
    return remove_stale(out.parent, pattern, folders=True)


def _put_back_previous(out: Path, pattern: re.Pattern[str]) -> None:
    """Rename the newest ``.old`` folder a dead writer of ``out`` left back to ``out``."""
    olds = []
    for entry in out.parent.iterdir() if out.parent.is_dir() else []:
        m = pattern.fullmatch(entry.name)
        if m and entry.name.endswith(".old") and not _pid_alive(int(m.group(1))):
            olds.append(entry)
    whole = [p for p in olds if _whole(p)]
    if whole:
        os.rename(max(whole, key=lambda p: p.stat().st_mtime_ns), out)


def _whole(folder: Path) -> bool:
    """A sharded checkpoint whose index loads and lists only shards that are there (an
    earlier release deleted ``.old`` folders under that name: one may be part deleted)."""
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    try:
        index = load_index(indexes[0])
    except (IndexError, OSError, ValueError):
        return False
    return all((folder / shard).is_file() for shard in index.shards)
