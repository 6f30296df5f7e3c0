"""What ``robustpatch onnx check`` reports: a model validated as untrusted input, what
its undo record says was applied, and whether signatures fit it."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

from .._format.undo import UndoSidecar, undo_path_for
from .._io.inputs import open_input
from ..errors import MismatchError
from ..targets import plan_for
from .model import load
from .patch import check_fits

__all__ = ["check"]


def check(model: str | os.PathLike[str], signatures: Sequence[Any] = ()) -> dict[str, Any]:
    """Validate ``model`` (FormatError if it is malformed or hostile) and report it; with
    ``signatures``, ``fits`` says whether they apply (``problem``: why not)."""
    m = load(model)
    rep: dict[str, Any] = {
        "file": str(m.path),
        "initializers": len(m.initializers),
        "external_data": m.location,
        "bytes": len(m.data) + (m.data_id[2] if m.data_id else 0),
        "applied": _applied(m.path, m.data),
    }
    if signatures:
        try:
            check_fits(m, plan_for(list(signatures), 1.0))
            rep["fits"] = True
        except MismatchError as e:
            rep["fits"], rep["problem"] = False, str(e)
    return rep


def _applied(path: os.PathLike[str], data: bytes) -> list[dict[str, Any]]:
    """The signatures the undo record beside ``path`` says were applied to it (none if
    there is no record, or it belongs to another file)."""
    side_path = undo_path_for(path)
    if not side_path.exists():
        return []
    with open_input(side_path) as f:
        side = UndoSidecar.load(side_path, f)
    if hashlib.sha256(data).hexdigest() != side.record.patched_header_sha256:
        return []
    return [
        {"name": s.name, "hash": s.content_hash, "alpha": a}
        for s, a in zip(side.signatures, side.record.alphas)
    ]
