"""Training recipes: pretrain, clean and robust fine-tuning from the same start,
BatchNorm re-estimation, and safetensors checkpoints with metadata.

The clean and robust fine-tunes share the pretrained weights, the seed and the
data order, so that their difference is what the corruption taught
(the condition under which robust weight signatures transfer). The optimizer is
the paper's: SGD, momentum 0.9, weight decay 5e-4, step decay of the learning rate.

BatchNorm: a signature ships the robust model's running statistics for the layers it
patches (see :mod:`robustpatch.signature`); :func:`reestimate_bn` re-estimates all of
them on unlabeled corrupted images (:func:`unlabeled_corrupted`).

Several processes (GPUs) through torch's own launcher: under ``torchrun``, call
:func:`init_distributed` and then ``train(..., distributed=True)``; every rank trains a
DistributedDataParallel replica on its share of each epoch (``DistributedSampler``) and
all ranks end with the same weights and BatchNorm statistics. ``python -m
robustpatch.lab.recipes --help`` is such a script::

    torchrun --nproc_per_node 2 -m robustpatch.lab.recipes --corruption fog --out fog.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import training
from .training import TrainConfig, Transform, accuracy, default_device


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    transform: Transform | None = None,
    device: torch.device | None = None,
    progress: Callable[[int, float], None] | None = None,
    *,
    distributed: bool = False,
) -> nn.Module:
    """Train `model` in place with SGD and cross-entropy on (x, y), each batch passed
    through `transform` first (a corruption for the robust twin); return it.

    :func:`robustpatch.lab.training.train` with the paper's optimizer: two runs with the
    same seed see the same batches in the same order (the transform draws from its own
    generator, so it does not change the order). `x` is float in [0, 1], NCHW; `y` int64
    labels. `progress(epoch, mean training loss)` is called after every epoch.
    ``distributed=True``: DistributedDataParallel under torchrun (see the module's
    docstring and :func:`init_distributed`).
    """
    return training.train(
        model,
        x,
        y,
        config,
        transform=transform,
        device=device,
        progress=progress,
        distributed=distributed,
    )


def init_distributed(backend: str | None = None) -> tuple[int, int, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment.

    Returns (rank, world size, this rank's device): ``cuda:LOCAL_RANK`` with the NCCL
    backend when CUDA is available, else the CPU with gloo. Does nothing but report when
    the group is already initialised.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.get_backend() == "nccl":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


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
    if len(x) == 0:  # checked first: the statistics are reset before the first batch
        raise ValueError("no images to re-estimate BatchNorm statistics on")
    device = device or training.model_device(model)
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


def _checked_cells(names, severities) -> tuple[list[str], list[int]]:
    """Corruption names and severities checked up front, not at the first batch: both
    non-empty, every name known, every severity an integer from 1 to 5."""
    from .corruptions import _check_name_severity

    names, severities = list(names), list(severities)
    if not names or not severities:
        raise ValueError(
            f"need at least one corruption and one severity, got {names} and {severities}"
        )
    for c in names:
        for s in severities:
            _check_name_severity(c, s)
    return names, [int(s) for s in severities]


def corruption_transform(
    name: str, severities: Sequence[int] = (1, 2, 3, 4, 5), scale: str = "imagenet"
) -> Transform:
    """A training transform: each batch corrupted by `name` at a severity drawn from
    `severities` (all five by default), with the noise seeded from the generator."""
    from .corruptions import corrupt

    sevs = _checked_cells([name], severities)[1]

    def transform(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        severity = sevs[int(torch.randint(0, len(sevs), (1,), generator=gen))]
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        return corrupt(x, name, severity, seed=seed, scale=scale)

    return transform


def unlabeled_corrupted(
    x: torch.Tensor,
    names: str | Sequence[str],
    n: int = 500,
    *,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    scale: str = "imagenet",
    seed: int = 7,
) -> torch.Tensor:
    """`n` unlabeled corrupted images for BatchNorm re-estimation.

    The first `n` images of `x` (training data, never the test set), split evenly over
    the corruptions in `names` and, within each, over `severities`.
    """
    from .corruptions import corrupt

    names, severities = _checked_cells([names] if isinstance(names, str) else names, severities)
    training.count(n, "n")
    x = x[: min(n, len(x))]
    cells = [(c, s) for c in names for s in severities]
    bounds = [round(i * len(x) / len(cells)) for i in range(len(cells) + 1)]
    parts = [
        corrupt(x[lo:hi], c, int(s), seed=seed + 101 * i, scale=scale)
        for i, ((c, s), lo, hi) in enumerate(zip(cells, bounds, bounds[1:]))
        if hi > lo
    ]
    return torch.cat(parts)


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


def checkpoint_metadata(
    *,
    recipe: str,
    dataset: str,
    seed: int,
    corruption: str | None = None,
    config: TrainConfig | None = None,
    **extra: object,
) -> dict[str, object]:
    """The standard metadata of a lab checkpoint (pass to :func:`save_checkpoint`).

    `recipe`: ``"pretrain"``, ``"clean"`` or ``"corruption"`` (robust fine-tune) ...;
    `corruption`: the corruption trained on, ``None`` for clean training.
    """
    meta: dict[str, object] = {
        "recipe": recipe,
        "dataset": dataset,
        "corruption": corruption if corruption is not None else "none",
        "seed": int(seed),
    }
    if config is not None:
        meta["config"] = config_dict(config)
    meta.update(extra)
    return meta


def save_checkpoint(model: nn.Module, path: str | Path, **metadata: object) -> Path:
    """Save the state dict as safetensors with JSON-encoded metadata values.

    Tensors keep the model's order in the file (``safetensors.torch.save_file`` would
    sort them by dtype and name), so :func:`robustpatch.extract` reading leading layers
    from the file sees the real depth order; the write is atomic. See
    :func:`checkpoint_metadata` for the standard keys.
    """
    from robustpatch._format.safetensors import write_tensors

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        # numpy has no bfloat16: uint16 bits, which the writer labels BF16.
        state[k] = (
            v.view(torch.int16).numpy().view("uint16") if v.dtype == torch.bfloat16 else (v.numpy())
        )
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    write_tensors(path, state, meta)
    return path


def load_checkpoint(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load weights saved by `save_checkpoint` into `model`; returns the metadata
    (JSON-encoded values decoded; plain strings as they are)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))
    with safe_open(str(path), framework="pt") as f:
        raw = dict(f.metadata() or {})
    out: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def config_dict(config: TrainConfig) -> dict:
    """The config as plain JSON-able values (for metadata and reports)."""
    return asdict(config)


# ---------------------------------------------------------------------------- script


def main(argv: Sequence[str] | None = None) -> int:
    """Fine-tune the small CNN on the embedded digits, clean or under one corruption.

    One process, or several under ``torchrun`` (DistributedDataParallel; rank 0 writes
    the checkpoint with its metadata).
    """
    parser = argparse.ArgumentParser(
        prog="python -m robustpatch.lab.recipes",
        description="Fine-tune SmallCNN on the embedded digits (clean or corrupted); "
        "run under torchrun for several processes/GPUs.",
        epilog="example:\n  torchrun --nproc_per_node 2 -m robustpatch.lab.recipes "
        "--pretrained pre.safetensors --corruption fog --out fog.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pretrained", type=Path, help="start from this checkpoint")
    parser.add_argument("--corruption", help="train on this corruption (default: clean)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    args = parser.parse_args(argv)

    from . import datasets, models

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        rank, world, device = init_distributed()
    else:
        rank, world, device = 0, 1, default_device()
    train_set, test_set = datasets.load_digits32("train"), datasets.load_digits32("test")
    x, y = train_set.tensors()
    xt, yt = test_set.tensors()
    model = models.SmallCNN(num_classes=10, seed=args.seed)
    if args.pretrained:
        load_checkpoint(model, args.pretrained)
    e = args.epochs
    config = TrainConfig(
        epochs=e,
        lr=args.lr,
        batch_size=args.batch_size,
        milestones=sorted({max(1, int(0.6 * e)), max(1, int(0.8 * e))}),
        seed=args.seed,
    )
    transform = corruption_transform(args.corruption) if args.corruption else None

    def report(epoch: int, loss: float) -> None:
        if rank == 0:
            print(f"epoch {epoch + 1}/{e}: loss {loss:.4f} ({world} process(es))", flush=True)

    train(model, x.float() / 255, y, config, transform, device, report, distributed=distributed)
    if rank == 0:
        acc = accuracy(model, xt, yt, batch_size=512, device=device)
        meta = checkpoint_metadata(
            recipe="corruption" if args.corruption else "clean",
            dataset="digits32",
            corruption=args.corruption,
            seed=args.seed,
            config=config,
            world_size=world,
            test_accuracy=acc,
        )
        save_checkpoint(model.cpu(), args.out, **meta)
        print(f"clean test accuracy {100 * acc:.1f}%; wrote {args.out}", flush=True)
    if distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
