"""robustpatch: robust weight signatures — extract, compress and patch robustness
into neural networks at memory bandwidth.

>>> import numpy as np
>>> import robustpatch as rp
>>> rng = np.random.default_rng(0)
>>> pretrained = {"fc.weight": rng.normal(size=(8, 16)).astype(np.float32)}
>>> clean = {"fc.weight": pretrained["fc.weight"] + np.float32(0.01)}
>>> robust = {"fc.weight": clean["fc.weight"] + rng.normal(0, 0.1, (8, 16)).astype(np.float32)}
>>> sig = rp.extract(pretrained, clean, robust, layers="all").quantize(bits=4)
>>> model = {k: v.copy() for k, v in clean.items()}
>>> undo = rp.apply(model, sig, alphas=1.0)     # in place
>>> rp.remove(model, undo)["tensors"]            # bit-exact
1
>>> bool((model["fc.weight"] == clean["fc.weight"]).all())
True
>>> combo = 0.5 * sig + sig                      # kept as 4-bit terms, fused when applied
>>> [(s.name, a) for s, a in combo.terms()]
[('signature', 0.5), ('signature', 1.0)]

The lab (`robustpatch.lab`) needs the ``torch`` extra; nothing here imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._core import __version__
from .errors import (
    FormatError,
    InvalidArgumentError,
    MismatchError,
    NonFiniteError,
    SelectionError,
    ZeroSignatureWarning,
)

if TYPE_CHECKING:  # the names below are imported on first use (see __getattr__)
    from . import onnx as onnx
    from .extraction import extract, extract_to
    from .files import apply_file, remove_file
    from .signature import (
        Entry,
        Quantized,
        Signature,
        SignatureSum,
        combine,
        detect,
        similarity,
    )
    from .targets import Undo, apply, remove, subtract

#: Where each public name lives. ``import robustpatch`` loads none of these modules (nor
#: numpy), so that the command line starts fast and can choose numpy's BLAS threads
#: before numpy loads; a name's module is imported when the name is first used.
_LAZY = {
    **dict.fromkeys(["extract", "extract_to"], ".extraction"),
    **dict.fromkeys(["apply_file", "remove_file"], ".files"),
    **dict.fromkeys(
        ["Entry", "Quantized", "Signature", "SignatureSum", "combine", "detect", "similarity"],
        ".signature",
    ),
    **dict.fromkeys(["Undo", "apply", "remove", "subtract"], ".targets"),
}

__all__ = [
    "Entry",
    "FormatError",
    "InvalidArgumentError",
    "MismatchError",
    "NonFiniteError",
    "Quantized",
    "SelectionError",
    "Signature",
    "SignatureSum",
    "Undo",
    "__version__",
    "apply",
    "apply_file",
    "combine",
    "detect",
    "extract",
    "extract_to",
    "remove",
    "remove_file",
    "similarity",
    "subtract",
    "ZeroSignatureWarning",
]


def __getattr__(name: str) -> object:
    """A public name on first use (PEP 562), then cached in the module; a submodule
    (``rp.files``, ``rp.onnx``: ONNX support is an extra) is imported when first named."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise  # the submodule exists; something it imports is missing
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    """The public names, and the submodules already imported (not this module's own
    imports, such as ``importlib``)."""
    loaded = [k for k, v in globals().items() if type(v) is type(importlib) and k != "importlib"]
    return sorted({*__all__, *loaded, *(k for k in globals() if k.startswith("__"))})
