"""Exception classes of robustpatch.

Every expected failure is one of these (or a plain ``TypeError``/``OSError``), so callers
and the CLI can report it as one clear line:

- :class:`FormatError` (a ``ValueError``): a file that is not what it claims to be
  (truncated, bad header, overlapping offsets, unknown format version, content hash
  mismatch).
- :class:`NonFiniteError` (a ``ValueError``): NaN or Inf in a delta, a weight or an α.
- :class:`MismatchError` (a ``ValueError``): a signature and a model that do not fit
  each other (missing tensor, shape, dtype); ``force=True`` relaxes the dtype and shape
  checks (never the element count).
"""

from __future__ import annotations

from ._core import FormatError, NonFiniteError

__all__ = ["FormatError", "NonFiniteError", "MismatchError", "EXPECTED_ERRORS"]


class MismatchError(ValueError):
    """A signature does not fit the model it is applied to (or an undo record its target)."""


#: Exceptions the CLI reports as one line without a traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    FormatError,
    NonFiniteError,
    MismatchError,
    ValueError,
    OSError,
    TypeError,
    KeyError,
)
