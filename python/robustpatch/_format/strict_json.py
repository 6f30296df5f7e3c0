"""JSON read from files, strictly: NaN, Infinity and numbers past the float range are
refused. Python's ``json`` reads them (as ``nan``/``inf``) and writes them back as
``NaN``/``Infinity``, which other readers reject, so a value read from one file would
make another file or ``--json`` output invalid."""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["NonStandardNumber", "loads"]


class NonStandardNumber(ValueError):
    """A number JSON cannot hold; its text is the message."""


def _refuse_constant(name: str) -> Any:
    raise NonStandardNumber(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NonStandardNumber(text)
    return value


def loads(raw: str | bytes, **kwargs: Any) -> Any:
    """``json.loads`` that raises :class:`NonStandardNumber` for NaN, Infinity or a
    number that overflows a float (``1e999``)."""
    return json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float, **kwargs)
