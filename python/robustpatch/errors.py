"""Exception classes of robustpatch.

Every expected failure is one of these (or an ``OSError``), so callers and the CLI can
report it as one clear line; anything else is a bug in robustpatch and shows its
traceback:

- :class:`FormatError` (a ``ValueError``): a file that is not what it claims to be
  (truncated, bad header, overlapping offsets, unknown format version, content hash
  mismatch).
- :class:`NonFiniteError` (a ``ValueError``): NaN or Inf in a delta, a weight or an α.
- :class:`MismatchError` (a ``ValueError``): a signature and a model that do not fit
  each other (missing tensor, shape, dtype); ``allow_dtype_change=True`` relaxes the
  dtype check, ``force=True`` the dtype and shape checks (never the element count).
- :class:`InvalidArgumentError` (a ``ValueError``): an argument out of range or of the
  wrong kind (bits, group, scheme, α, a path), refused where it enters the API.
- :class:`SelectionError` (a ``ValueError``): a layer selection for ``extract`` that is
  invalid (bad regex, share outside (0, 1]) or leaves nothing to extract.

:class:`ZeroSignatureWarning` (a ``UserWarning``): an extracted signature is zero or
near zero (clean and robust checkpoints that are the same model).

Messages name the keyword that relaxes a check (``force=True``); the CLI shows the
matching flag instead (``--force``).
"""

from __future__ import annotations

from ._core import FormatError, NonFiniteError

__all__ = [
    "FormatError",
    "NonFiniteError",
    "MismatchError",
    "InvalidArgumentError",
    "SelectionError",
    "ZeroSignatureWarning",
    "EXPECTED_ERRORS",
    "shown",
]

#: Longest rendering of a value quoted in an error message.
SHOWN_CHARS = 200


def shown(value: object) -> str:
    """``repr(value)`` cut to :data:`SHOWN_CHARS`: a value read from a file may be huge,
    and the message must stay one short line."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


class MismatchError(ValueError):
    """A signature does not fit the model it is applied to (or an undo record its target)."""


class InvalidArgumentError(ValueError):
    """An argument of the wrong kind or out of range (see :mod:`robustpatch.validate`)."""


class SelectionError(ValueError):
    """A layer selection that is invalid or selects nothing to extract."""


class ZeroSignatureWarning(UserWarning):
    """An extracted signature is zero or near zero relative to the robust delta."""


#: Exceptions the CLI reports as one line without a traceback: ours, and OSError (a file
#: missing, a full disk...). A plain ValueError, TypeError or KeyError is a bug.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    FormatError,
    NonFiniteError,
    MismatchError,
    InvalidArgumentError,
    SelectionError,
    OSError,
)
