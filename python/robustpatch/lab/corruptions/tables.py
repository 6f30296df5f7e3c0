"""The published parameter tables of ``make_cifar_c.py`` ("cifar") and ``make_imagenet_c.py``
("imagenet"), and the numbers the procedural frost and the gray conversions use."""

from __future__ import annotations

_E = 32.0  # CIFAR elastic parameters are given in units of the image size 32
_I = 244.0  # ImageNet elastic parameters are given in units of 244 (sic, see make_imagenet_c.py)


def _by_scale(*rows: tuple) -> dict[str, tuple]:
    """A table written one line per severity (or photograph): (CIFAR values, ImageNet values)."""
    return {"cifar": tuple(c for c, _ in rows), "imagenet": tuple(i for _, i in rows)}


def _in_pixels(table: dict[str, tuple]) -> dict[str, tuple]:
    """Elastic parameters given in units of the image size, in pixels."""
    units = {"cifar": _E, "imagenet": _I}
    return {k: tuple(tuple(units[k] * v for v in row) for row in rows) for k, rows in table.items()}


# Published parameter tables: make_cifar_c.py ("cifar") and make_imagenet_c.py ("imagenet").
_TABLES: dict[str, dict[str, tuple]] = {
    "gaussian_noise": {
        "cifar": (0.04, 0.06, 0.08, 0.09, 0.10),
        "imagenet": (0.08, 0.12, 0.18, 0.26, 0.38),
    },
    "shot_noise": {"cifar": (500, 250, 100, 75, 50), "imagenet": (60, 25, 12, 5, 3)},
    "impulse_noise": {
        "cifar": (0.01, 0.02, 0.03, 0.05, 0.07),
        "imagenet": (0.03, 0.06, 0.09, 0.17, 0.27),
    },
    # (disk radius, alias blur)
    "defocus_blur": {
        "cifar": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
        "imagenet": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    },
    # (sigma, max delta, iterations)
    "glass_blur": {
        "cifar": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
        "imagenet": ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
    },
    # (radius, sigma)
    "motion_blur": {
        "cifar": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
        "imagenet": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
    },
    # zoom factors: np.arange(start, stop, step)
    "zoom_blur": _by_scale(
        ((1, 1.06, 0.01), (1, 1.11, 0.01)),
        ((1, 1.11, 0.01), (1, 1.16, 0.01)),
        ((1, 1.16, 0.01), (1, 1.21, 0.02)),
        ((1, 1.21, 0.01), (1, 1.26, 0.02)),
        ((1, 1.26, 0.01), (1, 1.31, 0.03)),
    ),
    # (loc, scale, zoom, threshold, blur radius, blur sigma, image weight)
    "snow": _by_scale(
        ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.3, 3, 0.5, 10, 4, 0.8)),
        ((0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.2, 0.3, 2, 0.5, 12, 4, 0.7)),
        ((0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.55, 0.3, 4, 0.9, 12, 8, 0.7)),
        ((0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65)),
        ((0.3, 0.3, 1.25, 0.65, 14, 12, 0.8), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)),
    ),
    # (image weight, frost weight)
    "frost": {
        "cifar": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
        "imagenet": ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)),
    },
    # (fog strength, fractal wibble decay)
    "fog": {
        "cifar": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
        "imagenet": ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)),
    },
    "brightness": {"cifar": (0.05, 0.1, 0.15, 0.2, 0.3), "imagenet": (0.1, 0.2, 0.3, 0.4, 0.5)},
    "contrast": {"cifar": (0.75, 0.5, 0.4, 0.3, 0.15), "imagenet": (0.4, 0.3, 0.2, 0.1, 0.05)},
    # (alpha, sigma, affine jitter), in units of the image size, here turned into pixels
    "elastic_transform": _in_pixels(
        _by_scale(
            ((0, 0, 0.08), (2, 0.7, 0.1)),
            ((0.05, 0.2, 0.07), (2, 0.08, 0.2)),
            ((0.08, 0.06, 0.06), (0.05, 0.01, 0.02)),
            ((0.1, 0.04, 0.05), (0.07, 0.01, 0.02)),
            ((0.1, 0.03, 0.03), (0.12, 0.01, 0.02)),
        )
    ),
    "pixelate": {"cifar": (0.95, 0.9, 0.85, 0.75, 0.65), "imagenet": (0.6, 0.5, 0.4, 0.3, 0.25)},
    "jpeg_compression": {"cifar": (80, 65, 58, 50, 40), "imagenet": (25, 18, 15, 10, 7)},
    "speckle_noise": {
        "cifar": (0.06, 0.1, 0.12, 0.16, 0.2),
        "imagenet": (0.15, 0.2, 0.35, 0.45, 0.6),
    },
    "gaussian_blur": {"cifar": (0.4, 0.6, 0.7, 0.8, 1), "imagenet": (1, 2, 3, 4, 6)},
    # (loc, scale, sigma, threshold, intensity / mud sigma, mode: 0 water, 1 mud)
    "spatter": _by_scale(
        ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.3, 4, 0.69, 0.6, 0)),
        ((0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 3, 0.68, 0.6, 0)),
        ((0.65, 0.3, 1, 0.69, 0.5, 0), (0.65, 0.3, 2, 0.68, 0.5, 0)),
        ((0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.3, 1, 0.65, 1.5, 1)),
        ((0.65, 0.1, 0.5, 0.68, 0.6, 1), (0.67, 0.4, 1, 0.65, 1.5, 1)),
    ),
    # (saturation factor, saturation offset)
    "saturate": {
        "cifar": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
        "imagenet": ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)),
    },
}

# Per-channel (R, G, B) mean and standard deviation of crops of the five frost photographs the
# benchmark draws from (frost1-5), measured once the way each benchmark crops them: 224-px crops
# of the photographs at 1.1x ("imagenet"), 32-px crops at 0.2x ("cifar"). Numbers only; the
# procedural frost is coloured with them.
_FROST_PALETTES = {
    scale: tuple((row[:3], row[3:]) for row in rows)
    for scale, rows in _by_scale(
        # one line per photograph: (R, G, B mean, R, G, B standard deviation) of the CIFAR
        # crops, then of the ImageNet crops
        ((0.310, 0.586, 0.649, 0.067, 0.041, 0.040), (0.301, 0.578, 0.643, 0.087, 0.053, 0.050)),
        ((0.778, 0.795, 0.832, 0.051, 0.053, 0.056), (0.774, 0.791, 0.827, 0.073, 0.075, 0.078)),
        ((0.777, 0.794, 0.831, 0.050, 0.052, 0.055), (0.776, 0.793, 0.830, 0.072, 0.075, 0.077)),
        ((0.565, 0.624, 0.674, 0.059, 0.060, 0.066), (0.568, 0.626, 0.676, 0.098, 0.098, 0.104)),
        ((0.405, 0.450, 0.496, 0.101, 0.099, 0.096), (0.394, 0.438, 0.485, 0.134, 0.132, 0.129)),
    ).items()
}

_GRAY = (0.299, 0.587, 0.114)  # OpenCV's RGB -> gray weights
_GRAY_SK = (0.2989, 0.5870, 0.1140)  # the reference's rgb2gray for single-channel images
