"""Restore the ONNX model :func:`robustpatch.onnx.apply` patched, bit for bit, from its
undo record.

The record holds the source .onnx's bytes when the model keeps its tensors in an
external data file; the restored .onnx is those bytes, with the data file's name set
to the one written beside it: ``<out>.data`` (the source's own bytes when its data
file was ``<its name>.data``, as torch writes it, and ``out`` has its name), or with
``source_data_name`` the name the source gave it (``weights.bin``, ``model.onnx_data``),
so that the .onnx is the source's bytes under any name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from .. import validate
from .._format.undo import UndoSidecar, undo_path_for
from .._io.atomic import check_destinations
from .._io.inputs import open_input
from ..errors import FormatError, InvalidArgumentError, MismatchError
from ..files import _drop_stale_record
from ..records import FileRecords, VerifyRestore, record_plan
from ..targets import Plan, restore_target
from .fit import renamed, tie_aliases
from .model import OnnxModel, external_locations, load, relocated
from .outputs import Outputs, fixed_data_name
from .patch import OnnxReport, _data_source, _Infos, _output, _target

__all__ = ["remove", "remove_outputs"]


def remove(
    patched: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    undo: str | os.PathLike[str] | None = None,
    durable: bool = False,
    source_data_name: bool = False,
) -> OnnxReport:
    """Restore the ONNX model :func:`~robustpatch.onnx.apply` patched: ``out`` gets the
    source's bytes (same sha256). With external data, the data file is ``<out>.data``
    (the .onnx then differs from the source's only by that name, unless it is the one
    the source read), or with ``source_data_name`` the file name the source read, beside
    ``out`` (the .onnx is then the source's bytes whatever ``out`` is named). ``undo``
    defaults to ``<patched>.rpundo``; a record left beside ``out`` by a previous write
    is deleted. Refuses a patched model that changed since, a record that does not
    restore it, and outputs that are inputs; nothing is written on error."""
    src, out = validate.path(patched, "patched"), _output(out)
    side_path = validate.path(undo, "undo") if undo else undo_path_for(src)
    m = load(src)
    inputs = [src, side_path, *([m.data_path] if m.data_path else [])]
    known = None if source_data_name else _data_out(m, None, out, False)
    check_destinations(inputs, [p for p in (out, known) if p])  # before the record is read
    _check_record_exists(side_path, src)
    with open_input(side_path) as fside:
        side = UndoSidecar.load(side_path, fside)
        data_out = _data_out(m, side, out, source_data_name)
        inputs += side.found_files  # signature files the record refers to
        check_destinations(inputs, [p for p in (out, data_out) if p])
        _verify_model(m, side)
        plan = _record_plan(m, side)
        restored = _restored_bytes(m, side, data_out)
        # With external data the embedded tensors come back with the source's bytes.
        todo = plan if data_out is None else _external_only(m, plan)
        with Outputs(out, data_out, None, durable, inputs) as files, _data_source(m) as fsrc:
            target = _target(m, restored, fsrc, files.data, VerifyRestore(side))
            restore_target(target, todo, FileRecords(side, _Infos(m)))  # type: ignore[arg-type]
            files.model.file.write(restored)
            files.commit()
    _drop_stale_record(out, keep=side_path)
    return OnnxReport(out, data_out, None, len(plan.deltas), len(plan.bn), 0)


def remove_outputs(
    patched: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    undo: str | os.PathLike[str] | None = None,
    source_data_name: bool = False,
) -> list[Path]:
    """The files :func:`remove` would write: ``out`` and, with external data, its data
    file (for a caller that refuses existing outputs before any work)."""
    src, out = validate.path(patched, "patched"), _output(out)
    m = load(src)
    if m.location is None:
        return [out]
    if not source_data_name:
        return [out, out.parent / fixed_data_name(out)]
    side_path = validate.path(undo, "undo") if undo else undo_path_for(src)
    _check_record_exists(side_path, src)
    with open_input(side_path) as fside:
        side = UndoSidecar.load(side_path, fside)
        return [out, out.parent / _source_location(side)]


def _check_record_exists(side_path: Path, src: Path) -> None:
    if not side_path.exists():
        raise FileNotFoundError(
            f"no undo record at {side_path} (was {src} written with undo=False?)"
        )


def _data_out(
    m: OnnxModel, side: UndoSidecar | None, out: Path, source_data_name: bool
) -> Path | None:
    """The restored model's data file: None without external data, else ``<out>.data``
    or (``source_data_name``: ``side`` is needed) the source's, beside ``out``."""
    if m.location is None:
        return None
    name = _source_location(side) if side and source_data_name else fixed_data_name(out)
    if name == out.name:
        raise InvalidArgumentError(
            f"the source model read its external data from {name!r}, the output's own name: "
            "give the output another name"
        )
    return out.parent / name


def _source_location(side: UndoSidecar) -> str:
    """The data file name the source model read (kept in the record), refused unless it
    is one plain file name (the restored files stay in ``out``'s folder)."""
    where = f"{side.path}: bad undo record"
    if not side.source_header:
        raise FormatError(f"{where}: it holds no source model")
    locations = sorted(external_locations(side.source_header, where))
    if len(locations) != 1:
        raise FormatError(f"{where}: its source model names {len(locations)} data files")
    name = locations[0]
    if any(flavour(name).name != name for flavour in (PurePosixPath, PureWindowsPath)):
        raise InvalidArgumentError(
            f"the source model read its external data from {name!r}, in a subfolder: "
            "restore it without source_data_name (as <out>.data)"
        )
    return name


def _record_plan(m: OnnxModel, side: UndoSidecar) -> Plan:
    """The plan the record restores, keyed by initializer names (ties resolved as
    :func:`~robustpatch.onnx.apply` resolved them), checked against the record."""
    plan = record_plan(side)
    plan = renamed(plan, tie_aliases(m, plan))
    _verify_tensors(m, side, plan)
    return plan


def _verify_model(m: OnnxModel, side: UndoSidecar) -> None:
    """The patched model is the one the record was made for (its .onnx's sha256 and its
    data file's size)."""
    record = side.record
    if hashlib.sha256(m.data).hexdigest() != record.patched_header_sha256:
        raise MismatchError(f"{m.path} differs from the model its undo record was written for")
    size = None if m.data_id is None else m.data_id[2]
    if record.data_size is not None and size != record.data_size:
        raise MismatchError(
            f"{m.data_path}: the external data file has {size} bytes, not the "
            f"{record.data_size} the patch wrote: it changed since"
        )


def _verify_tensors(m: OnnxModel, side: UndoSidecar, plan: Plan) -> None:
    """The record's tensors are the ones its signatures touch (each of the model's
    dtype)."""
    record, where = side.record, f"{side.path}: bad undo record"
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
