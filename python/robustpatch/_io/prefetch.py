"""Items computed one ahead in a second thread while the caller consumes the current
one: ``extract_to`` computes the next tensor's signature (the engine, with the GIL
released) while it writes this one to the file (a ``pwrite`` into the page cache, one
core's work the computation would otherwise wait for)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

__all__ = ["prefetched"]

T = TypeVar("T")

_END = object()


@contextmanager
def prefetched(items: Iterable[T], name: str, ahead: int = 1) -> Iterator[Iterator[T]]:
    """An iterator over ``items``, drawn by a thread of its own at most ``ahead`` items
    before the caller. An error raised while drawing is raised to the caller at that
    item. Leaving the block early (an error of the caller's) stops the thread once the
    item it is drawing is done, and waits for it: nothing runs on behind the caller."""
    slots: queue.Queue[tuple[bool, object]] = queue.Queue(maxsize=max(ahead, 1))
    stop = threading.Event()

    def hand_over(ok: bool, value: object) -> bool:
        while not stop.is_set():
            try:
                slots.put((ok, value), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def draw() -> None:
        try:
            for x in items:
                if not hand_over(True, x):
                    return
            hand_over(True, _END)
        except BaseException as e:  # handed to the caller, raised there
            hand_over(False, e)

    def taken() -> Iterator[T]:
        while True:
            ok, value = slots.get()
            if not ok:
                raise value  # type: ignore[misc]
            if value is _END:
                return
            yield value  # type: ignore[misc]

    thread = threading.Thread(target=draw, name=name, daemon=True)
    thread.start()
    try:
        yield taken()
    finally:
        stop.set()
        thread.join()
