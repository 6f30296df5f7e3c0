"""safetensors container I/O: validated reads, atomic writes, byte-range copies.

Headers are always parsed by the engine's validating reader (``_core.read_header``), so
no offset or length from a file is used before it has been checked; a file that is
plainly something else (text, a pickle) is called "not a safetensors file". Writes go to
a temporary file in the destination folder, are fsynced and renamed into place: a crash
or an error never leaves a partial file at the destination, and an I/O error names the
destination, never the temporary file. :func:`check_destinations` refuses, before any
write, an output that is one of the inputs.

Temporary files are named ``.<name>.rp<pid>.<random>.tmp``. A writer killed mid-write
(``SIGKILL``, power cut) leaves its temporary file behind; the next write to the same
destination deletes such leftovers when the process that made them is gone and they are
older than the current process (see :func:`remove_stale_temps`). Anything else that only
looks similar is never touched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import queue
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Union

import numpy as np

from . import _core
from .dtypes import NUMPY_OF_LABEL, label_of
from .errors import FormatError

PathLike = Union[str, "os.PathLike[str]"]

#: Bytes moved per call when copying a byte range between files.
COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file; ``begin``/``end`` are relative to ``data_start``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A validated safetensors header."""

    metadata: dict[str, str]
    tensors: list[TensorInfo]  # sorted by offset
    data_start: int
    file_size: int

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


def read_header(path: PathLike) -> Header:
    """Read and validate the header of a safetensors file (FormatError if malformed)."""
    path = os.fspath(path)
    size = os.stat(path).st_size  # a missing file raises FileNotFoundError naming the path
    try:
        meta, entries, data_start = _core.read_header(path)
    except FormatError as e:
        with open(path, "rb") as f:
            raise _refusal(path, f.read(9), size, e) from None
    tensors = [TensorInfo(n, d, tuple(s), b, e) for n, d, s, b, e in entries]
    return Header(dict(meta), tensors, data_start, size)


_MAX_HEADER = 100_000_000  # the engine's limit on a header's length (MAX_HEADER)


def read_header_from(f: BinaryIO, name: str) -> Header:
    """Read and validate the header of an open safetensors file (``name`` for errors):
    header and data come from the same file even if its path is replaced meanwhile."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    prefix = f.read(8)
    n = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
    # Read no more than the file holds or the parser accepts; it then refuses bad lengths.
    buf = prefix + f.read(min(n, max(size - 8, 0), _MAX_HEADER + 1))
    try:
        return parse_header(buf, size)
    except FormatError as e:
        raise _refusal(name, buf[:9], size, e) from None


def _refusal(name: str, start: bytes, size: int, e: FormatError) -> FormatError:
    """The error for a header the parser refused. A file whose length prefix cannot be
    right (longer than the file) or whose header does not open a JSON object is not a
    damaged safetensors file but something else (text, a pickle...): say so first, as
    the parser's detail (a huge "header length") would only puzzle."""
    n = int.from_bytes(start[:8], "little")
    if len(start) < 9 or n > size - 8 or start[8:9] != b"{":
        return FormatError(f"{name}: not a safetensors file ({e})")
    return FormatError(f"{name}: {e}")


def parse_header(buf: bytes, file_size: int) -> Header:
    """Validate a header held in memory (``buf`` starts at byte 0 of the file)."""
    meta, entries, data_start = _core.parse_header(buf, file_size)
    tensors = [TensorInfo(n, d, tuple(s), b, e) for n, d, s, b, e in entries]
    return Header(dict(meta), tensors, data_start, file_size)


def encode_header(tensors: list[TensorInfo], metadata: Mapping[str, str] | None) -> bytes:
    """Length prefix + JSON header, space-padded to a multiple of 8 bytes."""
    obj: dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = dict(metadata)
    for t in tensors:
        obj[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.begin, t.end]}
    text = json.dumps(obj, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _layout(tensors: Mapping[str, np.ndarray]) -> list[TensorInfo]:
    infos, offset = [], 0
    for name, arr in tensors.items():
        label = "U8" if arr.dtype == np.uint8 else label_of(arr)
        infos.append(TensorInfo(name, label, tuple(arr.shape), offset, offset + arr.nbytes))
        offset += arr.nbytes
    return infos


def _dtype_override(label_overrides: Mapping[str, str] | None, info: TensorInfo) -> TensorInfo:
    if label_overrides and info.name in label_overrides:
        return TensorInfo(info.name, label_overrides[info.name], info.shape, info.begin, info.end)
    return info


def write_tensors(
    path: PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> None:
    """Write numpy arrays as a safetensors file, atomically.

    uint16 arrays are labelled ``BF16`` unless ``labels`` says otherwise (e.g. ``U16``).
    """
    with atomic_file(path) as f:
        write_tensors_to(f, tensors, metadata, labels)


def write_tensors_to(
    f: BinaryIO,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> None:
    """Write numpy arrays as safetensors into an open binary file."""
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    infos = [_dtype_override(labels, i) for i in _layout(arrays)]
    f.write(encode_header(infos, metadata))
    for arr in arrays.values():
        f.write(memoryview(arr.reshape(-1).view(np.uint8)))


def read_tensors(path: PathLike) -> tuple[Header, dict[str, np.ndarray]]:
    """Read a whole (small) safetensors file into numpy arrays, validating the header.

    BF16 tensors come back as uint16 bits; F8 tensors as raw uint8.
    """
    header = read_header(path)
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        for t in header.tensors:
            out[t.name] = read_tensor(f, header, t)
    return header, out


def read_tensor(f: BinaryIO, header: Header, t: TensorInfo) -> np.ndarray:
    """Read one tensor into a fresh, writable, aligned array."""
    arr = np.empty(t.shape, NUMPY_OF_LABEL[t.dtype])
    f.seek(header.data_start + t.begin)
    view = memoryview(arr.reshape(-1).view(np.uint8))
    got = f.readinto(view) if t.nbytes else 0
    if got != t.nbytes:
        raise FormatError(f"tensor {t.name!r}: file ended after {got} of {t.nbytes} bytes")
    return arr


class TensorReader:
    """Loads tensors of one file, one at a time, into one reusable buffer (so memory
    stays at the largest tensor read). Reads with ``preadv`` (one copy out of the page
    cache, kernel readahead on a cold file); where that is missing, through a
    short-lived read-only mmap of the tensor's byte range."""

    def __init__(self, fd: int, header: Header) -> None:
        self.fd = fd
        self.header = header
        self._buf = np.empty(0, np.uint8)

    def load(self, t: TensorInfo) -> np.ndarray:
        """The tensor as a writable array, valid until the next :meth:`load`."""
        dtype = NUMPY_OF_LABEL[t.dtype]
        if self._buf.nbytes < t.nbytes:
            self._buf = np.empty(t.nbytes, np.uint8)
        raw = self._buf[: t.nbytes]
        if t.nbytes:
            start = self.header.data_start + t.begin
            if hasattr(os, "preadv"):
                got = pread_into(self.fd, memoryview(raw), start)
                if got != t.nbytes:
                    raise FormatError(
                        f"tensor {t.name!r}: file ended after {got} of {t.nbytes} bytes"
                    )
            else:  # pragma: no cover - platforms without preadv (Windows)
                base = start - start % mmap.ALLOCATIONGRANULARITY
                with mmap.mmap(
                    self.fd, start - base + t.nbytes, access=mmap.ACCESS_READ, offset=base
                ) as mm:
                    src = np.frombuffer(mm, np.uint8, t.nbytes, start - base)
                    raw[:] = src
                    del src
        return raw.view(dtype).reshape(t.shape)


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``fd`` at ``offset`` (looping over short reads); returns the
    bytes read, fewer than asked only at the end of the file."""
    view = view.cast("B")
    total = 0
    while total < view.nbytes:
        n = os.preadv(fd, [view[total:]], offset + total)
        if n <= 0:
            break
        total += n
    return total


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (looping over short writes)."""
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view[: 1 << 30], offset)
        if n <= 0:
            raise OSError(f"write returned {n} at byte {offset}")
        view, offset = view[n:], offset + n


def copy_range(
    src_fd: int,
    dst_fd: int | DirectWriter,
    offset: int,
    length: int,
    dst_offset: int,
    progress: Callable[[int], object] | None = None,
    stop: Callable[[], bool] | None = None,
    writeback: bool = False,
) -> None:
    """Copy ``length`` bytes at ``offset`` of one file to ``dst_offset`` of another.

    Uses ``os.copy_file_range`` (in the kernel: no user memory, reflinks where the
    filesystem has them), falling back to pread/pwrite; ``dst_fd`` may also be a
    :class:`DirectWriter` (then ``dst_offset`` must be its current end). ``stop()`` is
    polled between chunks to abandon the copy early. ``writeback`` starts writing each
    copied chunk to disk at once (:func:`start_writeback`), so that a later fsync has
    little left to do.
    """
    end = offset + length
    use_kernel = hasattr(os, "copy_file_range") and isinstance(dst_fd, int)
    while offset < end:
        if stop is not None and stop():
            return
        n = min(COPY_CHUNK, end - offset)
        done = 0
        if isinstance(dst_fd, DirectWriter):
            done = dst_fd.copy_from(src_fd, offset, n, dst_offset)
        else:
            if use_kernel:
                try:
                    done = os.copy_file_range(src_fd, dst_fd, n, offset, dst_offset)
                except OSError as e:  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP: fall back
                    if e.errno not in (18, 22, 38, 95):
                        raise
                    use_kernel = False
            if not use_kernel:
                data = os.pread(src_fd, n, offset)
                pwrite_all(dst_fd, data, dst_offset)
                done = len(data)
        if done <= 0:
            raise OSError(f"short copy: source ended at byte {offset} of {end}")
        if writeback and isinstance(dst_fd, int):
            start_writeback(dst_fd, dst_offset, done)
        offset += done
        dst_offset += done
        if progress is not None:
            progress(done)


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait
_sync_file_range: Callable[[int, int, int, int], int] | None | bool = False  # False: unresolved


def _resolve_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    global _sync_file_range
    if _sync_file_range is False:
        _sync_file_range = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _sync_file_range = fn
            except (OSError, AttributeError):
                pass
    return _sync_file_range  # type: ignore[return-value]


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a just-written byte range to disk, without
    waiting (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; a no-op elsewhere).

    Only a head start: it guarantees nothing, the final ``fsync`` still makes the file
    durable; but the disk then works while the rest of the file is produced instead of
    all at the end. Errors are ignored (the ``fsync`` reports real ones).
    """
    fn = _resolve_sync_file_range()
    if fn is not None and length > 0:
        fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # releases the GIL (ctypes.CDLL)


#: Durable outputs at least this large are written with direct I/O (:class:`DirectWriter`).
DIRECT_MIN_BYTES = 64 << 20
#: Bytes per direct write, and how many such buffers may be in flight.
DIRECT_BLOCK = 8 << 20
DIRECT_BUFFERS = 4
_DIRECT_ALIGN = 4096  # offsets, lengths and buffer addresses of O_DIRECT writes


class DirectWriter:
    """Fills a new file front to back through ``O_DIRECT``, bypassing the page cache.

    For output that must be durable anyway, this replaces "write into the page cache,
    then fsync": the bytes go from a few aligned buffers straight to the disk while the
    caller fills the next buffer, so the disk works from the first block on, and no
    page-cache pages are allocated, dirtied and written back (about half the CPU time
    of a buffered copy). The final fsync of :class:`AtomicFile` still makes the file
    (and its metadata) durable. The written file is not left in the page cache.

    Bytes are appended with :meth:`write` and :meth:`copy_from` (sequentially: an
    explicit offset must be the current end). A filesystem that refuses ``O_DIRECT``
    (or a write it rejects as misaligned) switches the writer to buffered writes with
    early writeback; the bytes written are the same. Memory: ``DIRECT_BUFFERS`` blocks
    of ``DIRECT_BLOCK`` bytes.
    """

    def __init__(self, fd: int, offset: int = 0) -> None:
        import fcntl

        if offset % _DIRECT_ALIGN:
            raise ValueError("a DirectWriter starts at an aligned offset")
        self.fd = fd
        self.pos = offset  # bytes appended so far (end of the file being written)
        self._flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, self._flags | os.O_DIRECT)  # OSError: unsupported
        self.direct = True
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(DIRECT_BUFFERS):
            self._free.put(mmap.mmap(-1, DIRECT_BLOCK))  # page-aligned anonymous memory
        self._full: queue.SimpleQueue = queue.SimpleQueue()
        self._buf: mmap.mmap | None = None
        self._used = 0  # bytes of self._buf filled
        self._block_start = offset  # file offset of self._buf's first byte
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="robustpatch-direct-writer")
        self._thread.daemon = True
        self._thread.start()

    @classmethod
    def open(cls, fd: int) -> DirectWriter | None:
        """A writer for ``fd`` (at offset 0), or None where direct I/O is unavailable."""
        if not hasattr(os, "O_DIRECT"):
            return None
        try:
            return cls(fd)
        except OSError:  # EINVAL: the filesystem does not do O_DIRECT (e.g. some FUSE)
            return None

    # -- producer side
    def _current(self) -> memoryview:
        if self._buf is None:
            buf = self._free.get()
            self._check()
            self._buf, self._used, self._block_start = buf, 0, self.pos
        return memoryview(self._buf)

    def _submit(self, last: bool = False) -> None:
        if self._buf is not None and (self._used == DIRECT_BLOCK or (last and self._used)):
            self._full.put((self._buf, self._block_start, self._used))
            self._buf = None
        elif last and self._buf is not None:
            self._free.put(self._buf)
            self._buf = None

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, data: bytes | memoryview, offset: int | None = None) -> None:
        """Append ``data`` (``offset``, if given, must be the current end)."""
        self._at(offset)
        view = memoryview(data).cast("B")
        while view.nbytes:
            buf = self._current()
            n = min(view.nbytes, DIRECT_BLOCK - self._used)
            buf[self._used : self._used + n] = view[:n]
            self._used += n
            self.pos += n
            view = view[n:]
            self._submit()

    def copy_from(
        self, src_fd: int, offset: int, length: int, dst_offset: int | None = None
    ) -> int:
        """Append ``length`` bytes of ``src_fd`` at ``offset``; returns the bytes copied
        (fewer only where the source ends)."""
        self._at(dst_offset)
        done = 0
        while done < length:
            buf = self._current()
            n = min(length - done, DIRECT_BLOCK - self._used)
            got = pread_into(src_fd, buf[self._used : self._used + n], offset + done)
            self._used += got
            self.pos += got
            done += got
            self._submit()
            if got < n:
                break
        return done

    def _at(self, offset: int | None) -> None:
        if offset is not None and offset != self.pos:
            raise ValueError(f"DirectWriter appends: asked for byte {offset}, at {self.pos}")

    def finish(self) -> int:
        """Write what is buffered, wait for the disk, and return the file's size."""
        self._submit(last=True)
        self._stop()
        self._check()
        return self.pos

    def abort(self) -> None:
        """Stop writing (after an error elsewhere); the caller discards the file."""
        if self._buf is not None:
            self._free.put(self._buf)
            self._buf = None
        self._error = self._error or _Aborted()
        self._stop()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._full.put(None)
            self._thread.join()
        self._buffered()

    # -- writer thread
    def _run(self) -> None:
        while True:
            item = self._full.get()
            if item is None:
                return
            buf, start, used = item
            try:
                if self._error is None:
                    self._write_block(memoryview(buf)[:used], start)
            except BaseException as e:  # reported to the producer by _check()
                self._error = e
            finally:
                self._free.put(buf)

    def _write_block(self, view: memoryview, offset: int) -> None:
        first = offset
        while view.nbytes:
            chunk = view
            if self.direct and chunk.nbytes % _DIRECT_ALIGN:
                if chunk.nbytes < _DIRECT_ALIGN:  # the file's unaligned tail: buffered
                    self._buffered()
                    continue
                chunk = chunk[: chunk.nbytes - chunk.nbytes % _DIRECT_ALIGN]
            try:
                n = os.pwrite(self.fd, chunk, offset)
            except OSError as e:
                if self.direct and e.errno == errno.EINVAL:  # refused: go buffered
                    self._buffered()
                    continue
                raise
            if n <= 0:
                raise OSError(f"write returned {n} at byte {offset}")
            view, offset = view[n:], offset + n
        if not self.direct:
            start_writeback(self.fd, first, offset - first)

    def _buffered(self) -> None:
        if self.direct:
            import fcntl

            fcntl.fcntl(self.fd, fcntl.F_SETFL, self._flags & ~os.O_DIRECT)
            self.direct = False


class _Aborted(Exception):
    pass


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
        """Close and delete the temporary file (idempotent)."""
        if not self.file.closed:
            self.file.close()
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass

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
    undo record stay a pair), and a crash can split the set only in the window between
    two ``rename`` calls."""
    for af in files:
        af.sync()
    with _folder_lock(files[0].path.parent):
        for af in files:
            af._rename()
    if any(af.durable for af in files):
        _fsync_dir(files[0].path.parent)


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
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # not thread-safe, hence only where /proc is missing
    os.umask(mask)
    return 0o666 & ~mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: someone else's; or not a pid: leave it
        return True
    return True


def remove_stale_temps(path: PathLike) -> list[Path]:
    """Delete the temporary files that killed writers of ``path`` left in its folder.

    A file is removed only if its name is ``.<name>.rp<pid>.<random>.tmp`` for this
    ``path``, the process ``<pid>`` no longer exists on this machine, and it was last
    modified before the current process imported robustpatch; so a concurrent writer's
    file is never touched. POSIX only (elsewhere nothing is removed). Returns what was
    removed; errors (a racing cleaner, permissions) are ignored.
    """
    if os.name != "posix":
        return []
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.rp") + r"(\d+)\.[A-Za-z0-9_]+\.tmp")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not entry.is_file(follow_symlinks=False) or st.st_mtime >= _STARTED:
                continue
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_id(path: PathLike) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``, through symlinks; None if there is none."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino


def check_destinations(
    inputs: Iterable[PathLike], outputs: Iterable[PathLike], overwrite: bool = True
) -> None:
    """Refuse, before anything is written, an output that is one of the inputs (the same
    file by device and inode, so also through a symlink or a hard link: ValueError), or,
    unless ``overwrite``, one that exists (FileExistsError). Even ``overwrite`` never
    lets an output replace an input."""
    seen: dict[tuple[int, int], PathLike] = {}
    for p in inputs:
        fid = _file_id(p)
        if fid is not None:
            seen.setdefault(fid, p)
    for out in outputs:
        fid = _file_id(out)
        if fid is None:
            continue
        if fid in seen:
            src = os.fspath(seen[fid])
            also = "" if src == os.fspath(out) else f" {src} (the same file)"
            raise ValueError(f"output {os.fspath(out)} is the input{also}; write to another file")
        if not overwrite:
            raise FileExistsError(
                errno.EEXIST, "already exists (overwrite=True replaces it)", os.fspath(out)
            )


def sha256_file(path: PathLike, chunk: int = 8 << 20) -> str:
    """Hex sha256 of a whole file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
