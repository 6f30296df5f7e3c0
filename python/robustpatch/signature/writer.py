"""A signature file written entry by entry, never held whole in memory.

:class:`SignatureWriter` takes each :class:`~robustpatch.signature.entry.Entry` as it is
produced and writes its file tensors (dense deltas in their compact dtype, as
:func:`~robustpatch.signature.codec.save` stores them) to a temporary data file in the
output's folder, so memory stays near one entry. The header cannot be written first: it
holds every entry's stats and the content hash, which covers the entry specs before any
tensor and the tensors in name order, not in the order they were produced. So the data
goes behind room reserved for the header, sized from the number of entries expected;
:meth:`commit` reads it back once in name order to hash it (compact values widened to
the float32 the hash is defined over), then

- for a large signature whose header fits the room, writes the header into it, padded
  with spaces (which safetensors allows) and renames the file into place: the data is
  written once;
- otherwise copies the data behind the header into a second temporary file while it
  hashes, and renames that: the file is then byte for byte what ``codec.save`` writes
  for the same signature (a small signature is not left with unused room).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._format.safetensors import TensorInfo, check_header_size, encode_header
from .._io.atomic import AtomicFile
from .._io.ranged import pread_into, pwrite_all
from ..dtypes import label_of
from ..errors import InvalidArgumentError
from .codec import (
    HASH_ALGORITHMS,
    META_KEY,
    ContentHasher,
    compact,
    header_object,
    json_default,
)
from .entry import Entry

__all__ = ["SignatureWriter"]

#: Bytes moved per read while the data is hashed and copied behind the header.
_BLOCK = 8 << 20

#: Data at least this large is written once, behind reserved header room (below it, the
#: copy behind an exact-size header is cheap and the file has no padding).
IN_PLACE_MIN_BYTES = 64 << 20

#: Header room reserved per expected entry, and in all (an entry's spec, stats and
#: tensor infos take about 300 bytes; names may be long).
_ROOM_PER_ENTRY = 2048
_ROOM_BASE = 64 << 10

#: A content hash as long as the real one (the algorithm's name and 64 hex digits): the
#: header is laid out with it before the hash is known, then overwritten in place.
_HASH_PLACEHOLDER = f"{HASH_ALGORITHMS[0]}:" + "0" * 64


@dataclass(frozen=True)
class _Stored:
    """One file tensor in the data file: where it is, and how the hash sees it (the
    float32 values of a compact dense delta: ``widen_from`` names its stored label)."""

    info: TensorInfo
    hashed_dtype: np.dtype
    hashed_shape: tuple[int, ...]
    widen_from: str | None


class SignatureWriter:
    """Write a signature to ``path`` one entry at a time (see the module docstring).

    Use as a context manager: leaving it without :meth:`commit` (an error) deletes the
    temporary files and leaves ``path`` as it was. The file appears by an atomic rename;
    ``durable=True`` also fsyncs it first, so that it survives a power cut."""

    def __init__(
        self, path: str | os.PathLike[str], durable: bool = False, expected_entries: int = 0
    ) -> None:
        self.path = Path(path)
        self.durable = durable
        self._data = AtomicFile(self.path, durable)
        # The data starts on a page boundary behind the room: 8 length bytes + the header.
        room = _ROOM_BASE + _ROOM_PER_ENTRY * max(expected_entries, 0)
        self._start = -(-(room + 8) // 4096) * 4096
        self._specs: list[dict[str, Any]] = []
        self._stored: list[_Stored] = []
        self._entries: set[str] = set()
        self._owner: dict[str, str] = {}  # file tensor -> the entry that stores it
        self._offset = 0

    def __enter__(self) -> SignatureWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._data.discard()

    def __len__(self) -> int:
        return len(self._specs)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data written so far."""
        return self._offset

    def add(self, entry: Entry) -> None:
        """Append ``entry`` (weight 1) to the file (InvalidArgumentError if its name or
        a file tensor it needs is taken, as :class:`Signature` refuses it). All or
        nothing: if it fails part way (a dtype refused, a full disk), the writer is as
        it was before the call, so the entry can be added again or left out."""
        tensors = entry.file_tensors()
        self._check_free(entry.name, list(tensors))
        compact_dense = entry.kind == "delta" and entry.quant is None
        stored: list[_Stored] = []
        end = self._offset
        try:
            for name, arr in tensors.items():
                s = self._write_tensor(name, np.ascontiguousarray(arr), compact_dense, end)
                stored.append(s)
                end = s.info.end
            spec = entry.spec()
        except BaseException:
            with suppress(OSError):  # only frees the space: later tensors overwrite it
                os.ftruncate(self._data.file.fileno(), self._start + self._offset)
            raise
        self._stored += stored
        self._offset = end
        self._specs.append(spec)
        self._owner.update(dict.fromkeys(tensors, entry.name))
        self._entries.add(entry.name)

    def _write_tensor(self, name: str, arr: np.ndarray, compact_dense: bool, at: int) -> _Stored:
        """Write one file tensor at offset ``at`` of the data file (compact dtype for a
        dense delta); where it went."""
        stored = compact(arr) if compact_dense else arr
        label = "U8" if stored.dtype == np.uint8 else label_of(stored)
        widen_from = label if compact_dense and label != "F32" else None
        info = TensorInfo(name, label, tuple(stored.shape), at, at + stored.nbytes)
        data = memoryview(stored.reshape(-1).view(np.uint8))
        pwrite_all(self._data.file.fileno(), data, self._start + at)
        return _Stored(info, arr.dtype, tuple(arr.shape), widen_from)

    def _check_free(self, entry: str, names: list[str]) -> None:
        if entry in self._entries:
            raise InvalidArgumentError(f"duplicate entry {entry!r}")
        for t in names:
            if t in self._owner:
                raise InvalidArgumentError(
                    f"entries {self._owner[t]!r} and {entry!r} both need the file tensor {t!r}"
                )

    def commit(self, name: str, meta: Mapping[str, Any]) -> None:
        """Write the header (``name`` and ``meta`` as ``Signature(name=, meta=)`` would
        give them) and the data, hashed, then rename the file into place."""
        header = self._header(name, meta, _HASH_PLACEHOLDER)
        if self._offset >= IN_PLACE_MIN_BYTES and len(header) <= self._start:
            digest = self._hash_data()
            final = _padded(self._header(name, meta, digest), self._start)
            pwrite_all(self._data.file.fileno(), final, 0)
            self._data.commit()
            return
        with AtomicFile(self.path, self.durable) as out:
            digest = self._hash_data(out.file.fileno(), len(header))
            final = self._header(name, meta, digest)
            assert len(final) == len(header), "the placeholder has the hash's length"
            pwrite_all(out.file.fileno(), final, 0)
            out.commit()

    def _header(self, name: str, meta: Mapping[str, Any], content_hash: str) -> bytes:
        obj = header_object(name, meta, self._specs, content_hash)
        raw = json.dumps(obj, default=json_default)
        header = encode_header([s.info for s in self._stored], {META_KEY: raw})
        check_header_size(len(header), str(self.path))
        return header

    def _hash_data(self, copy_to: int | None = None, data_start: int = 0) -> str:
        """Read every tensor back in name order and hash it; with ``copy_to``, also copy
        it there at ``data_start`` + its offset. Returns the content hash."""
        hasher = ContentHasher(self._specs)
        buf = np.empty(_BLOCK, np.uint8)
        src = self._data.file.fileno()
        for s in sorted(self._stored, key=lambda s: s.info.name):
            hasher.tensor(s.info.name, s.hashed_dtype, s.hashed_shape)
            at, end = s.info.begin, s.info.end
            while at < end:  # blocks hold whole elements: _BLOCK is a multiple of 8
                view = memoryview(buf[: min(_BLOCK, end - at)])
                if pread_into(src, view, self._start + at) != len(view):
                    raise OSError(f"{self._data.tmp}: the temporary data file ended early")
                if copy_to is not None:
                    pwrite_all(copy_to, view, data_start + at)
                if s.widen_from is not None:
                    hasher.update_values(view, s.widen_from)
                else:
                    hasher.update(view)
                at += len(view)
        return hasher.hexdigest()


def _padded(header: bytes, size: int) -> bytes:
    """A safetensors header (length prefix + JSON) grown to ``size`` bytes in all with
    trailing spaces in the JSON, so that the data behind it starts at ``size``."""
    json_len = size - 8
    return json_len.to_bytes(8, "little") + header[8:].ljust(json_len, b" ")
