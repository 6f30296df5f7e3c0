"""The journal of an in-place patch: the original bytes of every range a patch is about
to overwrite, made durable before the first of them changes.

``<model>.rpjournal`` holds::

    b"RPJRNL2\\n"  state (1 byte: - being written, P pending, D done)  7 bytes zero
    u64 little-endian length of the JSON that follows, the JSON
    the original bytes of each range, in order
    BLAKE3 (32 bytes) of the JSON and the bytes: present only once the journal is whole

The JSON names the model's size, a digest of bytes no range covers (recovery checks that
the file is still the model the journal was written for), the ranges, and what the
commit and a rollback do to the files beside the model (rename a pending undo record
into place, delete a consumed one). A patch runs :meth:`Journal.begin` (written and
fsynced in state -, then sealed: state P, fsynced), changes the ranges, fsyncs the
model, then :meth:`Journal.commit` (state D written: the commit point; then the file
actions; then the journal is deleted). :func:`recover` finishes whatever a killed
process left: an unsealed journal was never followed (the model is untouched; it is
deleted), a pending one is rolled back (the original bytes written back), a done one is
completed (its file actions run). A sealed journal that is not whole (its digest, length
or description wrong) was damaged after the patch may have begun: it is refused with a
FormatError and kept, since it
holds the only copy of the original bytes. (``RPJRNL1`` journals, of earlier releases,
are read the same way; releases before the seal wrote theirs in state P from the first
byte, so one of those cut short may also be a writer killed before the patch: the
refusal says so.) So after any crash the model is
either the original or the patched one, and its undo record says which. An error
before the commit point rolls back at once (:meth:`Journal.abort`); one from the
moment the done marker is being written (its write or fsync, the file actions) never
does: the journal stays for :func:`recover`, which goes the way the disk says.

One patch or recovery of a model runs at a time: each holds :func:`model_lock` (an
exclusive ``flock`` on the model) from its first look at the journal to its last write,
and a second one is refused at once with ``BlockingIOError`` naming the model.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import _core
from ..errors import FormatError, MismatchError
from .atomic import PathLike, _fsync_dir, _pid_alive
from .direct import DirectWriter
from .inputs import open_input
from .ranged import pwrite_all

__all__ = [
    "JOURNAL_SUFFIX",
    "PENDING_SUFFIX",
    "Journal",
    "journal_path_for",
    "model_lock",
    "recover",
    "recover_held",
]

JOURNAL_SUFFIX = ".rpjournal"
PENDING_SUFFIX = ".pending"  # an apply's undo record, until the commit renames it
_MAGIC = b"RPJRNL2\n"
_EARLIER_MAGIC = b"RPJRNL1\n"  # earlier releases: sealed, or (older) P from the first byte
_STATE_AT = len(_MAGIC)
_PREFIX = len(_MAGIC) + 8  # magic, state byte, padding
_UNSEALED, _PENDING, _DONE = b"-", b"P", b"D"
_CHUNK = 8 << 20


def journal_path_for(model: PathLike) -> Path:
    """Where the journal of an in-place patch of ``model`` lives: beside the file itself,
    symbolic links resolved, so that every name of the model finds it."""
    return Path(os.path.realpath(model) + JOURNAL_SUFFIX)


@dataclass
class _Plan:
    """The journal's JSON: the ranges saved and the file actions of commit/rollback."""

    model_size: int
    ranges: list[tuple[int, int]]  # (offset, length) in the model
    commit_rename: tuple[str, str] | None = None  # pending record -> its place
    commit_unlink: str | None = None  # the record a removal consumed
    rollback_unlink: list[str] = field(default_factory=list)
    pid: int = 0  # the patching process (its temporary files name it)
    untouched: str | None = None  # digest of bytes no range covers (earlier releases: none)

    @property
    def removal(self) -> bool:
        """Whether the journal is a removal's (it consumes the model's undo record)."""
        return self.commit_unlink is not None

    @classmethod
    def parse(cls, obj: object, where: str) -> _Plan:
        """The plan of a journal's JSON, every field checked: a journal is read back
        after a crash, and what it says is written into the model and done to files.
        Its digest proves it whole, not that robustpatch wrote it, so the file actions
        it may name are only those an in-place patch takes (see :func:`_undo_record_or_none`)."""

        def bad(what: str) -> FormatError:
            return FormatError(f"{where}: damaged journal: {what}; not recovering from it")

        if not isinstance(obj, dict) or not set(obj) <= set(cls.__dataclass_fields__):
            raise bad("not a journal's description")
        size, ranges, pid = obj.get("model_size"), obj.get("ranges"), obj.get("pid", 0)
        if not _is_count(size) or not _is_count(pid) or not isinstance(ranges, list):
            raise bad("model_size, pid or ranges is not a count")
        for r in ranges:
            if not (isinstance(r, list) and len(r) == 2 and all(_is_count(x) for x in r)):
                raise bad(f"range {r!r} is not an (offset, length) pair")
            if r[0] + r[1] > size:
                raise bad(f"range {r!r} ends past the model's {size} bytes")
        rename, unlink = obj.get("commit_rename"), obj.get("commit_unlink")
        rollback = obj.get("rollback_unlink", [])
        if rename is not None and not (
            isinstance(rename, list)
            and len(rename) == 2
            and all(isinstance(x, str) for x in rename)
            and rename[0] == rename[1] + PENDING_SUFFIX
        ):
            raise bad("commit_rename is not (a pending undo record, its place)")
        if not (unlink is None or isinstance(unlink, str)):
            raise bad("commit_unlink is not a path")
        if not (
            isinstance(rollback, list)
            and all(isinstance(x, str) and x.endswith(PENDING_SUFFIX) for x in rollback)
        ):
            raise bad("rollback_unlink is not a list of pending undo records")
        untouched = obj.get("untouched")
        if not (untouched is None or (isinstance(untouched, str) and len(untouched) == 64)):
            raise bad("untouched is not a digest")
        return cls(
            size,
            [(o, n) for o, n in ranges],
            None if rename is None else (rename[0], rename[1]),
            unlink,
            rollback,
            pid,
            untouched,
        )


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _undo_record_or_none(path: str, journal: Path) -> Path | None:
    """``path`` if it is an undo record, None if there is no file there; FormatError if
    it is anything else: a journal's file actions only ever move or delete the undo
    record of its patch, never another file it names."""
    from .._format.safetensors import read_header_from
    from .._format.undo import UNDO_KEY

    p = Path(path)
    try:
        with open(p, "rb") as f:
            if UNDO_KEY in read_header_from(f, path).metadata:
                return p
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, FormatError):
        pass
    raise FormatError(
        f"{journal}: the journal names {path}, which is not an undo record; not touching it "
        "(delete the journal if you know the model is whole)"
    )


def _absolute(path: Path) -> str:
    """``path`` from the root: recovery may run from another working folder. Not
    normalized: ``a/link/..`` stays what the system resolves it to."""
    return os.path.join(os.getcwd(), os.fspath(path))


class Journal:
    """An open journal of one in-place patch (see the module docstring)."""

    def __init__(self, path: Path, plan: _Plan) -> None:
        self.path, self.plan = path, plan
        self.may_be_done = False  # the done marker may be on disk: never roll back then

    @classmethod
    def begin(
        cls,
        model: Path,
        fd: int,
        ranges: Sequence[tuple[int, int]],
        *,
        commit_rename: tuple[Path, Path] | None = None,
        commit_unlink: Path | None = None,
    ) -> Journal:
        """Save the original bytes of ``ranges`` of the model open at ``fd``, durably."""
        rename = None
        if commit_rename is not None:
            rename = (_absolute(commit_rename[0]), _absolute(commit_rename[1]))
        size = os.fstat(fd).st_size
        ranges = [(int(o), int(n)) for o, n in ranges]
        plan = _Plan(
            size,
            ranges,
            rename,
            None if commit_unlink is None else _absolute(commit_unlink),
            [] if rename is None else [rename[0]],
            os.getpid(),
            _untouched_digest(fd, size, ranges),
        )
        path = journal_path_for(model)
        try:
            _write(path, plan, fd)
        except BaseException:  # a half-written journal would block the model until recovered
            path.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return cls(path, plan)

    def commit(self) -> None:
        """The patch is whole and synced: mark the journal done, then finish."""
        self._mark_done()
        self._finish_commit()

    def abort(self, fd: int) -> None:
        """After an error: roll the model open at ``fd`` back, unless the done marker
        may have been written. Then the model is the patched one and the undo record may
        already be in place, so the journal stays for :func:`recover`, which reads the
        state on disk: done, it finishes the file actions (a rollback here would leave a
        record that says patched beside the original); pending, it rolls back."""
        if not self.may_be_done:
            self.roll_back(fd)

    def _mark_done(self) -> None:
        """The commit point: state D, fsynced."""
        self.may_be_done = True  # from the first byte written, only the disk decides
        _set_state(self.path, _DONE)

    def _finish_commit(self) -> None:
        self._rename_record()
        self._unlink_consumed()
        self._delete()

    def _rename_record(self) -> None:
        """Put the pending undo record of an apply in place (gone: done before a crash).
        Neither there nor in place: the journal names them from a working folder this
        is not (an earlier release's relative paths), and finishing would leave the
        model patched with no record beside it: refused, the journal kept."""
        if self.plan.commit_rename is not None:
            src, dst = self.plan.commit_rename
            if _undo_record_or_none(src, self.path) is not None:
                os.replace(src, dst)
            elif not os.path.lexists(dst):
                raise FormatError(
                    f"{self.path}: the patch committed, but its undo record is neither at "
                    f"{src} nor at {dst}; run 'robustpatch recover' from the folder the "
                    "patch ran in (earlier releases named the record from there); if the "
                    "record is lost, the model is the patched one: delete the journal"
                )

    def _unlink_consumed(self) -> None:
        """Delete the undo record a removal consumed."""
        if self.plan.commit_unlink is not None:
            consumed = _undo_record_or_none(self.plan.commit_unlink, self.path)
            if consumed is not None:
                consumed.unlink()

    def roll_back(self, fd: int) -> None:
        """Write the original bytes back into the model open at ``fd`` and sync it."""
        with open(self.path, "rb") as f:
            at = _PREFIX + 8 + _meta_length(f)
            for offset, length in self.plan.ranges:
                for start in range(0, length, _CHUNK):
                    n = min(_CHUNK, length - start)
                    f.seek(at + start)
                    pwrite_all(fd, f.read(n), offset + start)
                at += length
        os.fsync(fd)
        for name in self.plan.rollback_unlink:
            pending = _undo_record_or_none(name, self.path)
            if pending is not None:
                pending.unlink()
            _remove_writer_temps(Path(name), self.plan.pid)
        self._delete()

    def _delete(self) -> None:
        self.path.unlink(missing_ok=True)
        _fsync_dir(self.path.parent)


def _set_state(path: Path, state: bytes) -> None:
    """Write the journal's state byte and fsync it (one sector: written whole or not)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        pwrite_all(fd, state, _STATE_AT)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, plan: _Plan, fd: int) -> None:
    """Write and fsync the journal of ``plan``, the original bytes read from ``fd``, then
    seal it (state P): a crash before the seal leaves a journal recovery may discard.

    Through direct I/O where the filesystem has it: the journal is only read back after
    a crash, so its bytes go from a few buffers straight to the disk (hashed in between,
    while the disk writes the block before) instead of filling the page cache first.
    That halves the journal's time and steadies it: a buffered write of 100 MB took
    100-360 ms, wherever reclaim had to find the pages.
    """
    meta = json.dumps(asdict(plan)).encode()
    h = _hasher(meta)
    with open(path, "wb", buffering=0) as f:
        writer = DirectWriter.for_fd(f.fileno())
        try:
            writer.write(_MAGIC + _UNSEALED + bytes(7) + len(meta).to_bytes(8, "little") + meta)
            for offset, length in plan.ranges:
                got = writer.copy_from(fd, offset, length, hasher=h)
                if got < length:
                    raise FormatError(
                        f"the model: the file ends at byte {offset + got}, before byte "
                        f"{offset + length}"
                    )
            writer.write(bytes.fromhex(h.hexdigest()))
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        os.fsync(f.fileno())
    _set_state(path, _PENDING)


def _hasher(meta: bytes) -> _core.Blake3:
    """The journal's hash (the engine's BLAKE3: parallel, the GIL released), fed ``meta``."""
    h = _core.Blake3()
    h.update(np.frombuffer(meta, np.uint8))
    return h


#: How many windows of how many bytes :func:`_untouched_digest` reads.
_WINDOWS, _WINDOW = 16, 4096


def _untouched_digest(fd: int, size: int, ranges: Sequence[tuple[int, int]]) -> str:
    """BLAKE3 of up to 16 windows of 4 KiB spread over the model's bytes that no range
    covers (the patch never changes them): recovery checks that the file under the
    model's name is still the one the journal was written for before writing the
    journal's bytes into it (another model of the same size put there would otherwise
    come out a mix of the two). The header is in the first window unless patched."""
    gaps, at = [], 0
    for offset, length in sorted(ranges):
        if offset > at:
            gaps.append((at, offset - at))
        at = max(at, offset + length)
    if at < size:
        gaps.append((at, size - at))
    total = sum(length for _, length in gaps)
    h = _hasher(size.to_bytes(8, "little"))
    wanted = sorted({k * total // _WINDOWS for k in range(_WINDOWS)}) if total else []
    skipped = 0  # untouched bytes in the gaps before this one
    for start, length in gaps:
        for w in wanted:
            if skipped <= w < skipped + length:
                inside = w - skipped
                n = min(_WINDOW, length - inside)
                h.update(np.frombuffer(os.pread(fd, n, start + inside), np.uint8))
        skipped += length
    return h.hexdigest()


def _remove_writer_temps(path: Path, pid: int) -> None:
    """Delete the temporary files of ``path`` that the journal's writer left, once it is
    gone (alive, it is this process: its own files are discarded as it unwinds)."""
    if _pid_alive(pid):
        return
    prefix = f".{path.name}.rp{pid}."
    for entry in path.parent.iterdir():
        if entry.name.startswith(prefix) and entry.name.endswith(".tmp"):
            entry.unlink(missing_ok=True)


def _meta_length(f) -> int:
    f.seek(_PREFIX)
    return int.from_bytes(f.read(8), "little")


def _load(path: Path) -> tuple[bytes, _Plan] | None:
    """The state and plan of a sealed journal; None for one never sealed (its writer was
    killed before the patch began). FormatError for a sealed journal that is not whole."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_PREFIX + 8)
        state = head[_STATE_AT : _STATE_AT + 1]
        if state not in (_PENDING, _DONE):
            return None
        # An earlier release's pending journal cut short is either damaged or (releases
        # before the seal) its writer's, killed before the patch: which, no byte says.
        maybe_unfinished = head.startswith(_EARLIER_MAGIC) and state == _PENDING

        def damaged(what: str, torn: bool = False) -> FormatError:
            unfinished = (
                " (an earlier release that wrote its journals unsealed, killed while writing "
                "one, leaves one like this too: then the model is untouched)"
                if torn and maybe_unfinished
                else ""
            )
            return FormatError(
                f"{path}: damaged journal ({what}); not recovering from it. The model may be "
                "partly patched and this journal holds its only copy of the original bytes: "
                "keep it, and restore the model from a copy (delete the journal only if you "
                f"know the model is whole){unfinished}"
            )

        if len(head) < _PREFIX + 8 or head[: len(_MAGIC)] not in (_MAGIC, _EARLIER_MAGIC):
            raise damaged("its header is not a journal's")
        n = int.from_bytes(head[_PREFIX:], "little")
        meta = f.read(n) if n <= size else b""
        if len(meta) != n:
            raise damaged("its description is cut short", torn=True)
        try:
            obj = json.loads(meta)
        except ValueError:
            raise damaged("its description is not JSON") from None
        plan = _Plan.parse(obj, str(path))
        body = sum(length for _, length in plan.ranges)
        whole = _PREFIX + 8 + n + body + 32
        if size != whole:
            raise damaged(f"{size} bytes, not the {whole} it describes", torn=size < whole)
        h, left = _hasher(meta), body
        while left:
            block = f.read(min(_CHUNK, left))
            h.update(np.frombuffer(block, np.uint8))
            left -= len(block)
        if f.read(32) != bytes.fromhex(h.hexdigest()):
            raise damaged("its digest does not match its bytes")
    return state, plan


@contextmanager
def model_lock(model: PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on ``model`` for one in-place patch or
    recovery. Another holder makes this raise ``BlockingIOError`` naming the model at
    once, never wait. A no-op where files cannot be locked (no ``fcntl``, or a file
    system that refuses ``flock``), as :func:`~robustpatch._io.atomic.commit_all`'s lock."""
    with open_input(model) as f:  # a FIFO or device is refused (opening one could block)
        _lock_or_refuse(f.fileno(), model)
        yield  # closing the file releases the lock


def _lock_or_refuse(fd: int, model: PathLike) -> None:
    try:
        import fcntl
    except ImportError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise BlockingIOError(
                e.errno,
                "busy: another in-place patch or recover of it is running; "
                "try again once it has finished",
                os.fspath(model),
            ) from None


def recover(model: PathLike) -> str | None:
    """Finish an in-place patch of ``model`` that a crash interrupted, under
    :func:`model_lock` (see :func:`recover_held`)."""
    with model_lock(model):
        return recover_held(model)


def recover_held(model: PathLike) -> str | None:
    """:func:`recover` for a caller that already holds :func:`model_lock` on ``model``.

    Returns None (no journal), ``"discarded"`` (the journal was never sealed, so the
    model was never changed), ``"rolled back"`` (an apply's: the original bytes written
    back, the model is the original), ``"removal rolled back"`` (a removal's: the model
    is the patched one again, its undo record kept), ``"completed"`` (an apply had
    committed: the model is the patched one, its file actions finished) or
    ``"removal completed"`` (the model is the original). FormatError (the journal
    kept): a sealed journal that is damaged; MismatchError (kept too): the file under
    the model's name is not the one the journal was written for.
    """
    path = journal_path_for(model)
    if not path.exists():
        return None
    loaded = _load(path)
    if loaded is None:
        path.unlink()
        _fsync_dir(path.parent)
        return "discarded"
    state, plan = loaded
    journal = Journal(path, plan)
    kind = "removal " if plan.removal else ""
    fd = os.open(model, os.O_RDWR)
    try:
        _check_same_model(fd, plan, model, path)
        if state == _DONE:
            journal._finish_commit()
            return kind + "completed"
        journal.roll_back(fd)
    finally:
        os.close(fd)
    return kind + "rolled back"


def _check_same_model(fd: int, plan: _Plan, model: PathLike, path: Path) -> None:
    """MismatchError unless the file open at ``fd`` is the size the journal says and its
    untouched bytes are those the journal saw (journals of earlier releases: the size)."""
    size = os.fstat(fd).st_size
    if size == plan.model_size and (
        plan.untouched is None or _untouched_digest(fd, size, plan.ranges) == plan.untouched
    ):
        return
    why = "its size changed" if size != plan.model_size else "its unpatched bytes differ"
    raise MismatchError(
        f"{os.fspath(model)}: not the file that the in-place patch journalled in {path} "
        f"was patching ({why}); "
        "refusing to recover into it. Put that model back to recover it, or delete the "
        "journal if this file is whole"
    )
