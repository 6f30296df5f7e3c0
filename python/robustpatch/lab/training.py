"""The lab's one training loop, and the helpers every trainer and evaluator shares.

:func:`train` serves the recipes (clean and corruption fine-tuning, DistributedDataParallel),
the robustifiers (any loss: PGD, distillation, AugMix..., optionally a subset of the
parameters) and :func:`robustpatch.lab.models.fit` (AdamW with a one-cycle schedule). The
data order comes from a generator seeded with ``TrainConfig.seed`` and every random draw of
a transform or loss from a second one, so two models trained with the same config from the
same start see the same batches in the same order -- the condition under which robust
weight signatures transfer.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np
import torch
from torch import nn

from ..errors import InvalidArgumentError

DeviceArg = Union[str, torch.device, None]

# A batch transform: (images, generator) -> images. Used to corrupt training batches.
Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

LossFn = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, torch.Generator, torch.Tensor], torch.Tensor
]
"""A training loss ``(model, x, y, generator, index) -> scalar``.

``x`` is the float [0, 1] batch and ``y`` its labels, both on the training device; the model
is in train mode; ``generator`` is the run's CPU augmentation generator (seeded with
``TrainConfig.seed + 1``); ``index`` holds the batch's positions in the training set (CPU),
for losses that look up precomputed targets."""

# (optimizer, scheduler, whether the scheduler steps after every batch, not every epoch)
Optimization = tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, bool]
# (parameters to train, config, batches per epoch) -> Optimization
OptimizerFactory = Callable[[list[nn.Parameter], "TrainConfig", int], Optimization]


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (recorded in checkpoint metadata)."""

    epochs: int = 4
    lr: float = 0.05
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # Epoch counts after which the learning rate is multiplied by `gamma`: milestone m is
    # the first (0-based) epoch run at the reduced rate ([2, 3]: epochs 0-1 at lr, 2 at
    # 0.1 lr, 3 onwards at 0.01 lr).
    milestones: list[int] = field(default_factory=lambda: [2, 3])
    gamma: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse values that would crash mid-run or train silently wrong (the config is
        mutable, so :func:`train` checks again before it starts)."""
        count(self.epochs, "epochs", minimum=0)
        count(self.batch_size, "batch_size")
        for name in ("lr", "momentum", "weight_decay", "gamma"):
            value = getattr(self, name)
            real = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not real or not 0 <= value < float("inf"):
                raise InvalidArgumentError(f"{name} must be a finite number >= 0, got {value!r}")
        for m in self.milestones:
            count(m, "milestones", minimum=0)


def count(value, what: str, minimum: int = 1) -> int:
    """``value`` as an integer of at least ``minimum`` (bool and float refused): the one
    check of the lab's sizes and counts (epochs, batch sizes, image counts)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidArgumentError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------- devices, modes


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with torch's CPU thread count set to ``threads`` (None: as it is),
    then give the caller's count back: a library call leaves the process as it found it."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_device(device: DeviceArg = None) -> torch.device:
    """``device`` as a ``torch.device``; by default CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_device(model: nn.Module) -> torch.device:
    """The device the model's parameters are on."""
    return next(model.parameters()).device


def as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images scaled to [0, 1]; float images as float32."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block with ``model`` in eval mode, then give every submodule back the mode
    it had (``model.train(was)`` would set them all alike: a BatchNorm the caller had
    frozen in eval mode would start updating its statistics)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, *, batch_size: int = 256, device: DeviceArg = None
) -> torch.Tensor:
    """Predicted labels (CPU int64 tensor) of ``model`` in eval mode (its mode is kept)."""
    dev = default_device(device)
    with eval_mode(model.to(dev)):
        out = [
            model(as_float(images[i : i + batch_size].to(dev))).argmax(1).cpu()
            for i in range(0, len(images), batch_size)
        ]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 256,
    device: DeviceArg = None,
) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on ``images`` (eval mode), counted exactly."""
    check_labelled(images, labels)
    pred = predict(model, images, batch_size=batch_size, device=device)
    return int((pred == torch.as_tensor(labels).cpu()).sum()) / len(labels)


def check_labelled(images: Sized, labels: Sized) -> None:
    """ValueError unless there are images and one label for each (one label would be
    broadcast against every prediction; extra images silently left out)."""
    if len(labels) == 0:
        raise ValueError("no images to evaluate")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")


# ---------------------------------------------------------------------------- the loop


def cross_entropy(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, *_: object) -> torch.Tensor:
    """The plain loss: cross-entropy on the batch."""
    return nn.functional.cross_entropy(model(xb), yb)


def sgd_step_decay(params: list[nn.Parameter], config: TrainConfig, _batches: int) -> Optimization:
    """The paper's optimizer: SGD with momentum and weight decay, the learning rate times
    ``config.gamma`` after each epoch in ``config.milestones``."""
    opt = torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(config.milestones), config.gamma)
    return opt, sched, False


def adam(params: list[nn.Parameter], config: TrainConfig, _batches: int) -> Optimization:
    """Adam at the constant learning rate ``config.lr``, weight decay
    ``config.weight_decay``."""
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _epoch: 1.0), False


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    loss_fn: LossFn = cross_entropy,
    *,
    transform: Transform | None = None,
    params: Sequence[nn.Parameter] | None = None,
    device: DeviceArg = None,
    progress: Callable[[int, float], None] | None = None,
    optimizer: OptimizerFactory = sgd_step_decay,
    generators: tuple[torch.Generator, torch.Generator] | None = None,
    distributed: bool = False,
) -> nn.Module:
    """Train ``model`` in place on (x, y) and return it, in eval mode on ``device``.

    Every epoch draws a permutation from the order generator (seeded with ``config.seed``);
    each batch is sliced on the CPU, passed through ``transform`` there (if any), moved to
    the device, scaled to float [0, 1] and handed to ``loss_fn`` with the augmentation
    generator (seeded with ``config.seed + 1``). ``generators`` replaces the two.
    ``optimizer`` builds the optimizer and schedule (default :func:`sgd_step_decay`).

    Args:
        x: ``(N, C, H, W)`` uint8 or float [0, 1] images (kept on the CPU).
        y: ``(N,)`` integer labels.
        params: train only these parameters (the others get ``requires_grad=False`` during
            training, which also skips their gradient computation); default all. The
            model trains in train mode, so every BatchNorm layer's running statistics
            follow the batches, as in a plain PyTorch fine-tune.
        device: default CUDA if available, else CPU.
        progress: called with ``(epoch, mean loss)`` after each epoch.
        distributed: inside an initialised process group (e.g. under torchrun after
            :func:`robustpatch.lab.recipes.init_distributed`), the model is wrapped in
            DistributedDataParallel, each rank takes its share of every epoch from a
            ``DistributedSampler`` seeded with ``config.seed`` (so the order differs from
            the single-process one), gradients are averaged across ranks, and BatchNorm
            running statistics are averaged at the end: every rank returns the same weights.
            The loss passed to ``progress`` is the mean over all ranks.
    """
    config.check()
    dev = default_device(device)
    model.to(dev).train()
    y = torch.as_tensor(y, dtype=torch.int64)
    if len(y) == 0:
        raise ValueError("no training data")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} training images but {len(y)} labels")
    net, rank, world = _wrap(model, dev) if distributed else (model, 0, 1)
    trainable = list(model.parameters()) if params is None else list(params)
    if not trainable:
        raise ValueError("no parameter to train")
    batches = -(-len(y) // config.batch_size)
    opt, sched, per_batch = optimizer(trainable, config, batches)
    order_gen, aug_gen = generators or (
        torch.Generator().manual_seed(config.seed),
        torch.Generator().manual_seed(config.seed + 1 + 1000 * rank),
    )
    with _only_trainable(model, None if params is None else trainable):
        for epoch in range(config.epochs):
            if distributed:
                perm = _rank_order(len(y), epoch, config.seed, rank, world)
            else:
                perm = torch.randperm(len(y), generator=order_gen)
            loss_sum = 0.0
            for start in range(0, len(perm), config.batch_size):
                idx = perm[start : start + config.batch_size]
                xb = x[idx]
                if transform is not None:
                    xb = transform(xb, aug_gen)
                xb, yb = as_float(xb.to(dev)), y[idx].to(dev)
                net.train()
                loss = loss_fn(net, xb, yb, aug_gen, idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if per_batch:
                    sched.step()
                loss_sum += float(loss.detach()) * len(idx)
            if not per_batch:
                sched.step()
            if progress is not None:
                progress(epoch, _mean_loss(loss_sum, len(perm), dev, distributed))
    if distributed:
        _average_buffers(model, world)
    return model.eval()


@contextlib.contextmanager
def _only_trainable(model: nn.Module, trainable: list[nn.Parameter] | None) -> Iterator[None]:
    """Freeze every parameter outside ``trainable`` (None: none) for the block."""
    all_params = list(model.parameters())
    saved = [p.requires_grad for p in all_params]
    if trainable is not None:
        keep = {id(p) for p in trainable}
        for p in all_params:
            p.requires_grad_(id(p) in keep)
    try:
        yield
    finally:
        for p, r in zip(all_params, saved):
            p.requires_grad_(r)


def _mean_loss(loss_sum: float, count: int, device: torch.device, distributed: bool) -> float:
    total = torch.tensor([loss_sum, count], dtype=torch.float64)
    if distributed:
        total = _all_reduce_sum(total, device)
    return float(total[0] / max(total[1], 1))


# ---------------------------------------------------------------------------- distributed


def _wrap(model: nn.Module, device: torch.device) -> tuple[nn.Module, int, int]:
    """``model`` in DistributedDataParallel, with this process's rank and the world size."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "train(distributed=True) needs an initialised process group: run under "
            "torchrun and call init_distributed() first"
        )
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index or 0] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids), dist.get_rank(), dist.get_world_size()


def _rank_order(n: int, epoch: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """This rank's indices for one epoch (torch's DistributedSampler, shuffled)."""
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(
        range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.int64)


def _all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    import torch.distributed as dist

    buf = t.to(device)
    dist.all_reduce(buf)
    return buf.cpu()


@torch.no_grad()
def _average_buffers(model: nn.Module, world: int) -> None:
    """Average floating-point buffers (BatchNorm running statistics) across ranks.

    DistributedDataParallel broadcasts rank 0's buffers before each forward pass, and
    each rank then updates them with its own batch, so after the last step they differ.
    """
    import torch.distributed as dist

    for b in model.buffers():
        if b.is_floating_point():
            dist.all_reduce(b)
            b.div_(world)
