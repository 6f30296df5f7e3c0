"""Fashion-MNIST (Zalando, MIT licence) for the paper's protocol: splits, the embedded subset.

Disjoint splits, chosen by a fixed rule before any result was seen (per class, in file
order, the first images go to the first split that wants that class):

- ``pretrain``: all ten classes (the "pretrained" model's data);
- task A (classes 0-4: T-shirt, trouser, pullover, dress, coat): ``a_train``, ``a_val``;
- task B (classes 5-9: sandal, shirt, sneaker, bag, ankle boot): ``b_train``, ``b_val``;
- ``a_test``, ``b_test`` from the official test file.

The package embeds one such subset (:data:`EMBEDDED_SIZES`: 11,000 images, built by
``tools/build_fashion_subset.py`` from the Debian ``dataset-fashion-mnist`` files) as three
gzip IDX files whose sha256 is checked at load. :func:`load_folder` reads the full IDX
files (the ``--data`` folder) and applies the same rule with any sizes.
Images come back as ``uint8`` tensors ``(N, 3, 32, 32)``: 28 px padded by 2 with black,
the gray value copied to three channels (the CIFAR-10-C parameter tables assume 32 px RGB).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ...errors import FormatError
from .idx import read_idx

__all__ = [
    "CLASSES",
    "TASK_A",
    "TASK_B",
    "SPLITS",
    "EMBEDDED_SIZES",
    "EMBEDDED_SHA256",
    "SplitSizes",
    "FashionSplits",
    "assign_splits",
    "load_embedded",
    "load_folder",
    "to_rgb32",
]

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
TASK_A = (0, 1, 2, 3, 4)
TASK_B = (5, 6, 7, 8, 9)
SPLITS = ("pretrain", "a_train", "a_val", "b_train", "b_val", "a_test", "b_test")

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class SplitSizes:
    """Images per class in each split (``pretrain`` over all ten classes, the others over
    their task's five)."""

    pretrain: int
    task_train: int
    task_val: int
    test: int


#: The embedded subset: 4,000 pretraining, 2 x (2,000 + 500) task, 2 x 1,000 test images.
EMBEDDED_SIZES = SplitSizes(pretrain=400, task_train=400, task_val=100, test=200)

#: sha256 of the embedded files, checked at every load.
EMBEDDED_SHA256 = {
    "fashion_subset-images-idx3-ubyte.gz": (
        "87816a602956b5848fedf5844c49815904cba155e6ba92b60e27d34b79adfda3"
    ),
    "fashion_subset-labels-idx1-ubyte.gz": (
        "0f04d8b10fa95c430fe2ff967fa41f674b12e0dbe02b2b6384083a05c1ca14d7"
    ),
    "fashion_subset-meta-idx2-int.gz": (
        "834ea3733cd6645924835c528608b974971293d18d434ace5b3511004bdeeaa3"
    ),
}


@dataclass
class FashionSplits:
    """Images ``uint8 (N, 3, 32, 32)`` and labels ``int64 (N,)`` per split name; task
    labels are remapped to 0-4 (class ``c`` of task B becomes ``c - 5``)."""

    images: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    source: str

    def __getitem__(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[split], self.labels[split]

    def head(self, n: int) -> FashionSplits:
        """The first ``n`` images of every split (for miniature runs)."""
        return FashionSplits(
            {k: v[:n] for k, v in self.images.items()},
            {k: v[:n] for k, v in self.labels.items()},
            f"{self.source}, first {n} of each split",
        )


def assign_splits(
    train_labels: np.ndarray, test_labels: np.ndarray, sizes: SplitSizes
) -> dict[str, tuple[str, np.ndarray]]:
    """Split name -> (``"train"`` or ``"test"`` file, indices into it), by the fixed rule.

    Raises :class:`FormatError` when a class has too few images for ``sizes``.
    """
    want = {
        "train": [
            ("pretrain", range(10), sizes.pretrain),
            ("a_train", TASK_A, sizes.task_train),
            ("a_val", TASK_A, sizes.task_val),
            ("b_train", TASK_B, sizes.task_train),
            ("b_val", TASK_B, sizes.task_val),
        ],
        "test": [("a_test", TASK_A, sizes.test), ("b_test", TASK_B, sizes.test)],
    }
    out: dict[str, tuple[str, np.ndarray]] = {}
    for file, labels in (("train", train_labels), ("test", test_labels)):
        taken = {c: 0 for c in range(10)}
        for split, classes, per_class in want[file]:
            picks = []
            for c in classes:
                idx = np.flatnonzero(labels == c)[taken[c] : taken[c] + per_class]
                if len(idx) < per_class:
                    raise FormatError(
                        f"Fashion-MNIST {file} file: class {c} has too few images for "
                        f"{split} ({per_class} per class wanted)"
                    )
                picks.append(idx)
                taken[c] += per_class
            out[split] = (file, np.sort(np.concatenate(picks)))
    return out


def to_rgb32(images: np.ndarray) -> torch.Tensor:
    """``uint8 (N, 28, 28)`` -> ``uint8 (N, 3, 32, 32)``: padded by 2, gray to RGB."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
    x = torch.nn.functional.pad(x, (2, 2, 2, 2))
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def _task_labels(split: str, labels: np.ndarray) -> torch.Tensor:
    shift = 5 if split.startswith("b_") else 0
    return torch.from_numpy(labels.astype(np.int64) - shift)


def _from_arrays(
    arrays: dict[str, tuple[np.ndarray, np.ndarray]], picks: dict, source: str
) -> FashionSplits:
    images, labels = {}, {}
    for split, (file, idx) in picks.items():
        x, y = arrays[file]
        images[split] = to_rgb32(x[idx])
        labels[split] = _task_labels(split, y[idx])
    return FashionSplits(images, labels, source)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no {stem} or {stem}.gz (the Fashion-MNIST IDX files)")


def _read_pair(folder: Path, file: str) -> tuple[np.ndarray, np.ndarray]:
    img_path, lbl_path = (_find(folder, s) for s in _FILES[file])
    x, y = read_idx(img_path), read_idx(lbl_path)
    if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
        raise FormatError(f"{img_path}: expected uint8 images (N, 28, 28), got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x) or y.dtype != np.uint8 or (len(y) and y.max() > 9):
        raise FormatError(
            f"{lbl_path}: expected {len(x)} uint8 labels 0-9, got {y.dtype} {y.shape}"
        )
    return x, y


def load_folder(path: str | os.PathLike, sizes: SplitSizes) -> FashionSplits:
    """The splits from the full IDX files in folder ``path`` (plain or ``.gz``)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder with the Fashion-MNIST IDX files")
    arrays = {file: _read_pair(folder, file) for file in _FILES}
    picks = assign_splits(arrays["train"][1], arrays["test"][1], sizes)
    return _from_arrays(arrays, picks, f"Fashion-MNIST files in {folder}")


def _embedded_bytes(name: str) -> bytes:
    data = resources.files(__package__).joinpath(name).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != EMBEDDED_SHA256[name]:
        raise FormatError(
            f"embedded {name}: sha256 {digest} differs from the recorded "
            f"{EMBEDDED_SHA256[name]} (the package's data file was changed)"
        )
    return data


def load_embedded() -> FashionSplits:
    """The embedded subset (:data:`EMBEDDED_SIZES`), checksums checked."""
    folder = Path(str(resources.files(__package__)))
    for name in EMBEDDED_SHA256:
        _embedded_bytes(name)
    x = read_idx(folder / "fashion_subset-images-idx3-ubyte.gz")
    y = read_idx(folder / "fashion_subset-labels-idx1-ubyte.gz")
    meta = read_idx(folder / "fashion_subset-meta-idx2-int.gz")  # columns: split, file index
    images, labels = {}, {}
    for code, split in enumerate(SPLITS):
        rows = np.flatnonzero(meta[:, 0] == code)
        images[split] = to_rgb32(x[rows])
        labels[split] = _task_labels(split, y[rows])
    return FashionSplits(images, labels, "embedded Fashion-MNIST subset")
