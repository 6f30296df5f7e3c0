"""The ``imagecorruptions`` reference, for agreement tests and benchmarks only.

``imagecorruptions`` 1.1.2 predates NumPy 2 and scikit-image 0.19: ``fog`` uses ``np.float_``
and ``glass_blur`` / ``gaussian_blur`` pass ``multichannel=True``. :func:`load_reference`
imports it and patches those two names *inside its module only* (nothing global changes), so
all 19 reference functions run with current NumPy and scikit-image.

Also here: a small set of real test images (scikit-image and scikit-learn bundled photos) and
:func:`agreement`, which measures how closely :func:`robustpatch.lab.corruptions.corrupt`
agrees with the reference at 224 px.
"""

from __future__ import annotations

import types
import warnings
from typing import Any, Optional

import numpy as np

# Standard types whose reference output is a deterministic function of the image.
DETERMINISTIC = ["defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"]
# Standard types with randomness (compared by statistics of corrupted - clean).
RANDOM = [
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "glass_blur",
    "motion_blur",
    "snow",
    "frost",
    "fog",
    "elastic_transform",
]


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

    def gaussian(image: Any, sigma: Any = 1, *args: Any, multichannel: Any = None, **kw: Any) -> Any:
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


def reference_corrupt(image: np.ndarray, name: str, severity: int, seed: Optional[int] = None) -> np.ndarray:
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


def agreement(
    images: np.ndarray,
    names: Optional[list[str]] = None,
    severities: tuple[int, ...] = (1, 2, 3, 4, 5),
    seeds: tuple[int, ...] = (0,),
) -> dict[str, dict[str, dict[str, float]]]:
    """Compare ours with the reference on ``images`` ((N, H, W, 3) uint8).

    For every type and severity the result holds, in 0-255 levels:

    - ``mae``: mean |ours - reference| (meaningful for deterministic types),
    - ``p99``: 99th percentile of |ours - reference|,
    - ``frac_le1``: fraction of values within one level,
    - ``mean_ours`` / ``mean_ref``: mean of (corrupted - clean),
    - ``std_ours`` / ``std_ref``: standard deviation of (corrupted - clean),
    - ``mad_ours`` / ``mad_ref``: mean |corrupted - clean|.

    Statistics pool all images and seeds.
    """
    import torch

    from .corruptions import STANDARD, corrupt

    names = list(STANDARD) if names is None else list(names)
    clean = images.astype(np.float64)
    batch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    result: dict[str, dict[str, dict[str, float]]] = {}
    for name in names:
        result[name] = {}
        for sev in severities:
            ours_all, ref_all = [], []
            for seed in seeds:
                ours = corrupt(batch, name, sev, seed=seed, scale="imagenet")
                ours_all.append(ours.permute(0, 2, 3, 1).numpy().astype(np.float64))
                ref_all.append(
                    np.stack(
                        [
                            reference_corrupt(img, name, sev, seed=1000 * seed + i).astype(np.float64)
                            for i, img in enumerate(images)
                        ]
                    )
                )
            ours_np = np.concatenate(ours_all)
            ref_np = np.concatenate(ref_all)
            base = np.concatenate([clean] * len(seeds))
            diff = np.abs(ours_np - ref_np)
            d_ours, d_ref = ours_np - base, ref_np - base
            result[name][str(sev)] = {
                "mae": float(diff.mean()),
                "p99": float(np.percentile(diff, 99)),
                "frac_le1": float((diff <= 1).mean()),
                "mean_ours": float(d_ours.mean()),
                "mean_ref": float(d_ref.mean()),
                "std_ours": float(d_ours.std()),
                "std_ref": float(d_ref.std()),
                "mad_ours": float(np.abs(d_ours).mean()),
                "mad_ref": float(np.abs(d_ref).mean()),
            }
    return result
