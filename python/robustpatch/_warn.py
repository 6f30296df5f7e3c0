"""Warnings that point at the user's line: the first frame outside this package.

A fixed ``stacklevel`` is right only for one call path and one Python version (3.11
gives a list comprehension a frame of its own, 3.12 inlines it), so the level is counted
at the time of the warning instead."""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["warn"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the innermost caller outside robustpatch."""
    frame = sys._getframe(1)
    level = 2  # the frame that called warn()
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
