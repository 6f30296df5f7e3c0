"""One normaliser per kind of user input, called where the input enters (a public
function or a CLI argument); deeper layers trust what these return.

Each raises :class:`~robustpatch.errors.InvalidArgumentError` (a ``ValueError``) with one
line naming the value, or :class:`~robustpatch.errors.NonFiniteError` for NaN/Inf.

>>> alphas(3, 0.5)
[0.5, 0.5, 0.5]
>>> bits(4)
4
>>> bits(99)
Traceback (most recent call last):
...
robustpatch.errors.InvalidArgumentError: expected bits from 1 to 8 (an integer), got 99
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import sys
from pathlib import Path
from typing import Any

from .errors import InvalidArgumentError, NonFiniteError

__all__ = [
    "SCHEMES",
    "GRANULARITIES",
    "alphas",
    "alpha",
    "bits",
    "scheme",
    "granularity",
    "group",
    "path",
]

SCHEMES = ("affine", "symmetric", "log", "tanh")
GRANULARITIES = ("tensor", "channel", "group")

#: Largest magnitude an α may have: the engine multiplies in float32 (its largest finite
#: value, ``np.finfo(np.float32).max``).
F32_MAX = 3.4028234663852886e38

#: Longest rendering of a bad value inside a message.
_SHOWN = 60


def _numpy() -> Any:
    """numpy if it is loaded, else None: a numpy bool or array cannot exist before numpy is
    imported, and this module is imported by the command line before it chooses numpy's
    BLAS threads."""
    return sys.modules.get("numpy")


def is_bool(value: Any) -> bool:
    """True for Python and numpy booleans."""
    np = _numpy()
    return isinstance(value, bool) or (np is not None and isinstance(value, np.bool_))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def alpha(value: Any, what: str = "alpha") -> float:
    """One real number, finite and within float32 range (the engine narrows α to f32);
    a 0-d numpy array is its number."""
    value = _plain(value)
    is_number = isinstance(value, numbers.Real) and not is_bool(value)
    if not is_number:
        raise InvalidArgumentError(f"{what} must be a real number, got {_show(value)}")
    out = float(value)
    if not math.isfinite(out):
        raise NonFiniteError(f"{what} {out} is not finite")
    if abs(out) > F32_MAX:
        raise InvalidArgumentError(
            f"{what} {out:g} is outside the float32 range (±{F32_MAX:.4g}) the engine computes in"
        )
    return out


def alphas(n: int, values: Any, what: str = "alpha") -> list[float]:
    """One α per signature: a single number (or a one-item sequence) applies to all ``n``.

    >>> alphas(2, [1, -0.5])
    [1.0, -0.5]
    >>> alphas(2, [1, 2, 3])
    Traceback (most recent call last):
    ...
    robustpatch.errors.InvalidArgumentError: 2 signatures but 3 alpha values
    """
    values = _plain(values)
    if isinstance(values, (str, bytes)) or not _is_sequence(values):
        return [alpha(values, what)] * n
    items = list(values)
    if len(items) == 1:
        return [alpha(items[0], what)] * n
    if len(items) != n:
        raise InvalidArgumentError(f"{n} signatures but {len(items)} {what} values")
    return [alpha(v, f"{what} #{i + 1}") for i, v in enumerate(items)]


def _plain(value: Any) -> Any:
    """An array's values as Python numbers: a 0-d array (numpy's, torch's) its number, a
    1-d one a list; anything else as it is."""
    if hasattr(value, "tolist") and getattr(value, "ndim", None) in (0, 1):
        return value.tolist()
    return value


def _is_sequence(values: Any) -> bool:
    np = _numpy()
    if np is not None and isinstance(values, np.ndarray):
        return values.ndim > 0
    return hasattr(values, "__iter__") and hasattr(values, "__len__")


def _integer(value: Any, lo: int, hi: int | None) -> int | None:
    """``value`` as an int in ``lo..hi``, or None (bool and float are not integers)."""
    if is_bool(value):
        return None
    try:
        out = operator.index(value)
    except TypeError:
        return None
    return out if out >= lo and (hi is None or out <= hi) else None


def bits(value: Any) -> int:
    """Bits per quantized weight: an integer from 1 to 8."""
    out = _integer(value, 1, 8)
    if out is None:
        raise InvalidArgumentError(f"expected bits from 1 to 8 (an integer), got {_show(value)}")
    return out


def group(value: Any) -> int:
    """Elements per quantization group: an integer of at least 1."""
    out = _integer(value, 1, None)
    if out is None:
        raise InvalidArgumentError(f"expected a positive integer group size, got {_show(value)}")
    return out


def _choice(value: Any, what: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgumentError(
            f"unknown {what} {_show(value)}; expected one of {', '.join(choices)}"
        )
    return value


def scheme(value: Any) -> str:
    """Quantization scheme: one of :data:`SCHEMES`."""
    return _choice(value, "scheme", SCHEMES)


def granularity(value: Any) -> str:
    """Quantization granularity: one of :data:`GRANULARITIES`."""
    return _choice(value, "granularity", GRANULARITIES)


def path(value: Any, what: str = "path") -> Path:
    """A filesystem path from a ``str`` or ``os.PathLike``: not empty, no NUL byte.

    >>> path("fog.rws").name
    'fog.rws'
    """
    if not isinstance(value, (str, os.PathLike)):
        raise InvalidArgumentError(f"{what} must be a str or os.PathLike, got {_show(value)}")
    text = os.fspath(value)
    if not isinstance(text, str) or not text or "\0" in text:
        raise InvalidArgumentError(f"{what} {_show(text)} is not a usable file name")
    return Path(text)


def output_file(value: Any, what: str = "out") -> Path:
    """:func:`path` for a file to write: a name that ends with a separator
    (``"results/"``) names a folder and is refused, as ``cp`` refuses it, instead of
    becoming a file called ``results``.

    >>> output_file("runs/")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    robustpatch.errors.InvalidArgumentError: out 'runs/' ends with '/', a folder's name; ...
    """
    result = path(value, what)
    text = os.fspath(value)
    if text.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)):
        raise InvalidArgumentError(
            f"{what} {text!r} ends with {text[-1]!r}, a folder's name; name the file to write"
        )
    return result
