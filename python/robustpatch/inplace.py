"""Patch a safetensors model in place, through a memory map, crash-safe by a journal.

:func:`apply_inplace` (``apply_file(..., inplace=True)``, ``robustpatch apply
--inplace``) touches only the bytes of the tensors the signatures patch: it saves their
original bytes in a durable journal (:mod:`robustpatch._io.journal`), patches them in
the mapped file, fsyncs, writes the undo record, and marks the journal done. Its time
and I/O follow the touched bytes, not the file's size. A process killed at any moment
leaves a journal that :func:`recover` (run by the next in-place call, or ``robustpatch
recover``) turns back into the original model or forward into the patched one. One
patch, removal or recovery of a model runs at a time: each holds the model's lock
(:func:`~robustpatch._io.journal.model_lock`) throughout; a second is refused at once.

The model's header gains the applied signatures' metadata when the new header fits in
the old one's space (padded with spaces, as the format allows); otherwise the header
stays as it was and only the undo record tells what was applied (``header_updated``).

Nothing but the model and its own journal and record is written: a model that is one of
the signature files is refused, and so is a model with other hard links (patching it
would change those names too), or one that already has an undo record (that patch could
no longer be removed).
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from . import validate
from ._format.safetensors import Header, TensorInfo, read_header_from
from ._format.undo import UndoSidecar, UndoWriter, undo_path_for
from ._io.atomic import AtomicFile, check_destinations, naming_errors, remove_stale_temps
from ._io.inputs import open_input
from ._io.journal import (
    PENDING_SUFFIX,
    Journal,
    journal_path_for,
    model_lock,
    recover,
    recover_held,
)
from ._io.pipeline import Watch
from ._io.ranged import populate_writable, pwrite_all, start_writeback
from .dtypes import NUMPY_OF_LABEL, kernel_view
from .errors import InvalidArgumentError
from .files import (
    FileReport,
    PatchCall,
    Progress,
    locked_progress,
    patched_header,
    releaser,
    signature_refs,
    spec_of,
    streamed_plan,
    verify_patched,
    verifying,
)
from .records import FileRecords, RecordToFile, VerifyRestore, record_plan, signature_paths
from .targets import (
    NumpyTarget,
    Plan,
    check_plan,
    patch_target,
    restore_target,
)

__all__ = ["apply_inplace", "remove_inplace", "recover", "journal_path_for", "PENDING_SUFFIX"]


class MappedTarget(NumpyTarget):
    """The touched tensors of a model mapped read-write, patched where they lie.

    :meth:`visit` walks them in file order; each is a view of the mapping (a copy,
    written back when done, where the file puts it at an unaligned offset). ``watch``
    sees each as loaded and when done, as for a streamed file. Each patched tensor's
    pages start for the disk (of the file open at ``fd``) at once, so the final sync
    waits for the last of them only.
    """

    def __init__(
        self,
        mm: mmap.mmap,
        fd: int,
        header: Header,
        watch: Watch,
        progress: Progress,
        plan: Plan,
    ) -> None:
        super().__init__({})
        self.mm, self.fd, self.header, self.watch, self.tick = mm, fd, header, watch, progress
        self.release = releaser(plan)
        self._index = {t.name: k for k, t in enumerate(header.tensors)}
        self._spec = spec_of(header)

    def spec(self, name: str) -> tuple[str, tuple[int, ...]] | None:
        return self._spec(name)

    def span(self, name: str) -> tuple[int, int]:
        k = self._index[name]  # tensors of one file never share bytes
        return k, k + 1

    def check_writable(self, name: str) -> None:
        """Mapped read-write: always writable."""

    def visit(self, names: Sequence[str]) -> Iterator[str]:
        wanted = set(names)
        for t in (t for t in self.header.tensors if t.name in wanted):
            mapped = self._view(t)
            arr = mapped if mapped.flags.aligned else mapped.copy()
            try:
                self.watch.loaded(t, arr)
                self.arrays = {t.name: arr}
                yield t.name
                self.watch.finished(t, arr)
                if arr is not mapped:
                    mapped[...] = arr
            finally:
                self.arrays = {}  # no view may outlive the mapping
            del mapped, arr
            start_writeback(self.fd, self.header.data_start + t.begin, t.nbytes)
            self.release(t.name)
            self.tick(t.nbytes)

    def _view(self, t: TensorInfo) -> np.ndarray:
        populate_writable(self.mm, self.header.data_start + t.begin, t.nbytes)
        raw = np.frombuffer(self.mm, np.uint8, t.nbytes, self.header.data_start + t.begin)
        return kernel_view(raw.view(NUMPY_OF_LABEL[t.dtype]).reshape(t.shape))


@contextmanager
def _reported(model: Path) -> Iterator[None]:
    """An I/O error of an in-place call names the model (not a temporary file, or
    nothing), and says to run ``recover`` when it leaves the journal behind: the model
    is then patched, or part restored, until it is recovered."""
    try:
        with naming_errors(model):
            yield
    except BlockingIOError:
        raise  # another call holds the model: its journal, if any, is its own
    except OSError as e:
        if e.errno is None or not journal_path_for(model).exists():
            raise
        hint = f"{e.strerror}; the journal keeps the original bytes: run 'robustpatch recover"
        raise type(e)(e.errno, f"{hint} {model}'", e.filename) from None


def _check_model(model: Path) -> None:
    """Refuse a model whose bytes other names share (hard links), or a symbolic link: its
    record would sit beside the link, where a patch through the file's own name does not
    look, so the model could be patched twice (and a Hugging Face cache's snapshot links
    name shared, content-addressed blobs)."""
    if model.is_symlink():
        raise InvalidArgumentError(
            f"{model} is a symbolic link (to {os.path.realpath(model)}): patch that file "
            "in place by its own name, or write to an output file"
        )
    remove_stale_temps(model)  # a killed writer's second name of the previous file
    links = os.stat(model).st_nlink
    if links > 1:
        raise InvalidArgumentError(
            f"{model} has {links} hard links: patching it in place would change the other "
            "names too; copy it first (cp) or write to an output file"
        )


def _reserve(fd: int, ranges: list[tuple[int, int]], model: Path) -> None:
    """Give the touched ranges their disk blocks before anything changes: a sparse model
    (a zero tensor stored as a hole) on a full disk is then a clean ENOSPC here, not a
    SIGBUS when the mapped hole is written. Instant where the blocks exist (0.02 ms for
    the 19 ranges of a 100 MB patch). Where the filesystem has no fallocate (NFSv3),
    glibc emulates it: a byte read per block, a zero written where that byte is zero, so
    no content changes (the model's lock keeps other in-place writers out)."""
    for offset, length in ranges:
        try:
            os.posix_fallocate(fd, offset, length)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return
            raise OSError(e.errno, e.strerror, os.fspath(model)) from None


def _fitted_header(new_header: bytes, data_start: int) -> bytes | None:
    """``new_header`` padded to the old header's length, or None if it does not fit."""
    text = new_header[8:].rstrip(b" ")
    size = data_start - 8
    if len(text) > size:
        return None
    return size.to_bytes(8, "little") + text.ljust(size)


def _tensor_ranges(header: Header, names: set[str]) -> list[tuple[int, int]]:
    return [(header.data_start + t.begin, t.nbytes) for t in header.tensors if t.name in names]


@contextmanager
def _mapped(f: Any) -> Iterator[mmap.mmap]:
    """The open model mapped shared and writable; synced to disk when done."""
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_WRITE)
    try:
        yield mm
        mm.flush()
    finally:
        try:
            mm.close()
        except BufferError:  # an error's traceback still holds a view: closed when it goes
            pass


def apply_inplace(model: str | os.PathLike[str], call: PatchCall) -> FileReport:
    """Patch ``model`` in place with ``Σ α_k·sig_k`` (see the module docstring).

    The undo record goes to ``<model>.rpundo`` (unless ``undo`` is off); a model that is
    a symbolic link is refused (patch the file by its own name); checks and errors
    are those of :func:`~robustpatch.files.apply_file`, and ``BlockingIOError`` while
    another in-place call or recovery holds the model. On any error before the commit
    the model is restored from the journal before the error propagates.
    """
    model = validate.path(model, "model")
    with _reported(model), model_lock(model):
        return _apply_held(model, call)


def _apply_held(model: Path, call: PatchCall) -> FileReport:
    """:func:`apply_inplace`, the model's lock held."""
    sigs, opts = call.sigs, call.opts
    record = undo_path_for(model)
    check_destinations(signature_paths(sigs), [model])
    _check_model(model)
    recover_held(model)  # first: a patch committed before a kill puts its record in place
    if opts.undo:
        check_destinations([model, *signature_paths(sigs)], [record])
        if record.exists():
            raise FileExistsError(
                f"{record} exists: {model} already carries a patch; remove it first "
                "(robustpatch remove --inplace) or move the record away"
            )
    plan = streamed_plan(sigs, call.alphas)
    with open_input(model) as probe:
        header = read_header_from(probe, str(model))
    try:
        check_plan(
            plan,
            spec_of(header),
            opts.force,
            allow_dtype_change=opts.allow_dtype_change,
            model=model,
        )
    except BaseException:
        with verifying(plan):  # a signature that fails its verification is the error
            raise
    fitted = _fitted_header(patched_header(header, plan, model, model), header.data_start)
    ranges = _tensor_ranges(header, set(plan.names))
    if fitted is not None:
        ranges.insert(0, (0, header.data_start))
    pending = Path(str(record) + PENDING_SUFFIX)
    with open(model, "r+b") as f:
        src_header = os.pread(f.fileno(), header.data_start, 0)
        _reserve(f.fileno(), ranges, model)
        journal = Journal.begin(
            model, f.fileno(), ranges, commit_rename=(pending, record) if opts.undo else None
        )
        try:
            elements = _patch(
                f,
                header,
                plan,
                fitted,
                src_header,
                pending if opts.undo else None,
                call.progress,
                opts.allow_nonfinite,
                signature_refs(plan, call.embed_signature),
            )
            journal.commit()
        except BaseException:
            journal.abort(f.fileno())
            raise
    touched = sum(n for _, n in ranges)
    return FileReport(
        model,
        record if opts.undo else None,
        len(plan.deltas),
        len(plan.bn),
        touched,
        elements,
        header_updated=fitted is not None,
    )


def _patch(f, header, plan, fitted, src_header, pending, progress, allow_nonfinite, refs) -> int:
    """Patch the mapped tensors (and header), writing the undo record to ``pending``
    (``refs``: the signatures it refers to); returns the record's element count."""
    tick = locked_progress(progress)
    header_now = fitted if fitted is not None else src_header
    if pending is None:
        with _mapped(f) as mm:
            target = MappedTarget(mm, f.fileno(), header, _NoWatch(), tick, plan)
            with verifying(plan):
                patch_target(target, plan, None, allow_nonfinite)
        _finish_model(f, fitted)
        return 0
    touched = [t for t in header.tensors if t.name in plan.deltas or t.name in plan.bn]
    kinds = [(t, "delta" if t.name in plan.deltas else "bn") for t in touched]
    size = header.file_size
    with AtomicFile(pending, durable=True) as uf:
        sizes = (size, size)
        writer = UndoWriter(uf, plan.sigs, plan.alphas, kinds, src_header, sizes, header_now, refs)
        sink = RecordToFile(writer)
        with _mapped(f) as mm:
            with verifying(plan):
                target = MappedTarget(mm, f.fileno(), header, sink, tick, plan)
                patch_target(target, plan, sink, allow_nonfinite)
        _finish_model(f, fitted)
        writer.finish()
        uf.commit()
    return writer.elements


def _finish_model(f: Any, fitted: bytes | None) -> None:
    """Write the new header (if it fits) and make the model durable."""
    if fitted is not None:
        pwrite_all(f.fileno(), fitted, 0)
    os.fsync(f.fileno())


class _NoWatch:
    def loaded(self, t: TensorInfo, arr: np.ndarray) -> None:
        """Nothing to record without an undo record."""

    def finished(self, t: TensorInfo, arr: np.ndarray) -> None:
        """Nothing to record without an undo record."""


def remove_inplace(
    patched: str | os.PathLike[str],
    *,
    undo: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    signatures: Sequence[str | os.PathLike[str]] = (),
) -> FileReport:
    """Restore, in place, the model a patch changed: bit for bit the original, through
    the same journal as :func:`apply_inplace`; the consumed record is deleted at the
    commit. Works for a record of an in-place patch, and for one of ``apply_file`` whose
    header kept its length. Refuses what :func:`~robustpatch.files.remove_file` refuses,
    and (``BlockingIOError``) a model another in-place call or recovery holds."""
    patched = validate.path(patched, "patched")
    side_path = validate.path(undo, "undo") if undo else undo_path_for(patched)
    with _reported(patched), model_lock(patched):
        return _remove_held(patched, side_path, progress, signatures)


def _remove_held(
    patched: Path, side_path: Path, progress: Progress | None, signatures: Sequence[Any]
) -> FileReport:
    """:func:`remove_inplace`, the model's lock held."""
    _check_model(patched)
    check_destinations([side_path], [patched])
    if not side_path.exists():
        raise FileNotFoundError(f"no undo record at {side_path}")
    recover_held(patched)
    with open_input(side_path) as fside, open(patched, "r+b") as f:
        side = UndoSidecar.load(side_path, fside, signatures, background=True)
        header = read_header_from(f, str(patched))
        plan = record_plan(side)
        verify_patched(f, header, side, plan)
        if len(side.source_header) != header.data_start:
            raise InvalidArgumentError(
                f"{patched}: the original header has another length than the patched one; "
                "restore to an output file (robustpatch remove -o)"
            )
        ranges = [(0, header.data_start), *_tensor_ranges(header, set(plan.names))]
        _reserve(f.fileno(), ranges, patched)
        journal = Journal.begin(patched, f.fileno(), ranges, commit_unlink=side_path)
        try:
            tick = locked_progress(progress)
            with _mapped(f) as mm:
                target = MappedTarget(mm, f.fileno(), header, VerifyRestore(side), tick, plan)
                with verifying(plan):
                    restore_target(target, plan, FileRecords(side, header))
            _finish_model(f, side.source_header)
            journal.commit()
        except BaseException:
            journal.abort(f.fileno())
            raise
    return FileReport(patched, None, len(plan.deltas), len(plan.bn), sum(n for _, n in ranges), 0)
