"""A BatchNorm-free VGG-style CNN: the official code's CIFAR arm (``models/vgg.py``, VGG-16
without BN: ``conv3x3 -> ReLU`` stages, max pooling, global average pooling, one linear
classifier, Kaiming fan-out initialisation, zero biases), narrowed for 2 CPU cores.

``VGG_CONFIG`` has 6 convolutions in three stages; the paper's patch is the first
:data:`PAPER_LAYERS` = 3 of them (half the conv tensors, as the official 7 of 13), 10% of the
weights (official: about 12%).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..models import ConvClassifier, Normalize

__all__ = ["VGG_CONFIG", "PAPER_LAYERS", "VGGNoBN", "conv_weight_names"]

#: Channels of each conv layer; "M" is a 2x2 max pooling.
VGG_CONFIG: tuple = (16, 16, "M", 32, 32, "M", 64, 64, "M")

#: Leading conv tensors (with their biases) the paper's patch covers, fixed before any run.
PAPER_LAYERS = 3


class VGGNoBN(ConvClassifier):
    """VGG without BatchNorm for ``(N, 3, 32, 32)`` images in [0, 1] (uint8 is scaled).

    Args:
        num_classes: outputs of the classifier.
        config: :data:`VGG_CONFIG`-style channel list.
        seed: initialise from this seed without touching torch's global generator.
    """

    def __init__(
        self, num_classes: int = 10, config: Sequence = VGG_CONFIG, *, seed: int | None = None
    ) -> None:
        super().__init__()
        self.normalize = Normalize([0.5] * 3, [0.25] * 3)
        layers: list[nn.Module] = []
        c = 3
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                c = int(v)
        self.assemble(layers, c, num_classes)
        self.seeded_reset(seed)

    def reset_parameters(self) -> None:
        """The official init: Kaiming fan-out convs, N(0, 0.01) classifier, zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)


def conv_weight_names(model: nn.Module) -> list[str]:
    """Names of the model's conv weights, input first (the units the paper's k counts)."""
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
