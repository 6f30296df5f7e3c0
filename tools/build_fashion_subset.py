"""Build the Fashion-MNIST subset embedded in robustpatch.lab.data (deterministic).

Reads the four official IDX files (Debian: ``apt-get install dataset-fashion-mnist``
puts them in /usr/share/datasets/fashion-mnist), picks the splits of
``robustpatch.lab.data.fashion_mnist.assign_splits`` at ``EMBEDDED_SIZES`` and writes
three gzip IDX files (gzip mtime 0, so the same input gives the same bytes):

- ``fashion_subset-images-idx3-ubyte.gz``: uint8 (N, 28, 28);
- ``fashion_subset-labels-idx1-ubyte.gz``: uint8 (N,), the original class 0-9;
- ``fashion_subset-meta-idx2-int.gz``: int32 (N, 2): split code (index into ``SPLITS``)
  and the image's index in its original file.

It prints the sha256 of each file for ``EMBEDDED_SHA256``.

Usage: python tools/build_fashion_subset.py [--src DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np

from robustpatch.lab.data import fashion_mnist as fm
from robustpatch.lab.data.idx import read_idx

_CODES = {np.dtype("u1"): 0x08, np.dtype(">i4"): 0x0C}


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8 or int32) as an IDX file."""
    dtype = np.dtype("u1") if array.dtype == np.uint8 else np.dtype(">i4")
    head = struct.pack(">BBBB", 0, 0, _CODES[dtype], array.ndim)
    head += struct.pack(f">{array.ndim}I", *array.shape)
    return head + np.ascontiguousarray(array, dtype=dtype).tobytes()


def write_gz(path: Path, data: bytes) -> str:
    blob = gzip.compress(data, compresslevel=9, mtime=0)
    path.write_bytes(blob)
    return hashlib.sha256(blob).hexdigest()


def main() -> None:
    here = Path(fm.__file__).parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--out", type=Path, default=here)
    args = ap.parse_args()
    files = {f: tuple(read_idx(fm._find(args.src, s)) for s in fm._FILES[f]) for f in fm._FILES}
    picks = fm.assign_splits(files["train"][1], files["test"][1], fm.EMBEDDED_SIZES)
    xs, ys, meta = [], [], []
    for code, split in enumerate(fm.SPLITS):
        file, idx = picks[split]
        xs.append(files[file][0][idx])
        ys.append(files[file][1][idx])
        meta.append(np.stack([np.full(len(idx), code), idx], axis=1))
    arrays = {
        "fashion_subset-images-idx3-ubyte.gz": np.concatenate(xs),
        "fashion_subset-labels-idx1-ubyte.gz": np.concatenate(ys),
        "fashion_subset-meta-idx2-int.gz": np.concatenate(meta).astype(np.int32),
    }
    for name, array in arrays.items():
        print(f'    "{name}": "{write_gz(args.out / name, idx_bytes(array))}",')


if __name__ == "__main__":
    main()
