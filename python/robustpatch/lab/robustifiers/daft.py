"""DAFT (Nasery et al., arXiv 2208.09139): an adversarially trained head distilled into a
student, evaluated leave-one-domain-out."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import corruptions as C
from .. import evaluate, training
from ..models import SmallCNN, default_device
from ..training import DeviceArg, LossFn, TrainConfig, as_float, eval_mode
from .common import (
    SCALE,
    _device_generator,
    _digits,
    _jsonable,
    _last_linear,
    _timed,
    _to_uint8,
    cross_entropy_loss,
    features_and_logits,
    pgd_maximize,
    six_epochs,
    train_with_loss,
)


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
    m = as_float(x).mean(1, keepdim=True).to(fg.device)
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
    x = as_float(images)
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
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            feat, _ = features_and_logits(model, as_float(x[i : i + batch_size].to(device)), head)
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
    gen = torch.Generator().manual_seed(cfg.seed)
    dgen = _device_generator(gen, dev)
    feature_space = cfg.space == "feature"

    def loss_fn(model, xb, yb, _gen, _idx):
        if feature_space:  # xb: a batch of the backbone's features
            logits = head(xb)
            delta = _feature_pgd_l2(head, xb, logits.detach(), cfg.eps, cfg.steps, dgen)
            logits_adv = head(xb + delta)
        else:
            with torch.no_grad():
                fb, logits0 = features_and_logits(net, xb, head)
            adv = pgd_maximize(
                lambda a, ref=logits0: _kl(ref, net(a)), xb, cfg.eps, cfg.steps, generator=dgen
            )
            with torch.no_grad():
                fa, _ = features_and_logits(net, adv, head)
            logits, logits_adv = head(fb), head(fa)
        return F.cross_entropy(logits, yb) + cfg.beta * _kl(logits, logits_adv)

    data = _features(net, x, dev).cpu() if feature_space else x
    run = TrainConfig(
        epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, weight_decay=0.0, seed=cfg.seed
    )
    # One generator draws the batch order and the perturbations, in the order they are needed.
    training.train(
        head, data, y, run, loss_fn, device=dev, optimizer=training.adam, generators=(gen, gen)
    )
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
            with eval_mode(model):
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
    teacher: TrainConfig = six_epochs(0.05)
    head: HeadConfig = field(default_factory=HeadConfig)
    student: TrainConfig = six_epochs(0.05)
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
