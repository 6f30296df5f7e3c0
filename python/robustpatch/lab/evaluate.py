"""Evaluation: accuracy per corruption x severity, mCE, FGSM / PGD robustness, JSON, heatmaps.

Every entry point takes a ``device`` (default: CUDA when available, else CPU). Images are
``(N, C, H, W)`` tensors, uint8 in [0, 255] or float in [0, 1]; models take [0, 1] input
(see :mod:`robustpatch.lab.models`).

Result dictionaries (``corruption_accuracy``) look like::

    {"clean": 0.98,
     "accuracy": {"gaussian_noise": {"1": 0.95, ..., "5": 0.41}, ...},
     "meta": {"n": 359, "seed": 0, "scale": "cifar", "severities": [1, 2, 3, 4, 5]}}

Severity keys are strings so the dictionary round-trips through JSON unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import torch
from torch import nn

from ..errors import InvalidArgumentError
from . import outputs
from .corruptions import STANDARD, _check_name_severity, corrupt, resolve_scale
from .training import (
    accuracy,
    as_float,
    check_labelled,
    count,
    default_device,
    eval_mode,
    predict,
)

__all__ = [
    "ALEXNET_ERRORS",
    "ALEXNET_CLEAN_ERROR",
    "predict",
    "accuracy",
    "CorruptionGrid",
    "corruption_accuracy",
    "corruption_errors",
    "mean_corruption_error",
    "relative_mean_corruption_error",
    "fgsm",
    "pgd_linf",
    "robust_accuracy",
    "save_json",
    "load_json",
    "plot_heatmap",
    "evaluate_corruptions",
]

DeviceArg = Union[str, torch.device, None]
PathLike = Union[str, os.PathLike]

ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}
"""AlexNet's top-1 error on ImageNet-C per corruption, averaged over severities 1-5
(Hendrycks & Dietterich 2019, as published with the benchmark); the mCE baseline."""

ALEXNET_CLEAN_ERROR = 0.4348
"""AlexNet's clean ImageNet top-1 error (43.5% in the paper; torchvision's AlexNet: 43.48%)."""


def _cell_seed(seed: int, name: str, severity: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{severity}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class CorruptionGrid:
    """The cells :func:`corruption_accuracy` evaluates, and how.

    Attributes:
        corruptions: names (default: the 15 standard types).
        severities: severities to evaluate.
        seed: base seed of the corruptions; every cell has its own generator seeded from
            ``(seed, corruption, severity)``, so results are reproducible for a given batch
            size.
        scale: corruption parameter table, default from the image size.
        batch_size: images per batch (corrupted batch by batch on ``device``).
        device: default CUDA if available, else CPU.
        progress: show a tqdm bar.
    """

    corruptions: Sequence[str] | None = None
    severities: Sequence[int] = (1, 2, 3, 4, 5)
    seed: int = 0
    scale: str | None = None
    batch_size: int = 256
    device: DeviceArg = None
    progress: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.corruptions, str):  # would be read letter by letter
            raise InvalidArgumentError(
                f"corruptions: expected a sequence of names, got the string "
                f"{self.corruptions!r} (one corruption: ({self.corruptions!r},))"
            )
        count(self.batch_size, "batch_size")


def corruption_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    grid: CorruptionGrid | None = None,
) -> dict[str, Any]:
    """Accuracy on clean images and on every (corruption, severity) cell of ``grid``.

    Args:
        model: classifier taking [0, 1] images.
        images: ``(N, C, H, W)`` uint8 or float images (the clean test set).
        labels: ``(N,)`` labels.
        grid: the cells and settings (default: :class:`CorruptionGrid`).

    Returns:
        ``{"clean": acc, "accuracy": {name: {"1": acc, ...}}, "meta": {...}}``.
    """
    grid = grid or CorruptionGrid()
    seed, batch_size = grid.seed, grid.batch_size
    names = list(STANDARD if grid.corruptions is None else grid.corruptions)
    sevs = [int(s) for s in grid.severities]
    for name in names:
        for s in sevs:
            _check_name_severity(name, s)
    dev = default_device(grid.device)
    labels = torch.as_tensor(labels).cpu()
    table = resolve_scale(images.shape[-2], images.shape[-1], grid.scale)
    result: dict[str, Any] = {
        "clean": accuracy(model, images, labels, batch_size=batch_size, device=dev),
        "accuracy": {},
        "meta": {
            "n": len(labels),
            "seed": seed,
            "scale": table,
            "severities": sevs,
            "corruptions": names,
        },
    }
    bar = None
    if grid.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(names) * len(sevs), desc="corruptions")
    try:
        with eval_mode(model.to(dev)), torch.no_grad():
            for name in names:
                cells: dict[str, float] = {}
                for s in sevs:
                    gen = torch.Generator(device=dev)
                    gen.manual_seed(_cell_seed(seed, name, s))
                    correct = 0
                    for i in range(0, len(labels), batch_size):
                        xb = images[i : i + batch_size].to(dev)
                        xb = corrupt(xb, name, s, generator=gen, scale=table)
                        pred = model(as_float(xb)).argmax(1).cpu()
                        correct += int((pred == labels[i : i + batch_size]).sum())
                    cells[str(s)] = correct / len(labels)
                    if bar is not None:
                        bar.update(1)
                result["accuracy"][name] = cells
    finally:
        if bar is not None:
            bar.close()
    return result


def corruption_errors(results: Mapping[str, Any]) -> dict[str, list[float]]:
    """Per-corruption top-1 errors ``[e_sev1, ...]`` from a :func:`corruption_accuracy` result."""
    out: dict[str, list[float]] = {}
    for name, cells in results["accuracy"].items():
        keys = sorted(cells, key=int)
        out[name] = [1.0 - float(cells[k]) for k in keys]
    return out


def _baseline_sum(value: float | Sequence[float], count: int) -> float:
    if isinstance(value, (int, float)):
        return float(value) * count  # a published mean over severities
    values = [float(v) for v in value]
    if len(values) != count:
        raise ValueError(f"baseline has {len(values)} severities, the model {count}")
    return sum(values)


def mean_corruption_error(
    errors: Mapping[str, Sequence[float]],
    baseline: Mapping[str, float | Sequence[float]] | None = None,
) -> dict[str, Any]:
    """Mean corruption error (Hendrycks & Dietterich 2019).

    ``CE_c = sum_s E_{c,s} / sum_s B_{c,s}`` and ``mCE = mean_c CE_c``, over the corruptions
    present in ``errors``.

    Args:
        errors: per corruption, the model's top-1 errors at each severity (e.g. from
            :func:`corruption_errors`).
        baseline: per corruption, the baseline's errors: one number (its mean over severities,
            as published) or one per severity. Default: :data:`ALEXNET_ERRORS`.

    Returns:
        ``{"mCE": float, "CE": {name: float}}``.

    Raises:
        KeyError: a corruption has no baseline error.
    """
    base = ALEXNET_ERRORS if baseline is None else baseline
    ce = _per_corruption(errors, base, lambda _name, errs, b: sum(errs) / b)
    return {"mCE": sum(ce.values()) / len(ce), "CE": ce}


def _per_corruption(
    errors: Mapping[str, Sequence[float]],
    baseline: Mapping[str, float | Sequence[float]],
    ratio: Callable[[str, list[float], float], float],
) -> dict[str, float]:
    """``ratio(name, errors at each severity, the baseline's error summed over as many
    severities)`` for every corruption in ``errors``."""
    if not errors:
        raise ValueError("no corruption errors given")
    out: dict[str, float] = {}
    for name, errs in errors.items():
        if name not in baseline:
            raise KeyError(f"no baseline error for corruption {name!r}")
        errs = [float(e) for e in errs]
        out[name] = ratio(name, errs, _baseline_sum(baseline[name], len(errs)))
    return out


def relative_mean_corruption_error(
    errors: Mapping[str, Sequence[float]],
    clean_error: float,
    baseline: Mapping[str, float | Sequence[float]],
    baseline_clean_error: float,
) -> dict[str, Any]:
    """Relative mCE: degradation relative to the baseline's degradation.

    ``relCE_c = sum_s (E_{c,s} - E_clean) / sum_s (B_{c,s} - B_clean)`` and the mean over c.

    Args:
        errors: per corruption, the model's errors at each severity.
        clean_error: the model's clean error.
        baseline: per corruption, the baseline's errors (mean over severities or per severity),
            e.g. :data:`ALEXNET_ERRORS`.
        baseline_clean_error: the baseline's clean error, e.g. :data:`ALEXNET_CLEAN_ERROR`.

    Returns:
        ``{"relative_mCE": float, "relative_CE": {name: float}}``.
    """

    def degradation_ratio(name: str, errs: list[float], base_sum: float) -> float:
        denom = base_sum - len(errs) * float(baseline_clean_error)
        if denom == 0:
            raise ValueError(f"baseline degradation on {name!r} is zero")
        return (sum(errs) - len(errs) * float(clean_error)) / denom

    rel = _per_corruption(errors, baseline, degradation_ratio)
    return {"relative_mCE": sum(rel.values()) / len(rel), "relative_CE": rel}


# ---------------------------------------------------------------------------------------------
# Adversarial robustness
# ---------------------------------------------------------------------------------------------


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss gradient with respect to the input. Gradients are enabled here, so an
    attack also runs inside ``torch.no_grad()`` (where evaluation code often sits); inference
    mode cannot be left from inside, so it is refused with a clear error."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "adversarial attacks need gradients: call them outside torch.inference_mode() "
            "(torch.no_grad() is fine)"
        )
    with torch.enable_grad():
        # clone: an inference tensor made earlier cannot itself require grad
        x = x.detach().clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(x), y)
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    *,
    device: DeviceArg = None,
) -> torch.Tensor:
    """Fast gradient sign method: ``clip(x + eps * sign(grad_x loss), 0, 1)``.

    The model runs in eval mode; its parameters get no gradients. Returns float [0, 1]
    adversarial images on ``device``.
    """
    if not eps >= 0:  # a negative eps would descend the loss: no attack at all
        raise InvalidArgumentError(f"eps must be >= 0, got {eps!r}")
    dev = default_device(device)
    with eval_mode(model.to(dev)):
        x = as_float(images.to(dev))
        y = torch.as_tensor(labels).to(dev)
        adv = x + eps * _input_grad(model, x, y).sign()
        return adv.clamp(0, 1).detach()


def pgd_linf(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    *,
    steps: int = 10,
    alpha: float | None = None,
    random_start: bool = True,
    seed: int = 0,
    device: DeviceArg = None,
) -> torch.Tensor:
    """Projected gradient descent in the L-infinity ball (Madry et al. 2018).

    ``steps`` signed-gradient ascent steps of size ``alpha`` (default ``2.5 * eps / steps``)
    from a uniform random start in the ball (``random_start``), each followed by projection
    onto the ball around the clean image and onto [0, 1]. Returns float adversarial images.
    """
    if eps < 0 or steps < 1:
        raise ValueError("eps must be >= 0 and steps >= 1")
    dev = default_device(device)
    step = 2.5 * eps / steps if alpha is None else alpha
    with eval_mode(model.to(dev)):
        x = as_float(images.to(dev))
        y = torch.as_tensor(labels).to(dev)
        adv = x.clone()
        if random_start:
            gen = torch.Generator(device=dev)
            gen.manual_seed(seed)
            noise = torch.rand(x.shape, generator=gen, device=dev) * 2 - 1
            adv = (x + eps * noise).clamp(0, 1)
        for _ in range(steps):
            adv = adv + step * _input_grad(model, adv, y).sign()
            adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1)
        return adv.detach()


def robust_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    attack: str = "pgd",
    eps: float = 8 / 255,
    steps: int = 10,
    alpha: float | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: DeviceArg = None,
) -> float:
    """Accuracy under an FGSM (``attack="fgsm"``) or PGD-L-infinity (``"pgd"``) attack."""
    if attack not in ("fgsm", "pgd"):
        raise ValueError(f"attack must be 'fgsm' or 'pgd', got {attack!r}")
    if not eps >= 0:
        raise InvalidArgumentError(f"eps must be >= 0, got {eps!r}")
    count(batch_size, "batch_size")
    dev = default_device(device)
    labels = torch.as_tensor(labels).cpu()
    check_labelled(images, labels)
    correct = 0
    for i in range(0, len(labels), batch_size):
        xb, yb = images[i : i + batch_size], labels[i : i + batch_size]
        if attack == "fgsm":
            adv = fgsm(model, xb, yb, eps, device=dev)
        else:
            adv = pgd_linf(model, xb, yb, eps, steps=steps, alpha=alpha, seed=seed + i, device=dev)
        correct += int((predict(model, adv, batch_size=batch_size, device=dev) == yb).sum())
    return correct / len(labels)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def save_json(results: Mapping[str, Any], path: PathLike) -> Path:
    """Write ``results`` as indented JSON (atomically); returns the path."""
    return outputs.write_json(path, results, allow_nan=True)


def load_json(path: PathLike) -> dict[str, Any]:
    """Read a JSON results file."""
    return json.loads(Path(path).read_text())


def plot_heatmap(results: Mapping[str, Any], path: PathLike, *, title: str | None = None) -> Path:
    """Save a corruption x severity accuracy heatmap (PNG, matplotlib's Agg canvas).

    ``results`` is a :func:`corruption_accuracy` result. No global matplotlib state (backend,
    pyplot figures) is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    acc = results["accuracy"]
    names = list(acc)
    sevs = sorted({k for cells in acc.values() for k in cells}, key=int)
    grid = [[100.0 * float(acc[n].get(s, float("nan"))) for s in sevs] for n in names]
    fig = Figure(figsize=(1.0 + 0.8 * len(sevs), 0.8 + 0.38 * len(names)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(sevs)))
    ax.set_xticklabels(sevs)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names)
    ax.set_xlabel("severity")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(
                j, i, f"{v:.0f}", ha="center", va="center", fontsize=8, color="w" if v < 60 else "k"
            )
    clean = results.get("clean")
    heading = title or "accuracy (%)"
    if clean is not None:
        heading += f" - clean {100 * float(clean):.1f}%"
    ax.set_title(heading, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return outputs.save_figure(fig, path, dpi=100)


def evaluate_corruptions(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    out_dir: PathLike,
    grid: CorruptionGrid | None = None,
    *,
    baseline: Mapping[str, float | Sequence[float]] | None = None,
    name: str = "corruptions",
) -> dict[str, Any]:
    """Run :func:`corruption_accuracy`, add mCE, write ``<name>.json`` and ``<name>.png``.

    mCE is added (under ``"mCE"``) when every evaluated corruption has a baseline error
    (``baseline``, default AlexNet's) and all five severities were run.

    Returns:
        The results dictionary, with ``"files"`` naming the JSON and PNG written.
    """
    results = corruption_accuracy(model, images, labels, grid)
    base = ALEXNET_ERRORS if baseline is None else baseline
    errors = corruption_errors(results)
    if all(n in base for n in errors) and sorted(results["meta"]["severities"]) == [1, 2, 3, 4, 5]:
        results["mCE"] = mean_corruption_error(errors, base)
    out = Path(out_dir)
    json_path = out / f"{name}.json"
    png_path = out / f"{name}.png"
    results["files"] = {"json": str(json_path), "heatmap": str(png_path)}
    save_json(results, json_path)
    plot_heatmap(results, png_path)
    return results
