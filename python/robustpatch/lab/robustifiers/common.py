"""Shared pieces of the robustifiers: features, attacks, losses, the digits data."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import corruptions as C
from .. import datasets, training
from ..training import DeviceArg, LossFn, TrainConfig, eval_mode

# Corruption strengths: at CIFAR-C strengths 32-px digits barely suffer (see lab/demo.py).
SCALE = "imagenet"
# One of each family: noise, blur, weather, digital (the demo's set).
DEFAULT_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "fog", "contrast")


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x
    return torch.round(x.clamp(0, 1) * 255).to(torch.uint8)


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


# The lab's one loop (:func:`robustpatch.lab.training.train`): SGD with step decay, batches
# in the order of a generator seeded with ``config.seed``, a second one for the loss.
train_with_loss = training.train


def six_epochs(lr: float) -> Any:
    """A dataclass field whose default is the robustifiers' usual run: 6 epochs at ``lr``,
    batch 64, the learning rate × 0.1 after epochs 4 and 5."""
    return field(
        default_factory=lambda: TrainConfig(epochs=6, lr=lr, batch_size=64, milestones=[4, 5])
    )


Finetuner = Callable[..., nn.Module]
"""``(model, x, y, train, config=None, *, device=None) -> model``: the model fine-tuned in
place with :func:`train_with_loss` on the loss its config describes."""


def finetuner(
    make_loss: Callable[[Any], LossFn], default: Callable[[], Any], doc: str
) -> Finetuner:
    """A fine-tune entry point: ``make_loss(config or default())`` through the lab's loop."""

    def finetune(
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        train: TrainConfig,
        config: Any = None,
        *,
        device: DeviceArg = None,
    ) -> nn.Module:
        loss = make_loss(config if config is not None else default())
        return train_with_loss(model, x, y, train, loss, device=device)

    finetune.__doc__ = doc
    return finetune


def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` and its wall time in seconds."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


# ---------------------------------------------------------------------------------- losses


def cross_entropy_loss() -> LossFn:
    """Plain fine-tuning: cross-entropy on the clean batch."""
    return training.cross_entropy


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
        with eval_mode(model):
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
