"""The file side of an undo record: the sink that writes each patched tensor's record
as a file patch streams (:class:`RecordToFile`), the watch that checks each tensor of a
removal against it (:class:`VerifyRestore`), and the source that reads the records back
(:class:`FileRecords`). Shared by :mod:`robustpatch.files`, :mod:`robustpatch.inplace`
and :mod:`robustpatch.onnx`."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ._format.safetensors import Header, TensorInfo
from ._format.undo import UndoSidecar, UndoWriter, checksum, digest
from .errors import MismatchError
from .signature import SignatureLike
from .targets import EngineRecord, Plan, make_plan


class RecordToFile:
    """The undo sink of a file patch, and the watch of its :class:`FileTarget`: each
    tensor's record goes to the :class:`UndoWriter` once the tensor is patched, with the
    digest of its original bytes (taken as loaded) and the checksum of its patched ones.
    Its state is kept per tensor: a :class:`~robustpatch._io.pipeline.Pipeline` loads
    the next tensor, patches this one and finishes the previous one at the same time."""

    def __init__(self, writer: UndoWriter) -> None:
        self.writer = writer
        self.original: dict[str, str] = {}  # digests of the tensors loaded, not finished
        self.kept: dict[str, EngineRecord | np.ndarray] = {}  # their records

    def loaded(self, t: TensorInfo, arr: np.ndarray) -> None:
        self.original[t.name] = digest(arr, "xxh3-128")

    def keep_delta(self, name: str, record: EngineRecord) -> None:
        self.kept[name] = record

    def keep_bn(self, name: str, original: np.ndarray) -> None:
        self.kept[name] = original

    def finished(self, t: TensorInfo, arr: np.ndarray) -> None:
        kept, sum_, orig = self.kept.pop(t.name), checksum(arr), self.original.pop(t.name)
        if isinstance(kept, EngineRecord):
            self.writer.delta(t, kept.positions, kept.values, sum_, orig)
        else:
            self.writer.bn(t, kept, sum_, orig)


class VerifyRestore:
    """The watch of a removal: each patched tensor is the one the record was made for
    (its CRC) when loaded, and restores the original (its digest) before it is written."""

    def __init__(self, side: UndoSidecar) -> None:
        self.side = side
        self.entries = {e.name: e for e in side.record.tensors}

    def loaded(self, t: TensorInfo, arr: np.ndarray) -> None:
        if checksum(arr) != self.entries[t.name].checksum:
            raise MismatchError(
                f"{t.name}: tensor changed since it was patched (its undo record: {self.side.path})"
            )

    def finished(self, t: TensorInfo, arr: np.ndarray) -> None:
        self.side.check_restored(f"tensor {t.name!r}", self.entries[t.name].digest, arr)


def record_plan(side: UndoSidecar) -> Plan:
    """The plan an undo record restores: its signatures at its α."""
    return make_plan(side.signatures, side.record.alphas)


class FileRecords:
    """The undo source of a file removal: records read from the sidecar when needed."""

    def __init__(self, side: UndoSidecar, header: Header) -> None:
        self.side, self.infos = side, header.by_name()

    def delta_record(self, name: str) -> EngineRecord:
        return EngineRecord(*self.side.delta_record(self.infos[name]))

    def bn_original(self, name: str) -> np.ndarray:
        return self.side.bn_original(self.infos[name])


def signature_paths(sigs: SignatureLike | Sequence[SignatureLike]) -> list[str | os.PathLike[str]]:
    """The signature files among ``sigs`` (the others are in memory)."""
    many = sigs if isinstance(sigs, Sequence) and not isinstance(sigs, str) else [sigs]
    return [s for s in many if isinstance(s, (str, os.PathLike))]
