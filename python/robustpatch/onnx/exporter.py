"""Export a torch model to ONNX as a deployable, measured variant: patched in torch,
BatchNorm folded, optionally f16 and int8, validated against the patched torch model.

The only module of :mod:`robustpatch.onnx` that imports torch (when a function here
is called). The export is torch's own
(``torch.onnx.export``, dynamo): its graph optimization folds each BatchNorm into the
convolution before it, after the signatures were applied, which is why a signature is
applied here in torch rather than to the folded file. f16 is onnxruntime's
``float16`` converter (inputs and outputs stay f32); int8 is onnxruntime's dynamic or
static (QDQ, calibrated on ``calibration``) quantization. The variant is then run by
onnxruntime on a batch and compared with the patched torch model; one that misses the
tolerance is refused (MismatchError) and nothing is written.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import validate
from .._format.safetensors import read_header
from .._io.atomic import AtomicFile, check_destinations
from ..errors import InvalidArgumentError, MismatchError
from ..targets import apply as apply_signatures
from .graph import sort_nodes

if TYPE_CHECKING:
    import torch

__all__ = ["TOLERANCES", "export", "export_checkpoint", "has_dynamo_export"]

#: Default (max abs error relative to the largest |output|, min top-1 agreement) per
#: variant: f32 differs from torch only by the order of float sums, f16 by 11-bit
#: mantissas; int8 changes outputs by design, so only its decisions are held.
TOLERANCES = {"f32": (1e-4, 0.99), "f16": (2e-2, 0.95), "int8": (float("inf"), 0.9)}

INT8_MODES = (False, "dynamic", "static")


def export(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    signatures: Any = None,
    alphas: Any = 1.0,
    dtype: str = "f32",
    int8: Any = False,
    calibration: torch.Tensor | None = None,
    max_abs_error: float | None = None,
    min_agreement: float | None = None,
) -> dict[str, Any]:
    """Write ``module`` (with ``Σ α_k·sig_k`` applied to a copy) as an ONNX file.

    ``example``: an input batch (its first dimension stays dynamic); it is also the
    validation batch unless ``calibration`` is given (then that batch is, and static
    int8 calibrates on it). ``dtype``: ``"f32"`` or ``"f16"``; ``int8``: False,
    ``"dynamic"`` or ``"static"`` (quantizes the f32 model). ``max_abs_error`` (the
    largest output error allowed, as a fraction of the torch model's largest |output|)
    and ``min_agreement`` (top-1 agreement with it) default to :data:`TOLERANCES`.
    The module returns one tensor of shape ``(N, C, ...)``; agreement is over ``C``
    (a classifier's classes, a segmenter's per pixel). Returns the
    measurements; a variant outside them is refused (MismatchError) and ``path`` is left
    as it was; ``path`` is never one of the signature files. The file is self-contained
    (no external data: up to protobuf's 2 GiB).
    """
    path = validate.output_file(path, "path")
    variant = _variant(dtype, int8)
    _check_limits(max_abs_error, min_agreement)
    check_destinations(_signature_files(signatures), [path])
    if int8 == "static" and calibration is None:
        calibration = example
    batch = example if calibration is None else calibration
    model = copy.deepcopy(module).cpu().eval()
    if signatures is not None:
        apply_signatures(model, signatures, alphas)
    reference = _model_output(model, batch.cpu())
    if batch is not example:
        _model_output(model, example.cpu())
    proto = _exported(model, example.cpu())
    if dtype == "f16":
        proto = _to_f16(proto)
    data = proto.SerializeToString()
    if int8:
        data = _quantized(data, int8, batch.cpu(), _input_name(proto))
    measured = _measure(data, batch.cpu().numpy(), reference)
    _check_tolerance(measured, variant, max_abs_error, min_agreement)
    with AtomicFile(path, durable=False) as af:
        af.file.write(data)
        af.commit()
    return {"file": str(path), "variant": variant, "bytes": len(data), **measured}


def _signature_files(signatures: Any) -> list[Any]:
    """The signatures given as files (an output must not replace one)."""
    if isinstance(signatures, (str, os.PathLike)):
        return [signatures]
    if isinstance(signatures, (list, tuple)):
        return [s for s in signatures if isinstance(s, (str, os.PathLike))]
    return []


def _model_output(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The torch model's output on ``x``: one tensor of shape ``(N, C, ...)``, else
    InvalidArgumentError (an input it cannot take, or outputs the validation cannot
    compare) before the export's own errors, which are pages of torch's log."""
    import torch

    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InvalidArgumentError(
            f"the model does not run on inputs of shape {tuple(x.shape[1:])}: {first}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.ndim < 2:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise InvalidArgumentError(
            "the export validates the model's top-1 decisions: it must return one tensor "
            f"of shape (N, C, ...), got {got}"
        )
    return out.float().numpy()


def _check_limits(max_abs: float | None, min_agree: float | None) -> None:
    """The tolerances are numbers a measurement can fail (NaN would pass every export)."""
    if max_abs is not None and not max_abs >= 0:
        raise InvalidArgumentError(f"max_abs_error must be a number >= 0, got {max_abs!r}")
    if min_agree is not None and not 0 <= min_agree <= 1:
        raise InvalidArgumentError(f"min_agreement must be between 0 and 1, got {min_agree!r}")


def _variant(dtype: str, int8: Any) -> str:
    if dtype not in ("f32", "f16"):
        raise InvalidArgumentError(f"dtype must be 'f32' or 'f16', got {dtype!r}")
    if int8 not in INT8_MODES:
        raise InvalidArgumentError(f"int8 must be False, 'dynamic' or 'static', got {int8!r}")
    if int8 and dtype != "f32":
        raise InvalidArgumentError("int8 quantizes the f32 model: give dtype='f32'")
    return "int8" if int8 else dtype


#: Keywords of ``torch.onnx.export`` the export needs (torch 2.6 and newer).
EXPORT_KEYWORDS = ("dynamo", "optimize", "dynamic_shapes")


def has_dynamo_export() -> bool:
    """Whether this torch's ``torch.onnx.export`` takes :data:`EXPORT_KEYWORDS`."""
    import torch

    params = inspect.signature(torch.onnx.export).parameters
    return all(k in params for k in EXPORT_KEYWORDS)


def _exported(model: torch.nn.Module, example: torch.Tensor) -> Any:
    """torch's ONNX export with a dynamic batch dimension (BatchNorm folded)."""
    import torch

    if not has_dynamo_export():
        raise InvalidArgumentError(
            f"rp.onnx.export needs torch >= 2.6 (torch.onnx.export with {EXPORT_KEYWORDS}); "
            f"this is torch {torch.__version__}"
        )
    with warnings.catch_warnings(), _quiet_logger("torch.onnx"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example,), dynamo=True, dynamic_shapes=({0: "batch"},), verbose=False
        )
    return program.model_proto


def _to_f16(proto: Any) -> Any:
    """onnxruntime's float16 converter, its nodes then sorted: it appends the casts of
    the inputs at the end of the graph, which ``onnx.checker`` refuses."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert_float_to_float16(proto, keep_io_types=True)
    sort_nodes(onnx, converted.graph)
    return converted


def _input_name(proto: Any) -> str:
    return proto.graph.input[0].name


def _quantized(data: bytes, mode: str, batch: torch.Tensor, input_name: str) -> bytes:
    """onnxruntime's int8 quantization of the f32 model (files in a private folder)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{input_name: batch.numpy()}])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp, _quiet_logger():
        src, dst = Path(tmp) / "f32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(data)
        if mode == "dynamic":
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        else:
            quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ)
        return dst.read_bytes()


@contextmanager
def _quiet_logger(name: str | None = None) -> Iterator[None]:
    """Errors only from logger ``name`` (the root: onnxruntime's quantizer logs advice
    there; "torch.onnx": the exporter's notes, e.g. that torchvision is missing), meanwhile:
    a CLI error stays one line."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def _session(data: bytes, threads: int = 1) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _measure(data: bytes, x: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """The variant's outputs on ``x`` against torch's: max abs error (and relative to the
    largest |output|) and top-1 agreement."""
    sess = _session(data)
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0].astype(np.float32)
    err = float(np.abs(out - reference).max())
    scale = max(float(np.abs(reference).max()), 1e-30)
    agreement = float((out.argmax(1) == reference.argmax(1)).mean())
    return {
        "max_abs_error": err,
        "relative_error": err / scale,
        "agreement": agreement,
        "batch": int(x.shape[0]),
    }


def _check_tolerance(
    m: dict[str, Any], variant: str, max_abs: float | None, min_agree: float | None
) -> None:
    """Refuse a variant outside the tolerances (a NaN measurement fails every test)."""
    rel_default, agree_default = TOLERANCES[variant]
    allowed = rel_default if max_abs is None else max_abs
    if not m["relative_error"] <= allowed:
        raise MismatchError(
            f"the {variant} export differs from the patched torch model by up to "
            f"{m['relative_error']:.3g} of its largest output (allowed {allowed:.3g}); "
            "nothing was written"
        )
    need = agree_default if min_agree is None else min_agree
    if not m["agreement"] >= need:
        raise MismatchError(
            f"the {variant} export agrees with the patched torch model on "
            f"{m['agreement']:.1%} of top-1 predictions (needed {need:.1%}); nothing was written"
        )


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    signatures: Sequence[Any] = (),
    alphas: Any = 1.0,
    input_shape: tuple[int, ...] = (3, 32, 32),
    batch: int = 64,
    **options: Any,
) -> dict[str, Any]:
    """:func:`export` of a :class:`~robustpatch.lab.models.SmallCNN` checkpoint (its
    widths read from the tensors' shapes), validated on ``batch`` seeded uniform inputs
    in [0, 1) of ``input_shape``. The options are checked before the checkpoint is read."""
    _variant(options.get("dtype", "f32"), options.get("int8", False))
    _check_limits(options.get("max_abs_error"), options.get("min_agreement"))
    import torch
    from safetensors.torch import load as load_safetensors

    from ..lab.models import SmallCNN

    source = validate.path(checkpoint, "checkpoint")
    read_header(source)  # a malformed file: our one-line FormatError, not safetensors' own
    with open(source, "rb") as f:  # safetensors' own open takes UTF-8 paths only
        state = load_safetensors(f.read())
    # safetensors lists tensors by name ("features.10" before "features.3"): by index.
    names = [k for k in state if re.fullmatch(r"features\.\d+\.weight", k) and state[k].ndim == 4]
    convs = [state[k] for k in sorted(names, key=lambda k: int(k.split(".")[1]))]
    if not convs or "classifier.weight" not in state:
        raise InvalidArgumentError(f"{checkpoint}: not a SmallCNN checkpoint")
    model = SmallCNN(
        num_classes=state["classifier.weight"].shape[0],
        in_channels=convs[0].shape[1],
        widths=[c.shape[0] for c in convs[::2]],
    )
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise MismatchError(f"{checkpoint}: not a SmallCNN checkpoint ({first})") from None
    gen = torch.Generator().manual_seed(0)
    example = torch.rand((batch, *input_shape), generator=gen)
    check_destinations([source], [path])  # export checks the signature files
    sigs = list(signatures) or None
    return export(model, example, path, signatures=sigs, alphas=alphas, **options)
