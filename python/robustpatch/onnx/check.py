"""What ``robustpatch onnx check`` reports: a model validated as untrusted input, what
its undo record says was applied, and whether signatures fit it."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

from .._format.undo import read_record, undo_path_for
from ..errors import EXPECTED_ERRORS, MismatchError
from ..targets import plan_for
from .fit import fitted_plan
from .model import load

__all__ = ["check"]


def check(
    model: str | os.PathLike[str],
    signatures: Sequence[Any] = (),
    *,
    force: bool = False,
    allow_dtype_change: bool = False,
) -> dict[str, Any]:
    """Validate ``model`` (FormatError if it is malformed or hostile) and report it; with
    ``signatures``, ``fits`` says whether :func:`~robustpatch.onnx.apply` with the same
    ``force`` and ``allow_dtype_change`` takes them (``problem``: why not). ``applied``:
    the signatures the undo record beside the model lists, when it is this model's
    (``record_note`` says why a record there is not)."""
    m = load(model)
    rep: dict[str, Any] = {
        "file": str(m.path),
        "initializers": len(m.initializers),
        "external_data": m.location,
        "bytes": len(m.data) + (m.data_id[2] if m.data_id else 0),
    }
    rep["applied"], note = _applied(m.path, m.data)
    if note:
        rep["record_note"] = note
    if signatures:
        try:
            fitted_plan(m, plan_for(list(signatures), 1.0), force, allow_dtype_change)
            rep["fits"] = True
        except MismatchError as e:
            rep["fits"], rep["problem"] = False, str(e)
    return rep


def _applied(path: os.PathLike[str], data: bytes) -> tuple[list[dict[str, Any]], str | None]:
    """The signatures the undo record beside ``path`` says were applied to it, and a
    note when a file is there that is not its record: one that cannot be read, or the
    record of another file, says nothing about this model (its metadata alone is read:
    the signatures it refers to need not be found)."""
    side_path = undo_path_for(path)
    if not (side_path.exists() or side_path.is_symlink()):
        return [], None
    try:
        record = read_record(side_path)
    except EXPECTED_ERRORS as e:
        return [], f"the undo record beside it is ignored: {e}"
    if hashlib.sha256(data).hexdigest() != record.patched_header_sha256:
        return [], f"{side_path} is the undo record of another file (ignored)"
    keys = ("name", "hash", "alpha")
    return [{k: a[k] for k in keys} for a in record.applied()], None
