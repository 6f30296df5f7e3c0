"""robustpatch: robust weight signatures — extract, compress and patch robustness
into neural networks at memory bandwidth.

>>> import robustpatch as rp
>>> sig = rp.extract(pretrained, clean, robust, layers="auto").quantize(bits=4)
>>> undo = rp.apply(model, sig, alpha=1.0)      # in place
>>> rp.remove(model, undo)                       # bit-exact

The lab (`robustpatch.lab`) needs the ``torch`` extra; nothing here imports torch.
"""

from ._core import __version__
from .errors import FormatError, MismatchError, NonFiniteError
from .extract import extract
from .files import apply_file, remove_file
from .patch import Undo, apply, remove, subtract
from .signature import Entry, Quantized, Signature, combine, detect, similarity

__all__ = [
    "Entry",
    "FormatError",
    "MismatchError",
    "NonFiniteError",
    "Quantized",
    "Signature",
    "Undo",
    "__version__",
    "apply",
    "apply_file",
    "combine",
    "detect",
    "extract",
    "remove",
    "remove_file",
    "similarity",
    "subtract",
]
