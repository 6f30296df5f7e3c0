"""A signature file written entry by entry, never held whole in memory.

:class:`SignatureWriter` takes each :class:`~robustpatch.signature.entry.Entry` as it is
produced and writes its file tensors (dense deltas in their compact dtype, as
:func:`~robustpatch.signature.codec.save` stores them) to a temporary data file in the
output's folder, so memory stays near one entry. The header cannot come first: it holds
every entry's stats and the content hash, which covers the entry specs before any tensor
and the tensors in name order, not in the order they were produced. :meth:`commit`
therefore reads the data back once in name order, hashing it (compact values widened to
the float32 the hash is defined over) while copying it behind the header into the final
temporary file, which is then renamed into place. The file is byte for byte what
``codec.save`` writes for the same signature.
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

    def __init__(self, path: str | os.PathLike[str], durable: bool = False) -> None:
        self.path = Path(path)
        self.durable = durable
        self._data = AtomicFile(self.path, durable=False)
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
                os.ftruncate(self._data.file.fileno(), self._offset)
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
        pwrite_all(self._data.file.fileno(), memoryview(stored.reshape(-1).view(np.uint8)), at)
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
        with AtomicFile(self.path, self.durable) as out:
            digest = self._copy_hashed(out.file.fileno(), len(header))
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

    def _copy_hashed(self, out_fd: int, data_start: int) -> str:
        """Copy every tensor from the data file to ``out_fd`` at ``data_start`` + its
        offset, in name order, hashing it on the way; returns the content hash."""
        hasher = ContentHasher(self._specs)
        buf = np.empty(_BLOCK, np.uint8)
        wide = np.empty(_BLOCK // 2, np.uint32)  # a block of BF16 or F16 as float32
        src = self._data.file.fileno()
        for s in sorted(self._stored, key=lambda s: s.info.name):
            hasher.tensor(s.info.name, s.hashed_dtype, s.hashed_shape)
            at, end = s.info.begin, s.info.end
            while at < end:  # blocks hold whole elements: _BLOCK is a multiple of 8
                view = memoryview(buf[: min(_BLOCK, end - at)])
                if pread_into(src, view, at) != len(view):
                    raise OSError(f"{self._data.tmp}: the temporary data file ended early")
                pwrite_all(out_fd, view, data_start + at)
                block = buf[: len(view)]
                if s.widen_from is not None:
                    block = _widened(block, s.widen_from, wide[: len(view) // 2])
                hasher.update(block)
                at += len(view)
        return hasher.hexdigest()


def _widened(block: np.ndarray, label: str, out: np.ndarray) -> np.ndarray:
    """A block of BF16 or F16 values (raw bytes) as float32 bytes, written into ``out``
    (uint32, one per value): exact, and without temporaries."""
    if label == "BF16":
        np.left_shift(block.view(np.uint16), 16, out=out, dtype=np.uint32)
    else:
        out.view(np.float32)[:] = block.view(np.float16)
    return out.view(np.uint8)
