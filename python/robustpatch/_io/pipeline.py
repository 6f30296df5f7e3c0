"""How a :class:`~robustpatch.files.FileTarget` moves bytes: the touched tensors go
through a three-stage :class:`Pipeline` (reader thread, caller, writer thread) while a
:class:`Stream` copies the untouched byte ranges around them, either front to back by
direct I/O or in the kernel by a second thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .._format.safetensors import Header, TensorInfo
from ..dtypes import kernel_view
from . import direct
from .atomic import AtomicFile
from .direct import DirectWriter
from .ranged import TensorReader, copy_range, pwrite_all, start_writeback

if TYPE_CHECKING:
    from ..files import FileTarget


def open_stream(tgt: FileTarget, touched: list[TensorInfo]) -> Stream:
    """Direct I/O for a large durable output, else a kernel copy in a second thread."""
    tgt.out.file.flush()
    writer = None
    if tgt.out.durable and tgt.size >= direct.DIRECT_MIN_BYTES:
        writer = DirectWriter.open(tgt.out.file.fileno())
    ranges = _ranges(tgt.header, touched)
    shift = len(tgt.new_header) - tgt.header.data_start
    if writer is not None:
        return _DirectStream(tgt.src.fileno(), writer, ranges, shift, tgt)
    return _ThreadedStream(tgt.src.fileno(), tgt.out, ranges, shift, tgt)


def _ranges(header: Header, touched: list[TensorInfo]) -> list[tuple[int, int]]:
    """The (offset, length) source ranges between the touched tensors, in file order."""
    ranges, pos = [], header.data_start
    for t in touched:
        ranges.append((pos, header.data_start + t.begin - pos))
        pos = header.data_start + t.end
    ranges.append((pos, header.file_size - pos))
    return ranges


class Watch(Protocol):
    """Sees each touched tensor of a :class:`FileTarget` when loaded and when done."""

    def loaded(self, t: TensorInfo, arr: np.ndarray) -> None: ...
    def finished(self, t: TensorInfo, arr: np.ndarray) -> None: ...


class Stream(Protocol):
    """How a :class:`FileTarget` moves bytes: ``before(t)`` each touched tensor,
    ``write(t, arr)`` it, then ``finish()`` (or ``abort()`` after an error)."""

    def before(self, t: TensorInfo) -> None: ...
    def write(self, t: TensorInfo, arr: np.ndarray) -> None: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...


class _DirectStream:
    """Front to back through a :class:`DirectWriter`: each untouched range is copied
    just before the tensor that follows it."""

    def __init__(self, sfd: int, w: DirectWriter, ranges, shift: int, tgt: FileTarget) -> None:
        self.sfd, self.w, self.shift, self.tgt = sfd, w, shift, tgt
        self.ranges = iter(ranges)
        w.write(tgt.new_header)

    def _copy_next(self) -> None:
        offset, length = next(self.ranges)
        copy_range(self.sfd, self.w, offset, length, offset + self.shift, self.tgt.tick)

    def before(self, t: TensorInfo) -> None:
        self._copy_next()

    def write(self, t: TensorInfo, arr: np.ndarray) -> None:
        self.w.write(arr.reshape(-1).view(np.uint8).data, len(self.tgt.new_header) + t.begin)

    def finish(self) -> None:
        self._copy_next()
        self.w.finish()

    def abort(self) -> None:
        self.w.abort()


class _ThreadedStream:
    """Untouched ranges copied in the kernel by a second thread while this one patches;
    a durable output has its writeback started as it is produced."""

    def __init__(self, sfd: int, out: AtomicFile, ranges, shift: int, tgt: FileTarget) -> None:
        self.dfd, self.wb, self.at = out.file.fileno(), out.durable, len(tgt.new_header)
        pwrite_all(self.dfd, tgt.new_header, 0)
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(1)

        def copy_all() -> None:
            for offset, length in ranges:
                copy_range(
                    sfd,
                    self.dfd,
                    offset,
                    length,
                    offset + shift,
                    tgt.tick,
                    self.stop.is_set,
                    self.wb,
                )

        self.copying: Future[None] = self.pool.submit(copy_all)

    def before(self, t: TensorInfo) -> None:
        """Nothing to do: the copier thread fills the gaps."""

    def write(self, t: TensorInfo, arr: np.ndarray) -> None:
        pwrite_all(self.dfd, arr.reshape(-1).view(np.uint8).data, self.at + t.begin)
        if self.wb:
            start_writeback(self.dfd, self.at + t.begin, t.nbytes)

    def finish(self) -> None:
        self.pool.shutdown()
        error = self.copying.exception()
        if error is not None:
            raise error

    def abort(self) -> None:
        self.stop.set()
        self.pool.shutdown()


#: Tensor buffers of a :class:`Pipeline`: one being read, one patched, one written.
PIPELINE_BUFFERS = 3


class Pipeline:
    """The touched tensors of a :class:`FileTarget`, read one ahead and written one
    behind: a reader thread loads the next tensor (and shows it to the watch) while the
    caller patches the current one, and a writer thread checks (the watch) and writes
    the previous one. Reads, hashing, the engine and writes release the GIL, so the
    three stages run on separate cores. Tensors stay in file order in every stage; an
    error in a thread is raised to the caller at its next step.
    """

    def __init__(self, tgt: FileTarget, touched: list[TensorInfo], stream: Stream) -> None:
        self.tgt, self.touched, self.stream = tgt, touched, stream
        self.free: queue.SimpleQueue[TensorReader | None] = queue.SimpleQueue()
        for _ in range(min(PIPELINE_BUFFERS, len(touched))):
            self.free.put(TensorReader(tgt.src.fileno(), tgt.header))
        self.ready: queue.SimpleQueue[tuple[TensorInfo, np.ndarray, TensorReader] | None]
        self.ready = queue.SimpleQueue()
        self.done: queue.SimpleQueue[tuple[TensorInfo, np.ndarray, TensorReader] | None]
        self.done = queue.SimpleQueue()
        self.current: TensorReader | None = None  # the buffer of the tensor being patched
        self.error: BaseException | None = None
        self.threads = [
            threading.Thread(target=self._guard, args=(fn,), name=f"robustpatch-{stage}")
            for fn, stage in ((self._read_all, "reader"), (self._write_all, "writer"))
        ]
        for th in self.threads:
            th.daemon = True
            th.start()

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as e:  # raised to the caller by _check()
            self.error = self.error or e
            self.ready.put(None)  # wakes a caller waiting for a tensor

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def _read_all(self) -> None:
        watch = self.tgt.watch
        for t in self.touched:
            reader = self.free.get()
            if reader is None or self.error is not None:
                return
            arr = kernel_view(reader.load(t))
            if watch is not None:
                watch.loaded(t, arr)
            self.ready.put((t, arr, reader))

    def _write_all(self) -> None:
        watch, stream = self.tgt.watch, self.stream
        while (item := self.done.get()) is not None and self.error is None:
            t, arr, reader = item
            stream.before(t)
            if watch is not None:
                watch.finished(t, arr)
            stream.write(t, arr)
            self.tgt.tick(t.nbytes)
            self.free.put(reader)

    def loaded(self) -> Iterator[tuple[TensorInfo, np.ndarray]]:
        """Each touched tensor, loaded, in file order."""
        for _ in self.touched:
            item = self.ready.get()
            self._check()
            assert item is not None
            t, arr, self.current = item
            yield t, arr

    def write(self, t: TensorInfo, arr: np.ndarray) -> None:
        """Hand the patched tensor to the writer thread."""
        self._check()
        assert self.current is not None
        self.done.put((t, arr, self.current))

    def finish(self) -> None:
        """Wait for the writer; raises what a thread raised."""
        self._stop()
        self._check()

    def abort(self) -> None:
        """Stop both threads (after an error); the caller discards the output."""
        self.error = self.error or _Abandoned()
        self._stop()

    def _stop(self) -> None:
        self.done.put(None)
        self.free.put(None)  # wakes a reader waiting for a buffer
        for th in self.threads:
            th.join()


class _Abandoned(Exception):
    """Set as a :class:`Pipeline`'s error when its caller stops early."""
