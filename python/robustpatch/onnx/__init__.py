"""ONNX deployment: patch an ONNX model's initializers with signatures (``apply``,
``remove``), switch signatures at load time (``session``), and export measured f32 /
f16 / int8 variants from torch (``export``). Needs the ``onnx`` extra; ``apply``,
``remove`` and ``session`` never import torch.
"""

from __future__ import annotations

from typing import Any

from .model import OnnxModel, load
from .patch import FOLDING_HINT, OnnxReport, apply
from .restore import remove
from .session import session

__all__ = [
    "FOLDING_HINT",
    "OnnxModel",
    "OnnxReport",
    "apply",
    "export",
    "load",
    "remove",
    "session",
]


def export(*args: Any, **kwargs: Any) -> Any:
    """See :func:`robustpatch.onnx.exporter.export` (imported on call: it needs torch)."""
    from .exporter import export as _export

    return _export(*args, **kwargs)
