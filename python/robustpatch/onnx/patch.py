"""Patch the initializers of an ONNX model file, and restore it bit for bit.

The algorithm is :mod:`robustpatch.targets`' over an :class:`OnnxTarget`: initializers
embedded in the .onnx file are patched in place in its bytes (a protobuf is parsed
whole anyway, and is under 2 GiB), those in the external data file are streamed
through a :class:`~robustpatch.files.FileTarget` (one tensor in memory at a time,
untouched ranges copied in the kernel). The patched model keeps every byte of the
source except the patched tensors' and, with external data, the data file's name:
``<out>.data`` beside ``out`` (the source's data file is never written). Every output
goes to a temporary file and is renamed into place, the undo record (``<out>.rpundo``,
the safetensors record of :mod:`robustpatch._format.undo`) first; on any error
nothing is left at the destination. :func:`remove` verifies the patched model against
the record and writes the original's bytes (same sha256; with external data, when
the restored model's data file gets the original's name).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .. import validate
from .._format.safetensors import Header, TensorInfo
from .._format.undo import UndoSidecar, UndoWriter, undo_path_for
from .._io.atomic import AtomicFile, check_destinations, commit_all, naming_errors
from .._io.inputs import open_input
from ..dtypes import NUMPY_OF_LABEL
from ..errors import FormatError, InvalidArgumentError, MismatchError
from ..files import FileTarget
from ..options import FILE_OPTIONS, PatchOptions
from ..records import FileRecords, RecordToFile, VerifyRestore, record_plan, signature_paths
from ..signature import SignatureLike
from ..targets import (
    Alphas,
    NumpyTarget,
    Plan,
    check_plan,
    patch_target,
    plan_for,
    restore_target,
)
from .model import OnnxModel, load, raw_spans, relocated

__all__ = ["OnnxReport", "apply", "remove", "check_fits", "FOLDING_HINT", "data_name"]

#: How to export a model whose BatchNorm layers keep their own initializers.
FOLDING_HINT = (
    "was a BatchNorm folded into a convolution at export? export without folding: "
    "torch.onnx.export(model, args, path, optimize=False) (torch >= 2.6), and apply the "
    "signature to that file (rp.onnx.export patches in torch and folds afterwards)"
)


@dataclass
class OnnxReport:
    """What :func:`apply` / :func:`remove` wrote."""

    out: Path
    data: Path | None  # the external data file beside ``out``
    undo: Path | None
    tensors: int
    bn_buffers: int
    record_elements: int


def data_name(out: Path) -> str:
    """The external data file of a model written to ``out``: ``<out name>.data``."""
    return out.name + ".data"


def check_fits(
    model: OnnxModel, plan: Plan, force: bool = False, allow_dtype_change: bool = False
) -> None:
    """Refuse (MismatchError) a plan whose tensors are not initializers of the same shape
    stored as bytes, naming the first such tensor and how to export without folding."""
    for name in plan.names:
        spec = model.spec(name)
        init = model.initializers.get(name)
        if init is not None and init.label is None:
            raise MismatchError(
                f"{model.path}: initializer {name!r} has an ONNX data type whose elements "
                "are not whole bytes of one size (such as INT4 or STRING): it cannot be patched"
            )
        if spec is None:
            raise MismatchError(
                f"{model.path} has no initializer {name!r} that a signature touches "
                f"({FOLDING_HINT})"
            )
        if math.prod(spec[1]) != math.prod(_sig_shape(plan, name)):
            raise MismatchError(
                f"{model.path}: initializer {name!r} has shape {list(spec[1])}, the signature "
                f"{list(_sig_shape(plan, name))} ({FOLDING_HINT})"
            )
        if not model.initializers[name].raw:
            raise MismatchError(
                f"{model.path}: initializer {name!r} is stored in typed fields, not raw_data: "
                "re-save it with onnx.save_model (onnx.numpy_helper.from_array writes raw_data)"
            )
    check_plan(plan, model.spec, force, allow_dtype_change=allow_dtype_change)


def _sig_shape(plan: Plan, name: str) -> tuple[int, ...]:
    for sig in plan.sigs:
        if name in sig.entries:
            return sig.entries[name].shape
    raise KeyError(name)


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
    initializer names). An external data file is written as ``<out>.data`` beside
    ``out``. With ``undo`` (default) ``<out>.rpundo`` lets :func:`remove` restore the
    source bit for bit. Refuses a signature tensor with no initializer of its shape (a
    BatchNorm folded at export: see :data:`FOLDING_HINT`), an output that is one of the
    inputs, and any malformed or hostile model (:func:`robustpatch.onnx.model.load`); on
    any error nothing is written. Never imports torch.
    """
    opts = PatchOptions.of(options, "onnx.apply", FILE_OPTIONS)
    src, out = validate.path(model, "model"), _output(out)
    m = load(src)
    data_out = out.parent / data_name(out) if m.location is not None else None
    outputs = [p for p in (out, data_out, undo_path_for(out) if opts.undo else None) if p]
    check_destinations(
        [src, *([m.data_path] if m.data_path else []), *signature_paths(signatures)], outputs
    )
    plan = plan_for(signatures, alphas)
    check_fits(m, plan, opts.force, opts.allow_dtype_change)
    new_bytes = bytearray(m.data if data_out is None else relocated(m.data, data_out.name))
    touched = [(_info(m, n), "delta" if n in plan.deltas else "bn") for n in _file_order(m, plan)]
    undo_path = undo_path_for(out) if opts.undo else None
    with _Outputs(out, data_out, undo_path, opts.durable) as files, _data_source(m) as fsrc:
        writer = None
        if files.undo is not None:
            src_header = m.data if data_out is not None else b""
            sizes = (len(m.data), len(new_bytes))
            writer = UndoWriter(files.undo, plan.sigs, plan.alphas, touched, src_header, sizes, b"")
        sink = None if writer is None else RecordToFile(writer)
        target = _target(m, new_bytes, fsrc, files.data, sink)
        patch_target(target, plan, sink, opts.allow_nonfinite)
        files.model.file.write(new_bytes)
        if writer is not None:
            patched_sha = hashlib.sha256(new_bytes).hexdigest()
            data_size = None if m.data_id is None else m.data_id[2]  # copied whole
            writer.record = replace(
                writer.record, patched_header_sha256=patched_sha, data_size=data_size
            )
            writer.finish()
        files.commit()
    elements = 0 if writer is None else writer.elements
    return OnnxReport(out, data_out, undo_path, len(plan.deltas), len(plan.bn), elements)


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


class _Outputs:
    """The model, its data file and its undo record as atomic files, committed as a
    set (the record first, the model last) or discarded together."""

    def __init__(self, out: Path, data: Path | None, undo: Path | None, durable: bool) -> None:
        self._open: list[AtomicFile] = []
        self.undo = self._new(undo, durable)
        self.data = self._new(data, durable)
        self.model = self._new(out, durable)

    def _new(self, path: Path | None, durable: bool) -> AtomicFile | None:
        if path is None:
            return None
        try:
            af = AtomicFile(path, durable)
        except BaseException:
            self.discard()
            raise
        self._open.append(af)
        return af

    def commit(self) -> None:
        commit_all(self._open)

    def discard(self) -> None:
        for af in self._open:
            af.discard()

    def __enter__(self) -> _Outputs:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
        if isinstance(exc, OSError) and self.model is not None:
            with naming_errors(self.model.path):  # not a temporary file, or nothing
                raise exc


# ---------------------------------------------------------------------------- remove


def remove(
    patched: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    undo: str | os.PathLike[str] | None = None,
    durable: bool = False,
) -> OnnxReport:
    """Restore the ONNX model :func:`apply` patched: ``out`` gets the source's bytes
    (same sha256; with external data, its data file is ``<out>.data`` and the .onnx
    differs only by that name unless it is the source's). ``undo`` defaults to
    ``<patched>.rpundo``. Refuses a patched model that changed since, a record that
    does not restore it, and outputs that are inputs; nothing is written on error."""
    src, out = validate.path(patched, "patched"), _output(out)
    side_path = validate.path(undo, "undo") if undo else undo_path_for(src)
    m = load(src)
    data_out = out.parent / data_name(out) if m.location is not None else None
    inputs = [src, side_path, *([m.data_path] if m.data_path else [])]
    check_destinations(inputs, [p for p in (out, data_out) if p])
    if not side_path.exists():
        raise FileNotFoundError(
            f"no undo record at {side_path} (was {src} written with undo=False?)"
        )
    with open_input(side_path) as fside:
        side = UndoSidecar.load(side_path, fside)
        plan = record_plan(side)
        _verify_patched(m, side, plan)
        restored = _restored_bytes(m, side, data_out)
        # With external data the embedded tensors come back with the source's bytes.
        todo = plan if data_out is None else _external_only(m, plan)
        with _Outputs(out, data_out, None, durable) as files, _data_source(m) as fsrc:
            target = _target(m, restored, fsrc, files.data, VerifyRestore(side))
            restore_target(target, todo, FileRecords(side, _Infos(m)))  # type: ignore[arg-type]
            files.model.file.write(restored)
            files.commit()
    return OnnxReport(out, data_out, None, len(plan.deltas), len(plan.bn), 0)


def _verify_patched(m: OnnxModel, side: UndoSidecar, plan: Plan) -> None:
    """The patched model is the one the record was made for, and the record's tensors
    are the ones its signatures touch (each of the model's dtype)."""
    record, where = side.record, f"{side.path}: bad undo record"
    if hashlib.sha256(m.data).hexdigest() != record.patched_header_sha256:
        raise MismatchError(f"{m.path} differs from the model its undo record was written for")
    size = None if m.data_id is None else m.data_id[2]
    if record.data_size is not None and size != record.data_size:
        raise MismatchError(
            f"{m.data_path}: the external data file has {size} bytes, not the "
            f"{record.data_size} the patch wrote: it changed since"
        )
    for e in record.tensors:
        kind = "delta" if e.name in plan.deltas else "bn" if e.name in plan.bn else None
        spec = m.spec(e.name)
        if kind is None or e.kind != kind or spec is None or spec[0] != e.dtype:
            raise FormatError(f"{where}: tensor {e.name!r} does not match the patched model")
    missing = set(plan.names) - {e.name for e in record.tensors}
    if missing:
        raise FormatError(f"{where}: tensor {sorted(missing)[0]!r} of its signatures has no record")


def _restored_bytes(m: OnnxModel, side: UndoSidecar, data_out: Path | None) -> bytearray:
    """The restored .onnx before its embedded tensors are restored: the patched bytes,
    or with external data the source's bytes (kept by the record) under the new data
    file's name."""
    if data_out is None:
        return bytearray(m.data)
    if not side.source_header:
        raise FormatError(f"{side.path}: bad undo record: it holds no source model")
    return bytearray(relocated(side.source_header, data_out.name))


def _external_only(m: OnnxModel, plan: Plan) -> Plan:
    ext = {i.name for i in m.external}
    deltas = {n: v for n, v in plan.deltas.items() if n in ext}
    bn = {n: v for n, v in plan.bn.items() if n in ext}
    return Plan(plan.sigs, plan.alphas, deltas, bn)
