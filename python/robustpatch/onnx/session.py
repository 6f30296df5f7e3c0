"""An onnxruntime session with signatures applied at load time, no file written.

The touched initializers are read from the model, patched in memory by the engine and
handed to onnxruntime through ``SessionOptions.add_initializer``, which takes
precedence over the model's own: switching a device between signatures is a new
session, not a new file. Nothing here imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..errors import InvalidArgumentError, MismatchError
from ..signature import SignatureLike
from ..targets import Alphas, NumpyTarget, patch_target, plan_for
from .model import load
from .patch import check_fits

__all__ = ["session"]

#: Initializer dtypes onnxruntime takes from numpy arrays as they are.
_SESSION_LABELS = ("F32", "F16")
_CPU = ("CPUExecutionProvider",)


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise InvalidArgumentError(
            f"rp.onnx.session needs the onnx extra: pip install 'robustpatch[onnx]' ({e})"
        ) from None
    return onnxruntime


def session(
    model: str | os.PathLike[str],
    signatures: SignatureLike | Sequence[SignatureLike],
    alphas: Alphas = 1.0,
    *,
    providers: Sequence[Any] | None = None,
    sess_options: Any = None,
    force: bool = False,
    allow_dtype_change: bool = False,
    allow_nonfinite: bool = False,
) -> Any:
    """An ``onnxruntime.InferenceSession`` of ``model`` with ``Σ α_k·sig_k`` added to its
    initializers (F32/F16), checked like :func:`robustpatch.onnx.apply`; the file is
    not changed. ``providers`` default to the CPU; ``sess_options`` (a
    ``SessionOptions``) gets the patched initializers added. The session's
    ``patched_initializers`` maps each patched name to its array."""
    ort = _ort()
    m = load(model)
    plan = plan_for(signatures, alphas)
    check_fits(m, plan, force, allow_dtype_change)
    for name in plan.names:
        label = m.initializers[name].label
        if label not in _SESSION_LABELS:
            raise MismatchError(
                f"{m.path}: initializer {name!r} is {label}; sessions patch F32/F16"
            )
    arrays = {name: m.read(name) for name in plan.names}
    patch_target(NumpyTarget(arrays), plan, None, allow_nonfinite)
    opts = sess_options if sess_options is not None else ort.SessionOptions()
    values = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}
    for name, value in values.items():
        opts.add_initializer(name, value)
    sess = ort.InferenceSession(os.fspath(m.path), opts, providers=list(providers or _CPU))
    # onnxruntime reads the initializers from these buffers while the session lives.
    sess.patched_initializers = arrays
    sess.patched_ortvalues = values
    return sess
