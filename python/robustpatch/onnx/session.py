"""An onnxruntime session with signatures applied at load time, no file written.

The model's bytes are patched in memory (as :func:`robustpatch.onnx.apply` patches
them on disk) and handed to onnxruntime; the tensors of its external data file are read
into memory, patched where touched, and given to onnxruntime with
``SessionOptions.add_external_initializers``, so that it never opens the data file
(whose path has been checked here). ``SessionOptions.add_initializer`` is not used: the
overrides it sets are ignored by the graph optimizations that fold initializers into
their consumers (Conv + BatchNorm fusion, constant folding; onnxruntime 1.32 at
the default optimization level). Switching a device between signatures is a new
session, not a new file. Nothing here imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import FormatError, InvalidArgumentError, MismatchError
from ..signature import SignatureLike
from ..targets import Alphas, patch_target, plan_for
from .fit import fitted_plan
from .model import Initializer, OnnxModel, load
from .patch import OnnxTarget

__all__ = ["session"]

#: External initializer dtypes that numpy holds only as raw bits (onnxruntime would
#: take them as integers).
_RAW_BITS = ("BF16", "F8_E4M3", "F8_E5M2")
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
    initializers, checked like :func:`robustpatch.onnx.apply`; the file is not changed
    (the model and its external data are held in memory, as onnxruntime holds them).
    ``providers`` default to the CPU; ``sess_options`` (threads, optimization level...)
    gets the external tensors added, so give each session its own. The session's
    ``patched_initializers`` maps each patched initializer's name to its array."""
    ort = _ort()
    m = load(model)
    plan = fitted_plan(m, plan_for(signatures, alphas), force, allow_dtype_change)
    patched = bytearray(m.data)
    target = OnnxTarget(m, patched, None)
    external = {init.name: _external_array(m, init) for init in m.external}
    target.memory.arrays.update(external)
    patch_target(target, plan, None, allow_nonfinite)
    opts = sess_options if sess_options is not None else ort.SessionOptions()
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in external.values()]
    if values:
        opts.add_external_initializers(list(external), values)
    sess = _inference_session(ort, m, bytes(patched), opts, list(providers or _CPU))
    sess.patched_initializers = {name: target.memory.arrays[name] for name in plan.names}
    sess.external_ortvalues = values  # onnxruntime reads these buffers while it lives
    return sess


def _inference_session(ort: Any, m: OnnxModel, data: bytes, opts: Any, providers: list[Any]) -> Any:
    """onnxruntime's session of the patched bytes; a model it refuses (one the checker
    passes, e.g. a Gemm whose untouched weight has the wrong width) is a FormatError
    naming the file, not onnxruntime's own exception."""
    try:
        return ort.InferenceSession(data, opts, providers=providers)
    except _ort_errors(ort) as e:
        first = " ".join(str(e).split())[:300] or type(e).__name__
        raise FormatError(f"{m.path}: onnxruntime cannot load it: {first}") from None


def _ort_errors(ort: Any) -> tuple[type[BaseException], ...]:
    """The exception classes onnxruntime raises from its C++ side (Fail, InvalidGraph,
    NotImplemented...)."""
    state = ort.capi.onnxruntime_pybind11_state
    return tuple(
        v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception)
    )


def _external_array(m: OnnxModel, init: Initializer) -> np.ndarray:
    """An external tensor read into memory, in a dtype onnxruntime takes from numpy."""
    if init.label is None or init.label in _RAW_BITS:
        raise MismatchError(
            f"{m.path}: external initializer {init.name!r} is {init.label}, which onnxruntime "
            "does not take from numpy: patch the file with rp.onnx.apply instead"
        )
    return m.read(init.name)
