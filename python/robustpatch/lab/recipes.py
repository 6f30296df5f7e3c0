"""Training recipes: pretrain, clean and robust fine-tuning from the same start,
BatchNorm re-estimation, and safetensors checkpoints with metadata.

The clean and robust fine-tunes share the pretrained weights, the seed and the
data order, so that their difference is what the corruption taught
(the condition under which robust weight signatures transfer). The optimizer is
the paper's: SGD, momentum 0.9, weight decay 5e-4, step decay of the learning rate.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

# A batch transform: (images, generator) -> images. Used to corrupt training batches.
Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (recorded in checkpoint metadata)."""

    epochs: int = 4
    lr: float = 0.05
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # Epoch indices (0-based) after which the learning rate is multiplied by `gamma`.
    milestones: list[int] = field(default_factory=lambda: [2, 3])
    gamma: float = 0.1
    seed: int = 0


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    transform: Transform | None = None,
    device: torch.device | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train `model` in place with SGD on (x, y) and return it.

    The data order and the transform's randomness come from generators seeded
    with `config.seed`, so two runs with the same seed see the same batches in
    the same order (the transform draws from its own generator, so it does not
    change the order). `x` is float in [0, 1], NCHW; `y` int64 labels.
    """
    device = device or default_device()
    model.to(device).train()
    opt = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, config.milestones, config.gamma)
    order_gen = torch.Generator().manual_seed(config.seed)
    aug_gen = torch.Generator().manual_seed(config.seed + 1)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(config.epochs):
        perm = torch.randperm(len(x), generator=order_gen)
        total = 0.0
        for start in range(0, len(x), config.batch_size):
            idx = perm[start : start + config.batch_size]
            xb = x[idx]
            if transform is not None:
                xb = transform(xb, aug_gen)
            xb, yb = xb.to(device), y[idx].to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        sched.step()
        if progress is not None:
            progress(epoch, total / len(x))
    return model.eval()


@torch.no_grad()
def accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device | None = None,
    batch_size: int = 512,
) -> float:
    """Top-1 accuracy in [0, 1] (model in eval mode)."""
    device = device or next(model.parameters()).device
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == y[start : start + batch_size]).sum())
    return correct / max(1, len(x))


@torch.no_grad()
def reestimate_bn(
    model: nn.Module,
    x: torch.Tensor,
    device: torch.device | None = None,
    batch_size: int = 256,
) -> nn.Module:
    """Replace every BatchNorm's running statistics by those of unlabeled data `x`.

    Statistics are reset and averaged over all of `x` (cumulative average, not
    an exponential one), so the result does not depend on the old values.
    """
    device = device or next(model.parameters()).device
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for start in range(0, len(x), batch_size):
        model(x[start : start + batch_size].to(device))
    for m, mom in zip(norms, saved):
        m.momentum = mom
    return model.eval()


def finetune_pair(
    make_model: Callable[[], nn.Module],
    pretrained: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    corrupt: Transform,
    config: TrainConfig,
    device: torch.device | None = None,
) -> tuple[nn.Module, nn.Module]:
    """Fine-tune a clean and a robust model from the same pretrained weights.

    Both runs use the same seed and data order; the robust run sees each batch
    through `corrupt`. Returns (clean, robust).
    """
    models = []
    for transform in (None, corrupt):
        model = make_model()
        model.load_state_dict(pretrained)
        models.append(train(model, x, y, config, transform=transform, device=device))
    return models[0], models[1]


def save_checkpoint(model: nn.Module, path: str | Path, **metadata: object) -> Path:
    """Save the state dict as safetensors with JSON-encoded metadata values."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    save_file(state, str(path), metadata=meta)
    return path


def load_checkpoint(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Load weights saved by `save_checkpoint` into `model`; returns the metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def config_dict(config: TrainConfig) -> dict:
    """The config as plain JSON-able values (for metadata and reports)."""
    return asdict(config)
