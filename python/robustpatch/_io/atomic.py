"""Atomic files: a temporary file in the destination folder, renamed into place.

A crash or an error never leaves a partial file at the destination, and an I/O error
names the destination, never the temporary file. :func:`check_destinations` refuses,
before any write, an output that is one of the inputs.

Temporary files are named ``.<name>.rp<pid>.<random>.tmp``. A writer killed mid-write
(``SIGKILL``, power cut) leaves its temporary file behind; the next write to the same
destination deletes such leftovers when the process that made them is gone and they are
older than the current process (see :func:`remove_stale_temps`). Anything else that only
looks similar is never touched.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Union

from ..errors import InvalidArgumentError

PathLike = Union[str, "os.PathLike[str]"]


class AtomicFile:
    """A temporary file in the destination folder that becomes ``path`` on :meth:`commit`.

    Until then nothing exists at ``path`` (an existing file there stays untouched);
    :meth:`discard` (or an exception inside ``with``) deletes the temporary file.
    ``durable=False`` skips the fsyncs (still atomic for readers, not across a crash).
    """

    def __init__(self, path: PathLike, durable: bool = True) -> None:
        self.path = Path(path)
        self.durable = durable
        folder = self.path.parent
        _check_file_destination(self.path)
        remove_stale_temps(self.path)
        with naming_errors(self.path):
            fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(self.path), suffix=".tmp", dir=folder)
        self.tmp = Path(tmp)
        try:  # mkstemp makes the file 0600; give the result the mode a plain open() would
            if hasattr(os, "fchmod"):
                os.fchmod(fd, _new_file_mode())
        except OSError:
            pass
        self.file: BinaryIO = os.fdopen(fd, "w+b")

    def sync(self) -> None:
        """Flush (and with ``durable``, fsync) the data before :meth:`commit`."""
        self.file.flush()
        if self.durable:
            os.fsync(self.file.fileno())

    def commit(self) -> None:
        """Sync, close and atomically rename into place."""
        self.sync()
        self._rename()
        if self.durable:
            _fsync_dir(self.path.parent)

    def _rename(self) -> None:
        self.file.close()
        with naming_errors(self.path):
            os.replace(self.tmp, self.path)

    def discard(self) -> None:
        """Close and delete the temporary file (idempotent). A close that fails (it
        flushes the buffer: a full disk again) still deletes it."""
        try:
            if not self.file.closed:
                self.file.close()
        except OSError:
            pass  # the descriptor is closed even so
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self.file.closed:
            self.discard()
        if isinstance(exc, OSError) and _names_no_user_path(exc, self.path):
            raise _renamed(exc, self.path) from None  # e.g. a full disk while writing


def commit_all(files: list[AtomicFile]) -> None:
    """Commit several temporary files of one folder as a set: all are synced first, then
    renamed back to back under an exclusive lock on the folder (then the folder is
    synced once), so two processes committing the same destinations never interleave
    their renames (the set that commits last wins whole, e.g. a patched model and its
    undo record stay a pair). A rename that fails puts back the files the set already
    replaced (each existing destination is kept under a second name until the set is
    in place), so an error leaves the previous set whole; a crash can split the set
    only in the window between two ``rename`` calls."""
    for af in files:
        af.sync()
    with _folder_lock(files[0].path.parent):
        kept = [_keep_previous(af.path) for af in files]  # a Path, None or NOT_KEPT
        done = 0
        try:
            for af in files:
                af._rename()
                done += 1
        except BaseException as e:
            for dest, previous in _put_back(files[:done], kept[:done]):
                e.add_note(f"the previous {dest} could not be put back: it is {previous}")
            _drop(kept[done:])
            if done and any(af.durable for af in files):
                try:  # the previous set's renames back, made durable as the new set's were
                    _fsync_dir(files[0].path.parent)
                except OSError:
                    pass  # the error being raised is the one to report
            raise
        _drop(kept)
    if any(af.durable for af in files):
        _fsync_dir(files[0].path.parent)


#: What :func:`_keep_previous` gives for a file that is there but could not be kept.
NOT_KEPT = Path()


def _keep_previous(path: Path) -> Path | None:
    """A second name for what is at ``path`` (a hard link to a file, a copy of a
    symlink), named as a temporary file so that a killed writer's is cleaned up like its
    other temporaries; None where nothing is there; :data:`NOT_KEPT` where the
    filesystem or its permissions refuse a hard link (that file cannot be put back)."""
    if not (path.is_symlink() or path.exists()):
        return None
    keep = path.with_name(f"{_temp_prefix(path)}{secrets.token_hex(4)}.tmp")
    try:
        if path.is_symlink():
            os.symlink(os.readlink(path), keep)
        else:
            os.link(path, keep)
    except OSError:
        return NOT_KEPT
    return keep


def _drop(kept: list[Path | None]) -> None:
    """Delete the second names of previous files no longer needed."""
    for previous in kept:
        if previous is not None and previous is not NOT_KEPT:
            previous.unlink(missing_ok=True)


def _put_back(renamed: list[AtomicFile], kept: list[Path | None]) -> list[tuple[Path, Path]]:
    """Undo the renames of a set that failed part way: each destination gets back what
    was there, or nothing where nothing was. One whose previous file could not be kept
    keeps the new one (deleting it would leave neither); a kept one stays under its
    second name if even putting it back fails: those (destination, second name) pairs
    are returned, for the error to tell the user (a later cleanup takes that name for a
    dead writer's temporary file)."""
    stranded = []
    for af, previous in zip(renamed, kept):
        try:
            if previous is None:
                af.path.unlink(missing_ok=True)
            elif previous is not NOT_KEPT:
                os.replace(previous, af.path)
        except OSError:
            if previous is not None and previous is not NOT_KEPT:
                stranded.append((af.path, previous))
    return stranded


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on a folder (a no-op where folders cannot be locked)."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # e.g. a filesystem without flock: commit unlocked
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def atomic_file(path: PathLike) -> Iterator[BinaryIO]:
    """``with atomic_file(p) as f: f.write(...)`` — ``p`` appears complete or not at all."""
    with AtomicFile(path) as af:
        yield af.file
        af.commit()


@contextmanager
def naming_errors(path: PathLike) -> Iterator[None]:
    """Re-raise an ``OSError`` about a temporary file of ``path`` (or about no file) as
    one naming ``path``, the file the user asked for: "out.rws: Permission denied",
    never a ``.out.rws.rp123.x.tmp`` they have never heard of."""
    try:
        yield
    except OSError as e:
        if not _names_no_user_path(e, path):
            raise
        raise _renamed(e, path) from None


def _names_no_user_path(e: OSError, path: PathLike) -> bool:
    """True if ``e`` names no file, or a temporary file of ``path`` (a failed rename names
    it and ``path``: the error is about ``path``)."""
    prefix = f".{Path(path).name}.rp"
    named = [os.path.basename(os.fspath(f)) for f in (e.filename, e.filename2) if f is not None]
    return not named or any(f.startswith(prefix) and f.endswith(".tmp") for f in named)


def _renamed(e: OSError, path: PathLike) -> OSError:
    if e.errno is None:  # our own OSError("...") messages
        return type(e)(f"{os.fspath(path)}: {e}")
    return type(e)(e.errno, e.strerror, os.fspath(path))


#: When this module was imported: temporary files not modified since are "older than
#: the current process" for :func:`remove_stale_temps`.
_STARTED = time.time()


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.rp{os.getpid()}."


def _new_file_mode() -> int:
    """0o666 minus the process umask (what ``open(path, "w")`` would create)."""
    return 0o666 & ~_umask()


def give_new_folder_mode(folder: PathLike) -> None:
    """Give ``folder``, made by ``mkdtemp`` (0o700), what ``os.mkdir`` would have made:
    0o777 minus the umask, keeping the setgid bit a group-shared parent passed on (so the
    files written inside still get the shared group)."""
    inherited = os.stat(folder).st_mode & stat.S_ISGID
    os.chmod(folder, (0o777 & ~_umask()) | inherited)


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # not thread-safe, hence only where /proc is missing
    os.umask(mask)
    return mask


def _pid_alive(pid: int, since: float | None = None) -> bool:
    """Whether process ``pid`` exists and may be the writer of an entry its writer last
    changed at ``since`` (seconds since the epoch). Where /proc tells, a zombie (killed, not yet
    reaped: for good under a PID 1 that does not reap) is dead, and so is a process that
    started after ``since``: the pid was reused after the writer died."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: someone else's; or not a pid: leave it
        return True
    state, started = _proc_state(pid)
    if state in ("Z", "X"):
        return False
    return since is None or started is None or started <= since + 1.0  # clock ticks


def _proc_state(pid: int) -> tuple[str | None, float | None]:
    """(state letter, start time in seconds since the epoch) of process ``pid`` from
    /proc, (None, None) where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after the (command name)
        state, ticks = fields[0].decode(), int(fields[19])
        return state, _boot_time() + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None, None


@functools.cache
def _boot_time() -> float:
    with open("/proc/stat") as f:
        return float(next(line.split()[1] for line in f if line.startswith("btime")))


def remove_stale_temps(path: PathLike) -> list[Path]:
    """Delete the temporary files that killed writers of ``path`` left in its folder
    (named ``.<name>.rp<pid>.<random>.tmp``: see :func:`remove_stale`)."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.rp") + r"(\d+)\.[A-Za-z0-9_]+\.tmp")
    return remove_stale(path.parent, pattern, folders=False)


def remove_stale(folder: Path, pattern: re.Pattern[str], folders: bool) -> list[Path]:
    """Delete the entries of ``folder`` that killed writers left: files (or, with
    ``folders``, folders) whose whole name ``pattern`` matches, its first group the
    writer's pid.

    An entry is removed only if the process ``<pid>`` no longer exists on this machine
    and the entry was last modified before the current process imported robustpatch;
    so a concurrent writer's is never touched. POSIX only (elsewhere a pid cannot be
    probed without signalling it: nothing is removed). Returns what was removed; errors
    (a racing cleaner, permissions) are ignored.
    """
    if os.name != "posix":
        return []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    removed = []
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        # A file's ctime dates it (POSIX: link() sets it too); a renamed folder's may not.
        since = None if folders else _changed(entry)
        if m is None or _pid_alive(int(m.group(1)), since):
            continue
        try:
            if not _is_stale(entry, folders):
                continue
            if folders:
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


def _changed(entry: os.DirEntry[str]) -> float | None:
    """When the entry's inode last changed: its writer made it (a temporary file, a hard
    link keeping a previous file) no earlier than that. Not the modification time: a
    kept previous file keeps its own, older than its keeper."""
    try:
        return entry.stat(follow_symlinks=False).st_ctime
    except OSError:
        return None


def _is_stale(entry: os.DirEntry[str], folders: bool) -> bool:
    """The entry is of the kind looked for (never through a link: a file search also
    takes a symlink itself, as a set's kept copy of a linked destination) and older than
    us."""
    is_dir = entry.is_dir(follow_symlinks=False)
    kind = is_dir if folders else not is_dir
    return kind and entry.stat(follow_symlinks=False).st_mtime < _STARTED


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError as e:
        # A filesystem that cannot sync folders says EINVAL (nothing to do); EIO means the
        # renames may not survive a power cut, which a durable call promised.
        if e.errno == errno.EIO:
            raise OSError(e.errno, e.strerror, os.fspath(folder)) from None
    finally:
        os.close(fd)


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether ``a`` and ``b`` name one existing file (by device and inode)."""
    fid = _file_id(a)
    return fid is not None and fid == _file_id(b)


def _file_id(path: PathLike) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``, through symlinks; None if there is none."""
    st = _stat(path, os.stat)
    return None if st is None else (st.st_dev, st.st_ino)


def _stat(path: PathLike, how: Callable[[PathLike], os.stat_result]) -> os.stat_result | None:
    try:
        return how(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _check_replaceable(out: PathLike) -> None:
    """An existing output must be a file or a folder (whose own checks follow): a device,
    a FIFO or a socket would be swapped for a regular file by the final rename."""
    st = _stat(out, os.stat)
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise InvalidArgumentError(
            f"output {os.fspath(out)} exists and is not a regular file (a device, FIFO or "
            "socket); write to a file"
        )


def _check_file_destination(out: Path) -> None:
    """Refuse, before anything is written, a destination the final rename cannot or must
    not replace with a file: a folder (the rename fails, after the other files of a set
    may have been renamed into place), a device, a FIFO or a socket."""
    if out.is_dir() and not out.is_symlink():
        raise IsADirectoryError(errno.EISDIR, "is a folder; write to a file", os.fspath(out))
    _check_replaceable(out)


def check_destinations(
    inputs: Iterable[PathLike], outputs: Iterable[PathLike], overwrite: bool = True
) -> None:
    """Refuse, before anything is written, an output that is one of the inputs (the same
    file by device and inode, so also through a symlink or a hard link:
    InvalidArgumentError) or a device, FIFO or socket (InvalidArgumentError), or, unless
    ``overwrite``, one that exists, a symlink to nothing included (FileExistsError).
    Even ``overwrite`` never lets an output replace an input."""
    seen: dict[tuple[int, int], PathLike] = {}
    for p in inputs:
        fid = _file_id(p)
        if fid is not None:
            seen.setdefault(fid, p)
    for out in outputs:
        if _stat(out, os.lstat) is None:
            continue
        fid = _file_id(out)  # None for a symlink to nothing, which still exists
        if fid is not None and fid in seen:
            src = os.fspath(seen[fid])
            also = "" if src == os.fspath(out) else f" {src} (the same file)"
            raise InvalidArgumentError(
                f"output {os.fspath(out)} is the input{also}; write to another file"
            )
        _check_replaceable(out)
        if not overwrite:
            raise FileExistsError(
                errno.EEXIST, "already exists (overwrite=True replaces it)", os.fspath(out)
            )
