"""The safetensors container: validated headers, tensor layout, whole-file reads/writes.

Headers are parsed and encoded by the engine (``_core.parse_header``,
``_core.encode_header``: one codec, in Rust), so no offset or length from a file is used
before it has been checked; a file that is plainly something else (text, a pickle) is
called "not a safetensors file".
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import BinaryIO, overload

import numpy as np

from .. import _core
from .._io.atomic import PathLike, atomic_file
from .._io.inputs import open_input
from ..dtypes import NUMPY_OF_LABEL, label_of
from ..errors import SHOWN_CHARS, FormatError, InvalidArgumentError


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


class TensorTable(Sequence[TensorInfo]):
    """The tensors of a parsed header, kept as the engine's columns; each
    :class:`TensorInfo` is made on access. One Python object per tensor took 7.5× the
    header's size for 1.4 M tiny tensors; the columns take about 1×."""

    def __init__(
        self,
        names: list[str],
        codes: np.ndarray,
        labels: tuple[str, ...],
        shape_ends: np.ndarray,
        dims: np.ndarray,
        offsets: np.ndarray,
    ) -> None:
        """Columns as ``_core.parse_header`` gives them: tensor ``k`` is named
        ``names[k]``, has dtype ``labels[codes[k]]``, the dimensions
        ``dims[shape_ends[k-1]:shape_ends[k]]`` and the byte range ``offsets[2k:2k+2]``."""
        self._names = names
        self._codes = codes
        self._labels = labels
        self._ends = shape_ends
        self._dims = dims
        self._offsets = offsets.reshape(-1, 2)

    def __len__(self) -> int:
        return len(self._names)

    @overload
    def __getitem__(self, i: int) -> TensorInfo: ...
    @overload
    def __getitem__(self, i: slice) -> list[TensorInfo]: ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        k = range(len(self))[i]  # IndexError (and negative indices) as for a list
        start = int(self._ends[k - 1]) if k else 0
        shape = tuple(self._dims[start : int(self._ends[k])].tolist())
        begin, end = self._offsets[k].tolist()
        return TensorInfo(self._names[k], self._labels[self._codes[k]], shape, begin, end)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Header:
    """A validated safetensors header."""

    metadata: dict[str, str]
    tensors: Sequence[TensorInfo]  # sorted by offset
    data_start: int
    file_size: int

    def by_name(self) -> Mapping[str, TensorInfo]:
        """The tensors by name, built once per header: an undo record is looked up twice
        for every tensor it restores, and rebuilding it each time made removing a
        full-model patch quadratic in the tensor count."""
        return MappingProxyType(self._by_name)

    @cached_property
    def _by_name(self) -> dict[str, TensorInfo]:  # a plain dict: the header still pickles
        return {t.name: t for t in self.tensors}


def read_header(path: PathLike) -> Header:
    """Read and validate the header of a safetensors file (FormatError if malformed; a
    path that is not a regular file is refused before it is opened)."""
    with open_input(path) as f:
        return read_header_from(f, os.fspath(path))


#: The engine's limit on a header's JSON length (MAX_HEADER), as in safetensors.
MAX_HEADER = 100_000_000


def check_header_size(n: int, what: str) -> None:
    """Refuse, before it is written, a header that readers would refuse as too long."""
    if n > MAX_HEADER:
        raise InvalidArgumentError(
            f"{what} would have a {n}-byte header, over the {MAX_HEADER}-byte limit of "
            "safetensors readers (shorten the signature names or metadata)"
        )


def read_header_from(f: BinaryIO, name: str) -> Header:
    """Read and validate the header of an open safetensors file (``name`` for errors):
    header and data come from the same file even if its path is replaced meanwhile."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    prefix = f.read(8)
    n = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
    # Read the header in one piece (one allocation), no more than the file holds; a
    # length the parser refuses needs only its first byte (for the refusal's wording).
    want = min(n, max(size - 8, 0)) if n <= MAX_HEADER else 1
    f.seek(0)
    buf = f.read(8 + want)
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
    # The parser's detail may quote a tensor name from the file: cut like a value.
    detail = str(e) if len(str(e)) <= SHOWN_CHARS else str(e)[: SHOWN_CHARS - 3] + "..."
    if len(start) < 9 or n > size - 8 or start[8:9] != b"{":
        return FormatError(f"{name}: not a safetensors file ({detail})")
    return FormatError(f"{name}: {detail}")


def parse_header(buf: bytes, file_size: int) -> Header:
    """Validate a header held in memory (``buf`` starts at byte 0 of the file)."""
    meta, columns, data_start = _core.parse_header(buf, file_size)
    return Header(meta, TensorTable(*columns), data_start, file_size)


def encode_header(tensors: list[TensorInfo], metadata: Mapping[str, str] | None) -> bytes:
    """Length prefix + JSON header, space-padded to a multiple of 8 bytes (by the engine,
    byte-identical to what ``json.dumps`` wrote before). A tensor named ``__metadata__``
    is refused: the header's metadata takes that key, so no reader could load the file."""
    if any(t.name == "__metadata__" for t in tensors):
        raise InvalidArgumentError(
            "a tensor cannot be named '__metadata__' (the safetensors header's metadata key)"
        )
    entries = [(t.name, t.dtype, list(t.shape), t.begin, t.end) for t in tensors]
    return _core.encode_header(list((metadata or {}).items()), entries)


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
    arrays = {k: np.asarray(v, order="C") for k, v in tensors.items()}
    infos = [_dtype_override(labels, i) for i in _layout(arrays)]
    with atomic_file(path) as f:
        f.write(encode_header(infos, metadata))
        for arr in arrays.values():
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))


def read_tensors(path: PathLike) -> tuple[Header, dict[str, np.ndarray]]:
    """Read a whole (small) safetensors file into numpy arrays, validating the header.

    BF16 tensors come back as uint16 bits; F8 tensors as raw uint8.
    """
    out: dict[str, np.ndarray] = {}
    with open_input(path) as f:
        header = read_header_from(f, os.fspath(path))
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
