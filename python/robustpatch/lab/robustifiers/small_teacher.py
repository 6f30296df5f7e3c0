"""Efficiently robustify pre-trained models (Jain et al., arXiv 2309.07499): AugMix, a small
robust teacher and partial tuning of a large model."""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import corruptions as C
from .. import datasets, evaluate, training
from ..models import SmallCNN, default_device, fit, parameters_by_depth
from ..training import DeviceArg, LossFn, TrainConfig, as_float, eval_mode
from .common import (
    DEFAULT_CORRUPTIONS,
    SCALE,
    _digits,
    _jsonable,
    _last_linear,
    _numpy_rng,
    _timed,
    _to_uint8,
    cross_entropy_loss,
    finetuner,
    six_epochs,
    train_with_loss,
)
from .daft import _features, _kl


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


augmix_finetune = finetuner(
    augmix_loss,
    AugMixConfig,
    "Robust fine-tuning with AugMix + JSD (:func:`augmix_loss`), every parameter, in place.",
)


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
    with eval_mode(model.to(device)):
        return torch.cat([model(as_float(x[i : i + bs].to(device))) for i in range(0, len(x), bs)])


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
    :class:`PartialTuneConfig`); ``large`` and ``teacher`` are not modified. As in a
    plain PyTorch fine-tune, the copy trains in train mode, so the running statistics of
    every BatchNorm layer follow the training batches, tuned or not; ``fraction``
    counts the tuned parameters only.

    Returns:
        ``(tuned model, info)`` with ``info``: ``tuned`` (parameter names), ``tuned_params``,
        ``total_params``, ``fraction`` and ``seconds`` (wall time, including computing the
        large model's clean outputs).
    """
    cfg = config or PartialTuneConfig()
    dev = default_device(device)
    model = copy.deepcopy(large).to(dev)
    teacher = copy.deepcopy(teacher).to(dev).eval()
    example = as_float(x[:2].to(dev))
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
    ytr = torch.as_tensor(y_train)
    classes = int(max(int(ytr.max()), int(torch.as_tensor(y_test).max()))) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = nn.Linear(ftr.shape[1], classes)
    # Full batch: every epoch is one Adam step on all the training features.
    run = TrainConfig(epochs=epochs, lr=lr, batch_size=len(ftr), weight_decay=1e-4, seed=seed)
    training.train(probe, ftr.cpu(), ytr, run, device=dev, optimizer=training.adam)
    return 100 * training.accuracy(probe, fte, y_test, device=dev)


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
    finetune: TrainConfig = six_epochs(0.02)
    teacher: TrainConfig = six_epochs(0.02)
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
        (n, s): _to_uint8(C.corrupt(as_float(x), n, s, seed=seed + 1000 * s + i, scale=SCALE))
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
