"""Input files: regular files only, each opened once.

A FIFO would block ``open`` until a writer appears, a device may never end, and a
directory is no file: each is refused by :func:`open_input` before it can block. The
path is checked with ``os.stat`` (so a device is never opened), then opened without
blocking and checked again on the open handle (a path swapped meanwhile is caught).
Readers then take the header and the data from that one handle, so a file replaced at
its path mid-read is never half old, half new.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO, TypeVar

from ..errors import InvalidArgumentError
from .atomic import PathLike

T = TypeVar("T")

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_regular(mode: int, path: PathLike) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "not a plain file")
    raise InvalidArgumentError(f"{os.fspath(path)}: is {kind}, not a regular file")


def open_input(path: PathLike) -> BinaryIO:
    """Open an input file for reading: InvalidArgumentError unless it is a regular file
    (FileNotFoundError etc. name the path)."""
    _check_regular(os.stat(path).st_mode, path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        _check_regular(os.fstat(fd).st_mode, path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def in_thread_on_dup(fd: int, work: Callable[[int], T], name: str) -> Future[T]:
    """``work(own)`` in a thread, ``own`` a duplicate of ``fd`` closed after it: the
    caller may close ``fd`` meanwhile; ``work`` reads by position (pread), so the file's
    offset is left alone. The result or the error comes back through the future."""
    own = os.dup(fd)

    def run() -> T:
        try:
            return work(own)
        finally:
            os.close(own)

    pool = ThreadPoolExecutor(1, thread_name_prefix=name)
    try:
        return pool.submit(run)
    finally:
        pool.shutdown(wait=False)
