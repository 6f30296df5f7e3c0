"""What every corruption rests on: unit-float conversion, the seeded random source, and
cached 1-D linear operators applied separably (Gaussian, zoom, box resize, filters)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .tables import _GRAY

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# Input / output and randomness
# ---------------------------------------------------------------------------------------------


#: Float images above this are not [0, 1] images (0..255 floats, say): a corruption clamps
#: its output to [0, 1], so they would come out nearly all white. Slack for rounding.
_UNIT_SLACK = 1.01


def _warn_if_not_unit(xf: Tensor) -> None:
    if xf.numel() and float(xf.max()) > _UNIT_SLACK:
        warnings.warn(
            f"float images should lie in [0, 1], got a maximum of {float(xf.max()):g}: the "
            "corrupted output is clamped to [0, 1] (for 0..255 values pass uint8 or divide "
            "by 255)",
            UserWarning,
            stacklevel=4,
        )


def _to_unit_float(images: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"images must be a torch.Tensor (N, C, H, W), got {type(images).__name__}; "
            "wrap numpy arrays with torch.from_numpy and move channels first"
        )
    squeeze = images.ndim == 3
    x = images.unsqueeze(0) if squeeze else images
    if x.ndim != 4:
        raise ValueError(
            f"images must have shape (N, C, H, W) or (C, H, W), got {tuple(images.shape)}"
        )
    if x.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels (dim 1), got {x.shape[1]}")
    if x.shape[2] < 8 or x.shape[3] < 8:
        raise ValueError(f"images must be at least 8x8 pixels, got {tuple(x.shape[2:])}")
    dtype = images.dtype
    if dtype == torch.uint8:
        xf = x.to(torch.float32) / 255.0
    elif dtype.is_floating_point:
        xf = x.to(torch.float32)
        _warn_if_not_unit(xf)
    else:
        raise TypeError(f"images must be uint8 or floating point, got {dtype}")

    def restore(y: Tensor) -> Tensor:
        y = y.clamp(0.0, 1.0)
        if dtype == torch.uint8:
            # Truncate like the reference's np.uint8(float image); the tiny offset keeps
            # values that are exact integers in float64 from dropping a level in float32.
            y = torch.floor(y * 255.0 + 1e-3).clamp_(0, 255).to(torch.uint8)
        else:
            y = y.to(dtype)
        return y[0] if squeeze else y.contiguous()

    return xf.contiguous(), restore


class _Random:
    """Draws every random number of a corruption from one generator."""

    def __init__(
        self, device: torch.device, seed: int | None, generator: torch.Generator | None
    ) -> None:
        if generator is None and seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(int(seed))
        self.gen = generator
        self.gen_device = generator.device if generator is not None else device
        self.device = device

    def rand(self, *shape: int) -> Tensor:
        out = torch.rand(shape, generator=self.gen, device=self.gen_device)
        return out.to(self.device)

    def randn(self, *shape: int) -> Tensor:
        out = torch.randn(shape, generator=self.gen, device=self.gen_device)
        return out.to(self.device)

    def uniform(self, low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * self.rand(*shape)

    def randint(self, low: int, high: int, *shape: int) -> Tensor:
        out = torch.randint(low, high, shape, generator=self.gen, device=self.gen_device)
        return out.to(self.device)

    def poisson(self, rates: Tensor) -> Tensor:
        out = torch.poisson(rates.to(self.gen_device), generator=self.gen)
        return out.to(self.device)


# ---------------------------------------------------------------------------------------------
# Linear-operator helpers (cached 1-D matrices applied separably)
# ---------------------------------------------------------------------------------------------


def _fold(idx: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Map out-of-range indices back into [0, n) following a boundary mode."""
    if mode == "nearest":  # a a a | a b c d | d d d
        return np.clip(idx, 0, n - 1)
    if mode == "reflect":  # scipy 'reflect': d c b a | a b c d | d c b a
        period = 2 * n
        idx = np.mod(idx, period)
        return np.where(idx >= n, period - 1 - idx, idx)
    if mode == "mirror":  # OpenCV BORDER_REFLECT_101: d c b | a b c d | c b a
        if n == 1:
            return np.zeros_like(idx)
        period = 2 * n - 2
        idx = np.mod(idx, period)
        return np.where(idx >= n, period - idx, idx)
    raise ValueError(mode)


@lru_cache(maxsize=256)
def _gauss_matrix_np(n: int, sigma: float, mode: str, truncate: float) -> np.ndarray:
    """(n, n) matrix of scipy's gaussian_filter1d with the given boundary mode."""
    mat = np.zeros((n, n))
    if sigma <= 0:
        np.fill_diagonal(mat, 1.0)
        return mat
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    rows = np.repeat(np.arange(n), offsets.size)
    cols = _fold((np.arange(n)[:, None] + offsets[None, :]).ravel(), n, mode)
    np.add.at(mat, (rows, cols), np.tile(weights, n))
    return mat


@lru_cache(maxsize=256)
def _zoom_matrix_np(n: int, factor: float) -> np.ndarray:
    """(n, n) matrix of the reference's centre crop + scipy zoom (order 1) + centre trim."""
    crop = int(math.ceil(n / factor))
    top = (n - crop) // 2
    out = int(round(crop * factor))
    trim = (out - n) // 2
    o = np.arange(n) + trim
    coord = o * (crop - 1) / (out - 1) if out > 1 else np.zeros(n)
    coord = coord + top
    i0 = np.floor(coord).astype(np.int64)
    w = coord - i0
    i0 = np.clip(i0, 0, n - 1)
    i1 = np.clip(i0 + 1, 0, n - 1)
    mat = np.zeros((n, n))
    np.add.at(mat, (np.arange(n), i0), 1.0 - w)
    np.add.at(mat, (np.arange(n), i1), w)
    return mat


@lru_cache(maxsize=256)
def _pil_box_matrix_np(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of PIL's BOX resampling (area weights, PIL's support rule)."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    mat = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        for j in range(lo, hi):
            t = (j - center + 0.5) / filterscale
            mat[i, j] = 1.0 if -0.5 < t <= 0.5 else 0.0
        total = mat[i].sum()
        if total > 0:
            mat[i] /= total
    return mat


def _t(mat: np.ndarray, like: Tensor) -> Tensor:
    return torch.as_tensor(mat, dtype=like.dtype, device=like.device)


def _sep(x: Tensor, mat_h: Tensor, mat_w: Tensor) -> Tensor:
    """Apply ``mat_h`` along H and ``mat_w`` along W: ``mat_h @ x @ mat_w.T``."""
    return torch.matmul(torch.matmul(mat_h, x), mat_w.transpose(0, 1))


def _gaussian(x: Tensor, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> Tensor:
    """Gaussian blur of every channel (skimage.filters.gaussian semantics)."""
    if sigma <= 0:
        return x
    h, w = x.shape[-2:]
    mh = _t(_gauss_matrix_np(h, float(sigma), mode, truncate), x)
    mw = mh if w == h else _t(_gauss_matrix_np(w, float(sigma), mode, truncate), x)
    return _sep(x, mh, mw)


def _pad(x: Tensor, ph: int, pw: int, mode: str) -> Tensor:
    """Pad H by ``ph`` and W by ``pw`` on both sides with a boundary mode (any size)."""
    h, w = x.shape[-2:]
    rows = torch.as_tensor(_fold(np.arange(-ph, h + ph), h, mode), device=x.device)
    cols = torch.as_tensor(_fold(np.arange(-pw, w + pw), w, mode), device=x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def _filter2d(x: Tensor, kernel: Tensor, mode: str = "mirror") -> Tensor:
    """Correlate every channel with a 2-D kernel (cv2.filter2D semantics, odd kernel).

    Kernels of 5x5 and more go through an FFT of the padded image (faster than a grouped
    convolution on CPU, equal to float precision).
    """
    kh, kw = kernel.shape
    n, c, h, w = x.shape
    xp = _pad(x, kh // 2, kw // 2, mode)
    kernel = kernel.to(x)
    if kh * kw >= 25:
        size = xp.shape[-2:]
        spectrum = torch.fft.rfft2(torch.flip(kernel, (0, 1)), s=size)
        y = torch.fft.irfft2(torch.fft.rfft2(xp) * spectrum, s=size)
        return y[..., kh - 1 : kh - 1 + h, kw - 1 : kw - 1 + w].contiguous()
    weight = kernel.reshape(1, 1, kh, kw).expand(c, 1, kh, kw)
    return F.conv2d(xp, weight, groups=c)


def _to_gray(x: Tensor, weights: Sequence[float] = _GRAY) -> Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = weights
    return r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:3]
