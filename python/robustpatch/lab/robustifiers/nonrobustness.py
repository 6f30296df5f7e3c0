"""Non-robustness transfer (Zhang et al., arXiv 2106.10989) and discrepancy-mitigating
fine-tuning."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import datasets, evaluate
from ..models import SmallCNN, default_device
from ..training import DeviceArg, LossFn, TrainConfig, eval_mode
from .common import (
    AttackConfig,
    _device_generator,
    _digits,
    _jsonable,
    _last_linear,
    _timed,
    cross_entropy_loss,
    features_and_logits,
    finetuner,
    pgd_loss,
    pgd_maximize,
    six_epochs,
    train_with_loss,
)


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
        with eval_mode(model):
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


adversarial_finetune = finetuner(
    pgd_loss, AttackConfig, "PGD adversarial training of ``model`` in place (see :func:`pgd_loss`)."
)
discrepancy_finetune = finetuner(
    discrepancy_loss,
    DiscrepancyConfig,
    "Discrepancy-mitigating fine-tuning of ``model`` in place (:class:`DiscrepancyConfig`).",
)


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
    pretrain: TrainConfig = six_epochs(0.05)
    finetune: TrainConfig = six_epochs(0.02)
    pretrain_attack: AttackConfig = field(default_factory=AttackConfig)
    discrepancy: DiscrepancyConfig | None = field(default_factory=DiscrepancyConfig)
    starts: tuple[str, ...] = ("scratch", "pretrained", "adv_pretrained")
    train_images: int | None = None
    test_images: int | None = None
    eval_eps: float = 8 / 255
    eval_steps: int = 10
    seed: int = 0


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
