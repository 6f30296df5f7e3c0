"""The ``imagecorruptions`` reference, for agreement tests and benchmarks only.

``imagecorruptions`` 1.1.2 predates NumPy 2 and scikit-image 0.19: ``fog`` uses ``np.float_``
and ``glass_blur`` / ``gaussian_blur`` pass ``multichannel=True``. :func:`load_reference`
imports it and patches those two names *inside its module only* (nothing global changes), so
all 19 reference functions run with current NumPy and scikit-image.

Also here: a small set of real test images (scikit-image and scikit-learn bundled photos) and
:func:`agreement_report`, which measures how closely :func:`robustpatch.lab.corruptions.corrupt`
agrees with the reference at 224 px and judges every type by :data:`CRITERIA`.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import numpy as np

# How each type is compared with the reference (see :func:`agreement_report`).
METHODS: dict[str, str] = {
    # deterministic functions of the image: pixel comparison
    "defocus_blur": "pixel",
    "zoom_blur": "pixel",
    "brightness": "pixel",
    "contrast": "pixel",
    "pixelate": "pixel",
    "gaussian_blur": "pixel",
    "saturate": "pixel",
    "jpeg_compression": "jpeg",
    # random, but driven with the reference's own random draws: pixel comparison
    "motion_blur": "controlled",
    "glass_blur": "controlled",
    # random: statistics of (corrupted - clean)
    "gaussian_noise": "statistics",
    "shot_noise": "statistics",
    "impulse_noise": "statistics",
    "speckle_noise": "statistics",
    "snow": "statistics",
    "fog": "statistics",
    "frost": "statistics",
    "spatter": "statistics",
    "elastic_transform": "statistics",
}

CRITERIA: dict[str, str] = {
    "pixel": "every severity: >= 99.9% of values within 1 level (0-255 scale) and mean "
    "|ours - reference| <= 0.25 levels",
    "jpeg": "every severity: mean |ours - reference| <= 0.75 levels and >= 90% of values "
    "within 1 level",
    "controlled": "given the reference's random draws (motion angle / glass offsets): every "
    "severity: >= 99.9% of values within 1 level and mean |ours - reference| <= 0.25 levels",
    "statistics": "every severity: the per-image mean and standard deviation of (corrupted - "
    "clean) agree: |difference of their averages over images x seeds| <= 3 standard errors "
    "+ 0.5 levels, and the pooled standard deviations differ by <= 10%",
}

# Reference variants that differ from the published data this module follows.
NOT_COMPARABLE = {
    "elastic_transform": "imagecorruptions uses an older elastic transform without the random "
    "affine step of make_imagenet_c.py, which this implementation follows",
}


def load_reference() -> Any:
    """Import ``imagecorruptions`` with its NumPy 2 / scikit-image >= 0.19 breakages patched.

    Returns the ``imagecorruptions`` package; raises ImportError if it is not installed.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import imagecorruptions
        from imagecorruptions import corruptions as mod
    if getattr(mod, "_robustpatch_patched", False):
        return imagecorruptions
    from skimage.filters import gaussian as sk_gaussian

    def gaussian(
        image: Any, sigma: Any = 1, *args: Any, multichannel: Any = None, **kw: Any
    ) -> Any:
        if multichannel:
            kw.setdefault("channel_axis", -1)
        return sk_gaussian(image, sigma, *args, **kw)

    class _NumpyShim(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            if name == "float_":
                return np.float64
            return getattr(np, name)

    mod.gaussian = gaussian
    mod.np = _NumpyShim("numpy")
    mod._robustpatch_patched = True
    return imagecorruptions


def reference_corrupt(
    image: np.ndarray, name: str, severity: int, seed: int | None = None
) -> np.ndarray:
    """Run the reference on one ``(H, W, 3)`` uint8 image; ``seed`` seeds ``np.random``."""
    ic = load_reference()
    if seed is not None:
        np.random.seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ic.corrupt(image, corruption_name=name, severity=severity)


def sample_images(size: int = 224) -> np.ndarray:
    """Eight real photographs, resized (shorter side ``size * 8 / 7``) and centre-cropped.

    Returns a ``(8, size, size, 3)`` uint8 array (scikit-image and scikit-learn bundled data,
    no download).
    """
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = [
        data.astronaut(),
        data.coffee(),
        data.chelsea(),
        data.rocket(),
        data.immunohistochemistry(),
        data.hubble_deep_field(),
    ]
    photos += list(load_sample_images().images)
    out = []
    short = int(round(size * 256 / 224))
    for photo in photos:
        im = Image.fromarray(np.ascontiguousarray(photo[..., :3]))
        w, h = im.size
        k = short / min(w, h)
        im = im.resize((max(size, int(round(w * k))), max(size, int(round(h * k)))), Image.BILINEAR)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        out.append(np.asarray(im.crop((left, top, left + size, top + size))))
    return np.stack(out)


def _levels(images: Any) -> np.ndarray:
    return np.asarray(images, dtype=np.float64)


def _pixel_metrics(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    diff = np.abs(ours - ref)
    return {
        "mae": float(diff.mean()),
        "p99": float(np.percentile(diff, 99)),
        "max": float(diff.max()),
        "frac_le1": float((diff <= 1).mean()),
    }


def _ours(images: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    import torch

    from .corruptions import corrupt

    batch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    out = corrupt(batch, name, severity, seed=seed, scale="imagenet")
    return _levels(out.permute(0, 2, 3, 1).numpy())


def _reference_batch(images: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    return np.stack(
        [
            _levels(reference_corrupt(img, name, severity, seed=seed * 1000 + i))
            for i, img in enumerate(images)
        ]
    )


def _controlled(images: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """Ours, driven by the random numbers the reference draws with ``np.random.seed``."""
    import torch

    from .corruptions import corruption_parameters
    from .corruptions.ops import _glass_blur_offsets, _motion_blur_angles

    params = corruption_parameters(name, severity, "imagenet")
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float() / 255.0
    n, _, h, w = x.shape
    if name == "motion_blur":
        angles = []
        for i in range(n):
            np.random.seed(seed * 1000 + i)
            angles.append(np.random.uniform(-45, 45))
        y = _motion_blur_angles(x, params[0], params[1], torch.tensor(angles))
    elif name == "glass_blur":
        sigma, delta, iterations = params
        rows = np.arange(h - delta, delta, -1)
        cols = np.arange(w - delta, delta, -1)
        rr, cc = (a.ravel() for a in np.meshgrid(rows, cols, indexing="ij"))
        passes = []
        for _ in range(iterations):
            passes.append((np.zeros((n, h, w), np.int64), np.zeros((n, h, w), np.int64)))
        for i in range(n):
            np.random.seed(seed * 1000 + i)
            draws = np.random.randint(-delta, delta, size=(iterations, rr.size, 2))
            for it in range(iterations):
                passes[it][1][i, rr, cc] = draws[it, :, 0]  # the reference draws dx, dy
                passes[it][0][i, rr, cc] = draws[it, :, 1]
        offsets = [(torch.from_numpy(dy), torch.from_numpy(dx)) for dy, dx in passes]
        y = _glass_blur_offsets(x, sigma, delta, offsets)
    else:
        raise ValueError(f"no controlled comparison for {name}")
    y = torch.floor(y.clamp(0, 1) * 255.0 + 1e-3)
    return y.permute(0, 2, 3, 1).numpy().astype(np.float64)


def _statistics(
    images: np.ndarray, name: str, severity: int, seeds: tuple[int, ...]
) -> dict[str, float]:
    clean = _levels(images)
    per = {"ours": ([], []), "ref": ([], [])}
    pooled: dict[str, list[np.ndarray]] = {"ours": [], "ref": []}
    for seed in seeds:
        for key, out in (
            ("ours", _ours(images, name, severity, seed)),
            ("ref", _reference_batch(images, name, severity, seed)),
        ):
            d = (out - clean).reshape(len(images), -1)
            per[key][0].extend(d.mean(axis=1))
            per[key][1].extend(d.std(axis=1))
            pooled[key].append(d.ravel())
    res: dict[str, float] = {}
    for key in ("ours", "ref"):
        res[f"mean_{key}"] = float(np.mean(per[key][0]))
        res[f"std_{key}"] = float(np.concatenate(pooled[key]).std())
        res[f"img_std_{key}"] = float(np.mean(per[key][1]))
    k = len(per["ours"][0])
    for stat, idx in (("mean", 0), ("img_std", 1)):
        a, b = np.asarray(per["ours"][idx]), np.asarray(per["ref"][idx])
        res[f"se_{stat}"] = float(np.sqrt(a.var(ddof=1) / k + b.var(ddof=1) / k))
    res["std_ratio"] = res["std_ours"] / max(res["std_ref"], 1e-12)
    return res


def _passes(method: str, m: dict[str, float]) -> bool:
    if method in ("pixel", "controlled"):
        return m["mae"] <= 0.25 and m["frac_le1"] >= 0.999
    if method == "jpeg":
        return m["mae"] <= 0.75 and m["frac_le1"] >= 0.90
    mean_ok = abs(m["mean_ours"] - m["mean_ref"]) <= 3 * m["se_mean"] + 0.5
    std_ok = abs(m["img_std_ours"] - m["img_std_ref"]) <= 3 * m["se_img_std"] + 0.5
    return mean_ok and std_ok and abs(m["std_ratio"] - 1) <= 0.10


def agreement_report(
    images: np.ndarray | None = None,
    names: list[str] | None = None,
    severities: tuple[int, ...] = (1, 2, 3, 4, 5),
    seeds: tuple[int, ...] = (0, 1, 2),
    controlled_images: int = 3,
) -> dict[str, Any]:
    """Compare ours with ``imagecorruptions`` at 224 px and judge each type by :data:`CRITERIA`.

    Args:
        images: ``(N, 224, 224, 3)`` uint8 real photographs (default :func:`sample_images`).
        names: corruption types (default all 19).
        severities: severities to compare.
        seeds: seeds for the statistical comparisons (each seed corrupts every image).
        controlled_images: images used for the controlled comparisons (the reference's glass
            blur is slow).

    Returns:
        ``{"criteria": ..., "types": {name: {"method", "passed", "note", "severities": {sev:
        metrics}}}, "standard_passed": int, "standard_compared": int}``; metrics are in 0-255
        levels.
    """
    from .corruptions import CORRUPTIONS, STANDARD

    imgs = sample_images(224) if images is None else images
    names = list(CORRUPTIONS) if names is None else list(names)
    per_type: dict[str, Any] = {}
    for name in names:
        method = METHODS[name]
        per_sev: dict[str, Any] = {}
        for sev in severities:
            if method in ("pixel", "jpeg"):
                m = _pixel_metrics(_ours(imgs, name, sev, 0), _reference_batch(imgs, name, sev, 0))
            elif method == "controlled":
                sub = imgs[:controlled_images]
                m = _pixel_metrics(
                    _controlled(sub, name, sev, 0), _reference_batch(sub, name, sev, 0)
                )
            else:
                m = _statistics(imgs, name, sev, seeds)
            m["passed"] = bool(_passes(method, m))
            per_sev[str(sev)] = m
        per_type[name] = {
            "method": method,
            "passed": all(v["passed"] for v in per_sev.values()),
            "note": NOT_COMPARABLE.get(name, ""),
            "severities": per_sev,
        }
    standard = [n for n in names if n in STANDARD]
    return {
        "criteria": CRITERIA,
        "images": int(len(imgs)),
        "seeds": list(seeds),
        "types": per_type,
        "standard_compared": len(standard),
        "standard_passed": sum(per_type[n]["passed"] for n in standard),
    }


def format_report(report: dict[str, Any]) -> str:
    """A Markdown table of an :func:`agreement_report`."""
    lines = [
        "| type | method | passed | per severity 1-5 |",
        "|---|---|---|---|",
    ]
    for name, t in report["types"].items():
        cells = []
        for sev, m in t["severities"].items():
            if t["method"] == "statistics":
                cells.append(
                    f"{sev}: mean {m['mean_ours']:.1f}/{m['mean_ref']:.1f}, "
                    f"std {m['std_ours']:.1f}/{m['std_ref']:.1f}"
                )
            else:
                cells.append(f"{sev}: mae {m['mae']:.3f}, <=1: {100 * m['frac_le1']:.2f}%")
        note = f" ({t['note']})" if t["note"] else ""
        passed = "yes" if t["passed"] else "no"
        lines.append(f"| {name} | {t['method']} | {passed}{note} | {'; '.join(cells)} |")
    return "\n".join(lines)
