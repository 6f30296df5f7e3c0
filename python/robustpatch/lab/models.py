"""Models for the lab: a small VGG-style CNN for CPU, torchvision ResNet-18 / VGG-16 builders,
a plain training loop, and :func:`parameters_by_depth` for choosing shallow layers.

Every model here takes images in [0, 1] (``uint8`` is accepted and scaled) and normalises
them inside the network, so corruptions and adversarial budgets work in pixel space.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .training import DeviceArg, TrainConfig, accuracy, default_device, eval_mode, train

__all__ = [
    "Normalize",
    "SmallCNN",
    "resnet18",
    "vgg16",
    "fit",
    "train_digits_cnn",
    "parameters_by_depth",
    "default_device",
]


class Normalize(nn.Module):
    """Scale uint8 input to [0, 1] if needed, then ``(x - mean) / std`` per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        return (x - self.mean) / self.std


class ConvClassifier(nn.Module):
    """The layout the lab's CNNs share: ``normalize -> features -> global average pool ->
    linear classifier``. Subclasses build the feature layers and ``reset_parameters``."""

    normalize: nn.Module

    def assemble(self, layers: Sequence[nn.Module], channels: int, num_classes: int) -> None:
        """Set the feature stack and the head over its ``channels`` outputs."""
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def seeded_reset(self, seed: int | None) -> None:
        """``reset_parameters`` drawn from ``seed`` (torch's global generator left as it
        was), or from the global generator when ``seed`` is None."""
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.reset_parameters()

    def reset_parameters(self) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(x))
        return self.classifier(torch.flatten(self.pool(x), 1))


class SmallCNN(ConvClassifier):
    """A small VGG-style CNN with BatchNorm for 32x32 inputs.

    Three stages of two ``conv3x3 -> BatchNorm -> ReLU`` layers followed by 2x2 max pooling,
    then global average pooling and a linear classifier. With the default widths (16, 32, 64)
    it has about 70k parameters and trains on 2 CPU cores in well under a minute to over 95%
    test accuracy on :func:`robustpatch.lab.datasets.load_digits32`.

    Args:
        num_classes: output classes.
        in_channels: input channels.
        widths: channels of the three stages.
        mean, std: input normalisation (per channel or one value for all).
        seed: if given, parameters are initialised from this seed without touching torch's
            global random state.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 32, 64),
        *,
        mean: float | Sequence[float] = 0.5,
        std: float | Sequence[float] = 0.25,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        mean_l = [float(mean)] * in_channels if isinstance(mean, (int, float)) else list(mean)
        std_l = [float(std)] * in_channels if isinstance(std, (int, float)) else list(std)
        self.normalize = Normalize(mean_l, std_l)
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            for _ in range(2):
                layers += [
                    nn.Conv2d(c, w, 3, padding=1, bias=False),
                    nn.BatchNorm2d(w),
                    nn.ReLU(inplace=True),
                ]
                c = w
            layers.append(nn.MaxPool2d(2))
        self.assemble(layers, c, num_classes)
        if seed is not None:
            self.seeded_reset(seed)

    def reset_parameters(self) -> None:
        """Re-initialise every layer (Kaiming for convolutions, defaults elsewhere)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.Linear)):
                m.reset_parameters()


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _torchvision() -> Any:
    try:
        import torchvision
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this model needs torchvision, which is not installed: pip install torchvision"
        ) from exc
    return torchvision


def resnet18(
    num_classes: int = 1000,
    *,
    small_input: bool = False,
    weights: Any | None = None,
    mean: Sequence[float] = _IMAGENET_MEAN,
    std: Sequence[float] = _IMAGENET_STD,
) -> nn.Module:
    """torchvision's ResNet-18 behind a :class:`Normalize` layer.

    Args:
        num_classes: output classes (the final layer is replaced when it differs from the
            pretrained one).
        small_input: CIFAR-style stem for 32-px images (3x3 stride-1 first convolution, no max
            pooling).
        weights: torchvision weights (e.g. ``"IMAGENET1K_V1"``), which torchvision takes
            from its cache or downloads. The lab never passes them (default None: random
            initialisation), so no lab run downloads weights; a caller who does opts in.
        mean, std: input normalisation.

    Raises:
        ImportError: torchvision is not installed (``pip install torchvision``).
    """
    tv = _torchvision()
    net = tv.models.resnet18(weights=weights)
    if net.fc.out_features != num_classes:
        net.fc = nn.Linear(net.fc.in_features, num_classes)
    if small_input:
        net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return nn.Sequential(Normalize(mean, std), net)


def vgg16(
    num_classes: int = 1000,
    *,
    batch_norm: bool = True,
    small_input: bool = False,
    weights: Any | None = None,
    mean: Sequence[float] = _IMAGENET_MEAN,
    std: Sequence[float] = _IMAGENET_STD,
) -> nn.Module:
    """torchvision's VGG-16 (with BatchNorm by default) behind a :class:`Normalize` layer.

    ``small_input=True`` replaces the 7x7 pooling and the 4096-wide classifier with global
    average pooling and one linear layer, the usual CIFAR variant. ``weights`` as in
    :func:`resnet18` (torchvision's cache or a download; the lab never passes them).

    Raises:
        ImportError: torchvision is not installed (``pip install torchvision``).
    """
    tv = _torchvision()
    net = (tv.models.vgg16_bn if batch_norm else tv.models.vgg16)(weights=weights)
    if small_input:
        net.avgpool = nn.AdaptiveAvgPool2d(1)
        net.classifier = nn.Linear(512, num_classes)
    elif net.classifier[-1].out_features != num_classes:
        net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, num_classes)
    return nn.Sequential(Normalize(mean, std), net)


def fit(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 8,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 5e-4,
    augment: bool = False,
    seed: int = 0,
    device: DeviceArg = None,
    progress: bool = False,
) -> dict[str, list[float]]:
    """Train a classifier with AdamW and a one-cycle learning-rate schedule
    (:func:`robustpatch.lab.training.train`).

    Args:
        model: the network (trained in place, left in eval mode on ``device``).
        images: ``(N, C, H, W)`` uint8 or float [0, 1] images.
        labels: ``(N,)`` integer labels.
        epochs, batch_size, lr, weight_decay: optimisation settings.
        augment: random translations of up to 2 pixels (reflect padding).
        seed: seed of the shuffling and augmentation (one generator for both).
        device: default CUDA if available, else CPU.
        progress: show a tqdm bar over the epochs.

    Returns:
        ``{"loss": [...], "accuracy": [...], "seconds": [...]}`` per epoch (training set).
    """
    config = TrainConfig(
        epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, seed=seed
    )
    history: dict[str, list[float]] = {"loss": [], "accuracy": [], "seconds": []}
    correct = [0]

    def loss_fn(net: nn.Module, xb: torch.Tensor, yb: torch.Tensor, gen, _idx) -> torch.Tensor:
        if augment:
            xb = _translate(xb, 2, gen)
        out = net(xb)
        correct[0] += int((out.argmax(1) == yb).sum())
        return nn.functional.cross_entropy(out, yb)

    bar = _epoch_bar(epochs) if progress else None
    started = [time.perf_counter()]

    def epoch_done(_epoch: int, loss: float) -> None:
        history["loss"].append(loss)
        history["accuracy"].append(correct[0] / len(labels))
        history["seconds"].append(time.perf_counter() - started[0])
        correct[0], started[0] = 0, time.perf_counter()
        if bar is not None:
            bar.update(1)

    gen = torch.Generator().manual_seed(seed)
    try:
        train(
            model,
            images,
            labels,
            config,
            loss_fn,
            device=device,
            progress=epoch_done,
            optimizer=_adamw_one_cycle,
            generators=(gen, gen),
        )
    finally:
        if bar is not None:
            bar.close()
    return history


def _adamw_one_cycle(params: list[nn.Parameter], config: TrainConfig, batches: int) -> Any:
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * batches
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=steps, pct_start=0.25
    )
    return opt, sched, True


def _epoch_bar(epochs: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=epochs, desc="train", unit="epoch")


def _translate(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    xp = nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    return torch.stack([xp[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def parameters_by_depth(
    model: nn.Module, example_input: torch.Tensor | None = None
) -> list[tuple[str, nn.Parameter]]:
    """All parameters of ``model``, shallowest (closest to the input) first.

    With ``example_input``, depth is the order in which the owning modules first run during
    one forward pass (traced with hooks, in eval mode, without gradients): this is right for
    any architecture. Without it, the registration order of the modules is used, which is the
    execution order for sequential models such as :class:`SmallCNN`, ResNet and VGG.
    Parameters of modules that never ran come last, in registration order. Shared parameters
    are listed once, at their first use.

    Returns:
        ``[(qualified_name, parameter), ...]``.
    """
    owners: list[tuple[str, nn.Module]] = [
        (name, m)
        for name, m in model.named_modules()
        if any(True for _ in m.parameters(recurse=False))
    ]
    order = list(range(len(owners)))
    if example_input is not None:
        first_call: dict[int, int] = {}
        hooks = []
        counter = [0]

        def make_hook(i: int) -> Any:
            def hook(module: nn.Module, args: Any) -> None:
                if i not in first_call:
                    first_call[i] = counter[0]
                    counter[0] += 1

            return hook

        for i, (_, m) in enumerate(owners):
            hooks.append(m.register_forward_pre_hook(make_hook(i)))
        try:
            with eval_mode(model), torch.no_grad():
                model(example_input)
        finally:
            for h in hooks:
                h.remove()
        order.sort(key=lambda i: (first_call.get(i, math.inf), i))
    seen: set[int] = set()
    result: list[tuple[str, nn.Parameter]] = []
    for i in order:
        prefix, module = owners[i]
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            result.append((f"{prefix}.{pname}" if prefix else pname, p))
    return result


def train_digits_cnn(
    *,
    epochs: int = 4,
    seed: int = 0,
    device: DeviceArg = None,
    cache: Any = None,
    progress: bool = False,
) -> tuple[SmallCNN, float]:
    """Train :class:`SmallCNN` on the embedded digits; return the model and its test accuracy.

    About a minute or less on 2 CPU cores; test accuracy is typically 98-99%.
    """
    from .datasets import load_digits32

    train = load_digits32("train", cache=cache)
    test = load_digits32("test", cache=cache)
    model = SmallCNN(num_classes=10, seed=seed)
    xtr, ytr = train.tensors()
    fit(model, xtr, ytr, epochs=epochs, seed=seed, device=device, progress=progress)
    xte, yte = test.tensors()
    return model, accuracy(model, xte, yte, batch_size=512, device=device)
