"""Patch safetensors model files on disk, and restore them bit for bit.

``apply_file`` streams: untouched byte ranges are copied, touched tensors are read one
at a time, patched by the engine and written, and each tensor's undo record goes to the
sidecar as soon as it exists. Memory stays near the largest touched tensor (plus the
signatures and fixed I/O buffers), whatever the file's size. The output goes to a
temporary file in its folder and is renamed into place, so the destination holds
either the complete result or what it held before, whatever happens to the process; a
killed writer's temporary files are removed by the next write to the same destination.
``durable=True`` also fsyncs before the rename, so that the result survives a power cut
or kernel crash. It is opt-in, as for ``shutil.copyfile``, ``safetensors`` or
``torch.save``: it makes the write run at the disk's speed (on the benchmark machine a
2 GiB output takes 0.9 s on disk against 0.46 s in the page cache).

How the bytes move: a durable output of ``DIRECT_MIN_BYTES`` or more is written front
to back with direct I/O (:class:`~robustpatch._io.direct.DirectWriter`): the disk writes
one block while the next is read and patched, and the final fsync has almost nothing
left (a buffered copy would dirty the whole file in the page cache and write it back at
the fsync, at about twice the CPU time). Smaller or non-durable outputs are copied in
the kernel (``os.copy_file_range``) by a second thread while this one patches, with
writeback started early when durable.

Patching a file is the algorithm of :mod:`robustpatch.targets` over a
:class:`FileTarget` (the file streamed into its output), then the commit (rename). The
patched file keeps the source's layout and metadata and adds
``__metadata__["robustpatch.applied"]`` (a JSON list of ``{name, hash, alpha}``).
Next to it, ``<out>.rpundo`` (see :mod:`robustpatch._format.undo`) holds what
``remove_file`` needs to restore the source exactly. The record is renamed into place
just before the model (see :func:`_commit_pair`).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from . import validate
from ._format.safetensors import (
    Header,
    check_header_size,
    encode_header,
    parse_header,
    read_header_from,
)
from ._format.shards import is_sharded
from ._format.undo import (
    UNDO_KEY,
    UndoSidecar,
    UndoWriter,
    undo_path_for,
)
from ._io.atomic import AtomicFile, check_destinations, commit_all, same_file
from ._io.inputs import open_input
from ._io.pipeline import Pipeline, Watch, open_stream
from .errors import FormatError, InvalidArgumentError, MismatchError
from .options import FILE_OPTIONS, PatchOptions
from .records import FileRecords, RecordToFile, VerifyRestore, record_plan, signature_paths
from .signature import SignatureLike, parse_meta_json
from .signature.streamed import StreamedSignature, open_signature
from .targets import Alphas, NumpyTarget, Plan, check_plan, patch_target, plan_for, restore_target

__all__ = [
    "apply_file",
    "remove_file",
    "undo_path_for",
    "applied_signatures",
    "FileReport",
    "FileTarget",
    "APPLIED_KEY",
    "UNDO_KEY",
]

APPLIED_KEY = "robustpatch.applied"

#: A progress callback: called with increments (bytes just written), as tqdm's ``update``.
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
    header_updated: bool = True  # False: an in-place patch kept the header (no room)


def applied_signatures(header: Header, where: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The signatures recorded in the metadata of the patched file ``where`` (empty if
    none)."""
    raw = header.metadata.get(APPLIED_KEY)
    if raw is None:
        return []
    value = parse_meta_json(raw, os.fspath(where), f"{APPLIED_KEY} metadata")
    if not isinstance(value, list) or not all(map(is_applied_entry, value)):
        raise FormatError(
            f"{os.fspath(where)}: {APPLIED_KEY} metadata is not a list of {{name, hash, alpha}}"
        )
    return value


def is_applied_entry(a: Any) -> bool:
    """One entry of an applied list (a patched file's, a sharded record's) as apply
    writes it: a name, a hash and a number."""
    return (
        isinstance(a, dict)
        and isinstance(a.get("name"), str)
        and isinstance(a.get("hash"), str)
        and isinstance(a.get("alpha"), (int, float))
        and not isinstance(a.get("alpha"), bool)
    )


def spec_of(header: Header) -> Callable[[str], tuple[str, tuple[int, ...]] | None]:
    """A header's (dtype, shape) by tensor name, None if absent (what check_plan asks)."""
    tensors = header.by_name()

    def spec(name: str) -> tuple[str, tuple[int, ...]] | None:
        t = tensors.get(name)
        return None if t is None else (t.dtype, t.shape)

    return spec


# ---------------------------------------------------------------------------- the target


class FileTarget(NumpyTarget):
    """A safetensors file streamed into a new file, as a patch target.

    :meth:`visit` walks the touched tensors in file order: each is loaded (one at a
    time, into one reused buffer), handed to the algorithm as the one array of this
    numpy target, then written to the output while the untouched byte ranges are
    copied. ``watch`` sees each tensor as loaded and as it is about to be written (to
    digest the originals on apply, to verify checksums and digests on removal). The
    output's header is ``new_header``; the data keeps its layout.
    """

    def __init__(
        self,
        src: BinaryIO,
        header: Header,
        out: AtomicFile,
        new_header: bytes,
        progress: Progress | None = None,
        watch: Watch | None = None,
    ) -> None:
        super().__init__({})
        self.header = header
        self.src = src
        self.out = out
        self.new_header = new_header
        self.size = len(new_header) + header.file_size - header.data_start
        self.tick = locked_progress(progress)
        self.watch = watch
        self.release: Callable[[str], object] = lambda name: None  # after each tensor
        self._index = {t.name: k for k, t in enumerate(header.tensors)}
        self._spec = spec_of(header)

    def spec(self, name: str) -> tuple[str, tuple[int, ...]] | None:
        return self._spec(name)

    def span(self, name: str) -> tuple[int, int]:
        k = self._index[name]  # tensors of one file never share bytes
        return k, k + 1

    def check_writable(self, name: str) -> None:
        """The output is a new file: always writable."""

    def visit(self, names: Sequence[str]) -> Iterator[str]:
        wanted = set(names)
        touched = [t for t in self.header.tensors if t.name in wanted]
        stream = open_stream(self, touched)
        pipe = Pipeline(self, touched, stream)
        try:
            for t, arr in pipe.loaded():
                self.arrays = {t.name: arr}
                yield t.name
                pipe.write(t, self.arrays.pop(t.name))
                self.release(t.name)
            pipe.finish()
            stream.finish()
        except BaseException:
            pipe.abort()
            stream.abort()
            raise
        got = os.fstat(self.out.file.fileno()).st_size
        if got != self.size:
            raise OSError(f"wrote {got} bytes, expected {self.size}")  # AtomicFile names it


def locked_progress(progress: Progress | None) -> Progress:
    """``progress`` safe to call from several threads at once (a no-op for None)."""
    if progress is None:
        return lambda n: None
    lock = threading.Lock()

    def tick(n: int) -> None:
        with lock:
            progress(n)

    return tick


# ---------------------------------------------------------------------------- apply


def apply_file(
    src: str | os.PathLike[str],
    sigs: SignatureLike | Sequence[SignatureLike],
    alphas: Alphas = 1.0,
    out: str | os.PathLike[str] | None = None,
    *,
    progress: Progress | None = None,
    inplace: bool = False,
    embed_signature: bool = False,
    **options: bool,
) -> FileReport:
    """Write ``src`` patched with ``Σ α_k·sig_k`` to ``out`` (atomically).

    ``inplace=True`` patches ``src`` itself instead (``out`` left out), touching only the
    patched tensors' bytes, crash-safe through a journal (:mod:`robustpatch.inplace`).

    ``options`` are those of :class:`~robustpatch.options.PatchOptions`: ``force``,
    ``allow_dtype_change``, ``undo`` (default True), ``durable``, ``allow_nonfinite``.
    With ``undo`` an undo record is written to ``<out>.rpundo`` so that
    :func:`remove_file` restores ``src`` bit for bit. Refuses an output (or its record)
    that is one of the inputs (``src`` or a signature file, also through links), and a
    model whose names/shapes/dtypes do not match the signatures; ``allow_dtype_change``
    accepts a float tensor of another dtype than the signature was made for (F32
    signature, F16/BF16 model...), ``force=True`` also a shape of the same element
    count. On any error nothing is left at ``out`` and ``src`` is untouched. ``durable=True`` fsyncs
    the output and the record before the rename, so that they also survive a power cut
    or kernel crash; it runs at the disk's write speed. ``progress`` is called with
    increments, as tqdm's ``update``: the bytes just written. A result that overflows a
    tensor's dtype (a finite weight becoming ±Inf) is refused (NonFiniteError) unless
    ``allow_nonfinite=True``.

    Memory stays near the largest touched tensor (and its undo record) plus the
    signatures and a fixed set of I/O buffers, whatever the file's size. A signature
    file with dense deltas is streamed (:mod:`robustpatch.signature.streamed`): memory
    then stays near one of its tensors too, and the undo record refers to the file by
    content hash instead of embedding it (``embed_signature=True`` embeds it).
    """
    opts = PatchOptions.of(options, "apply_file", FILE_OPTIONS)
    _check_progress(progress)
    call = PatchCall(sigs, alphas, opts, progress, embed_signature)
    if is_sharded(validate.path(src, "src")):  # an *.index.json or its folder: into a folder
        from .sharded import apply_sharded

        if inplace:
            raise InvalidArgumentError(
                f"{os.fspath(src)}: inplace=True patches one safetensors file; a sharded "
                "checkpoint is written to a new folder (out=...)"
            )
        return apply_sharded(src, out, call)
    if inplace:
        from .inplace import apply_inplace

        _no_output(src, out)
        return apply_inplace(src, call)
    return apply_one(src, out, call)


@dataclass(frozen=True)
class PatchCall:
    """What an :func:`apply_file` call asks of the writer that carries it out (one
    file, a sharded checkpoint, in place)."""

    sigs: SignatureLike | Sequence[SignatureLike]
    alphas: Alphas
    opts: PatchOptions
    progress: Progress | None = None
    embed_signature: bool = False


def apply_one(
    src: str | os.PathLike[str], out: str | os.PathLike[str] | None, call: PatchCall
) -> FileReport:
    """:func:`apply_file` of one safetensors file into a new one."""
    opts, progress = call.opts, call.progress
    src, out = validate.path(src, "src"), _output(out, "apply_file")
    _check_no_journal(src, out)
    outputs = [out, undo_path_for(out)] if opts.undo else [out]
    check_destinations([src, *signature_paths(call.sigs)], outputs)
    plan = streamed_plan(call.sigs, call.alphas)
    with open_input(src) as fsrc:
        header = read_header_from(fsrc, str(src))
        try:
            check_plan(
                plan,
                spec_of(header),
                opts.force,
                allow_dtype_change=opts.allow_dtype_change,
                model=src,
            )
        except BaseException:
            with verifying(plan):  # a signature that fails its verification is the error
                raise
        new_header = patched_header(header, plan, src, out)
        if not opts.undo:
            with AtomicFile(out, opts.durable) as fout:
                target = FileTarget(fsrc, header, fout, new_header, progress)
                target.release = releaser(plan)
                with verifying(plan):
                    patch_target(target, plan, None, opts.allow_nonfinite)
                fout.commit()
            _drop_stale_record(out)
            return FileReport(out, None, len(plan.deltas), len(plan.bn), target.size, 0)
        refs = signature_refs(plan, call.embed_signature)
        return _apply_with_undo(
            fsrc, header, new_header, plan, out, opts.durable, progress, opts.allow_nonfinite, refs
        )


def _apply_with_undo(
    fsrc: BinaryIO,
    header: Header,
    new_header: bytes,
    plan: Plan,
    out: Path,
    durable: bool,
    progress: Progress | None,
    allow_nonfinite: bool,
    refs: dict[int, Path] | None = None,
) -> FileReport:
    """Patch into ``out`` and write its undo record beside it, committed as a pair
    (``refs``: the signatures it refers to instead of embedding them)."""
    touched = [t for t in header.tensors if t.name in plan.deltas or t.name in plan.bn]
    kinds = [(t, "delta" if t.name in plan.deltas else "bn") for t in touched]
    src_header = _read_exact(fsrc, 0, header.data_start)
    sizes = (header.file_size, len(new_header) + header.file_size - header.data_start)
    undo_path = undo_path_for(out)
    with AtomicFile(out, durable) as fout, AtomicFile(undo_path, durable) as uf:
        writer = UndoWriter(uf, plan.sigs, plan.alphas, kinds, src_header, sizes, new_header, refs)
        sink = RecordToFile(writer)
        target = FileTarget(fsrc, header, fout, new_header, progress, sink)
        target.release = releaser(plan)
        with verifying(plan):
            patch_target(target, plan, sink, allow_nonfinite)
        writer.finish()
        _commit_pair(uf, fout)
    return FileReport(out, undo_path, len(plan.deltas), len(plan.bn), sizes[1], writer.elements)


def streamed_plan(sigs: SignatureLike | Sequence[SignatureLike], alphas: Alphas) -> Plan:
    """:func:`plan_for` with signature files opened for streaming (dense deltas stay
    in their file until applied; verified in a second thread meanwhile: see
    :func:`verifying`)."""
    many = sigs if isinstance(sigs, Sequence) and not isinstance(sigs, str) else [sigs]
    opened = [
        open_signature(s, background=True) if isinstance(s, (str, os.PathLike)) else s for s in many
    ]
    return plan_for(opened, alphas)


@contextmanager
def verifying(plan: Plan) -> Iterator[None]:
    """Around a patch: wait for the streamed signatures' verification at the end (so
    before anything is committed); if the patch fails, a signature that failed its
    verification is the error reported (the engine may have met its NaN first)."""
    try:
        yield
    except BaseException:
        _wait_verified(plan)
        raise
    _wait_verified(plan)


def _wait_verified(plan: Plan) -> None:
    for s in plan.sigs:
        if isinstance(s, StreamedSignature):
            s.verified()


def signature_refs(plan: Plan, embed: bool) -> dict[int, Path]:
    """The streamed signature files an undo record refers to (none if ``embed``)."""
    if embed:
        return {}
    return {k: s.path for k, s in enumerate(plan.sigs) if isinstance(s, StreamedSignature)}


def releaser(plan: Plan) -> Callable[[str], None]:
    """Drops a tensor's pages from every streamed signature once it is applied."""
    streamed = [s for s in plan.sigs if isinstance(s, StreamedSignature)]

    def release(name: str) -> None:
        for s in streamed:
            s.release(name)

    return release


def _no_output(src: str | os.PathLike[str], out: str | os.PathLike[str] | None) -> None:
    if out is not None:
        raise InvalidArgumentError(
            f"inplace=True patches {os.fspath(src)} itself: leave out the output ({os.fspath(out)})"
        )


def _drop_stale_record(out: Path, keep: Path | None = None) -> None:
    """An output written without an undo record replaced a file whose record may lie
    beside it: that record no longer describes the file (inspect showed it as the
    file's), so it is deleted; anything else there stays, and so does ``keep`` (the
    record a removal read: an input)."""
    stale = undo_path_for(out)
    if keep is not None and same_file(stale, keep):
        return
    try:
        with open(stale, "rb") as f:
            is_record = UNDO_KEY in read_header_from(f, str(stale)).metadata
    except (OSError, FormatError):
        return
    if is_record:
        stale.unlink()


def _check_progress(progress: Any) -> None:
    """Before any work: a wrong type failed in the writer thread, mid-file."""
    if progress is not None and not callable(progress):
        raise InvalidArgumentError(f"progress must be callable, got {type(progress).__name__}")


def _check_no_journal(*models: Path) -> None:
    """A model with an unfinished in-place patch is refused until recovered, as input
    and as output (a new file written there would be "recovered" from the journal)."""
    from ._io.journal import journal_path_for

    for model in models:
        if journal_path_for(model).exists():
            raise FormatError(
                f"{model}: an in-place patch of it was interrupted; run 'robustpatch "
                f"recover {model}' (or patch it in place again) first"
            )


def _output(out: str | os.PathLike[str] | None, fn: str) -> Path:
    if out is None:
        raise InvalidArgumentError(f"{fn} needs an output path (out=...)")
    return validate.output_file(out, "out")


def patched_header(header: Header, plan: Plan, src: Path, out: Path) -> bytes:
    """The header of ``src`` with the applied signatures added to its metadata; refused
    if readers (remove, inspect, safetensors) would refuse its length."""
    applied = applied_signatures(header, src) + [
        {"name": s.name, "hash": s.content_hash, "alpha": a} for s, a in zip(plan.sigs, plan.alphas)
    ]
    meta = dict(header.metadata)
    meta[APPLIED_KEY] = json.dumps(applied)
    encoded = encode_header(header.tensors, meta)
    check_header_size(len(encoded) - 8, f"{out}: the patched model")
    return encoded


def _commit_pair(uf: AtomicFile, fout: AtomicFile) -> None:
    """Commit the undo record and the patched file as a pair, the record first.

    :func:`commit_all` renames both back to back under a folder lock, so concurrent
    writers of the same output never leave one's model with the other's record; a
    rename that fails puts the previous pair back; and a writer killed between the two
    renames (a window of two system calls) leaves at most the new record beside the
    previous model (which ``remove_file`` refuses: the record names the header it
    belongs to), never a new model without its record.
    """
    commit_all([uf, fout])


def _read_exact(f: BinaryIO, offset: int, n: int) -> bytes:
    f.seek(offset)
    data = f.read(n)
    if len(data) != n:
        raise FormatError(f"file ended after {len(data)} of {n} bytes")
    return data


# ---------------------------------------------------------------------------- remove


def remove_file(
    patched: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    undo: str | os.PathLike[str] | None = None,
    durable: bool = False,
    progress: Progress | None = None,
    inplace: bool = False,
    signatures: Sequence[str | os.PathLike[str]] = (),
) -> FileReport:
    """Restore the file :func:`apply_file` patched: ``out`` becomes bit-identical to the
    source (same sha256). ``undo`` defaults to ``<patched>.rpundo``. Refuses a patched
    file that changed since (size, header or touched tensors differ), and an ``out``
    that is the patched file or the record. Written atomically like :func:`apply_file`.
    ``inplace=True`` restores ``patched`` itself (``out`` left out) through a journal,
    and deletes the record it used (:func:`robustpatch.inplace.remove_inplace`). A
    record that refers to a signature file (by content hash) finds it among
    ``signatures``, else at the path it holds; a file with another hash is refused.
    ``progress`` is called with increments, as tqdm's ``update``: the bytes just written."""
    _check_progress(progress)
    if isinstance(signatures, (str, os.PathLike)):  # one path, not its characters
        signatures = [signatures]
    if is_sharded(validate.path(patched, "patched")):
        from .sharded import remove_sharded

        return remove_sharded(patched, out, undo=undo, durable=durable, progress=progress)
    if inplace:
        from .inplace import remove_inplace

        _no_output(patched, out)
        return remove_inplace(patched, undo=undo, progress=progress, signatures=signatures)
    patched, out = validate.path(patched, "patched"), _output(out, "remove_file")
    _check_no_journal(patched, out)
    side_path = validate.path(undo, "undo") if undo else undo_path_for(patched)
    check_destinations([patched, side_path, *signatures], [out])
    if not side_path.exists():
        raise FileNotFoundError(
            f"no undo record at {side_path} (was {patched} written with undo=False?)"
        )
    with open_input(side_path) as fside, open_input(patched) as fsrc:
        # The record digest (a pass over the whole record) is checked while the file is
        # restored, not before: nothing is committed until it passes.
        side = UndoSidecar.load(side_path, fside, signatures, background=True, defer_digest=True)
        with record_errors_first(side):
            check_destinations(side.found_files, [out])
            header = read_header_from(fsrc, str(patched))
            plan = record_plan(side)
            verify_patched(fsrc, header, side, plan)
            with AtomicFile(out, durable) as fout:
                target = FileTarget(
                    fsrc, header, fout, side.source_header, progress, VerifyRestore(side)
                )
                target.release = releaser(plan)
                with verifying(plan):
                    restore_target(target, plan, FileRecords(side, header))
                side.sealed()
                fout.commit()
    _drop_stale_record(out, keep=side_path)
    return FileReport(out, None, len(plan.deltas), len(plan.bn), target.size, 0)


@contextmanager
def record_errors_first(side: UndoSidecar) -> Iterator[None]:
    """Around a removal whose record digest is checked in a thread: if the removal
    fails, a record that fails its digest is the error reported (its damage may be
    what made the removal fail)."""
    try:
        yield
    except BaseException:
        side.sealed()
        raise


def verify_patched(fsrc: BinaryIO, header: Header, side: UndoSidecar, plan: Plan) -> None:
    """The patched file is the one the record was made for, and the record's tensors are
    the ones its signatures touch (each of the kind and dtype the file has)."""
    record, where = side.record, f"{side.path}: bad undo record"
    patched = getattr(fsrc, "name", "the patched file")
    if header.file_size != record.patched_size:
        raise MismatchError(f"{patched}: its size differs from the undo record's ({side.path})")
    got = hashlib.sha256(_read_exact(fsrc, 0, header.data_start)).hexdigest()
    if got != record.patched_header_sha256:
        raise MismatchError(f"{patched}: its header differs from the undo record's ({side.path})")
    infos = header.by_name()
    for e in record.tensors:
        kind = "delta" if e.name in plan.deltas else "bn" if e.name in plan.bn else None
        if kind is None:
            raise FormatError(f"{where}: tensor {e.name!r} is touched by no signature")
        if e.kind != kind or e.name not in infos or infos[e.name].dtype != e.dtype:
            raise FormatError(f"{where}: tensor {e.name!r} does not match the patched file")
    missing = set(plan.names) - {e.name for e in record.tensors}
    if missing:
        raise FormatError(f"{where}: tensor {sorted(missing)[0]!r} of its signatures has no record")
    try:
        orig = parse_header(side.source_header, record.source_size)
    except FormatError as e:
        raise FormatError(f"{where}: the source header: {e}") from None
    _same_layout(header, orig, where)


def _same_layout(patched: Header, orig: Header, where: str) -> None:
    a = [(t.name, t.dtype, t.shape, t.begin, t.end) for t in patched.tensors]
    b = [(t.name, t.dtype, t.shape, t.begin, t.end) for t in orig.tensors]
    if a != b or patched.file_size - patched.data_start != orig.file_size - orig.data_start:
        raise FormatError(f"{where}: its original layout does not match the patched file")
