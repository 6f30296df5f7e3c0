"""Robustifiers from three papers, and a side-by-side comparison with robust weight signatures.

1. **Non-robustness transfer** (Zhang et al., arXiv 2106.10989, "Pre-training also transfers
   non-robustness"): :func:`nonrobustness_transfer` fine-tunes the same architecture from a
   random start, from standard pretrained weights and from adversarially (PGD) pretrained
   weights, and measures how much FGSM / PGD robustness each start hands down. The
   *discrepancy-mitigating* fine-tune (:func:`discrepancy_finetune`) adds
   ``beta * ||f(x) - f(x')||^2`` to the cross-entropy, with ``f`` the penultimate features and
   ``x'`` a few PGD steps maximising that feature distance in an L-infinity ball.
2. **DAFT** (Nasery et al., arXiv 2208.09139, "DAFT: distilling adversarially fine-tuned
   models for better OOD generalization"): a teacher learns many features by standard
   training; its head is then adversarially trained on those features
   (:func:`adversarial_head`, TRADES-style so its soft outputs stay a good guide) and the
   teacher is distilled into a student, also on perturbed inputs (:func:`distill`).
   :func:`domain_generalization` evaluates it DomainBed-style (leave one domain out) on
   domains rendered from the embedded digits (:func:`render_domain`), against ERM and plain
   distillation.
3. **Efficiently robustify pre-trained models** (Jain et al., arXiv 2309.07499):
   a small teacher is made robust cheaply with AugMix-style mixing of corrupted views
   (:func:`augmix`, :func:`augmix_finetune`); then only a few tensors of a larger model
   (normalisation layers, the first block...) are tuned by distillation from that teacher
   and from the large model's own clean outputs (:func:`robustify_with_small_teacher`).
   :func:`small_teacher_study` reports the tuned-parameter fraction, the wall time against a
   full robust fine-tune, and whether clean and transfer (linear probe) accuracy are kept.

:func:`compare_methods` runs corruption fine-tuning, PGD adversarial training, discrepancy
mitigation, DAFT and small-teacher tuning on the same data from the same pretrained start,
measures clean / corruption / PGD accuracy, mCE relative to the clean twin and training
time, extracts 4-bit group-128 signatures (projection and plain difference) from each
robust model against its clean twin, applies them to the clean model and measures the gain.
:func:`comparison_markdown` renders the result. ``ComparisonConfig.tiny()`` runs in about a
minute on 2 CPU cores.

Every trainer takes ``device`` (default: CUDA when available, else CPU); data stays on the
CPU and batches move to the device. Images are ``(N, C, H, W)`` tensors, uint8 or float in
[0, 1]; models normalise internally (see :mod:`robustpatch.lab.models`). All trainers share
the optimiser, learning-rate schedule and data order of :func:`robustpatch.lab.recipes.train`
(SGD with momentum, step decay, order generator seeded with ``TrainConfig.seed``), so two
models trained with the same :class:`~robustpatch.lab.recipes.TrainConfig` from the same start
see the same batches -- the condition under which robust weight signatures transfer.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import platform
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import corruptions as C
from . import datasets, evaluate
from .models import SmallCNN, default_device, fit, parameters_by_depth
from .recipes import TrainConfig

__all__ = [
    "AttackConfig",
    "DiscrepancyConfig",
    "TransferConfig",
    "HeadConfig",
    "DAFTConfig",
    "DomainConfig",
    "AugMixConfig",
    "PartialTuneConfig",
    "SmallTeacherConfig",
    "ComparisonConfig",
    "LossFn",
    "DOMAINS",
    "METHODS",
    "COLUMNS",
    "features_and_logits",
    "pgd_maximize",
    "train_with_loss",
    "cross_entropy_loss",
    "corruption_loss",
    "pgd_loss",
    "discrepancy_loss",
    "adversarial_finetune",
    "discrepancy_finetune",
    "nonrobustness_transfer",
    "render_domain",
    "adversarial_head",
    "distillation_loss",
    "distill",
    "domain_generalization",
    "augmix",
    "augmix_loss",
    "augmix_finetune",
    "select_parameters",
    "robustify_with_small_teacher",
    "linear_probe_accuracy",
    "small_teacher_study",
    "compare_methods",
    "comparison_markdown",
]

DeviceArg = Union[str, torch.device, None]

LossFn = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, torch.Generator, torch.Tensor], torch.Tensor
]
"""A training loss ``(model, x, y, generator, index) -> scalar``.

``x`` is the float [0, 1] batch and ``y`` its labels, both on the training device; the model
is in train mode; ``generator`` is the run's CPU augmentation generator (seeded with
``TrainConfig.seed + 1``); ``index`` holds the batch's positions in the training set (CPU),
for losses that look up precomputed targets."""

# Corruption strengths: at CIFAR-C strengths 32-px digits barely suffer (see lab/demo.py).
SCALE = "imagenet"
# One of each family: noise, blur, weather, digital (the demo's set).
DEFAULT_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "fog", "contrast")


# =============================================================================================
# Shared pieces: features, attacks, one training loop
# =============================================================================================


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x
    return torch.round(x.clamp(0, 1) * 255).to(torch.uint8)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block with ``model`` in eval mode, restoring its mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _device_generator(gen: torch.Generator, device: torch.device) -> torch.Generator:
    """``gen`` itself on the CPU; elsewhere a generator on ``device`` seeded from ``gen``."""
    if device.type == "cpu":
        return gen
    out = torch.Generator(device=device)
    out.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    return out


def _numpy_rng(gen: torch.Generator) -> np.random.RandomState:
    return np.random.RandomState(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))


def _last_linear(model: nn.Module) -> nn.Linear:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError("the model has no nn.Linear layer to take penultimate features from")
    return last


def features_and_logits(
    model: nn.Module, x: torch.Tensor, head: nn.Linear | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (the input of the last ``nn.Linear``) and the logits.

    Works for any classifier whose last linear layer is its head (:class:`SmallCNN`,
    torchvision ResNet / VGG with ``small_input``): the features are captured with a forward
    pre-hook, so gradients flow through both outputs.
    """
    head = head or _last_linear(model)
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple) -> None:
        captured.append(args[0])

    handle = head.register_forward_pre_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    return torch.flatten(captured[-1], 1), logits


def pgd_maximize(
    objective: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float | None = None,
    *,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Maximise ``objective(x')`` over the L-infinity ball of radius ``eps`` around ``x``.

    ``steps`` signed-gradient ascent steps of ``step_size`` (default ``2.5 * eps / steps``)
    from a uniform random start, each followed by projection onto the ball and [0, 1]
    (Madry et al. 2018). ``objective`` maps a batch to a scalar; only the input gets a
    gradient (parameters are untouched). Returns a detached tensor like ``x``.
    """
    if eps < 0 or steps < 0:
        raise ValueError("eps and steps must be >= 0")
    x = x.detach()
    if eps == 0 or steps == 0:
        return x.clone()
    step = 2.5 * eps / steps if step_size is None else float(step_size)
    adv = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        adv = (x + eps * (2 * noise - 1)).clamp(0, 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        with torch.enable_grad():
            value = objective(adv)
        (grad,) = torch.autograd.grad(value, adv)
        adv = adv.detach() + step * grad.sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1)
    return adv.detach()


def train_with_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    loss_fn: LossFn,
    *,
    params: Sequence[nn.Parameter] | None = None,
    device: DeviceArg = None,
    progress: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train ``model`` in place with ``loss_fn``; the loop of :func:`recipes.train`.

    SGD (``config.momentum``, ``config.weight_decay``), learning rate multiplied by
    ``config.gamma`` after each epoch in ``config.milestones``, batches drawn in the order of a
    generator seeded with ``config.seed`` (the same order as :func:`recipes.train`), and a
    second generator seeded with ``config.seed + 1`` handed to ``loss_fn`` for its randomness.

    Args:
        model: the network; left in eval mode on ``device``.
        x: ``(N, C, H, W)`` uint8 or float [0, 1] images (kept on the CPU).
        y: ``(N,)`` int64 labels.
        config: optimisation settings.
        loss_fn: see :data:`LossFn`.
        params: train only these parameters (the others get ``requires_grad=False`` during
            training, which also skips their gradient computation); default all.
        device: default CUDA if available, else CPU.
        progress: called with ``(epoch, mean loss)`` after each epoch.
    """
    dev = default_device(device)
    model.to(dev).train()
    y = torch.as_tensor(y, dtype=torch.int64)
    if len(y) == 0:
        raise ValueError("no training data")
    all_params = list(model.parameters())
    trainable = all_params if params is None else list(params)
    if not trainable:
        raise ValueError("no parameter to train")
    saved = [p.requires_grad for p in all_params]
    if params is not None:
        keep = {id(p) for p in trainable}
        for p in all_params:
            p.requires_grad_(id(p) in keep)
    opt = torch.optim.SGD(
        trainable, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(config.milestones), config.gamma)
    order_gen = torch.Generator().manual_seed(config.seed)
    aug_gen = torch.Generator().manual_seed(config.seed + 1)
    try:
        for epoch in range(config.epochs):
            perm = torch.randperm(len(y), generator=order_gen)
            total = 0.0
            for start in range(0, len(y), config.batch_size):
                idx = perm[start : start + config.batch_size]
                xb = _as_float(x[idx].to(dev))
                yb = y[idx].to(dev)
                model.train()
                loss = loss_fn(model, xb, yb, aug_gen, idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            sched.step()
            if progress is not None:
                progress(epoch, total / len(y))
    finally:
        for p, r in zip(all_params, saved):
            p.requires_grad_(r)
    return model.eval()


def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` and its wall time in seconds."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


# ---------------------------------------------------------------------------------- losses


def cross_entropy_loss() -> LossFn:
    """Plain fine-tuning: cross-entropy on the clean batch."""

    def loss_fn(model, xb, yb, gen, idx):
        return F.cross_entropy(model(xb), yb)

    return loss_fn


def _random_corruption(
    xb: torch.Tensor, gen: torch.Generator, names: Sequence[str], scale: str
) -> torch.Tensor:
    """The batch under one corruption drawn from ``names`` at a random severity 1-5."""
    name = names[int(torch.randint(0, len(names), (1,), generator=gen))]
    severity = int(torch.randint(1, 6, (1,), generator=gen))
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    return C.corrupt(xb, name, severity, seed=seed, scale=scale)


def corruption_loss(names: Sequence[str] = DEFAULT_CORRUPTIONS, scale: str = SCALE) -> LossFn:
    """Corruption fine-tuning (the robust twins of arXiv 2302.12480): cross-entropy on the
    batch under one of ``names`` at a random severity 1-5, drawn per batch."""
    names = list(names)

    def loss_fn(model, xb, yb, gen, idx):
        return F.cross_entropy(model(_random_corruption(xb, gen, names, scale)), yb)

    return loss_fn


@dataclass
class AttackConfig:
    """An L-infinity PGD attack: radius, steps, step size (default ``2.5 * eps / steps``)."""

    eps: float = 8 / 255
    steps: int = 5
    step_size: float | None = None


def pgd_loss(attack: AttackConfig, clean_weight: float = 0.0) -> LossFn:
    """PGD adversarial training (Madry et al. 2018): cross-entropy on PGD examples found in
    eval mode (so the attack does not move BatchNorm statistics); ``clean_weight`` mixes in
    the clean cross-entropy (0: the original recipe)."""

    def loss_fn(model, xb, yb, gen, idx):
        g = _device_generator(gen, xb.device)
        with _eval_mode(model):
            adv = pgd_maximize(
                lambda a: F.cross_entropy(model(a), yb),
                xb,
                attack.eps,
                attack.steps,
                attack.step_size,
                generator=g,
            )
        loss = F.cross_entropy(model(adv), yb)
        if clean_weight:
            loss = (1 - clean_weight) * loss + clean_weight * F.cross_entropy(model(xb), yb)
        return loss

    return loss_fn


# =============================================================================================
# 1. Non-robustness transfer (arXiv 2106.10989)
# =============================================================================================


@dataclass
class DiscrepancyConfig:
    """Discrepancy-mitigating fine-tuning: ``CE + beta * ||f(x) - f(x')||^2``.

    ``x'`` maximises the squared feature distance ``||f(x') - f(x)||^2`` (summed over feature
    dimensions, averaged over the batch) with ``steps`` PGD steps in the L-infinity ball of
    radius ``eps`` (step size default ``2.5 * eps / steps``).
    """

    beta: float = 1.0
    eps: float = 8 / 255
    steps: int = 3
    step_size: float | None = None


def discrepancy_loss(config: DiscrepancyConfig) -> LossFn:
    """The loss of :func:`discrepancy_finetune` (see :class:`DiscrepancyConfig`).

    The feature-space adversary runs in eval mode against the clean features (detached); the
    regulariser is then computed in train mode with gradients through both ``f(x)`` and
    ``f(x')`` (as TRADES does for its KL term).
    """

    def loss_fn(model, xb, yb, gen, idx):
        head = _last_linear(model)
        g = _device_generator(gen, xb.device)
        with _eval_mode(model):
            with torch.no_grad():
                target, _ = features_and_logits(model, xb, head)

            def distance(a: torch.Tensor) -> torch.Tensor:
                feat, _ = features_and_logits(model, a, head)
                return (feat - target).pow(2).sum(1).mean()

            adv = pgd_maximize(
                distance, xb, config.eps, config.steps, config.step_size, generator=g
            )
        feat, logits = features_and_logits(model, xb, head)
        feat_adv, _ = features_and_logits(model, adv, head)
        reg = (feat - feat_adv).pow(2).sum(1).mean()
        return F.cross_entropy(logits, yb) + config.beta * reg

    return loss_fn


def adversarial_finetune(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    train: TrainConfig,
    attack: AttackConfig | None = None,
    *,
    device: DeviceArg = None,
) -> nn.Module:
    """PGD adversarial training of ``model`` in place (see :func:`pgd_loss`)."""
    return train_with_loss(model, x, y, train, pgd_loss(attack or AttackConfig()), device=device)


def discrepancy_finetune(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    train: TrainConfig,
    config: DiscrepancyConfig | None = None,
    *,
    device: DeviceArg = None,
) -> nn.Module:
    """Discrepancy-mitigating fine-tuning of ``model`` in place (:class:`DiscrepancyConfig`)."""
    loss = discrepancy_loss(config or DiscrepancyConfig())
    return train_with_loss(model, x, y, train, loss, device=device)


def _adversarial_metrics(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    device: torch.device,
    seed: int = 0,
) -> dict[str, float]:
    """Clean, FGSM and PGD accuracy in percent."""
    return {
        "clean": 100 * evaluate.accuracy(model, x, y, device=device),
        "fgsm": 100 * evaluate.robust_accuracy(model, x, y, attack="fgsm", eps=eps, device=device),
        "pgd": 100
        * evaluate.robust_accuracy(
            model, x, y, attack="pgd", eps=eps, steps=steps, seed=seed, device=device
        ),
    }


@dataclass
class TransferConfig:
    """Sizes and settings of :func:`nonrobustness_transfer`.

    The source task is :func:`datasets.procedural_shapes`, the target the embedded digits.
    Standard and adversarial pretraining share ``pretrain`` (same optimiser, data order);
    every fine-tune shares ``finetune``.
    """

    widths: tuple[int, ...] = (16, 32, 64)
    source_images: int = 4000
    pretrain: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=6, lr=0.05, batch_size=64, milestones=[4, 5])
    )
    finetune: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=6, lr=0.02, batch_size=64, milestones=[4, 5])
    )
    pretrain_attack: AttackConfig = field(default_factory=AttackConfig)
    discrepancy: DiscrepancyConfig | None = field(default_factory=DiscrepancyConfig)
    starts: tuple[str, ...] = ("scratch", "pretrained", "adv_pretrained")
    train_images: int | None = None
    test_images: int | None = None
    eval_eps: float = 8 / 255
    eval_steps: int = 10
    seed: int = 0


def _digits(
    train_images: int | None, test_images: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits train/test as uint8 tensors, optionally a seeded subset of each split."""
    xtr, ytr = datasets.load_digits32("train").tensors()
    xte, yte = datasets.load_digits32("test").tensors()
    gen = torch.Generator().manual_seed(seed + 12345)
    if train_images is not None and train_images < len(ytr):
        keep = torch.randperm(len(ytr), generator=gen)[:train_images].sort().values
        xtr, ytr = xtr[keep], ytr[keep]
    if test_images is not None and test_images < len(yte):
        keep = torch.randperm(len(yte), generator=gen)[:test_images].sort().values
        xte, yte = xte[keep], yte[keep]
    return xtr, ytr, xte, yte


def nonrobustness_transfer(
    config: TransferConfig | None = None,
    *,
    device: DeviceArg = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """How much adversarial (non-)robustness fine-tuning inherits from its start.

    Fine-tunes the same :class:`SmallCNN` on the digits from each start in ``config.starts``:
    ``"scratch"`` (random initialisation), ``"pretrained"`` (standard training on procedural
    shapes) and ``"adv_pretrained"`` (PGD adversarial training on the same shapes, same
    optimiser and data order), all with plain cross-entropy; and, when ``config.discrepancy``
    is set, the discrepancy-mitigating fine-tune from the standard pretrained start
    (``"pretrained+discrepancy"``). Every model is evaluated clean and under FGSM and PGD
    (``eval_eps``).

    Returns:
        ``{"models": {start: {"clean", "fgsm", "pgd", "seconds"}}, "inherited": {...},
        "pretraining": {...}, "config": {...}}``; accuracies in percent. ``inherited`` holds,
        per start, its FGSM / PGD accuracy minus that of the scratch fine-tune (negative:
        non-robustness was transferred).
    """
    cfg = config or TransferConfig()
    dev = default_device(device)
    say = log or (lambda _m: None)
    unknown = set(cfg.starts) - {"scratch", "pretrained", "adv_pretrained"}
    if unknown:
        raise ValueError(f"unknown starts {sorted(unknown)}")
    xtr, ytr, xte, yte = _digits(cfg.train_images, cfg.test_images, cfg.seed)
    need_pre = "pretrained" in cfg.starts or cfg.discrepancy is not None
    starts: dict[str, dict[str, torch.Tensor] | None] = {}
    pretraining: dict[str, Any] = {}
    if need_pre or "adv_pretrained" in cfg.starts:
        shapes = datasets.procedural_shapes(cfg.source_images, seed=cfg.seed)
        xs, ys = shapes.tensors()
    for kind in ("pretrained", "adv_pretrained"):
        if kind == "pretrained" and not need_pre:
            continue
        if kind == "adv_pretrained" and kind not in cfg.starts:
            continue
        say(f"pretraining ({kind}) on {cfg.source_images} shapes")
        net = SmallCNN(10, widths=cfg.widths, seed=cfg.seed)
        loss = cross_entropy_loss() if kind == "pretrained" else pgd_loss(cfg.pretrain_attack)
        _, secs = _timed(train_with_loss, net, xs, ys, cfg.pretrain, loss, device=dev)
        pretraining[kind] = {
            "seconds": secs,
            "source_accuracy": 100 * evaluate.accuracy(net, xs[:1000], ys[:1000], device=dev),
        }
        starts[kind] = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if "scratch" in cfg.starts:
        starts["scratch"] = None
    runs: list[tuple[str, str, LossFn]] = [
        (s, s, cross_entropy_loss()) for s in cfg.starts if s in starts
    ]
    if cfg.discrepancy is not None:
        runs.append(("pretrained+discrepancy", "pretrained", discrepancy_loss(cfg.discrepancy)))
    results: dict[str, Any] = {}
    for label, start, loss in runs:
        say(f"fine-tuning from {label}")
        net = SmallCNN(10, widths=cfg.widths, seed=cfg.seed)
        if starts[start] is not None:
            net.load_state_dict(starts[start])
        _, secs = _timed(train_with_loss, net, xtr, ytr, cfg.finetune, loss, device=dev)
        metrics = _adversarial_metrics(net, xte, yte, cfg.eval_eps, cfg.eval_steps, dev)
        results[label] = {**metrics, "seconds": secs}
    inherited = {}
    if "scratch" in results:
        base = results["scratch"]
        for label, m in results.items():
            if label != "scratch":
                inherited[label] = {k: m[k] - base[k] for k in ("clean", "fgsm", "pgd")}
    return {
        "models": results,
        "inherited": inherited,
        "pretraining": pretraining,
        "config": _jsonable(asdict(cfg)),
    }


# =============================================================================================
# 2. DAFT (arXiv 2208.09139)
# =============================================================================================


def _tint(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Grey digits recoloured: random foreground / background colours per image."""
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    fg = torch.rand(n, 3, 1, 1, generator=gen)
    bg = torch.rand(n, 3, 1, 1, generator=gen)
    lum = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    gap = ((fg - bg) * lum).sum(1, keepdim=True)
    # keep at least 0.4 of luminance contrast, in either polarity
    push = (0.4 - gap.abs()).clamp(min=0) / 2 * torch.where(gap >= 0, 1.0, -1.0)
    fg, bg = (fg + push).clamp(0, 1), (bg - push).clamp(0, 1)
    m = _as_float(x).mean(1, keepdim=True).to(fg.device)
    return m * fg + (1 - m) * bg


DOMAINS: dict[str, str] = {
    "clean": "the digits as they are (white on black)",
    "noise": "gaussian_noise, severity 3 (ImageNet-C strength)",
    "blur": "defocus_blur, severity 2 (ImageNet-C strength)",
    "fog": "fog, severity 3 (ImageNet-C strength)",
    "contrast": "contrast, severity 3 (ImageNet-C strength)",
    "tinted": "random foreground and background colours per image (either polarity)",
    "inverted": "black on white",
}
"""Domains :func:`render_domain` builds from the embedded digits, with their recipe."""

_DOMAIN_CORRUPTION = {
    "noise": ("gaussian_noise", 3),
    "blur": ("defocus_blur", 2),
    "fog": ("fog", 3),
    "contrast": ("contrast", 3),
}


def render_domain(images: torch.Tensor, name: str, seed: int = 0) -> torch.Tensor:
    """``images`` (uint8 or float, ``(N, 3, H, W)``) rendered in domain ``name`` as uint8.

    See :data:`DOMAINS`. Deterministic for a given ``seed``.
    """
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; expected one of {sorted(DOMAINS)}")
    x = _as_float(images)
    if name == "clean":
        out = x
    elif name == "inverted":
        out = 1 - x
    elif name == "tinted":
        out = _tint(x, seed)
    else:
        corruption, severity = _DOMAIN_CORRUPTION[name]
        out = C.corrupt(x, corruption, severity, seed=seed, scale=SCALE)
    return _to_uint8(out)


@dataclass
class HeadConfig:
    """Adversarial training of a teacher's head on its frozen features (DAFT's teacher).

    ``space="feature"``: penultimate features are perturbed within an L2 ball of radius
    ``eps`` times each sample's feature norm (``steps`` normalised-gradient steps), cheap
    because the backbone runs once. ``space="input"``: images are perturbed in an L-infinity
    ball of radius ``eps`` through the frozen backbone (PGD). Either way the head minimises
    ``CE(clean) + beta * KL(p(clean) || p(perturbed))`` (TRADES), starting from the ERM head.
    """

    space: str = "feature"
    eps: float = 0.1
    steps: int = 5
    beta: float = 1.0
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 128
    seed: int = 0


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    """Batch-mean ``KL(softmax(p / t) || softmax(q / t))``; gradients flow into both."""
    return F.kl_div(
        F.log_softmax(q_logits / t, 1),
        F.log_softmax(p_logits / t, 1),
        reduction="batchmean",
        log_target=True,
    )


@torch.no_grad()
def _features(
    model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    head = _last_linear(model)
    out = []
    with _eval_mode(model):
        for i in range(0, len(x), batch_size):
            feat, _ = features_and_logits(model, _as_float(x[i : i + batch_size].to(device)), head)
            out.append(feat)
    return torch.cat(out)


def _feature_pgd_l2(
    head: nn.Linear,
    feats: torch.Tensor,
    ref_logits: torch.Tensor,
    eps: float,
    steps: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """Feature perturbations within ``eps * ||f||`` (L2) maximising KL(p(f) || p(f + d))."""
    radius = eps * feats.norm(dim=1, keepdim=True).clamp(min=1e-8)
    delta = torch.randn(feats.shape, generator=gen, device=feats.device) * 1e-3 * radius
    step = 2.5 * radius / max(steps, 1)
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            value = _kl(ref_logits, head(feats + delta))
        (grad,) = torch.autograd.grad(value, delta)
        delta = delta.detach() + step * grad / grad.norm(dim=1, keepdim=True).clamp(min=1e-12)
        norm = delta.norm(dim=1, keepdim=True).clamp(min=1e-12)
        delta = delta * torch.clamp(radius / norm, max=1.0)
    return delta.detach()


def adversarial_head(
    teacher: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: HeadConfig | None = None,
    *,
    device: DeviceArg = None,
) -> nn.Module:
    """A copy of ``teacher`` whose last linear layer is adversarially trained (DAFT's teacher).

    The backbone (everything before the last ``nn.Linear``) is frozen: the standard-trained
    features are kept, only the way they are combined becomes robust. See :class:`HeadConfig`.
    Returns the new teacher in eval mode; ``teacher`` is not modified.
    """
    cfg = config or HeadConfig()
    if cfg.space not in ("feature", "input"):
        raise ValueError(f"space must be 'feature' or 'input', got {cfg.space!r}")
    dev = default_device(device)
    net = copy.deepcopy(teacher).to(dev).eval()
    head = _last_linear(net)
    for p in net.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    dgen = _device_generator(gen, dev)
    y = torch.as_tensor(y, dtype=torch.int64)
    feats = _features(net, x, dev) if cfg.space == "feature" else None
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            yb = y[idx].to(dev)
            if feats is not None:
                fb = feats[idx.to(dev)]
                logits = head(fb)
                delta = _feature_pgd_l2(head, fb, logits.detach(), cfg.eps, cfg.steps, dgen)
                logits_adv = head(fb + delta)
            else:
                xb = _as_float(x[idx].to(dev))
                with torch.no_grad():
                    fb, logits0 = features_and_logits(net, xb, head)
                adv = pgd_maximize(
                    lambda a, ref=logits0: _kl(ref, net(a)), xb, cfg.eps, cfg.steps, generator=dgen
                )
                with torch.no_grad():
                    fa, _ = features_and_logits(net, adv, head)
                logits, logits_adv = head(fb), head(fa)
            loss = F.cross_entropy(logits, yb) + cfg.beta * _kl(logits, logits_adv)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p in net.parameters():
        p.requires_grad_(True)
    return net.eval()


def distillation_loss(
    teacher: nn.Module,
    temperature: float = 4.0,
    kd_weight: float = 0.9,
    eps: float = 0.0,
    steps: int = 0,
) -> LossFn:
    """``(1 - w) CE(s(x), y) + w T^2 KL(t(x) || s(x))`` plus, with ``eps`` and ``steps``,
    ``w T^2 KL(t(x') || s(x'))`` on inputs ``x'`` that maximise the student-teacher
    disagreement in the L-infinity ball (ARD-style), so the student copies the teacher's
    behaviour around the data too. The teacher stays frozen in eval mode."""
    teacher.eval()
    t2 = temperature**2

    def loss_fn(model, xb, yb, gen, idx):
        with torch.no_grad():
            t_logits = teacher(xb)
        s_logits = model(xb)
        loss = (1 - kd_weight) * F.cross_entropy(s_logits, yb) + kd_weight * t2 * _kl(
            t_logits, s_logits, temperature
        )
        if eps > 0 and steps > 0:
            g = _device_generator(gen, xb.device)
            with _eval_mode(model):
                adv = pgd_maximize(
                    lambda a: _kl(t_logits, model(a), temperature), xb, eps, steps, generator=g
                )
            with torch.no_grad():
                t_adv = teacher(adv)
            loss = loss + kd_weight * t2 * _kl(t_adv, model(adv), temperature)
        return loss

    return loss_fn


def distill(
    student: nn.Module,
    teacher: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    train: TrainConfig,
    *,
    temperature: float = 4.0,
    kd_weight: float = 0.9,
    eps: float = 0.0,
    steps: int = 0,
    device: DeviceArg = None,
) -> nn.Module:
    """Distil ``teacher`` into ``student`` in place (see :func:`distillation_loss`)."""
    dev = default_device(device)
    teacher.to(dev)
    loss = distillation_loss(teacher, temperature, kd_weight, eps, steps)
    return train_with_loss(student, x, y, train, loss, device=dev)


@dataclass
class DAFTConfig:
    """DAFT: teacher (standard training) -> adversarial head -> distillation.

    ``teacher_widths`` / ``student_widths``: :class:`SmallCNN` stage widths. ``teacher``:
    its standard training; ``head``: :class:`HeadConfig`; ``student``: the distillation run;
    ``temperature`` and ``kd_weight`` of the distillation; ``student_eps`` /
    ``student_steps``: the perturbed-input distillation term (0 disables it).
    """

    teacher_widths: tuple[int, ...] = (32, 64, 128)
    student_widths: tuple[int, ...] = (16, 32, 64)
    teacher: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=6, lr=0.05, batch_size=64, milestones=[4, 5])
    )
    head: HeadConfig = field(default_factory=HeadConfig)
    student: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=6, lr=0.05, batch_size=64, milestones=[4, 5])
    )
    temperature: float = 4.0
    kd_weight: float = 0.9
    student_eps: float = 4 / 255
    student_steps: int = 1


@dataclass
class DomainConfig:
    """Leave-one-domain-out evaluation of DAFT (:func:`domain_generalization`).

    ``domains``: names from :data:`DOMAINS`; ``held_out``: the domains to hold out in turn
    (default: each of ``domains``); ``images_per_domain``: a random subset of the digits
    training split per domain (different per domain; default all); ``test_images``: test
    images per domain (default all).
    """

    domains: tuple[str, ...] = ("clean", "tinted", "noise", "blur")
    held_out: tuple[str, ...] | None = None
    images_per_domain: int | None = None
    test_images: int | None = None
    daft: DAFTConfig = field(default_factory=DAFTConfig)
    seed: int = 0


def _domain_sets(
    x: torch.Tensor, y: torch.Tensor, names: Sequence[str], per_domain: int | None, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for k, name in enumerate(names):
        xs, ys = x, y
        if per_domain is not None and per_domain < len(y):
            gen = torch.Generator().manual_seed(seed * 1000 + k)
            keep = torch.randperm(len(y), generator=gen)[:per_domain]
            xs, ys = x[keep], y[keep]
        out[name] = (render_domain(xs, name, seed=seed * 1000 + k), ys)
    return out


def domain_generalization(
    config: DomainConfig | None = None,
    *,
    device: DeviceArg = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """DomainBed-style leave-one-domain-out comparison of ERM, distillation and DAFT.

    For each held-out domain, on the pooled training images of the other domains: the
    teacher (``teacher_widths``) by standard training; the ERM student (cross-entropy); the
    plain-distillation student (the standard teacher, clean inputs only); the DAFT teacher
    (:func:`adversarial_head`) and the DAFT student (:func:`distill` with the perturbed-input
    term). All students share their initialisation, seed and data order. Accuracy (percent)
    on the held-out domain's test images and the mean over the training domains' test images.

    Returns:
        ``{"held_out": {domain: {model: {"held_out", "in_domain"}}}, "average": {model:
        held-out accuracy averaged over held-out domains}, "seconds": {...}, "config"}``.
    """
    cfg = config or DomainConfig()
    dcfg = cfg.daft
    dev = default_device(device)
    say = log or (lambda _m: None)
    held = cfg.held_out or cfg.domains
    if any(h not in cfg.domains for h in held):
        raise ValueError("every held-out domain must be one of config.domains")
    if len(cfg.domains) < 2:
        raise ValueError("need at least two domains")
    xtr, ytr, xte, yte = _digits(None, cfg.test_images, cfg.seed)
    train_sets = _domain_sets(xtr, ytr, cfg.domains, cfg.images_per_domain, cfg.seed)
    test_sets = _domain_sets(xte, yte, cfg.domains, None, cfg.seed + 1)
    out: dict[str, Any] = {"held_out": {}, "seconds": {}}
    for target in held:
        sources = [d for d in cfg.domains if d != target]
        x = torch.cat([train_sets[d][0] for d in sources])
        y = torch.cat([train_sets[d][1] for d in sources])
        say(f"held out {target}: training on {sources} ({len(y)} images)")
        secs: dict[str, float] = {}
        teacher = SmallCNN(10, widths=dcfg.teacher_widths, seed=cfg.seed + 1)
        _, secs["teacher"] = _timed(
            train_with_loss, teacher, x, y, dcfg.teacher, cross_entropy_loss(), device=dev
        )
        daft_teacher, secs["daft_head"] = _timed(
            adversarial_head, teacher, x, y, dcfg.head, device=dev
        )
        students: dict[str, nn.Module] = {}
        for label in ("erm", "distill", "daft"):
            s = SmallCNN(10, widths=dcfg.student_widths, seed=cfg.seed)
            if label == "erm":
                loss = cross_entropy_loss()
            elif label == "distill":
                loss = distillation_loss(teacher, dcfg.temperature, dcfg.kd_weight)
            else:
                loss = distillation_loss(
                    daft_teacher,
                    dcfg.temperature,
                    dcfg.kd_weight,
                    dcfg.student_eps,
                    dcfg.student_steps,
                )
            _, secs[label] = _timed(train_with_loss, s, x, y, dcfg.student, loss, device=dev)
            students[label] = s
        row = {}
        for label, m in {"teacher": teacher, "daft_teacher": daft_teacher, **students}.items():
            row[label] = {
                "held_out": 100 * evaluate.accuracy(m, *test_sets[target], device=dev),
                "in_domain": float(
                    np.mean(
                        [100 * evaluate.accuracy(m, *test_sets[d], device=dev) for d in sources]
                    )
                ),
            }
        out["held_out"][target] = row
        out["seconds"][target] = secs
    models = list(next(iter(out["held_out"].values())))
    out["average"] = {
        m: float(np.mean([r[m]["held_out"] for r in out["held_out"].values()])) for m in models
    }
    out["config"] = _jsonable(asdict(cfg))
    return out


# =============================================================================================
# 3. Efficiently robustify pre-trained models (arXiv 2309.07499)
# =============================================================================================


@dataclass
class AugMixConfig:
    """AugMix-style mixing (Hendrycks et al. 2020) with corruptions as the operations.

    ``width`` chains of ``depth`` (a random integer in the range) operations, each one
    corruption from ``ops`` at a random severity in ``severity``; chains are mixed with
    Dirichlet(``alpha``) weights and the mix with the original by a Beta(``alpha``, ``alpha``)
    weight, both per image. ``jsd_weight``: weight of the Jensen-Shannon consistency loss of
    :func:`augmix_finetune`.
    """

    ops: tuple[str, ...] = DEFAULT_CORRUPTIONS
    width: int = 3
    depth: tuple[int, int] = (1, 3)
    severity: tuple[int, int] = (1, 5)
    alpha: float = 1.0
    scale: str = SCALE
    jsd_weight: float = 12.0


def augmix(
    x: torch.Tensor, gen: torch.Generator, config: AugMixConfig | None = None
) -> torch.Tensor:
    """One AugMix view of a float [0, 1] batch (on its device); see :class:`AugMixConfig`.

    Each chain step applies one corruption to the whole batch (drawn per batch, not per image:
    the corruptions are batched operations); the mixing weights are per image.
    """
    cfg = config or AugMixConfig()
    if not cfg.ops:
        raise ValueError("AugMix needs at least one operation")
    rs = _numpy_rng(gen)
    n = len(x)
    w = torch.from_numpy(rs.dirichlet([cfg.alpha] * cfg.width, size=n).astype(np.float32))
    m = torch.from_numpy(rs.beta(cfg.alpha, cfg.alpha, size=n).astype(np.float32))
    w, m = w.to(x.device), m.to(x.device).view(-1, 1, 1, 1)
    mix = torch.zeros_like(x)
    for i in range(cfg.width):
        xa = x
        for _ in range(rs.randint(cfg.depth[0], cfg.depth[1] + 1)):
            op = cfg.ops[rs.randint(len(cfg.ops))]
            sev = int(rs.randint(cfg.severity[0], cfg.severity[1] + 1))
            xa = C.corrupt(xa, op, sev, seed=int(rs.randint(2**31 - 1)), scale=cfg.scale)
        mix = mix + w[:, i].view(-1, 1, 1, 1) * xa
    return ((1 - m) * x + m * mix).clamp(0, 1)


def _jsd(*logits: torch.Tensor) -> torch.Tensor:
    probs = [F.softmax(z, 1) for z in logits]
    mean = torch.clamp(sum(probs) / len(probs), 1e-7, 1).log()
    return sum(F.kl_div(mean, p, reduction="batchmean") for p in probs) / len(probs)


def augmix_loss(config: AugMixConfig | None = None) -> LossFn:
    """AugMix training: CE on the clean batch + ``jsd_weight`` * JSD(clean, view 1, view 2),
    the three views in one forward pass (as in the AugMix reference)."""
    cfg = config or AugMixConfig()

    def loss_fn(model, xb, yb, gen, idx):
        views = torch.cat([xb, augmix(xb, gen, cfg), augmix(xb, gen, cfg)])
        lc, l1, l2 = model(views).chunk(3)
        return F.cross_entropy(lc, yb) + cfg.jsd_weight * _jsd(lc, l1, l2)

    return loss_fn


def augmix_finetune(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    train: TrainConfig,
    config: AugMixConfig | None = None,
    *,
    device: DeviceArg = None,
) -> nn.Module:
    """Robust fine-tuning with AugMix + JSD (:func:`augmix_loss`), every parameter, in place."""
    return train_with_loss(model, x, y, train, augmix_loss(config), device=device)


_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def select_parameters(
    model: nn.Module, spec: Sequence[str], example_input: torch.Tensor | None = None
) -> list[str]:
    """Names of the parameters chosen by ``spec`` (a union), in model order.

    Items: ``"norm"`` (every BatchNorm / GroupNorm / LayerNorm parameter), ``"head"`` (the
    last linear layer), ``"first:K"`` / ``"last:K"`` (the first / last K weight layers --
    modules holding a parameter of two or more dimensions -- in execution order, see
    :func:`parameters_by_depth`, with the normalisation layer right after each), or a regular
    expression matched in full against parameter names.
    """
    ordered = [n for n, _ in parameters_by_depth(model, example_input)]
    modules = dict(model.named_modules())
    owner = {n: n.rsplit(".", 1)[0] if "." in n else "" for n in ordered}
    # weight-layer units: a module with a >=2-D parameter, plus following param-only modules
    shapes = {n: p.dim() for n, p in model.named_parameters()}
    units: list[list[str]] = []
    for n in ordered:
        if shapes[n] >= 2 and not (units and owner[units[-1][-1]] == owner[n]):
            units.append([])
        if not units:
            units.append([])
        units[-1].append(n)
    chosen: set[str] = set()
    for item in spec:
        if item == "norm":
            chosen |= {n for n in ordered if isinstance(modules[owner[n]], _NORM_TYPES)}
        elif item == "head":
            head = _last_linear(model)
            chosen |= {n for n in ordered if modules[owner[n]] is head}
        elif re.fullmatch(r"(first|last):\d+", item):
            where, k = item.split(":")
            k = int(k)
            pick = units[:k] if where == "first" else units[-k:] if k else []
            chosen |= {n for u in pick for n in u}
        else:
            reg = re.compile(item)
            hits = {n for n in ordered if reg.fullmatch(n)}
            if not hits:
                raise ValueError(f"parameter pattern {item!r} matches nothing")
            chosen |= hits
    return [n for n in ordered if n in chosen]


@dataclass
class PartialTuneConfig:
    """Tuning a few tensors of a large model by distillation from a small robust teacher.

    ``tune``: :func:`select_parameters` spec. Loss per batch, with ``x_a`` an AugMix view
    (``augmix``) of the clean batch ``x``: ``teacher_weight * T^2 KL(teacher(x_a) ||
    model(x_a)) + self_weight * T^2 KL(original(x) || model(x)) + ce_weight * CE(model(x_a),
    y)``, where ``original`` is the large model before tuning (its clean outputs are computed
    once, before training) -- robustness from the teacher, clean behaviour from the model
    itself.
    """

    tune: tuple[str, ...] = ("norm", "first:2")
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=4, lr=0.02, batch_size=64, milestones=[3])
    )
    temperature: float = 2.0
    teacher_weight: float = 1.0
    self_weight: float = 1.0
    ce_weight: float = 0.5
    augmix: AugMixConfig = field(default_factory=AugMixConfig)


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, device: torch.device, bs: int = 256) -> torch.Tensor:
    with _eval_mode(model.to(device)):
        return torch.cat([model(_as_float(x[i : i + bs].to(device))) for i in range(0, len(x), bs)])


def robustify_with_small_teacher(
    large: nn.Module,
    teacher: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: PartialTuneConfig | None = None,
    *,
    device: DeviceArg = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Tune only ``config.tune`` of a copy of ``large`` by distillation (see
    :class:`PartialTuneConfig`); ``large`` and ``teacher`` are not modified.

    Returns:
        ``(tuned model, info)`` with ``info``: ``tuned`` (parameter names), ``tuned_params``,
        ``total_params``, ``fraction`` and ``seconds`` (wall time, including computing the
        large model's clean outputs).
    """
    cfg = config or PartialTuneConfig()
    dev = default_device(device)
    model = copy.deepcopy(large).to(dev)
    teacher = teacher.to(dev).eval()
    example = _as_float(x[:2].to(dev))
    names = select_parameters(model, cfg.tune, example)
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    start = time.perf_counter()
    original = _logits(model, x, dev)
    t, t2 = cfg.temperature, cfg.temperature**2

    def loss_fn(m, xb, yb, gen, idx):
        xa = augmix(xb, gen, cfg.augmix)
        with torch.no_grad():
            t_logits = teacher(xa)
        lc, la = m(torch.cat([xb, xa])).chunk(2)
        loss = cfg.teacher_weight * t2 * _kl(t_logits, la, t)
        loss = loss + cfg.self_weight * t2 * _kl(original[idx.to(dev)], lc, t)
        if cfg.ce_weight:
            loss = loss + cfg.ce_weight * F.cross_entropy(la, yb)
        return loss

    train_with_loss(model, x, y, cfg.train, loss_fn, params=params, device=dev)
    seconds = time.perf_counter() - start
    total = sum(p.numel() for p in model.parameters())
    tuned = sum(p.numel() for p in params)
    return model, {
        "tuned": names,
        "tuned_params": tuned,
        "total_params": total,
        "fraction": tuned / total,
        "seconds": seconds,
    }


def linear_probe_accuracy(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    epochs: int = 300,
    lr: float = 0.05,
    seed: int = 0,
    device: DeviceArg = None,
) -> float:
    """Transfer accuracy (percent): a linear classifier on ``model``'s frozen penultimate
    features (standardised), full-batch Adam on the training images, scored on the test ones.
    """
    dev = default_device(device)
    ftr, fte = _features(model, x_train, dev), _features(model, x_test, dev)
    mean, std = ftr.mean(0), ftr.std(0).clamp(min=1e-6)
    ftr, fte = (ftr - mean) / std, (fte - mean) / std
    ytr = torch.as_tensor(y_train).to(dev)
    classes = int(max(int(ytr.max()), int(torch.as_tensor(y_test).max()))) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = nn.Linear(ftr.shape[1], classes).to(dev)
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        loss = F.cross_entropy(probe(ftr), ytr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = probe(fte).argmax(1).cpu()
    return 100 * float((pred == torch.as_tensor(y_test)).float().mean())


@dataclass
class SmallTeacherConfig:
    """Sizes of :func:`small_teacher_study`.

    A large :class:`SmallCNN` (``large_widths``) and a small one (``small_widths``) are both
    pretrained on procedural shapes (``pretrain_images`` x ``pretrain_epochs``, AdamW) and
    fine-tuned clean on digits (``finetune``). The small one is robustified with AugMix + JSD
    (``teacher``); the large one either partially by distillation (``partial``) or fully with
    AugMix + JSD (``full``, every parameter, same epochs as ``partial`` by default).
    Transfer accuracy is a linear probe on ``transfer_images`` procedural patterns.
    """

    large_widths: tuple[int, ...] = (32, 64, 128)
    small_widths: tuple[int, ...] = (8, 16, 32)
    pretrain_images: int = 4000
    pretrain_epochs: int = 4
    finetune: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=6, lr=0.02, batch_size=64, milestones=[4, 5])
    )
    teacher: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=6, lr=0.02, batch_size=64, milestones=[4, 5])
    )
    partial: PartialTuneConfig = field(default_factory=PartialTuneConfig)
    full: TrainConfig | None = None
    augmix: AugMixConfig = field(default_factory=AugMixConfig)
    test_corruptions: tuple[str, ...] = DEFAULT_CORRUPTIONS
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    train_images: int | None = None
    test_images: int | None = None
    transfer_images: int = 1000
    seed: int = 0


def _corrupted_sets(
    x: torch.Tensor, names: Sequence[str], severities: Sequence[int], seed: int
) -> dict[tuple[str, int], torch.Tensor]:
    """Fixed uint8 corrupted copies of ``x`` per (corruption, severity)."""
    return {
        (n, s): _to_uint8(C.corrupt(_as_float(x), n, s, seed=seed + 1000 * s + i, scale=SCALE))
        for i, n in enumerate(names)
        for s in severities
    }


def _corruption_metrics(
    model: nn.Module, sets: Mapping[tuple[str, int], torch.Tensor], y: torch.Tensor, dev
) -> dict[str, Any]:
    """Accuracy (percent) per corruption and severity, their mean, and the errors per cell."""
    per: dict[str, dict[str, float]] = {}
    for (name, sev), xs in sets.items():
        per.setdefault(name, {})[str(sev)] = 100 * evaluate.accuracy(model, xs, y, device=dev)
    mean = float(np.mean([a for cells in per.values() for a in cells.values()]))
    return {"mean": mean, "per_corruption": per}


def _relative_mce(model_cells: Mapping[str, Any], clean_cells: Mapping[str, Any]) -> float:
    """mCE (percent) with the clean twin as the baseline: mean_c sum_s E / sum_s E_clean."""
    errs = {n: [1 - a / 100 for a in cells.values()] for n, cells in model_cells.items()}
    base = {n: [1 - a / 100 for a in cells.values()] for n, cells in clean_cells.items()}
    if any(sum(v) == 0 for v in base.values()):
        return float("nan")
    return 100 * evaluate.mean_corruption_error(errs, base)["mCE"]


def _pretrained(
    widths: Sequence[int], images: int, epochs: int, seed: int, dev: torch.device
) -> tuple[SmallCNN, float]:
    shapes = datasets.procedural_shapes(images, seed=seed)
    xs, ys = shapes.tensors()
    net = SmallCNN(10, widths=tuple(widths), seed=seed)
    _, secs = _timed(fit, net, xs, ys, epochs=epochs, seed=seed, device=dev)
    return net, secs


def small_teacher_study(
    config: SmallTeacherConfig | None = None,
    *,
    device: DeviceArg = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Partial robustification of a large model by a small robust teacher vs full robust
    fine-tuning (arXiv 2309.07499), on the digits.

    Returns:
        ``{"models": {name: {"clean", "corruption", "transfer", "seconds"}}, "partial":
        {"fraction", "tuned_params", "total_params", "tuned", "seconds"}, "seconds": {...},
        "config"}`` for ``large_clean``, ``small_teacher``, ``large_partial`` and
        ``large_full``; accuracies in percent, ``corruption`` the mean over
        ``test_corruptions`` x ``severities``.
    """
    cfg = config or SmallTeacherConfig()
    dev = default_device(device)
    say = log or (lambda _m: None)
    xtr, ytr, xte, yte = _digits(cfg.train_images, cfg.test_images, cfg.seed)
    patterns = datasets.procedural_patterns(2 * cfg.transfer_images, seed=cfg.seed + 5)
    xp, yp = patterns.tensors()
    ptr, pte = slice(0, cfg.transfer_images), slice(cfg.transfer_images, None)
    sets = _corrupted_sets(xte, cfg.test_corruptions, cfg.severities, cfg.seed)
    say("pretraining and clean fine-tuning the large and the small model")
    large, _ = _pretrained(
        cfg.large_widths, cfg.pretrain_images, cfg.pretrain_epochs, cfg.seed, dev
    )
    train_with_loss(large, xtr, ytr, cfg.finetune, cross_entropy_loss(), device=dev)
    small, _ = _pretrained(
        cfg.small_widths, cfg.pretrain_images, cfg.pretrain_epochs, cfg.seed, dev
    )
    train_with_loss(small, xtr, ytr, cfg.finetune, cross_entropy_loss(), device=dev)
    say("robustifying the small teacher (AugMix + JSD)")
    teacher = copy.deepcopy(small)
    _, t_secs = _timed(augmix_finetune, teacher, xtr, ytr, cfg.teacher, cfg.augmix, device=dev)
    say("tuning part of the large model by distillation")
    partial, info = robustify_with_small_teacher(large, teacher, xtr, ytr, cfg.partial, device=dev)
    say("fully fine-tuning the large model with AugMix + JSD")
    full = copy.deepcopy(large)
    full_train = cfg.full or cfg.partial.train
    _, f_secs = _timed(augmix_finetune, full, xtr, ytr, full_train, cfg.augmix, device=dev)
    models: dict[str, Any] = {}
    seconds = {
        "large_clean": 0.0,
        "small_teacher": t_secs,
        "large_partial": info["seconds"],
        "large_full": f_secs,
    }
    for name, m in (
        ("large_clean", large),
        ("small_teacher", teacher),
        ("large_partial", partial),
        ("large_full", full),
    ):
        models[name] = {
            "clean": 100 * evaluate.accuracy(m, xte, yte, device=dev),
            "corruption": _corruption_metrics(m, sets, yte, dev)["mean"],
            "transfer": linear_probe_accuracy(
                m, xp[ptr], yp[ptr], xp[pte], yp[pte], seed=cfg.seed, device=dev
            ),
            "seconds": seconds[name],
        }
    return {
        "models": models,
        "partial": info,
        "seconds": {"teacher": t_secs, "partial": info["seconds"], "full": f_secs},
        "config": _jsonable(asdict(cfg)),
    }


# =============================================================================================
# Comparison
# =============================================================================================

METHODS: dict[str, str] = {
    "corruption_finetune": "corruption fine-tuning",
    "pgd_adversarial": "PGD adversarial training",
    "discrepancy": "discrepancy mitigation",
    "daft": "DAFT",
    "small_teacher": "small-teacher tuning",
}
"""The comparison's rows (keys of ``results["rows"]``) and their display names."""

COLUMNS: dict[str, str] = {
    "clean_accuracy": "clean acc %",
    "corruption_accuracy": "corruption acc %",
    "mCE": "mCE % (vs twin)",
    "pgd_accuracy": "PGD acc %",
    "train_seconds": "train s",
    "signature_bytes": "RWS bytes",
    "patched_clean_change": "RWS clean Δ",
    "patched_corruption_gain": "RWS corr. gain",
    "patched_pgd_gain": "RWS PGD gain",
    "difference_bytes": "diff. bytes",
    "difference_clean_change": "diff. clean Δ",
    "difference_corruption_gain": "diff. corr. gain",
    "difference_pgd_gain": "diff. PGD gain",
}
"""The comparison's columns (keys of every row) and their display names."""


@dataclass
class ComparisonConfig:
    """Sizes and settings of :func:`compare_methods`.

    ``widths``: the model every method robustifies (and the small teacher of the
    small-teacher row); ``large_widths``: the large model of the small-teacher row;
    ``daft_teacher_widths``: DAFT's teacher (``None``: the clean twin serves as DAFT's
    standard-trained teacher). All fine-tunes share ``finetune``; models are pretrained on
    ``pretrain_images`` procedural shapes. Corruption training uses ``train_corruptions``,
    evaluation ``test_corruptions`` x ``severities`` at ImageNet-C strength; PGD evaluation
    ``eval_eps`` with ``eval_steps``. Signatures: ``signature_layers`` (as in
    :func:`robustpatch.extract`), ``bits``-bit affine quantization in groups of ``group``.
    """

    widths: tuple[int, ...] = (16, 32, 64)
    large_widths: tuple[int, ...] = (32, 64, 128)
    daft_teacher_widths: tuple[int, ...] | None = (32, 64, 128)
    pretrain_images: int = 4000
    pretrain_epochs: int = 4
    finetune: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=6, lr=0.05, batch_size=64, milestones=[4, 5])
    )
    train_images: int | None = None
    test_images: int | None = None
    train_corruptions: tuple[str, ...] = DEFAULT_CORRUPTIONS
    test_corruptions: tuple[str, ...] = DEFAULT_CORRUPTIONS
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    attack: AttackConfig = field(default_factory=AttackConfig)
    discrepancy: DiscrepancyConfig = field(default_factory=DiscrepancyConfig)
    daft_head: HeadConfig = field(default_factory=HeadConfig)
    daft_temperature: float = 4.0
    daft_kd_weight: float = 0.9
    daft_student_eps: float = 4 / 255
    daft_student_steps: int = 1
    augmix: AugMixConfig = field(default_factory=AugMixConfig)
    partial: PartialTuneConfig = field(default_factory=PartialTuneConfig)
    eval_eps: float = 8 / 255
    eval_steps: int = 10
    signature_layers: Any = "auto"
    bits: int = 4
    group: int = 128
    seed: int = 0

    @classmethod
    def tiny(cls) -> ComparisonConfig:
        """About a minute on 2 CPU cores: the pipeline and the table, not the science."""
        ft = TrainConfig(epochs=3, lr=0.05, batch_size=64, milestones=[2])
        ops = ("gaussian_noise", "contrast")
        return cls(
            widths=(8, 16, 32),
            large_widths=(16, 32, 64),
            daft_teacher_widths=None,
            pretrain_images=1000,
            pretrain_epochs=2,
            finetune=ft,
            test_images=200,
            train_corruptions=ops,
            test_corruptions=ops,
            severities=(2, 4),
            attack=AttackConfig(eps=8 / 255, steps=2),
            discrepancy=DiscrepancyConfig(beta=1.0, eps=8 / 255, steps=2),
            daft_head=HeadConfig(epochs=5),
            augmix=AugMixConfig(ops=ops, width=2, depth=(1, 2)),
            partial=PartialTuneConfig(
                train=TrainConfig(epochs=2, lr=0.02, batch_size=64, milestones=[1]),
                augmix=AugMixConfig(ops=ops, width=2, depth=(1, 2)),
            ),
            eval_steps=5,
        )


def _state_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _evaluate_model(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sets: Mapping[tuple[str, int], torch.Tensor],
    cfg: ComparisonConfig,
    dev: torch.device,
) -> dict[str, Any]:
    corr = _corruption_metrics(model, sets, y, dev)
    return {
        "clean_accuracy": 100 * evaluate.accuracy(model, x, y, device=dev),
        "corruption_accuracy": corr["mean"],
        "per_corruption": corr["per_corruption"],
        "pgd_accuracy": 100
        * evaluate.robust_accuracy(
            model, x, y, attack="pgd", eps=cfg.eval_eps, steps=cfg.eval_steps, device=dev
        ),
    }


def _signature_arm(
    name: str,
    pre: dict[str, np.ndarray],
    clean: nn.Module,
    robust: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sets: Mapping[tuple[str, int], torch.Tensor],
    cfg: ComparisonConfig,
    dev: torch.device,
    folder: Path,
    method: str = "projection",
    layers: Any = None,
) -> dict[str, Any]:
    """Extract (``method``), quantize, save, reload and apply a signature to the clean twin;
    evaluate the patched model."""
    from robustpatch.extract import extract
    from robustpatch.signature import Signature, is_bn_stat
    from robustpatch.targets import apply

    clean_np, robust_np = _state_numpy(clean), _state_numpy(robust)
    sig = extract(
        pre,
        clean_np,
        robust_np,
        cfg.signature_layers if layers is None else layers,
        method=method,
        name=name,
        order=list(clean.state_dict()),
        provenance={"method": name, "dataset": "digits32", "seed": cfg.seed},
    )
    q = sig.quantize(cfg.bits, "affine", "group", cfg.group)
    path = q.save(folder / f"{name}.{method}.rws")
    loaded = Signature.load(path)
    patched = copy.deepcopy(clean).cpu()
    state = patched.state_dict()  # tensors share storage with the module: patched in place
    apply(state, loaded, 1.0)
    patched.to(dev)
    metrics = _evaluate_model(patched, x, y, sets, cfg, dev)
    # weights the signature could touch: float state entries except BatchNorm statistics
    total = sum(
        v.numel()
        for k, v in clean.state_dict().items()
        if v.is_floating_point() and not is_bn_stat(k)
    )
    touched = sum(e.numel for e in loaded.deltas.values())
    return {
        "file_bytes": path.stat().st_size,
        "payload_bytes": int(loaded.nbytes),
        "tensors": len(loaded.deltas),
        "bn_buffers": len(loaded.bn),
        "params_touched": int(touched),
        "param_fraction": touched / total,
        "layers": {
            k: v for k, v in sig.meta.get("layers", {}).items() if k in ("mode", "units", "of")
        },
        "patched": metrics,
    }


def _train_methods(
    cfg: ComparisonConfig,
    xtr: torch.Tensor,
    ytr: torch.Tensor,
    xte: torch.Tensor,
    yte: torch.Tensor,
    sets: Mapping[tuple[str, int], torch.Tensor],
    dev: torch.device,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Train the clean twins and the five robust models of :func:`compare_methods`."""
    say(f"pretraining the model {cfg.widths} on {cfg.pretrain_images} shapes")
    base, _ = _pretrained(cfg.widths, cfg.pretrain_images, cfg.pretrain_epochs, cfg.seed, dev)
    pre_state = {k: v.detach().cpu().clone() for k, v in base.state_dict().items()}

    def from_pre() -> SmallCNN:
        m = SmallCNN(10, widths=cfg.widths, seed=cfg.seed)
        m.load_state_dict(pre_state)
        return m.to(dev)

    def run(loss: LossFn) -> tuple[nn.Module, float]:
        m = from_pre()
        _, secs = _timed(train_with_loss, m, xtr, ytr, cfg.finetune, loss, device=dev)
        return m, secs

    say("clean fine-tune (the clean twin)")
    clean, clean_secs = run(cross_entropy_loss())
    robust: dict[str, tuple[nn.Module, float, dict[str, Any]]] = {}
    say("corruption fine-tuning")
    m, s = run(corruption_loss(cfg.train_corruptions))
    robust["corruption_finetune"] = (m, s, {})
    say("PGD adversarial training")
    m, s = run(pgd_loss(cfg.attack))
    robust["pgd_adversarial"] = (m, s, {})
    say("discrepancy-mitigating fine-tuning")
    m, s = run(discrepancy_loss(cfg.discrepancy))
    robust["discrepancy"] = (m, s, {})

    say("DAFT: teacher, adversarial head, distillation")
    t_start = time.perf_counter()
    if cfg.daft_teacher_widths is None:
        teacher = clean
        teacher_secs = 0.0
    else:
        teacher = SmallCNN(10, widths=cfg.daft_teacher_widths, seed=cfg.seed + 1)
        _, teacher_secs = _timed(
            train_with_loss, teacher, xtr, ytr, cfg.finetune, cross_entropy_loss(), device=dev
        )
    daft_teacher = adversarial_head(teacher, xtr, ytr, cfg.daft_head, device=dev)
    head_secs = time.perf_counter() - t_start - teacher_secs
    m, s = run(
        distillation_loss(
            daft_teacher,
            cfg.daft_temperature,
            cfg.daft_kd_weight,
            cfg.daft_student_eps,
            cfg.daft_student_steps,
        )
    )
    robust["daft"] = (
        m,
        s + head_secs + teacher_secs,
        {
            "teacher_seconds": teacher_secs,
            "head_seconds": head_secs,
            "student_seconds": s,
            "teacher_reused_clean_twin": cfg.daft_teacher_widths is None,
            "teacher_clean_accuracy": 100 * evaluate.accuracy(daft_teacher, xte, yte, device=dev),
        },
    )

    say(f"small-teacher tuning: large model {cfg.large_widths}")
    large_base, _ = _pretrained(
        cfg.large_widths, cfg.pretrain_images, cfg.pretrain_epochs, cfg.seed, dev
    )
    large_pre = _state_numpy(large_base)
    large_clean = large_base
    train_with_loss(large_clean, xtr, ytr, cfg.finetune, cross_entropy_loss(), device=dev)
    small_teacher = from_pre()
    _, st_secs = _timed(
        augmix_finetune, small_teacher, xtr, ytr, cfg.finetune, cfg.augmix, device=dev
    )
    tuned, info = robustify_with_small_teacher(
        large_clean, small_teacher, xtr, ytr, cfg.partial, device=dev
    )
    robust["small_teacher"] = (
        tuned,
        info["seconds"],
        {
            "teacher_seconds": st_secs,
            "tuned_fraction": info["fraction"],
            "tuned_params": info["tuned_params"],
            "total_params": info["total_params"],
            "tuned": info["tuned"],
            "teacher_corruption_accuracy": _corruption_metrics(small_teacher, sets, yte, dev)[
                "mean"
            ],
        },
    )

    return {
        "pre_state": pre_state,
        "clean": clean,
        "clean_seconds": clean_secs,
        "large_pre": large_pre,
        "large_clean": large_clean,
        "robust": robust,
    }


def compare_methods(
    config: ComparisonConfig | None = None,
    *,
    device: DeviceArg = None,
    out: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the five robustifiers on the same digits, from the same pretrained start.

    Every row is a robust model with a *clean twin*: the same architecture fine-tuned on
    clean digits from the same pretrained weights with the same seed and data order
    (``finetune``). Rows: ``corruption_finetune`` (cross-entropy on corrupted batches),
    ``pgd_adversarial`` (PGD training), ``discrepancy`` (:func:`discrepancy_loss`), ``daft``
    (adversarial-head teacher distilled into the pretrained model), ``small_teacher`` (the
    small model robustified with AugMix + JSD, then a few tensors of the *large* model tuned
    by distillation; its clean twin is the large clean model). For each: clean, corruption
    and PGD accuracy, mCE relative to the clean twin, training time, and two ``bits``-bit
    signatures (robust vs clean twin): the paper's projection (columns ``signature_bytes``,
    ``patched_*``) and the plain difference (``difference_*``). Each is saved to a file,
    reloaded, applied to the clean twin (alpha 1), and the patched twin's change in clean,
    corruption and PGD accuracy is recorded.

    Args:
        config: sizes (``ComparisonConfig.tiny()`` for tests).
        device: default CUDA if available, else CPU.
        out: if given, a folder receiving ``comparison.json``, ``comparison.md`` and the
            signature files; otherwise signatures go to a temporary folder.
        log: progress messages.

    Returns:
        A JSON-able dict: ``rows`` (per method, every key of :data:`COLUMNS` plus details),
        ``baselines`` (the clean twins), ``columns``, ``methods``, ``seconds``, ``config``.
    """
    cfg = config or ComparisonConfig()
    dev = default_device(device)
    say = log or (lambda _m: None)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    xtr, ytr, xte, yte = _digits(cfg.train_images, cfg.test_images, cfg.seed)
    sets = _corrupted_sets(xte, cfg.test_corruptions, cfg.severities, cfg.seed)

    trained = _train_methods(cfg, xtr, ytr, xte, yte, sets, dev, say)
    pre_state, clean, clean_secs = trained["pre_state"], trained["clean"], trained["clean_seconds"]
    large_pre, large_clean, robust = trained["large_pre"], trained["large_clean"], trained["robust"]
    say("evaluating, extracting and applying signatures")
    baselines = {
        "clean": {**_evaluate_model(clean, xte, yte, sets, cfg, dev), "train_seconds": clean_secs},
        "clean_large": _evaluate_model(large_clean, xte, yte, sets, cfg, dev),
    }
    pre_np = {k: v.numpy().copy() for k, v in pre_state.items()}
    rows: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        if out is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        else:
            folder = Path(out)
            folder.mkdir(parents=True, exist_ok=True)
        for name, (model, secs, extra) in robust.items():
            twin_name = "clean_large" if name == "small_teacher" else "clean"
            twin = large_clean if name == "small_teacher" else clean
            pre = large_pre if name == "small_teacher" else pre_np
            metrics = _evaluate_model(model, xte, yte, sets, cfg, dev)
            twin_m = baselines[twin_name]
            # small-teacher tuning changed only its tuned tensors: sign exactly those
            tuned = extra.get("tuned")
            layers = [re.escape(n) for n in tuned] if tuned else None
            sigs = {
                method: _signature_arm(
                    name, pre, twin, model, xte, yte, sets, cfg, dev, folder, method, layers
                )
                for method in ("projection", "difference")
            }

            proj, diff = (
                {
                    k: sigs[method]["patched"][f"{k}_accuracy"] - twin_m[f"{k}_accuracy"]
                    for k in ("clean", "corruption", "pgd")
                }
                for method in ("projection", "difference")
            )
            rows[name] = {
                "method": METHODS[name],
                "clean_accuracy": metrics["clean_accuracy"],
                "corruption_accuracy": metrics["corruption_accuracy"],
                "mCE": _relative_mce(metrics["per_corruption"], twin_m["per_corruption"]),
                "pgd_accuracy": metrics["pgd_accuracy"],
                "train_seconds": secs,
                "signature_bytes": sigs["projection"]["file_bytes"],
                "patched_clean_change": proj["clean"],
                "patched_corruption_gain": proj["corruption"],
                "patched_pgd_gain": proj["pgd"],
                "difference_bytes": sigs["difference"]["file_bytes"],
                "difference_clean_change": diff["clean"],
                "difference_corruption_gain": diff["corruption"],
                "difference_pgd_gain": diff["pgd"],
                "twin": twin_name,
                "per_corruption": metrics["per_corruption"],
                "signatures": sigs,
                "details": extra,
            }
    results = {
        "methods": dict(METHODS),
        "columns": dict(COLUMNS),
        "rows": rows,
        "baselines": baselines,
        "seconds": time.perf_counter() - t0,
        "config": {
            **_jsonable(asdict(cfg)),
            "device": str(dev),
            "scale": SCALE,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
        },
    }
    results = _jsonable(results)
    if out is not None:
        folder = Path(out)
        evaluate.save_json(results, folder / "comparison.json")
        (folder / "comparison.md").write_text(comparison_markdown(results))
    return results


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def comparison_markdown(results: Mapping[str, Any]) -> str:
    """The :func:`compare_methods` result as a Markdown report (one table plus notes)."""
    cols = results.get("columns", COLUMNS)
    lines = [
        "# Robustifiers compared",
        "",
        "Digits test set; corruption accuracy is the mean over "
        f"{', '.join(results['config']['test_corruptions'])} at severities "
        f"{', '.join(str(s) for s in results['config']['severities'])} "
        f"({results['config'].get('scale', SCALE)}-C strength); PGD: L-inf eps "
        f"{results['config']['eval_eps'] * 255:.0f}/255, {results['config']['eval_steps']} steps. "
        "mCE is relative to each row's clean twin (100 = as fragile as the clean twin). "
        f"Signature: {results['config']['bits']}-bit affine, groups of "
        f"{results['config']['group']}, file size; *patched gain*: the signature applied "
        "(alpha = 1) to the clean twin, minus the clean twin, in accuracy points.",
        "",
        "| method | " + " | ".join(cols.values()) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name, row in results["rows"].items():
        cells = []
        for key in cols:
            v = row.get(key)
            if key.endswith("_bytes"):
                cells.append(_fmt(int(v)) if v is not None else "n/a")
            elif key == "train_seconds":
                extra = row.get("details", {}).get("teacher_seconds")
                s = _fmt(v)
                if name == "small_teacher" and extra is not None:
                    s += f" (+{_fmt(extra)} teacher)"
                cells.append(s)
            else:
                cells.append(_fmt(v))
        lines.append(f"| {row.get('method', name)} | " + " | ".join(cells) + " |")
    lines += ["", "Clean twins (plain fine-tunes from the same pretrained weights):", ""]
    lines += ["| model | clean acc % | corruption acc % | PGD acc % |", "|---|---|---|---|"]
    for name, b in results["baselines"].items():
        lines.append(
            f"| {name} | {_fmt(b['clean_accuracy'])} | {_fmt(b['corruption_accuracy'])} | "
            f"{_fmt(b['pgd_accuracy'])} |"
        )
    st = results["rows"].get("small_teacher", {}).get("details", {})
    if st:
        lines += [
            "",
            f"Small-teacher tuning changed {100 * st['tuned_fraction']:.1f}% of the large "
            f"model's parameters ({st['tuned_params']:,} of {st['total_params']:,}); its row's "
            "clean twin is the large clean model.",
        ]
    lines += [
        "",
        f"Total {results['seconds']:.0f} s on {results['config']['device']} "
        f"({results['config'].get('threads', '?')} torch threads).",
        "",
    ]
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    """Tuples to lists, numpy scalars to Python numbers, recursively; NaN kept as None."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return json.loads(json.dumps(obj, default=str))
