"""The files one ONNX write leaves: the model, its external data file and its undo
record, committed as a set; and the data files of previous writes, deleted after.

A patched model's data file gets a name of its own on every write,
``<out>.<8 hex digits>.data``, referenced by the new .onnx. The previous .onnx keeps
reading its own data file until the model's own rename replaces it, so a process killed
between the set's renames leaves the previous model whole, with the data it was written
with (at most the new record beside it, which ``remove`` refuses, and the new data file,
which nothing reads). Once the set is in place, the data files of the output's earlier
writes are deleted, under the lock the set was renamed under, and only while the
output is still the model just written: ``<out>.<8 hex>.data`` files it does not read
(a killed writer's too), and ``<out>.data`` if the model it replaced read that (as
``remove`` and earlier versions write it). Never an input of the call, nor a file
that another ``*.onnx`` file of the folder reads (a copy of a previous output, or one
renamed).
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .._io.atomic import AtomicFile, _folder_lock, commit_all, naming_errors, same_file
from .._io.inputs import open_input
from ..errors import FormatError, InvalidArgumentError
from .model import external_locations

__all__ = ["Outputs", "fresh_data_name", "fixed_data_name", "referenced_data"]


def fixed_data_name(out: Path) -> str:
    """``<out name>.data``: the data file ``remove`` restores beside ``out``."""
    return out.name + ".data"


def fresh_data_name(out: Path) -> str:
    """``<out name>.<8 hex>.data``, a name no file in ``out``'s folder has yet."""
    while True:
        name = f"{out.name}.{secrets.token_hex(4)}.data"
        if not os.path.lexists(out.parent / name):
            return name


def _unique_pattern(out: Path) -> re.Pattern[str]:
    return re.compile(re.escape(out.name) + r"\.[0-9a-f]{8}\.data")


def referenced_data(path: Path) -> set[str]:
    """The external data file names the ONNX model at ``path`` reads (none if there is
    no such file or it is no ONNX model): its bytes are mapped, and only its
    initializers' headers are read."""
    try:
        with open_input(path) as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _locations(mm, path)
    except (OSError, ValueError, InvalidArgumentError):  # ValueError: an empty file
        return set()


def _locations(mm: mmap.mmap, path: Path) -> set[str]:
    """:func:`external_locations` of a mapped file, none if it is no ONNX model (caught
    here, so that no view of the map outlives this call and the map can close)."""
    try:
        return external_locations(mm, path)
    except FormatError:
        return set()


class Outputs:
    """The model, its data file and its undo record as atomic files, committed as a
    set (the data file first: a new name, which nothing reads yet; then the record; the
    model last) or discarded together. ``inputs``: the call's input files, which the
    deletion of previous data files leaves alone."""

    def __init__(
        self,
        out: Path,
        data: Path | None,
        undo: Path | None,
        durable: bool,
        inputs: Sequence[Any] = (),
    ) -> None:
        if not out.parent.is_dir():  # else the first file made (the data's) would be named
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fspath(out))
        self._open: list[AtomicFile] = []
        self.inputs = list(inputs)
        self.data = self._new(data, durable)
        self.undo = self._new(undo, durable)
        self.model = self._new(out, durable)

    def _new(self, path: Path | None, durable: bool) -> AtomicFile | None:
        if path is None:
            return None
        try:
            af = AtomicFile(path, durable)
        except BaseException:
            self.discard()
            raise
        self._open.append(af)
        return af

    def commit(self) -> None:
        """Rename the set into place, then delete the output's previous data files."""
        assert self.model is not None
        out = self.model.path
        previous = referenced_data(out)
        written = os.fstat(self.model.file.fileno())
        commit_all(self._open)
        keep = None if self.data is None else self.data.path.name
        drop_previous_data(out, (written.st_dev, written.st_ino), keep, previous, self.inputs)

    def discard(self) -> None:
        for af in self._open:
            af.discard()

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
        if isinstance(exc, OSError) and self.model is not None:
            with naming_errors(self.model.path):  # not a temporary file, or nothing
                raise exc


def drop_previous_data(
    out: Path,
    written: tuple[int, int],
    keep: str | None,
    previous: set[str],
    inputs: Iterable[Any],
) -> list[Path]:
    """Delete the data files of ``out``'s earlier writes (see the module's docstring)
    while ``out`` is still the model ``written`` ((device, inode)); ``keep``: the data
    file it reads. Returns what was deleted; errors (a racing cleaner) are ignored."""
    with _folder_lock(out.parent):
        try:
            st = os.stat(out)
        except OSError:
            return []
        if (st.st_dev, st.st_ino) != written:  # a later write's set: it cleans after itself
            return []
        inputs = list(inputs)
        stale = [p for p in _candidates(out, keep, previous) if not _is_input(p, inputs)]
        if stale:
            read = _read_by_other_models(out)
            stale = [p for p in stale if p.name not in read]
        return _unlink_files(stale)


def _candidates(out: Path, keep: str | None, previous: set[str]) -> list[Path]:
    """Data files named as ``out``'s: ``<out>.<8 hex>.data``, and ``<out>.data`` where the
    model ``out`` replaced read it; not ``keep``."""
    unique, fixed = _unique_pattern(out), fixed_data_name(out)
    return [
        out.parent / name
        for name in _entries(out.parent)
        if name != keep and (unique.fullmatch(name) or (name == fixed and name in previous))
    ]


def _is_input(path: Path, inputs: list[Any]) -> bool:
    """``path`` is one of ``inputs``: the same path, or the same file (through links)."""
    return any(os.path.abspath(path) == os.path.abspath(p) or same_file(path, p) for p in inputs)


def _read_by_other_models(out: Path) -> set[str]:
    """The data file names the other ``*.onnx`` files of ``out``'s folder read (a copy of
    a previous output, or one renamed, keeps its data)."""
    read: set[str] = set()
    for name in _entries(out.parent):
        path = out.parent / name
        if name != out.name and name.lower().endswith(".onnx") and path.is_file():
            read |= {os.path.normpath(loc) for loc in referenced_data(path)}
    return read


def _unlink_files(paths: list[Path]) -> list[Path]:
    deleted = []
    for path in paths:
        try:
            if not path.is_dir():
                path.unlink()
                deleted.append(path)
        except OSError:
            pass
    return deleted


def _entries(folder: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(folder)]
    except OSError:
        return []
