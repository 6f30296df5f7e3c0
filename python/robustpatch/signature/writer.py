"""A signature file written entry by entry, never held whole in memory.

:class:`SignatureWriter` takes each :class:`~robustpatch.signature.entry.Entry` as it is
produced and writes its file tensors (dense deltas in their compact dtype, as
:func:`~robustpatch.signature.codec.save` stores them) to a temporary data file in the
output's folder, so memory stays near one entry, and hashes each as it writes it (the
``tensors-blake3`` content hash is over per-tensor digests, so the order they are
produced in does not matter and nothing is read back). The header cannot be written
first: it holds every entry's stats and the content hash. So the data goes behind room
reserved for the header, sized from the number of entries expected; :meth:`commit`

- for a large signature whose header fits the room, writes the header into it, padded
  with spaces (which safetensors allows) and renames the file into place: the data is
  written once;
- otherwise copies the data behind the exact-size header into a second temporary file
  and renames that: the file is then byte for byte what ``codec.save`` writes for the
  same signature (a small signature is not left with unused room).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._format.safetensors import TensorInfo, check_header_size, encode_header
from .._io.atomic import AtomicFile, naming_errors
from .._io.ranged import pread_into, pwrite_all
from ..errors import InvalidArgumentError
from .codec import (
    META_KEY,
    TensorDigests,
    compact,
    encode_meta,
    header_object,
    stored_label,
    tensor_digest,
)
from .entry import Entry

__all__ = ["SignatureWriter"]

#: Bytes moved per read while the data is copied behind the header.
_BLOCK = 8 << 20

#: Data at least this large is written once, behind reserved header room (below it, the
#: copy behind an exact-size header is cheap and the file has no padding).
IN_PLACE_MIN_BYTES = 64 << 20

#: Header room reserved per expected entry, and in all (an entry's spec, stats and
#: tensor infos take about 300 bytes; names may be long).
_ROOM_PER_ENTRY = 2048
_ROOM_BASE = 64 << 10


@dataclass(frozen=True)
class _Stored:
    """One file tensor in the data file: where it is, and the digest of its bytes."""

    info: TensorInfo
    digest: str


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
        dense delta) and digest it; where it went."""
        stored = compact(arr) if compact_dense else arr
        info = TensorInfo(name, stored_label(stored), tuple(stored.shape), at, at + stored.nbytes)
        data = memoryview(stored.reshape(-1).view(np.uint8))
        with naming_errors(self.path):  # a full disk: the signature's name, not its temp's
            pwrite_all(self._data.file.fileno(), data, self._start + at)
        return _Stored(info, tensor_digest(stored))

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
        give them, and the content hash) and rename the file into place."""
        digests = TensorDigests(self._specs)
        for s in self._stored:
            digests.add(s.info.name, s.info.dtype, s.info.shape, s.digest)
        header = self._header(name, meta, digests.hexdigest())
        if self._offset >= IN_PLACE_MIN_BYTES and len(header) <= self._start:
            pwrite_all(self._data.file.fileno(), _padded(header, self._start), 0)
            self._data.commit()
            return
        with AtomicFile(self.path, self.durable) as out:
            self._copy_data(out.file.fileno(), len(header))
            pwrite_all(out.file.fileno(), header, 0)
            out.commit()

    def _header(self, name: str, meta: Mapping[str, Any], content_hash: str) -> bytes:
        obj = header_object(name, meta, self._specs, content_hash)
        raw = encode_meta(obj)
        header = encode_header([s.info for s in self._stored], {META_KEY: raw})
        check_header_size(len(header), str(self.path))
        return header

    def _copy_data(self, dst: int, data_start: int) -> None:
        """Copy the tensor data to ``dst``, starting at ``data_start``."""
        buf = np.empty(_BLOCK, np.uint8)
        src = self._data.file.fileno()
        for at in range(0, self._offset, _BLOCK):
            view = memoryview(buf[: min(_BLOCK, self._offset - at)])
            if pread_into(src, view, self._start + at) != len(view):
                raise OSError(f"{self._data.tmp}: the temporary data file ended early")
            pwrite_all(dst, view, data_start + at)


def _padded(header: bytes, size: int) -> bytes:
    """A safetensors header (length prefix + JSON) grown to ``size`` bytes in all with
    trailing spaces in the JSON, so that the data behind it starts at ``size``."""
    json_len = size - 8
    return json_len.to_bytes(8, "little") + header[8:].ljust(json_len, b" ")
