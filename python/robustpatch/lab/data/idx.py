"""Read IDX files (the MNIST / Fashion-MNIST format), gzip-compressed or not.

An IDX file is a 4-byte magic number -- two zero bytes, a type code and the number of
dimensions -- then each dimension as a big-endian uint32, then the values in C order,
big-endian. Any file that does not follow this exactly raises
:class:`~robustpatch.errors.FormatError` naming the file and what is wrong; nothing is
written anywhere.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from ...errors import FormatError

__all__ = ["read_idx", "IDX_DTYPES"]

#: Type code -> big-endian numpy dtype (the format's table).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in the IDX file ``path`` (``.gz`` or plain, told by its content).

    Values come back in native byte order. Raises :class:`FormatError` for a file that is
    not IDX (bad magic, unknown type code, zero dimensions), a corrupt gzip stream, or a
    payload whose size disagrees with the dimensions (truncated or with trailing bytes);
    ``OSError`` when it cannot be read.
    """
    p = Path(path)
    raw = _decompressed(p, p.read_bytes())
    dtype, shape, offset = _header(p, raw)
    expected = math.prod(shape) * dtype.itemsize
    got = len(raw) - offset
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise FormatError(
            f"{p}: IDX payload {what}: dimensions {shape} of {dtype.name} need "
            f"{expected} bytes, the file has {got}"
        )
    values = np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)
    return values.astype(dtype.newbyteorder("="))


def _decompressed(path: Path, data: bytes) -> bytes:
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise FormatError(f"{path}: corrupt gzip stream: {e}") from None


def _header(path: Path, raw: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    if len(raw) < 4:
        raise FormatError(f"{path}: not an IDX file: {len(raw)} bytes, the magic needs 4")
    if raw[0] != 0 or raw[1] != 0:
        raise FormatError(
            f"{path}: not an IDX file: magic starts with {raw[:2].hex()}, expected 0000"
        )
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in IDX_DTYPES)
        raise FormatError(f"{path}: unknown IDX type code 0x{code:02x} (known: {known})")
    if ndim == 0:
        raise FormatError(f"{path}: IDX file with zero dimensions")
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise FormatError(
            f"{path}: IDX header truncated: {ndim} dimensions need {offset} bytes, "
            f"the file has {len(raw)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    return IDX_DTYPES[code], shape, offset
