"""Datasets for the lab: embedded defaults (no download), loaders, corrupted views.

Embedded, deterministic, cached as ``.npy`` under :func:`cache_dir`:

- :func:`load_digits32`: scikit-learn's bundled 8x8 digits upsampled to 32x32 (10 classes).
- :func:`procedural_shapes`: 10 classes of randomly placed, rotated, coloured shapes on
  textured backgrounds, any number of images (pretraining set).
- :func:`procedural_patterns`: 10 classes of oriented gratings, rings and spokes, a different
  task for transfer experiments (downstream set).

Loaders for data on disk: :func:`load_cifar` (the python pickle folders of CIFAR-10/100),
:func:`load_cifar_c` (CIFAR-10-C / CIFAR-100-C ``<corruption>.npy`` + ``labels.npy``) and
:class:`ImageFolder` (ImageNet-style ``root/<class>/<image>`` folders).

:class:`CorruptedView` presents a dataset under one (corruption, severity), generated on
the fly or cached.

Images are ``uint8`` arrays of shape ``(N, C, H, W)``; labels are ``int64``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import torch

from .training import default_device

__all__ = [
    "ImageSet",
    "cache_dir",
    "load_digits32",
    "procedural_shapes",
    "procedural_patterns",
    "load_cifar",
    "load_cifar_c",
    "ImageFolder",
    "load_image_folder",
    "CorruptedView",
    "SHAPE_CLASSES",
    "PATTERN_CLASSES",
]

PathLike = Union[str, os.PathLike]
CacheArg = Union[PathLike, bool, None]

_VERSION = 1  # bump when a generator changes, so stale caches are not reused

SHAPE_CLASSES = [
    "disk",
    "square",
    "triangle",
    "plus",
    "ring",
    "stripes",
    "checker",
    "frame",
    "star",
    "two_dots",
]
PATTERN_CLASSES = [
    "grating_0_coarse",
    "grating_45_coarse",
    "grating_90_coarse",
    "grating_135_coarse",
    "grating_0_fine",
    "grating_45_fine",
    "grating_90_fine",
    "grating_135_fine",
    "rings",
    "spokes",
]


@dataclass
class ImageSet:
    """Images ``(N, C, H, W)`` uint8 with integer labels ``(N,)`` and class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        """Number of classes (from ``classes`` if given, else from the labels)."""
        if self.classes:
            return len(self.classes)
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The images as a uint8 tensor and the labels as an int64 tensor (shared memory)."""
        images = torch.from_numpy(np.ascontiguousarray(self.images))
        labels = torch.from_numpy(np.ascontiguousarray(self.labels).astype(np.int64, copy=False))
        return images, labels

    def dataset(self) -> torch.utils.data.TensorDataset:
        """A ``TensorDataset`` of (uint8 image, label)."""
        return torch.utils.data.TensorDataset(*self.tensors())

    def subset(self, index: slice | Sequence[int] | np.ndarray) -> ImageSet:
        """A new ImageSet with the selected items."""
        return ImageSet(self.images[index], self.labels[index], list(self.classes))


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def cache_dir(path: PathLike | None = None) -> Path:
    """The cache folder: ``path``, else ``$ROBUSTPATCH_CACHE``, else ``~/.cache/robustpatch``.

    The folder is created if needed.
    """
    if path is None:
        path = os.environ.get("ROBUSTPATCH_CACHE") or Path.home() / ".cache" / "robustpatch"
    p = Path(path).expanduser()
    p.mkdir(parents=True, exist_ok=True)
    return p


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _cached(
    key: str, build: Callable[[], dict[str, np.ndarray]], cache: CacheArg
) -> dict[str, np.ndarray]:
    """Load arrays ``key.<name>.npy`` from the cache, or build and store them.

    ``cache=False`` disables caching; ``None`` or ``True`` uses :func:`cache_dir`.
    """
    if cache is False:
        return build()
    folder = cache_dir(None if cache is True or cache is None else cache)
    index = folder / f"{key}.names.txt"
    if index.exists():
        names = index.read_text().split()
        paths = [folder / f"{key}.{n}.npy" for n in names]
        if all(p.exists() for p in paths):
            try:
                return {n: np.load(p) for n, p in zip(names, paths)}
            except (OSError, ValueError):
                pass  # unreadable cache entry: rebuild below
    arrays = build()
    for name, arr in arrays.items():
        _save_npy_atomic(folder / f"{key}.{name}.npy", arr)
    tmp = index.with_suffix(".tmp")
    tmp.write_text("\n".join(arrays))
    os.replace(tmp, index)
    return arrays


# ---------------------------------------------------------------------------------------------
# Embedded data
# ---------------------------------------------------------------------------------------------


def _check_split(split: str) -> None:
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")


def load_digits32(
    split: str = "train",
    *,
    channels: int = 3,
    test_fraction: float = 0.2,
    seed: int = 0,
    cache: CacheArg = None,
) -> ImageSet:
    """scikit-learn's 1,797 bundled 8x8 digits, upsampled (bicubic) to 32x32 uint8.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``. The split is stratified and fixed by
            ``seed`` (``test_fraction`` of every class goes to the test split).
        channels: 1 (grey) or 3 (grey repeated, for RGB models and corruptions).
        test_fraction: share of each class in the test split.
        seed: seed of the split.
        cache: cache folder, ``None``/``True`` for :func:`cache_dir`, ``False`` for none.
    """
    _check_split(split)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")

    def build() -> dict[str, np.ndarray]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
        x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False)
        x = torch.round(x.clamp(0, 1) * 255).to(torch.uint8).numpy()
        return {"images": x, "labels": digits.target.astype(np.int64)}

    data = _cached(f"digits32-v{_VERSION}", build, cache)
    images, labels = data["images"], data["labels"]
    if split != "all":
        rs = np.random.RandomState(seed)
        test = np.zeros(len(labels), dtype=bool)
        for c in range(10):
            idx = np.flatnonzero(labels == c)
            rs.shuffle(idx)
            test[idx[: int(round(test_fraction * len(idx)))]] = True
        keep = test if split == "test" else ~test
        images, labels = images[keep], labels[keep]
    if channels == 3:
        images = np.repeat(images, 3, axis=1)
    return ImageSet(np.ascontiguousarray(images), labels, [str(d) for d in range(10)])


def _random_colors(rs_u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Foreground / background RGB in [0, 1] from uniforms (n, 6), with enough contrast."""
    fg = rs_u[:, 0:3]
    bg = rs_u[:, 3:6]
    lum_fg = fg @ np.array([0.299, 0.587, 0.114])
    lum_bg = bg @ np.array([0.299, 0.587, 0.114])
    # push the two apart in brightness so every shape stays visible
    gap = 0.35 - np.abs(lum_fg - lum_bg)
    sign = np.where(lum_fg >= lum_bg, 1.0, -1.0)
    shift = np.clip(gap, 0, None)[:, None] / 2 * sign[:, None]
    return np.clip(fg + shift, 0, 1), np.clip(bg - shift, 0, 1)


def _shape_masks(
    label: np.ndarray, u: np.ndarray, v: np.ndarray, r: np.ndarray, period: np.ndarray
) -> np.ndarray:
    """Soft-free binary masks (n, S, S) of the 10 shape classes in rotated coordinates."""
    d = np.sqrt(u**2 + v**2)
    m = np.zeros_like(u, dtype=bool)
    lab = label[:, None, None]
    r = r[:, None, None]
    p = period[:, None, None]
    inside_sq = np.maximum(np.abs(u), np.abs(v)) < r
    cases = {
        0: d < r,
        1: np.maximum(np.abs(u), np.abs(v)) < 0.85 * r,
        2: (v > -0.5 * r) & (np.sqrt(3) * np.abs(u) + v < r),
        3: ((np.abs(u) < 0.3 * r) & (np.abs(v) < r)) | ((np.abs(v) < 0.3 * r) & (np.abs(u) < r)),
        4: (d < r) & (d > 0.6 * r),
        5: inside_sq & (np.sin(2 * np.pi * v / p) > 0),
        6: inside_sq & (np.sin(np.pi * u / (0.5 * p)) * np.sin(np.pi * v / (0.5 * p)) > 0),
        7: (np.maximum(np.abs(u), np.abs(v)) < 0.9 * r)
        & (np.maximum(np.abs(u), np.abs(v)) > 0.55 * r),
        8: d < r * (0.55 + 0.45 * np.cos(5 * np.arctan2(v, u))),
        9: ((u - 0.55 * r) ** 2 + v**2 < (0.38 * r) ** 2)
        | ((u + 0.55 * r) ** 2 + v**2 < (0.38 * r) ** 2),
    }
    for c, mask in cases.items():
        m = np.where(lab == c, mask, m)
    return m


def _render_chunk(
    kind: str, start: int, count: int, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Render items ``start .. start+count`` of a procedural set (each depends on (seed, i))."""
    ss = 2 * size  # supersample 2x for anti-aliasing
    images = np.empty((count, 3, size, size), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    grid = (np.arange(ss) + 0.5) / 2.0  # pixel-centre coordinates in output pixels
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    for i in range(count):
        item = start + i
        rs = np.random.RandomState(
            np.random.SeedSequence([seed, item, 7 if kind == "shapes" else 11]).generate_state(1)[0]
        )
        label = item % 10
        p = rs.uniform(size=16)
        fg, bg = _random_colors(p[None, 0:6])
        fg, bg = fg[0], bg[0]
        if kind == "shapes":
            r = (0.22 + 0.16 * p[6]) * size
            cx = size / 2 + (p[7] - 0.5) * (size - 2.2 * r)
            cy = size / 2 + (p[8] - 0.5) * (size - 2.2 * r)
            theta = 2 * np.pi * p[9]
            dx, dy = xx - cx, yy - cy
            u = np.cos(theta) * dx + np.sin(theta) * dy
            v = -np.sin(theta) * dx + np.cos(theta) * dy
            period = np.array([(0.35 + 0.2 * p[10]) * r])
            mask = _shape_masks(np.array([label]), u[None], v[None], np.array([r]), period)[0]
            alpha = mask.astype(np.float64)
        else:
            alpha = _pattern(label, xx, yy, size, p)
        # background: colour gradient plus fine noise
        gdir = 2 * np.pi * p[11]
        grad = (
            ((np.cos(gdir) * (xx - size / 2) + np.sin(gdir) * (yy - size / 2)) / size) * 0.3 * p[12]
        )
        img = alpha[None] * fg[:, None, None] + (1 - alpha[None]) * (bg[:, None, None] + grad[None])
        img = img.reshape(3, size, 2, size, 2).mean(axis=(2, 4))
        img = img + rs.normal(scale=0.02 + 0.03 * p[13], size=img.shape)
        images[i] = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
        labels[i] = label
    return images, labels


def _pattern(label: int, xx: np.ndarray, yy: np.ndarray, size: int, p: np.ndarray) -> np.ndarray:
    """Alpha map in [0, 1] of a downstream pattern class."""
    cx = size / 2 + (p[7] - 0.5) * size * 0.3
    cy = size / 2 + (p[8] - 0.5) * size * 0.3
    dx, dy = xx - cx, yy - cy
    phase = 2 * np.pi * p[9]
    if label < 8:
        angle = np.deg2rad(45.0 * (label % 4) + (p[10] - 0.5) * 20.0)  # +-10 degrees jitter
        period = size / (2.5 + 1.0 * p[6]) if label < 4 else size / (6.0 + 2.0 * p[6])
        t = np.cos(angle) * dx + np.sin(angle) * dy
        wave = np.sin(2 * np.pi * t / period + phase)
    elif label == 8:
        period = size / (4.0 + 3.0 * p[6])
        wave = np.sin(2 * np.pi * np.sqrt(dx**2 + dy**2) / period + phase)
    else:
        k = 4 + int(p[6] * 5)
        wave = np.sin(k * np.arctan2(dy, dx) + phase)
    contrast = 0.6 + 0.4 * p[14]
    return 0.5 + 0.5 * contrast * wave


def _procedural(kind: str, n: int, seed: int, size: int, cache: CacheArg) -> ImageSet:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")

    def build() -> dict[str, np.ndarray]:
        chunks = [_render_chunk(kind, s, min(1024, n - s), size, seed) for s in range(0, n, 1024)]
        if not chunks:
            return {
                "images": np.zeros((0, 3, size, size), np.uint8),
                "labels": np.zeros(0, np.int64),
            }
        return {
            "images": np.concatenate([c[0] for c in chunks]),
            "labels": np.concatenate([c[1] for c in chunks]),
        }

    data = _cached(f"{kind}-n{n}-s{seed}-px{size}-v{_VERSION}", build, cache)
    classes = SHAPE_CLASSES if kind == "shapes" else PATTERN_CLASSES
    return ImageSet(data["images"], data["labels"], list(classes))


def procedural_shapes(n: int, *, seed: int = 0, size: int = 32, cache: CacheArg = None) -> ImageSet:
    """A deterministic 10-class pretraining set of ``n`` RGB images (:data:`SHAPE_CLASSES`).

    Each image holds one shape (disk, square, triangle, plus, ring, striped square, checker
    square, frame, star, two dots) at a random position, size, rotation and colour, on a
    background with a colour gradient and noise. Item ``i`` depends only on ``(seed, i)``, so
    a larger ``n`` extends a smaller one. Labels cycle through the classes (balanced).
    """
    return _procedural("shapes", n, seed, size, cache)


def procedural_patterns(
    n: int, *, seed: int = 0, size: int = 32, cache: CacheArg = None
) -> ImageSet:
    """A deterministic 10-class downstream set of ``n`` RGB images (:data:`PATTERN_CLASSES`).

    A different task from :func:`procedural_shapes`: full-image sinusoidal patterns whose class
    is the orientation (0, 45, 90, 135 degrees, +-10 jitter) and frequency (coarse / fine) of a
    grating, or concentric rings, or radial spokes; random phase, colours, contrast and noise.
    Item ``i`` depends only on ``(seed, i)``.
    """
    return _procedural("patterns", n, seed, size, cache)


# ---------------------------------------------------------------------------------------------
# Loaders for data on disk
# ---------------------------------------------------------------------------------------------


#: The only globals a CIFAR batch file may name: numpy's array reconstruction. Anything
#: else (os.system, builtins.eval, ...) is refused, so a hostile file cannot run code.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """CIFAR's "python version" is pickle; read it without letting it import code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        raw = _ArraysOnlyUnpickler(f, encoding="bytes").load()
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a CIFAR batch (expected a dict, got {type(raw).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def load_cifar(root: PathLike, split: str = "train", *, num_classes: int | None = None) -> ImageSet:
    """Load CIFAR-10 or CIFAR-100 from the python pickle release.

    Args:
        root: the extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``) or a
            folder containing it.
        split: ``"train"`` or ``"test"``.
        num_classes: 10 or 100; detected from the files when omitted.

    Returns:
        ImageSet with ``(N, 3, 32, 32)`` uint8 images, labels and class names.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    candidates = [root, root / "cifar-10-batches-py", root / "cifar-100-python"]
    folder = None
    kind = num_classes
    for c in candidates:
        if (c / "data_batch_1").exists() and kind in (None, 10):
            folder, kind = c, 10
            break
        if (c / "train").exists() and (c / "meta").exists() and kind in (None, 100):
            folder, kind = c, 100
            break
    if folder is None:
        raise FileNotFoundError(
            f"no CIFAR-{num_classes or '10/100'} python pickle files found under {root}"
        )
    if kind == 10:
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        parts = [_unpickle(folder / f) for f in files]
        data = np.concatenate([np.asarray(p["data"], dtype=np.uint8) for p in parts])
        labels = np.concatenate([np.asarray(p["labels"], dtype=np.int64) for p in parts])
        meta = folder / "batches.meta"
        names_key = "label_names"
    else:
        part = _unpickle(folder / split)
        data = np.asarray(part["data"], dtype=np.uint8)
        labels = np.asarray(part["fine_labels"], dtype=np.int64)
        meta = folder / "meta"
        names_key = "fine_label_names"
    classes: list[str] = []
    if meta.exists():
        classes = [
            n.decode() if isinstance(n, bytes) else str(n) for n in _unpickle(meta)[names_key]
        ]
    images = data.reshape(-1, 3, 32, 32)
    return ImageSet(np.ascontiguousarray(images), labels, classes)


def load_cifar_c(root: PathLike, corruption: str, severity: int | None = None) -> ImageSet:
    """Load CIFAR-10-C / CIFAR-100-C: ``root/<corruption>.npy`` and ``root/labels.npy``.

    The release stacks the test set five times, severity 1 first. ``severity`` 1-5 selects
    one block; ``None`` returns all five (labels repeated accordingly).
    """
    root = Path(root)
    path = root / f"{corruption}.npy"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    data = np.load(path, mmap_mode="r")
    labels = np.load(root / "labels.npy").astype(np.int64)
    if data.ndim != 4 or data.shape[-1] != 3:
        raise ValueError(f"{path}: expected (N, H, W, 3) images, got shape {data.shape}")
    if len(data) != len(labels) or len(data) % 5:
        raise ValueError(f"{path}: {len(data)} images, {len(labels)} labels (need 5 equal blocks)")
    if severity is not None:
        integer = isinstance(severity, (int, np.integer)) and not isinstance(severity, bool)
        if not integer or severity not in (1, 2, 3, 4, 5):  # 2.0 == 2, but slices need ints
            raise ValueError(f"severity must be an integer from 1 to 5, got {severity!r}")
        block = len(data) // 5
        sel = slice((severity - 1) * block, severity * block)
        data, labels = data[sel], labels[sel]
    images = np.ascontiguousarray(np.asarray(data).transpose(0, 3, 1, 2))
    return ImageSet(images, np.ascontiguousarray(labels))


_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolder(torch.utils.data.Dataset):
    """ImageNet-style folder ``root/<class>/<image>`` read lazily with PIL.

    Classes are the sorted subfolder names. Each image is converted to RGB, its shorter side
    resized to ``resize`` (bilinear) and centre-cropped to ``size`` x ``size`` (the usual
    ImageNet evaluation transform: 256 -> 224). Items are ``(uint8 tensor (3, size, size),
    label)``.
    """

    def __init__(self, root: PathLike, *, size: int = 224, resize: int | None = 256) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} is not a folder")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for c in self.classes:
            for dirpath, _, files in sorted(os.walk(self.root / c)):
                for f in sorted(files):
                    if f.lower().endswith(_IMAGE_EXTENSIONS):
                        self.samples.append((Path(dirpath) / f, self.class_to_idx[c]))
        if not self.samples:
            raise FileNotFoundError(f"no images found in class folders under {self.root}")
        self.size = size
        self.resize = resize

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            short = self.resize or self.size
            k = short / min(w, h)
            nw, nh = max(self.size, int(round(w * k))), max(self.size, int(round(h * k)))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - self.size) // 2, (nh - self.size) // 2
            im = im.crop((left, top, left + self.size, top + self.size))
            arr = np.asarray(im, dtype=np.uint8).copy()
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), label


def load_image_folder(
    root: PathLike, *, size: int = 224, resize: int | None = 256, limit: int | None = None
) -> ImageSet:
    """Read a (small) ImageNet-style folder into memory; see :class:`ImageFolder`."""
    folder = ImageFolder(root, size=size, resize=resize)
    count = len(folder) if limit is None else min(limit, len(folder))
    images = np.empty((count, 3, size, size), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    for i in range(count):
        img, lab = folder[i]
        images[i] = img.numpy()
        labels[i] = lab
    return ImageSet(images, labels, list(folder.classes))


# ---------------------------------------------------------------------------------------------
# Corrupted views
# ---------------------------------------------------------------------------------------------


def _fingerprint(images: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()[:16]


def _chunk_seed(seed: int, corruption: str, severity: int, chunk: int) -> int:
    digest = hashlib.sha256(f"{seed}/{corruption}/{severity}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class CorruptedView(torch.utils.data.Dataset):
    """A dataset seen through one (corruption, severity).

    Images are corrupted in fixed chunks of ``chunk_size`` items, each chunk with its own seed
    derived from ``(seed, corruption, severity, chunk index)``, so an item's corrupted version
    does not depend on the access order.

    Args:
        data: an :class:`ImageSet` or a pair ``(images, labels)`` of uint8 ``(N, C, H, W)``
            images (array or tensor) and labels.
        corruption: one of :data:`robustpatch.lab.corruptions.CORRUPTIONS`.
        severity: 1-5.
        seed: base seed.
        mode: ``"lazy"`` corrupts the chunk of a requested item when first needed (keeping the
            last few chunks); ``"cached"`` corrupts everything once, stored as ``.npy`` under the
            cache folder (``cache``) and reused by later views of the same data.
        scale: parameter table (``"cifar"``/``"imagenet"``), by default from the image size.
        chunk_size: items per chunk.
        device: where corruption runs (default: CUDA if available, else CPU).
        cache: cache folder for ``mode="cached"`` (``None`` = :func:`cache_dir`, ``False`` =
            keep in memory only).
    """

    def __init__(
        self,
        data: ImageSet | tuple[Any, Any],
        corruption: str,
        severity: int,
        *,
        seed: int = 0,
        mode: str = "lazy",
        scale: str | None = None,
        chunk_size: int = 256,
        device: str | torch.device | None = None,
        cache: CacheArg = None,
    ) -> None:
        from .corruptions import _check_name_severity, resolve_scale

        _check_name_severity(corruption, severity)
        if mode not in ("lazy", "cached"):
            raise ValueError(f"mode must be 'lazy' or 'cached', got {mode!r}")
        if isinstance(data, ImageSet):
            images, labels = data.images, data.labels
        else:
            images, labels = data
        if isinstance(images, torch.Tensor):
            images = images.cpu().numpy()
        if isinstance(labels, torch.Tensor):
            labels = labels.cpu().numpy()
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError("CorruptedView needs uint8 images of shape (N, C, H, W)")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        self.images = images
        self.labels = np.asarray(labels).astype(np.int64)
        self.corruption = corruption
        self.severity = int(severity)
        self.seed = int(seed)
        self.scale = resolve_scale(images.shape[2], images.shape[3], scale)
        self.chunk_size = int(chunk_size)
        self.device = default_device(device)
        self.mode = mode
        self._chunks: dict[int, np.ndarray] = {}
        self._all: np.ndarray | None = None
        if mode == "cached":
            self._all = self._materialise(cache)

    def __len__(self) -> int:
        return len(self.labels)

    def _corrupt_chunk(self, k: int) -> np.ndarray:
        from .corruptions import corrupt

        lo, hi = k * self.chunk_size, min(len(self), (k + 1) * self.chunk_size)
        batch = torch.from_numpy(np.ascontiguousarray(self.images[lo:hi])).to(self.device)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(_chunk_seed(self.seed, self.corruption, self.severity, k))
        out = corrupt(batch, self.corruption, self.severity, generator=gen, scale=self.scale)
        return out.cpu().numpy()

    def _materialise(self, cache: CacheArg) -> np.ndarray:
        def build() -> dict[str, np.ndarray]:
            n_chunks = (len(self) + self.chunk_size - 1) // self.chunk_size
            parts = [self._corrupt_chunk(k) for k in range(n_chunks)]
            out = np.concatenate(parts) if parts else self.images[:0].copy()
            return {"images": out}

        key = (
            f"corrupted-{_fingerprint(self.images)}-{self.corruption}-s{self.severity}"
            f"-seed{self.seed}-{self.scale}-c{self.chunk_size}-{self.device.type}-v{_VERSION}"
        )
        return _cached(key, build, cache)["images"]

    def _chunk(self, k: int) -> np.ndarray:
        if k not in self._chunks:
            if len(self._chunks) >= 4:
                self._chunks.pop(next(iter(self._chunks)))
            self._chunks[k] = self._corrupt_chunk(k)
        return self._chunks[k]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        if self._all is not None:
            img = self._all[index]
        else:
            k = index // self.chunk_size
            img = self._chunk(k)[index - k * self.chunk_size]
        return torch.from_numpy(np.array(img)), int(self.labels[index])

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate over (uint8 images, labels) chunk by chunk, in order."""
        n_chunks = (len(self) + self.chunk_size - 1) // self.chunk_size
        for k in range(n_chunks):
            lo, hi = k * self.chunk_size, min(len(self), (k + 1) * self.chunk_size)
            imgs = self._all[lo:hi] if self._all is not None else self._corrupt_chunk(k)
            yield torch.from_numpy(np.array(imgs)), torch.from_numpy(self.labels[lo:hi])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All corrupted images (uint8 tensor) and labels."""
        if self._all is not None:
            return torch.from_numpy(np.array(self._all)), torch.from_numpy(self.labels)
        parts = [b[0] for b in self.batches()]
        return torch.cat(parts), torch.from_numpy(self.labels)
