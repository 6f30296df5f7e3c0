"""Byte ranges of files: positioned reads and writes, range copies, tensor loads."""

from __future__ import annotations

import errno
import mmap
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..dtypes import NUMPY_OF_LABEL
from ..errors import FormatError

if TYPE_CHECKING:
    from .._format.safetensors import Header, TensorInfo
    from .direct import DirectWriter


#: Bytes moved per call when copying a byte range between files.
COPY_CHUNK = 64 << 20


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


def pread_blocks(fd: int, offset: int, end: int, step: int, where: str) -> Iterator[bytes]:
    """The bytes of ``fd`` from ``offset`` to ``end``, in blocks of at most ``step``; a
    file that ends sooner is a FormatError naming ``where``."""
    while offset < end:
        block = os.pread(fd, min(step, end - offset), offset)
        if not block:
            raise FormatError(f"{where}: the file ends at byte {offset}, before byte {end}")
        yield block
        offset += len(block)


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
        if not isinstance(dst_fd, int):
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


#: ``madvise`` advice (Linux 5.14+): fault a range in, writable, in one call.
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def populate_writable(mm: mmap.mmap, offset: int, length: int) -> bool:
    """Map ``length`` bytes of ``mm`` at ``offset`` in, writable, with one system call,
    instead of one page fault per page as they are first read and then written (about
    half the time of patching a range of a file mapped shared). Returns False where
    the kernel or platform lacks it; the pages then fault in as used."""
    if length <= 0 or not hasattr(mm, "madvise") or not sys.platform.startswith("linux"):
        return False
    start = offset - offset % mmap.PAGESIZE
    try:
        mm.madvise(MADV_POPULATE_WRITE, start, min(offset + length, len(mm)) - start)
    except OSError as e:
        if e.errno == errno.EINVAL:  # a kernel before 5.14
            return False
        raise  # EFAULT: a page could not be given (a hole on a full disk): not a SIGBUS later
    return True


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
