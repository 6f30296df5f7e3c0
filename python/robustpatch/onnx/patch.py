"""Patch the initializers of an ONNX model file (restored bit for bit by
:mod:`robustpatch.onnx.restore`).

The algorithm is :mod:`robustpatch.targets`' over an :class:`OnnxTarget`: initializers
embedded in the .onnx file are patched in place in its bytes (a protobuf is parsed
whole anyway, and is under 2 GiB), those in the external data file are streamed
through a :class:`~robustpatch.files.FileTarget` (one tensor in memory at a time,
untouched ranges copied in the kernel). The patched model keeps every byte of the
source except the patched tensors' and, with external data, the data file's name:
``<out>.<8 hex>.data`` beside ``out``, a new name on every write (the source's data
file is never written; see :mod:`robustpatch.onnx.outputs`). Every output goes to a
temporary file and is renamed into place with the undo record (``<out>.rpundo``, the
safetensors record of :mod:`robustpatch._format.undo`), the model last; on any error
nothing is left at the destination.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .. import validate
from .._format.safetensors import Header, TensorInfo
from .._format.undo import UndoWriter, undo_path_for
from .._io.atomic import AtomicFile, check_destinations
from ..dtypes import NUMPY_OF_LABEL
from ..errors import InvalidArgumentError
from ..files import FileTarget, _drop_stale_record
from ..options import FILE_OPTIONS, PatchOptions
from ..records import RecordToFile, signature_paths
from ..signature import SignatureLike
from ..targets import Alphas, NumpyTarget, Plan, patch_target, plan_for
from .fit import FOLDING_HINT, check_fits, fitted_plan
from .model import OnnxModel, load, raw_spans, relocated
from .outputs import Outputs, fixed_data_name, fresh_data_name

__all__ = ["OnnxReport", "apply", "check_fits", "FOLDING_HINT", "data_name"]


@dataclass
class OnnxReport:
    """What :func:`apply` / :func:`~robustpatch.onnx.restore.remove` wrote."""

    out: Path
    data: Path | None  # the external data file beside ``out``
    undo: Path | None
    tensors: int
    bn_buffers: int
    record_elements: int


def data_name(out: Path) -> str:
    """The external data file :func:`remove` writes beside ``out`` by default:
    ``<out name>.data`` (:func:`apply` writes ``<out name>.<8 hex>.data``)."""
    return fixed_data_name(out)


# ---------------------------------------------------------------------------- the target


class OnnxTarget:
    """An ONNX model as a patch target: initializers embedded in the .onnx are numpy
    views into ``onnx_bytes`` (``memory``, patched in place), those in the external data
    file go through ``file`` (a :class:`FileTarget` streaming it into its output).
    ``watch`` sees the embedded tensors as the FileTarget's watch sees its own."""

    def __init__(
        self,
        model: OnnxModel,
        onnx_bytes: bytearray,
        file: FileTarget | None,
        watch: Any = None,
    ) -> None:
        self.model, self.file, self.watch = model, file, watch
        self._index = {name: k for k, name in enumerate(model.initializers)}
        spans = dict(raw_spans(onnx_bytes, model.path))
        views = {}
        for name, init in model.initializers.items():
            span = spans.get(name)
            if init.file is None and span is not None and init.label is not None:
                raw = np.frombuffer(onnx_bytes, np.uint8, span[1] - span[0], span[0])
                views[name] = raw.view(NUMPY_OF_LABEL[init.label]).reshape(init.shape)
        self.memory = NumpyTarget(views)

    def _part(self, name: str) -> NumpyTarget:
        """The target holding ``name``: the data file's stream, or the model's bytes."""
        if self.file is not None and self.model.initializers[name].file is not None:
            return self.file
        return self.memory

    def spec(self, name: str) -> tuple[str, tuple[int, ...]] | None:
        return self.model.spec(name)

    def span(self, name: str) -> tuple[int, int]:
        k = self._index[name]  # initializers never share bytes
        return k, k + 1

    def check_writable(self, name: str) -> None:
        """The outputs are new files: always writable."""

    def visit(self, names: Sequence[str]) -> Iterator[str]:
        wanted = set(names)
        arrays = self.memory.arrays
        for name in (n for n in arrays if n in wanted):
            info = _info(self.model, name)
            if self.watch is not None:
                self.watch.loaded(info, arrays[name])
            yield name
            if self.watch is not None:
                self.watch.finished(info, arrays[name])
        if self.file is not None:
            yield from self.file.visit([n for n in names if self._part(n) is self.file])

    def add(
        self, name: str, deltas: Sequence[Any], alphas: Sequence[float], record: bool
    ) -> tuple[Any, int]:
        return self._part(name).add(name, deltas, alphas, record)

    def subtract(
        self, name: str, deltas: Sequence[Any], alphas: Sequence[float], record: Any
    ) -> tuple[int, int]:
        return self._part(name).subtract(name, deltas, alphas, record)

    def snapshot(self, name: str) -> np.ndarray:
        return self._part(name).snapshot(name)

    def restore(self, name: str, snap: np.ndarray) -> None:
        self._part(name).restore(name, snap)

    def read_values(self, name: str) -> np.ndarray:
        return self._part(name).read_values(name)

    def write_values(self, name: str, x: np.ndarray) -> None:
        self._part(name).write_values(name, x)


def _info(model: OnnxModel, name: str) -> TensorInfo:
    init = model.initializers[name]
    return TensorInfo(name, init.label or "U8", init.shape, init.begin, init.end)


def _data_header(model: OnnxModel) -> Header:
    """The external data file as a header-less safetensors file (offsets from byte 0)."""
    assert model.data_id is not None
    return Header({}, [_info(model, i.name) for i in model.external], 0, model.data_id[2])


class _Infos:
    """``by_name`` over every initializer (what the file records' reader asks for)."""

    def __init__(self, model: OnnxModel) -> None:
        self.model = model

    def by_name(self) -> dict[str, TensorInfo]:
        return {n: _info(self.model, n) for n in self.model.initializers}


# ---------------------------------------------------------------------------- apply


def apply(
    model: str | os.PathLike[str],
    signatures: SignatureLike | Sequence[SignatureLike],
    alphas: Alphas = 1.0,
    out: str | os.PathLike[str] | None = None,
    **options: bool,
) -> OnnxReport:
    """Write the ONNX ``model`` with ``Σ α_k·sig_k`` added to its initializers to ``out``.

    The same fused engine and ``options`` (``force``, ``allow_dtype_change``, ``undo``,
    ``durable``, ``allow_nonfinite``) as :func:`robustpatch.apply_file`; names are the
    state-dict names the signatures were extracted with (torch's exporter keeps them as
    initializer names; of tied weights it keeps one, which a signature's tensor of that
    tie patches). An external data file is written as ``<out>.<8 hex>.data`` beside
    ``out`` (a new name on every write; the data files of the output's previous writes
    are deleted once the new set is in place). With ``undo`` (default) ``<out>.rpundo``
    lets :func:`remove` restore the source bit for bit; without, a record left beside
    ``out`` by a previous write is deleted. Refuses a signature tensor with no
    initializer of its shape (a BatchNorm folded at export: see :data:`FOLDING_HINT`),
    an output that is one of the inputs, and any malformed or hostile model
    (:func:`robustpatch.onnx.model.load`); on any error nothing is written. Never
    imports torch.
    """
    opts = PatchOptions.of(options, "onnx.apply", FILE_OPTIONS)
    src, out = validate.path(model, "model"), _output(out)
    m = load(src)
    data_out = out.parent / fresh_data_name(out) if m.location is not None else None
    undo_path = undo_path_for(out) if opts.undo else None
    inputs = [src, *([m.data_path] if m.data_path else []), *signature_paths(signatures)]
    check_destinations(inputs, [p for p in (out, data_out, undo_path) if p])
    plan = fitted_plan(m, plan_for(signatures, alphas), opts.force, opts.allow_dtype_change)
    new_bytes = bytearray(m.data if data_out is None else relocated(m.data, data_out.name))
    with Outputs(out, data_out, undo_path, opts.durable, inputs) as files, _data_source(m) as fsrc:
        writer = None if files.undo is None else _undo_writer(files.undo, m, plan, new_bytes)
        sink = None if writer is None else RecordToFile(writer)
        target = _target(m, new_bytes, fsrc, files.data, sink)
        patch_target(target, plan, sink, opts.allow_nonfinite)
        files.model.file.write(new_bytes)
        if writer is not None:
            _finish_record(writer, m, new_bytes)
        files.commit()
    if undo_path is None:
        _drop_stale_record(out)
    elements = 0 if writer is None else writer.elements
    return OnnxReport(out, data_out, undo_path, len(plan.deltas), len(plan.bn), elements)


def _undo_writer(undo: AtomicFile, m: OnnxModel, plan: Plan, new_bytes: bytearray) -> UndoWriter:
    """The record of patching ``m`` by ``plan`` (keyed by initializer names), written to
    ``undo``; with external data it keeps the source .onnx's bytes."""
    touched = [(_info(m, n), "delta" if n in plan.deltas else "bn") for n in _file_order(m, plan)]
    src_header = m.data if m.location is not None else b""
    sizes = (len(m.data), len(new_bytes))
    return UndoWriter(undo, plan.sigs, plan.alphas, touched, src_header, sizes, b"")


def _finish_record(writer: UndoWriter, m: OnnxModel, new_bytes: bytearray) -> None:
    """Seal the record with the patched .onnx's sha256 and its data file's size."""
    patched_sha = hashlib.sha256(new_bytes).hexdigest()
    data_size = None if m.data_id is None else m.data_id[2]  # copied whole
    writer.record = replace(writer.record, patched_header_sha256=patched_sha, data_size=data_size)
    writer.finish()


def _output(out: str | os.PathLike[str] | None) -> Path:
    if out is None:
        raise InvalidArgumentError("an ONNX model is written to a new file: give out=...")
    return validate.output_file(out, "out")


def _file_order(m: OnnxModel, plan: Plan) -> list[str]:
    """The touched initializers in the order :class:`OnnxTarget` visits them."""
    names = set(plan.names)
    embedded = [n for n, i in m.initializers.items() if n in names and i.file is None]
    return embedded + [i.name for i in m.external if i.name in names]


@contextmanager
def _data_source(m: OnnxModel) -> Iterator[BinaryIO | None]:
    """The model's external data file, open for reading (None without one)."""
    if m.data_path is None:
        yield None
        return
    with m.open_data() as f:
        yield f


def _target(
    m: OnnxModel,
    onnx_bytes: bytearray,
    fsrc: BinaryIO | None,
    data_out: AtomicFile | None,
    watch: Any,
) -> OnnxTarget:
    """The patch target over the model's bytes and, if any, its streamed data file."""
    file = None
    if fsrc is not None and data_out is not None:
        file = FileTarget(fsrc, _data_header(m), data_out, b"", None, watch)
    return OnnxTarget(m, onnx_bytes, file, watch)
