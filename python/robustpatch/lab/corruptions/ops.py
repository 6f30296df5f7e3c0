"""The 19 corruptions, each ``(x, parameters, random source, table) -> x`` on unit-float
batches, and :data:`_FUNCS`, their dispatch table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .kernels import (
    _filter2d,
    _fold,
    _gaussian,
    _pil_box_matrix_np,
    _Random,
    _sep,
    _t,
    _to_gray,
    _zoom_matrix_np,
)
from .tables import _FROST_PALETTES, _GRAY_SK

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------


def _gaussian_noise(x: Tensor, c: float, rng: _Random, scale: str) -> Tensor:
    return x + c * rng.randn(*x.shape)


def _shot_noise(x: Tensor, c: float, rng: _Random, scale: str) -> Tensor:
    return rng.poisson(x * c) / c


def _impulse_noise(x: Tensor, c: float, rng: _Random, scale: str) -> Tensor:
    # salt & pepper on every value independently: a fraction c flipped, half to 1, half to 0
    u = rng.rand(*x.shape)
    x = torch.where(u < c, (u < 0.5 * c).to(x.dtype), x)
    return x


def _speckle_noise(x: Tensor, c: float, rng: _Random, scale: str) -> Tensor:
    return x + x * (c * rng.randn(*x.shape))


# ---------------------------------------------------------------------------------------------
# Blur
# ---------------------------------------------------------------------------------------------


def _gaussian_blur(x: Tensor, c: float, rng: _Random, scale: str) -> Tensor:
    return _gaussian(x, c)


def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The reference's anti-aliased disk: a binary disk smoothed by a small Gaussian."""
    if radius <= 8:
        grid = np.arange(-8, 9)
        ksize = 3
    else:
        grid = np.arange(-int(radius), int(radius) + 1)
        ksize = 5
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    disk /= disk.sum()
    # cv2.GaussianBlur(ksize, sigma) with its default BORDER_REFLECT_101
    t = np.arange(ksize) - (ksize - 1) / 2
    g = np.exp(-(t**2) / (2 * alias_blur**2))
    g /= g.sum()
    n = disk.shape[0]
    mat = np.zeros((n, n))
    idx = _fold(np.arange(n)[:, None] + (np.arange(ksize) - ksize // 2)[None, :], n, "mirror")
    for i in range(n):
        np.add.at(mat[i], idx[i], g)
    kernel = mat @ disk @ mat.T
    # crop to the non-zero support (exact: the cropped entries are zero)
    nz_r = np.flatnonzero(np.abs(kernel).sum(axis=1) > 0)
    nz_c = np.flatnonzero(np.abs(kernel).sum(axis=0) > 0)
    r = max(abs(int(nz_r[0]) - n // 2), abs(int(nz_r[-1]) - n // 2))
    cc = max(abs(int(nz_c[0]) - n // 2), abs(int(nz_c[-1]) - n // 2))
    return kernel[n // 2 - r : n // 2 + r + 1, n // 2 - cc : n // 2 + cc + 1]


def _defocus_blur(x: Tensor, c: tuple, rng: _Random, scale: str) -> Tensor:
    kernel = torch.as_tensor(_disk_kernel(*c), dtype=x.dtype, device=x.device)
    return _filter2d(x, kernel, "mirror")


@lru_cache(maxsize=32)
def _glass_schedule(h: int, w: int, delta: int) -> tuple[np.ndarray, np.ndarray]:
    """Wavefronts that run the reference's sequential pixel scan in parallel, exactly.

    The reference visits interior pixels (rows and columns ``delta+1 .. size-delta``) in
    reverse raster order and exchanges each with the pixel at an offset in [-delta, delta).
    A step only touches a 2*delta-wide window around its pixel, and steps with disjoint
    windows commute. Wavefront ``s = 2*delta*(h - row) + (w - col)`` orders every pair of
    overlapping windows as the scan does and never puts two overlapping windows in the same
    wavefront, so executing the wavefronts in order, each at once, gives the scan's result.

    Returns the flat pixel indices sorted by wavefront and the wavefront boundaries.
    """
    a = 2 * delta
    rows = np.arange(delta + 1, h - delta + 1)
    cols = np.arange(delta + 1, w - delta + 1)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    step = (a * (h - rr) + (w - cc)).ravel()
    flat = (rr * w + cc).ravel()
    order = np.argsort(step, kind="stable")
    step, flat = step[order], flat[order]
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(step)) + 1, [step.size]])
    return flat, bounds


def _glass_shuffle(x: Tensor, delta: int, dy: Tensor, dx: Tensor) -> Tensor:
    """One pass of the reference's local pixel "swaps", with given offsets.

    The reference writes ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on an (H, W, 3) array:
    the right-hand side holds numpy *views*, so pixel (h, w) receives the neighbour's value
    and the neighbour keeps its own -- a sequential copy, not a swap. That is what the
    published benchmark data contains, and what is reproduced here. ``dy``/``dx`` are
    ``(N, H, W)`` integer offsets in [-delta, delta) used at the interior pixels.
    """
    n, ch, h, w = x.shape
    hw = h * w
    positions, bounds = _glass_schedule(h, w, int(delta))
    pos = torch.as_tensor(positions, device=x.device)
    image_base = (torch.arange(n, device=x.device) * hw).view(1, n)
    # pixel indices into the (n * h * w) pixels, wavefront-major: (M, n)
    dst = pos.view(-1, 1) + image_base
    offset = (dy * w + dx).reshape(n, hw)[:, pos].transpose(0, 1)
    src = dst + offset
    chan = torch.arange(ch, device=x.device)
    # flat element indices into the (n, h, w, ch) table, wavefront-major
    dst = (dst.reshape(-1, 1) * ch + chan).reshape(-1)
    src = (src.reshape(-1, 1) * ch + chan).reshape(-1)
    table = x.permute(0, 2, 3, 1).reshape(-1).clone()
    k = n * ch
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        table.index_copy_(0, dst[lo * k : hi * k], table.index_select(0, src[lo * k : hi * k]))
    return table.reshape(n, h, w, ch).permute(0, 3, 1, 2).contiguous()


def _glass_blur_offsets(
    x: Tensor, sigma: float, delta: int, offsets: Sequence[tuple[Tensor, Tensor]]
) -> Tensor:
    """Glass blur with given per-pass offsets ``[(dy, dx), ...]``, each ``(N, H, W)``."""
    x = _gaussian(x, sigma)
    x = torch.floor(x.clamp(0, 1) * 255.0 + 1e-4) / 255.0  # the reference's np.uint8 step
    for dy, dx in offsets:
        x = _glass_shuffle(x, int(delta), dy, dx)
    return _gaussian(x, sigma)


def _glass_blur(x: Tensor, c: tuple, rng: _Random, scale: str) -> Tensor:
    sigma, delta, iterations = c
    n, _, h, w = x.shape
    offsets = []
    for _ in range(int(iterations)):
        dx = rng.randint(-delta, delta, n, h, w)
        dy = rng.randint(-delta, delta, n, h, w)
        offsets.append((dy, dx))
    return _glass_blur_offsets(x, sigma, delta, offsets)


def _motion_kernel(radius: int, sigma: float) -> np.ndarray:
    width = 2 * int(radius) + 1
    k = np.exp(-(np.arange(width) ** 2) / (2.0 * sigma**2))
    k /= k.sum()
    # taps below 1e-7 of the first change no output level; skip them
    return k[k >= k[0] * 1e-7]


def _motion_blur_angles(x: Tensor, radius: int, sigma: float, angles_deg: Tensor) -> Tensor:
    """Shift-and-add motion blur (ImageMagick's kernel) with one angle per image."""
    n, ch, h, w = x.shape
    kernel = _motion_kernel(radius, sigma)
    rad = angles_deg.to(torch.float64) * (math.pi / 180.0)
    sin, cos = torch.sin(rad), torch.cos(rad)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    flat = x.reshape(n, ch, h * w)
    out = torch.zeros_like(flat)
    alive = torch.ones(n, dtype=torch.bool, device=x.device)
    for i, k in enumerate(kernel):
        oy = torch.ceil(i * sin - 0.5).to(torch.int64)
        ox = torch.ceil(i * cos - 0.5).to(torch.int64)
        # the reference stops adding copies once a shift leaves the image
        alive = alive & (oy.abs() < h) & (ox.abs() < w)
        r = (rows.view(1, h) + oy.view(n, 1)).clamp(0, h - 1)
        cc = (cols.view(1, w) + ox.view(n, 1)).clamp(0, w - 1)
        index = (r[:, :, None] * w + cc[:, None, :]).reshape(n, 1, h * w)
        shifted = torch.gather(flat, 2, index.expand(n, ch, h * w))
        weight = float(k) * alive.to(x.dtype).view(n, 1, 1)
        out = out + weight * shifted
    return out.reshape(n, ch, h, w)


def _motion_blur(x: Tensor, c: tuple, rng: _Random, scale: str) -> Tensor:
    radius, sigma = c
    angles = rng.uniform(-45.0, 45.0, x.shape[0])
    return _motion_blur_angles(x, radius, sigma, angles)


def _zoom_factors(spec: tuple) -> np.ndarray:
    return np.arange(*spec)


def _zoom_blur(x: Tensor, c: tuple, rng: _Random, scale: str) -> Tensor:
    h, w = x.shape[-2:]
    factors = _zoom_factors(c)
    out = x.clone()
    for z in factors:
        out += _sep(x, _t(_zoom_matrix_np(h, float(z)), x), _t(_zoom_matrix_np(w, float(z)), x))
    return out / (len(factors) + 1)


# ---------------------------------------------------------------------------------------------
# Weather
# ---------------------------------------------------------------------------------------------


def _snow(x: Tensor, c: tuple, rng: _Random, scale: str) -> Tensor:
    loc, std, zoom, threshold, radius, sigma, weight = c
    n, ch, h, w = x.shape
    layer = loc + std * rng.randn(n, 1, h, w)
    layer = _sep(
        layer, _t(_zoom_matrix_np(h, float(zoom)), x), _t(_zoom_matrix_np(w, float(zoom)), x)
    )
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer).clamp(0, 1)
    angles = rng.uniform(-135.0, -45.0, n)
    layer = _motion_blur_angles(layer, radius, sigma, angles)
    layer = torch.round(layer * 255.0) / 255.0
    gray = _to_gray(x)
    x = weight * x + (1 - weight) * torch.maximum(x, gray * 1.5 + 0.5)
    return x + layer + torch.flip(layer, dims=(-2, -1))


def _value_noise(n: int, h: int, w: int, cell: float, rng: _Random, like: Tensor) -> Tensor:
    """Smooth zero-mean noise with feature size ``cell`` pixels (bicubic random lattice)."""
    gh = int(h / cell) + 5
    gw = int(w / cell) + 5
    lattice = rng.randn(n, 1, gh, gw).to(like.dtype)
    shift = rng.rand(n, 1, 1, 2).to(like.dtype)  # random sub-cell offset per image
    ys = ((torch.arange(h, device=like.device, dtype=like.dtype) + 0.5) / cell + 1.0).view(1, h, 1)
    xs = ((torch.arange(w, device=like.device, dtype=like.dtype) + 0.5) / cell + 1.0).view(1, 1, w)
    gx = (xs + shift[..., 0]) / (gw - 1) * 2 - 1
    gy = (ys + shift[..., 1]) / (gh - 1) * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)
    return F.grid_sample(lattice, grid, mode="bicubic", padding_mode="border", align_corners=True)


def _frost_texture(n: int, h: int, w: int, scale: str, rng: _Random, like: Tensor) -> Tensor:
    """Procedural frost: cloudy noise, ridge lines and needles, coloured like the photos.

    The benchmark crops frost photographs (at 1x for ImageNet-C, at 0.2x for CIFAR-10-C).
    Sizes below are in photograph pixels and converted with that factor, so the texture has
    the same scale relative to the image as the photographs.
    """
    photo_px = 5.0 if scale == "cifar" else 1.0  # photograph pixels per image pixel
    t = torch.zeros(n, 1, h, w, dtype=like.dtype, device=like.device)
    # cloudy base
    for cell in (192.0, 96.0, 48.0):
        t = t + 0.6 * _value_noise(n, h, w, cell / photo_px, rng, like)
    # thin bright crystal edges: ridges of mid-scale noise
    for cell in (32.0, 16.0):
        size = cell / photo_px
        if size >= 1.0:
            v = _value_noise(n, h, w, size, rng, like)
            t = t + 0.9 * (1.0 - v.abs().clamp(max=1.0)) ** 6
    # needles: sparse seeds smeared along three directions per image
    length = int(round(28 / photo_px))
    if length >= 2:
        for _ in range(3):
            seeds = (rng.rand(n, 1, h, w) < 0.012).to(like.dtype)
            angles = rng.uniform(-180.0, 180.0, n)
            t = t + 5.0 * _motion_blur_angles(seeds, length, length / 1.2, angles)
    else:
        t = t + 0.5 * rng.randn(n, 1, h, w)
    t = t - t.mean(dim=(2, 3), keepdim=True)
    t = t / t.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    palettes = torch.as_tensor(_FROST_PALETTES[scale], dtype=like.dtype, device=like.device)
    pick = palettes[rng.randint(0, len(palettes), n)]  # (n, 2, 3)
    mean = pick[:, 0].view(n, 3, 1, 1)
    std = pick[:, 1].view(n, 3, 1, 1)
    return (mean + std * t).clamp(0, 1)


def _frost(x: Tensor, c: tuple, rng: _Random, scale: str) -> Tensor:
    img_w, frost_w = c
    n, ch, h, w = x.shape
    frost = _frost_texture(n, h, w, scale, rng, x)
    if ch == 1:
        frost = _to_gray(frost, _GRAY_SK)
    return img_w * x + frost_w * frost


def _plasma_fractal(n: int, mapsize: int, decay: float, rng: _Random, like: Tensor) -> Tensor:
    """Diamond-square height maps in [0, 1], one per image (the reference's algorithm)."""
    m = torch.zeros(n, mapsize, mapsize, dtype=torch.float64, device=like.device)
    step = mapsize
    wibble = 100.0

    def wibbled(a: Tensor) -> Tensor:
        noise = rng.uniform(-wibble, wibble, *a.shape).to(torch.float64)
        return a / 4 + wibble * noise

    while step >= 2:
        half = step // 2
        corner = m[:, 0::step, 0::step]
        sq = corner + torch.roll(corner, -1, dims=1)
        sq = sq + torch.roll(sq, -1, dims=2)
        m[:, half::step, half::step] = wibbled(sq)
        dr = m[:, half::step, half::step]
        ul = m[:, 0::step, 0::step]
        lt = dr + torch.roll(dr, 1, dims=1) + ul + torch.roll(ul, -1, dims=2)
        m[:, 0::step, half::step] = wibbled(lt)
        tt = dr + torch.roll(dr, 1, dims=2) + ul + torch.roll(ul, -1, dims=1)
        m[:, half::step, 0::step] = wibbled(tt)
        step //= 2
        wibble /= decay
    flat = m.reshape(n, -1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    flat = flat / flat.max(dim=1, keepdim=True).values.clamp_min(1e-12)
    return flat.reshape(n, mapsize, mapsize).to(like.dtype)


def _fog(x: Tensor, c: tuple, rng: _Random, scale: str) -> Tensor:
    strength, decay = c
    n, ch, h, w = x.shape
    mapsize = 1 << max(1, (max(h, w) - 1).bit_length())
    plasma = _plasma_fractal(n, mapsize, decay, rng, x)[:, None, :h, :w]
    max_val = x.amax(dim=(1, 2, 3), keepdim=True)
    x = x + strength * plasma
    return x * max_val / (max_val + strength)


def _brightness(x: Tensor, c: float, rng: _Random, scale: str) -> Tensor:
    # HSV value + c, clipped: hue and saturation fixed, so RGB scales with the new value
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp(max=1.0)
    ratio = torch.where(v > 0, v_new / v.clamp_min(1e-12), torch.zeros_like(v))
    return torch.where(v > 0, x * ratio, v_new.expand_as(x))


# ---------------------------------------------------------------------------------------------
# Digital
# ---------------------------------------------------------------------------------------------


def _contrast(x: Tensor, c: float, rng: _Random, scale: str) -> Tensor:
    means = x.mean(dim=(2, 3), keepdim=True)
    return (x - means) * c + means


def _saturate(x: Tensor, c: tuple, rng: _Random, scale: str) -> Tensor:
    factor, offset = c
    if x.shape[1] == 1:  # a grey image keeps its value (hue 0, the reference's channel 0)
        return x
    v = x.amax(dim=1, keepdim=True)
    mn = x.amin(dim=1, keepdim=True)
    delta = v - mn
    chroma = delta > 0
    s = torch.where(chroma, delta / v.clamp_min(1e-12), torch.zeros_like(v))
    s_new = (s * factor + offset).clamp(0, 1)
    # for fixed hue and value each channel is v * (1 - s * g(hue)): rescale v - channel
    coloured = v - (v - x) * (s_new / s.clamp_min(1e-12))
    # hue 0 for grey pixels: red stays at v, green and blue drop to v * (1 - s_new)
    grey = torch.cat([v, v * (1 - s_new), v * (1 - s_new)], dim=1)
    return torch.where(chroma, coloured, grey)


def _elastic_transform(x: Tensor, c: tuple, rng: _Random, scale: str) -> Tensor:
    alpha, sigma, jitter = c
    n, ch, h, w = x.shape
    dev, dt = x.device, x.dtype
    # random affine from three points around the centre (cv2.getAffineTransform/warpAffine)
    center = torch.tensor([h // 2, w // 2], dtype=torch.float64, device=dev)
    sq = float(min(h, w) // 3)
    pts1 = torch.stack(
        [center + sq, torch.stack([center[0] + sq, center[1] - sq]), center - sq]
    )  # (3, 2) points (x, y) as the reference builds them
    pts2 = pts1.unsqueeze(0) + rng.uniform(-jitter, jitter, n, 3, 2).to(torch.float64)
    src = torch.cat([pts1, torch.ones(3, 1, dtype=torch.float64, device=dev)], dim=1)
    affine = torch.linalg.solve(src.unsqueeze(0).expand(n, 3, 3), pts2).transpose(1, 2)  # (n,2,3)
    a, b = affine[:, :, :2], affine[:, :, 2:]
    a_inv = torch.linalg.inv(a)
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64, device=dev),
        torch.arange(w, dtype=torch.float64, device=dev),
        indexing="ij",
    )
    dst = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=0).unsqueeze(0) - b  # (n, 2, hw)
    srcxy = torch.matmul(a_inv, dst)  # (n, 2, hw) source (x, y)
    gx = srcxy[:, 0] / max(w - 1, 1) * 2 - 1
    gy = srcxy[:, 1] / max(h - 1, 1) * 2 - 1
    grid = torch.stack([gx, gy], dim=-1).reshape(n, h, w, 2).to(dt)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    # smooth random displacement field, then map_coordinates (order 1, mode 'reflect')
    field = rng.uniform(-1.0, 1.0, n, 2, h, w)
    field = _gaussian(field, sigma, mode="reflect", truncate=3.0) * alpha
    dx, dy = field[:, 0], field[:, 1]
    px = xs.to(dt).unsqueeze(0) + dx
    py = ys.to(dt).unsqueeze(0) + dy
    grid = torch.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _round8(x: Tensor) -> Tensor:
    return torch.floor(x.clamp(0, 1) * 255.0 + 0.5) / 255.0


def _pil_box_resize(x: Tensor, out_h: int, out_w: int) -> Tensor:
    """PIL ``resize(BOX)`` on 8-bit images: horizontal pass, round, vertical pass, round."""
    h, w = x.shape[-2:]
    x = _round8(torch.matmul(x, _t(_pil_box_matrix_np(w, out_w), x).transpose(0, 1)))
    return _round8(torch.matmul(_t(_pil_box_matrix_np(h, out_h), x), x))


def _pixelate(x: Tensor, c: float, rng: _Random, scale: str) -> Tensor:
    h, w = x.shape[-2:]
    x = _round8(x)
    small = _pil_box_resize(x, max(1, int(h * c)), max(1, int(w * c)))
    return _pil_box_resize(small, h, w)


_JPEG_LUMA = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.int64,
)
_JPEG_CHROMA = np.full((8, 8), 99, dtype=np.int64)
_JPEG_CHROMA[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]


def _jpeg_table(base: np.ndarray, quality: int) -> np.ndarray:
    """libjpeg's quality scaling of a base table (baseline: entries clamped to 1..255)."""
    q = min(max(int(quality), 1), 100)
    s = 5000 // q if q < 50 else 200 - 2 * q
    return np.clip((base * s + 50) // 100, 1, 255)


@lru_cache(maxsize=1)
def _dct_matrix() -> np.ndarray:
    k = np.arange(8)
    mat = np.cos((2 * k[None, :] + 1) * k[:, None] * np.pi / 16) * np.sqrt(2 / 8)
    mat[0] /= np.sqrt(2)
    return mat


def _jpeg_plane(plane: Tensor, table: np.ndarray) -> Tensor:
    """Level-shifted DCT, quantise, dequantise, IDCT of one plane (n, 1, H, W), H, W % 8 == 0."""
    n, _, h, w = plane.shape
    d = _dct_matrix()
    kron = _t(np.kron(d, d), plane)  # 2-D DCT of a row-major 8x8 block as one 64x64 product
    q = _t(table.astype(np.float64).reshape(64), plane)
    blocks = (plane - 128.0).reshape(n, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4).reshape(-1, 64)
    coef = blocks @ kron.T
    quant = torch.sign(coef) * torch.floor(coef.abs() / q + 0.5)  # round half away from zero
    rec = (quant * q) @ kron
    rec = rec.reshape(n, h // 8, w // 8, 8, 8).permute(0, 1, 3, 2, 4).reshape(n, 1, h, w)
    return rec + 128.0


def _round_half_up(x: Tensor) -> Tensor:
    """libjpeg's fixed-point rounding (adds one half, truncates)."""
    return torch.floor(x + 0.5)


def _jpeg_compression(x: Tensor, c: int, rng: _Random, scale: str) -> Tensor:
    n, ch, h, w = x.shape
    luma_t = _jpeg_table(_JPEG_LUMA, c)
    chroma_t = _jpeg_table(_JPEG_CHROMA, c)
    v = torch.floor(x.clamp(0, 1) * 255.0 + 0.5)
    if ch == 1:
        ph, pw = -h % 8, -w % 8
        y = F.pad(v, (0, pw, 0, ph), mode="replicate")
        y = _jpeg_plane(y, luma_t)[:, :, :h, :w]
        return _round_half_up(y).clamp(0, 255) / 255.0
    # pad to whole 16x16 MCUs by repeating the last row / column, as libjpeg does
    v = F.pad(v, (0, -w % 16, 0, -h % 16), mode="replicate")
    r, g, b = v[:, 0:1], v[:, 1:2], v[:, 2:3]
    y = _round_half_up(0.299 * r + 0.587 * g + 0.114 * b)
    cb = _round_half_up(-0.168735892 * r - 0.331264108 * g + 0.5 * b + 128.0).clamp(0, 255)
    cr = _round_half_up(0.5 * r - 0.418687589 * g - 0.081312411 * b + 128.0).clamp(0, 255)
    cb = _round_half_up(F.avg_pool2d(cb, 2))
    cr = _round_half_up(F.avg_pool2d(cr, 2))
    y = _round_half_up(_jpeg_plane(y, luma_t)).clamp(0, 255)
    cb = _round_half_up(_jpeg_plane(cb, chroma_t)).clamp(0, 255)
    cr = _round_half_up(_jpeg_plane(cr, chroma_t)).clamp(0, 255)
    # "fancy" triangular upsampling = bilinear with half-pixel centres
    cb = F.interpolate(cb, scale_factor=2, mode="bilinear", align_corners=False) - 128.0
    cr = F.interpolate(cr, scale_factor=2, mode="bilinear", align_corners=False) - 128.0
    r = y + 1.402 * cr
    g = y - 0.344136286 * cb - 0.714136286 * cr
    b = y + 1.772 * cb
    rgb = torch.cat([r, g, b], dim=1)[:, :, :h, :w]
    return _round_half_up(rgb).clamp(0, 255) / 255.0


# ---------------------------------------------------------------------------------------------
# Spatter
# ---------------------------------------------------------------------------------------------


def _shift(x: Tensor, dy: int, dx: int, fill: float) -> Tensor:
    """out[y, x] = in[y + dy, x + dx], ``fill`` outside."""
    h, w = x.shape[-2:]
    p = max(abs(dy), abs(dx))
    xp = F.pad(x, (p, p, p, p), value=fill)
    return xp[..., p + dy : p + dy + h, p + dx : p + dx + w]


def _truncated_distance(edges: Tensor, limit: float = 20.0) -> Tensor:
    """Chamfer (1, sqrt 2) distance to the nearest edge pixel, capped at ``limit``."""
    big = limit + 10.0
    d = torch.where(
        edges,
        torch.zeros_like(edges, dtype=torch.float32),
        torch.full_like(edges, big, dtype=torch.float32),
    )
    steps = [(dy, dx, math.hypot(dy, dx)) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    for _ in range(int(limit) + 1):
        best = d
        for dy, dx, cost in steps:
            best = torch.minimum(best, _shift(d, dy, dx, big) + cost)
        d = best
    return d.clamp(max=limit)


def _equalize_hist(v: Tensor) -> Tensor:
    """cv2.equalizeHist per image on integer-valued (n, 1, H, W) tensors in 0..255."""
    n = v.shape[0]
    idx = v.reshape(n, -1).to(torch.int64)
    hist = torch.zeros(n, 256, dtype=torch.float64, device=v.device)
    hist.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    total = hist.sum(dim=1, keepdim=True)
    first = torch.argmax((hist > 0).to(torch.int64), dim=1, keepdim=True)
    h_first = hist.gather(1, first)
    cdf = torch.cumsum(hist, dim=1) - h_first
    denom = (total - h_first).clamp_min(1.0)
    lut = torch.round(cdf * (255.0 / denom)).clamp(0, 255)
    lut = torch.where(torch.arange(256, device=v.device)[None, :] <= first, 0.0, lut)
    lut = torch.where(total == h_first, first.to(lut.dtype).expand_as(lut), lut)
    return lut.gather(1, idx).reshape(v.shape).to(v.dtype)


def _spatter(x: Tensor, c: tuple, rng: _Random, scale: str) -> Tensor:
    loc, std, sigma, threshold, intensity, mode = c
    n, ch, h, w = x.shape
    liquid = loc + std * rng.randn(n, 1, h, w)
    liquid = _gaussian(liquid, sigma)
    liquid = torch.where(liquid < threshold, torch.zeros_like(liquid), liquid)
    if mode == 0:  # water drops with a bright, embossed rim
        l8 = torch.floor(liquid.clamp(0, 1) * 255.0)
        mask = l8 > 0
        # Canny's edges on this thresholded layer sit on the rim of the liquid: take the
        # inner boundary (pixels with a 4-neighbour outside the liquid)
        cross = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=x.dtype, device=x.device)
        inner = _filter2d(mask.to(x.dtype), cross, "nearest") > 4.5
        edges = mask & ~inner
        dist = _truncated_distance(edges)
        box = torch.full((3, 3), 1.0 / 9.0, dtype=x.dtype, device=x.device)
        dist = torch.floor(_filter2d(dist, box, "mirror"))
        dist = _equalize_hist(dist)
        emboss = torch.tensor([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=x.dtype)
        dist = torch.round(_filter2d(dist, emboss.to(x.device), "mirror")).clamp(0, 255)
        dist = _filter2d(dist, box, "mirror")
        m = l8 * dist
        m = m / m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12) * intensity
        color = torch.tensor([175.0, 238.0, 238.0], dtype=x.dtype, device=x.device) / 255.0
        add = m * color.view(1, 3, 1, 1)
        if ch == 1:
            add = _to_gray(add.clamp(0, 1), _GRAY_SK)
        return x + add
    # mud
    m = (liquid > threshold).to(x.dtype)
    m = _gaussian(m, intensity)
    m = torch.where(m < 0.8, torch.zeros_like(m), m)
    color = torch.tensor([63.0, 42.0, 20.0], dtype=x.dtype, device=x.device) / 255.0
    mud = m * color.view(1, 3, 1, 1)
    if ch == 1:
        mud = _to_gray(mud, _GRAY_SK)
    return x * (1 - m) + mud


_FUNCS: dict[str, Callable[[Tensor, Any, _Random, str], Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
    "spatter": _spatter,
    "saturate": _saturate,
}
