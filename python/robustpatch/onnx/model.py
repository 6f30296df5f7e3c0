"""Reading an ONNX model as untrusted input: every initializer's bytes located and checked
before any of them is used.

An ONNX file is a protobuf ``ModelProto``; its initializers hold their bytes either in
the file (``raw_data``) or in an external data file (``location``, ``offset``,
``length``). :func:`load` parses the file with ``onnx`` (a truncated or damaged protobuf
is a FormatError), locates each top-level initializer's ``raw_data`` in the file's
bytes with a small wire-format scanner, cross-checked with the parsed model, and runs
``onnx.checker`` on the graph (:mod:`robustpatch.onnx.graph`: without the bytes checked
here, nodes sorted). Refused (FormatError naming the file and the tensor): a byte size
that is not shape × dtype, typed values beside raw or external bytes, a name or an
external location that is not UTF-8, an external location that is absolute, climbs
out of the model's folder (``..``, or a symlink pointing out), is a symlink or a file
of several hard links, is missing or is not a regular file, ranges past the end of the
data file or overlapping another tensor's, duplicate names, negative dimensions, and
external data spread over several files. Nothing here imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, BinaryIO

import numpy as np

from .. import validate
from .._io.inputs import open_input
from .._io.ranged import pread_into
from ..dtypes import NUMPY_OF_LABEL
from ..errors import FormatError, InvalidArgumentError, MismatchError
from .graph import check_graph

__all__ = [
    "Initializer",
    "OnnxModel",
    "load",
    "relocated",
    "raw_spans",
    "external_locations",
    "import_onnx",
]

#: safetensors label of each ONNX ``TensorProto.DataType`` with a fixed byte size.
LABEL_OF_ONNX = {
    1: "F32",
    2: "U8",
    3: "I8",
    4: "U16",
    5: "I16",
    6: "I32",
    7: "I64",
    9: "BOOL",
    10: "F16",
    11: "F64",
    12: "U32",
    13: "U64",
    16: "BF16",
    17: "F8_E4M3",
    18: "F8_E4M3",
    19: "F8_E5M2",
    20: "F8_E5M2",
}

_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

# Protobuf field numbers (onnx.proto): ModelProto.graph, GraphProto.initializer,
# TensorProto.name, raw_data and external_data, StringStringEntryProto.key and value.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_NAME, _TENSOR_RAW = 7, 5, 8, 9
_TENSOR_EXTERNAL, _ENTRY_KEY, _ENTRY_VALUE = 13, 1, 2

#: TensorProto's typed value fields: a tensor holding raw_data or external data must
#: leave them empty (which one onnxruntime would read is not ours to guess).
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data")
_TYPED_FIELDS += ("uint64_data",)


def import_onnx() -> Any:
    """The ``onnx`` package, or an InvalidArgumentError saying which extra installs it."""
    try:
        import onnx
    except ImportError as e:
        raise InvalidArgumentError(
            f"ONNX support needs the onnx extra: pip install 'robustpatch[onnx]' ({e})"
        ) from None
    return onnx


@dataclass(frozen=True)
class Initializer:
    """Where one initializer's bytes are: ``file`` None means in the .onnx file itself
    (``begin``/``end``: byte offsets there), else the external data location."""

    name: str
    label: str | None  # None: a dtype without a fixed byte size (string, int4...)
    shape: tuple[int, ...]
    file: str | None
    begin: int
    end: int
    raw: bool  # the bytes are raw_data or external (not typed fields like float_data)


@dataclass
class OnnxModel:
    """A validated ONNX model: its bytes, parsed proto and initializers."""

    path: Path
    data: bytes
    proto: Any
    initializers: dict[str, Initializer]
    location: str | None  # the one external data file (relative), if any
    data_id: tuple[int, int, int] | None = None  # its (device, inode, size) when checked

    @property
    def data_path(self) -> Path | None:
        return None if self.location is None else self.path.parent / self.location

    def open_data(self) -> BinaryIO:
        """The external data file, open for reading: the very file that was checked (a
        path swapped since, e.g. for a symlink out of the folder, is refused)."""
        assert self.data_path is not None
        f = open_input(self.data_path)
        st = os.fstat(f.fileno())
        if (st.st_dev, st.st_ino, st.st_size) != self.data_id:
            f.close()
            raise FormatError(f"{self.path}: external data {self.location!r} changed meanwhile")
        return f

    @property
    def external(self) -> list[Initializer]:
        """The initializers in the external data file, by offset."""
        return sorted(
            (i for i in self.initializers.values() if i.file is not None), key=lambda i: i.begin
        )

    def spec(self, name: str) -> tuple[str, tuple[int, ...]] | None:
        init = self.initializers.get(name)
        return None if init is None or init.label is None else (init.label, init.shape)

    def read(self, name: str) -> np.ndarray:
        """A writable copy of one initializer's values."""
        init = self.initializers[name]
        if init.label is None:
            raise MismatchError(f"{self.path}: initializer {name!r} has no fixed-size dtype")
        arr = np.empty(init.shape, NUMPY_OF_LABEL[init.label])
        view = memoryview(arr.reshape(-1).view(np.uint8))
        if init.file is None:
            view[:] = self.data[init.begin : init.end]
            return arr
        with self.open_data() as f:
            if pread_into(f.fileno(), view, init.begin) != init.end - init.begin:
                raise FormatError(f"{self.path}: tensor {init.name!r}: its data file ends early")
        return arr


def load(path: str | os.PathLike[str]) -> OnnxModel:
    """Read and validate an ONNX model (FormatError naming the file and the problem)."""
    onnx = import_onnx()
    path = validate.path(path, "model")
    with open_input(path) as f:
        data = f.read()
    proto = _parse(onnx, data, path)
    table = _table(list(proto.graph.initializer), raw_spans(data, path), path)
    locations = {i.file for i in table.values() if i.file is not None}
    if len(locations) > 1:
        raise FormatError(
            f"{path}: external data in {len(locations)} files ({', '.join(sorted(locations))}); "
            "robustpatch patches models whose external data is one file: re-save with "
            "onnx.save_model(..., save_as_external_data=True, all_tensors_to_one_file=True)"
        )
    model = OnnxModel(path, data, proto, table, next(iter(locations), None))
    _check_external(model)
    check_graph(onnx, proto, path, _bytes_checked(table))
    return model


def _bytes_checked(table: dict[str, Initializer]) -> set[str]:
    """The initializers whose bytes were checked here (their size, or range), which the
    graph check need not read again: raw_data of a fixed-size dtype, and external data."""
    return {n for n, i in table.items() if i.raw and (i.file is not None or i.label is not None)}


def _table(
    inits: list[Any], spans: list[tuple[str, tuple[int, int] | None]], path: Path
) -> dict[str, Initializer]:
    """Each initializer by name, located (``spans``: from :func:`raw_spans`) and checked."""
    for t in inits:
        if not isinstance(t.name, str):  # protobuf hands a name not UTF-8 over as bytes
            raise FormatError(f"{path}: the name of an initializer is not UTF-8: {t.name!r}")
    if [n for n, _ in spans] != [t.name for t in inits]:
        raise FormatError(f"{path}: its initializers could not be located in the file")
    table: dict[str, Initializer] = {}
    for t, (_, span) in zip(inits, spans):
        if t.name in table:
            raise FormatError(f"{path}: two initializers are named {t.name!r}")
        table[t.name] = _initializer(t, span, path)
    return table


def _parse(onnx: Any, data: bytes, path: Path) -> Any:
    from google.protobuf.message import DecodeError

    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise FormatError(
            f"{path}: not an ONNX model (truncated or damaged protobuf: {e})"
        ) from None
    return proto


def _utf8(path: Path) -> bool:
    """Whether ``path`` is valid UTF-8 (a byte name decoded with surrogates is not)."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _initializer(t: Any, span: tuple[int, int] | None, path: Path) -> Initializer:
    """One initializer's location and size, checked against its shape and dtype."""
    where = f"{path}: initializer {t.name!r}"
    if not t.name:
        raise FormatError(f"{path}: an initializer has no name")
    shape = tuple(int(d) for d in t.dims)
    if any(d < 0 for d in shape):
        raise FormatError(f"{where} has a negative dimension {list(shape)}")
    if t.HasField("segment"):
        raise FormatError(f"{where} is stored in segments, which robustpatch does not read")
    label = LABEL_OF_ONNX.get(t.data_type)
    if (span is not None or t.data_location == _EXTERNAL) and _typed(t):
        raise FormatError(f"{where} holds typed values ({_typed(t)}) beside raw or external bytes")
    nbytes = None if label is None else _numel(shape) * NUMPY_OF_LABEL[label].itemsize
    if t.data_location == _EXTERNAL:
        if span is not None:
            raise FormatError(f"{where} is external and also holds raw_data")
        return _external(t, shape, label, nbytes, where)
    if span is None:
        return Initializer(t.name, label, shape, None, 0, 0, raw=False)
    if nbytes is not None and span[1] - span[0] != nbytes:
        raise FormatError(
            f"{where} holds {span[1] - span[0]} bytes but its shape {list(shape)} and dtype "
            f"{label} need {nbytes}"
        )
    return Initializer(t.name, label, shape, None, span[0], span[1], raw=True)


def _typed(t: Any) -> str:
    """The typed value fields ``t`` fills (empty: none)."""
    return ", ".join(f for f in _TYPED_FIELDS if len(getattr(t, f)))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _external(
    t: Any, shape: tuple[int, ...], label: str | None, nbytes: int | None, where: str
) -> Initializer:
    if any(not isinstance(x, str) for e in t.external_data for x in (e.key, e.value)):
        raise FormatError(f"{where}: external data location is not UTF-8")
    entries = {e.key: e.value for e in t.external_data}
    location = entries.get("location", "")
    _check_location(location, where)
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries["length"]) if "length" in entries else nbytes
    except ValueError:
        raise FormatError(f"{where}: external offset or length is not an integer") from None
    if length is None:
        raise FormatError(f"{where}: external tensor of dtype {t.data_type} without a length")
    if offset < 0 or length < 0:
        raise FormatError(f"{where}: negative external offset or length")
    if nbytes is not None and length != nbytes:
        raise FormatError(
            f"{where}: external length {length} but its shape {list(shape)} and dtype {label} "
            f"need {nbytes} bytes"
        )
    return Initializer(t.name, label, shape, location, offset, offset + length, raw=True)


def _check_location(location: str, where: str) -> None:
    """A location must name a file inside the model's folder, relative, without ``..``."""
    if not location or "\0" in location:
        raise FormatError(f"{where}: external data location {location!r} is not a file name")
    for flavour in (PurePosixPath, PureWindowsPath):
        p = flavour(location)
        if p.is_absolute() or p.anchor or ".." in p.parts:
            raise FormatError(
                f"{where}: external data location {location!r} is outside the model's folder"
            )


def _check_external(model: OnnxModel) -> None:
    """The data file is a regular file of the model's folder, and holds every external
    tensor's range, with no two ranges overlapping."""
    if model.location is None:
        return
    st = _data_file(model)
    model.data_id = (st.st_dev, st.st_ino, st.st_size)
    _check_ranges(model, st.st_size, f"{model.path}: external data {model.location!r}")


def _data_file(model: OnnxModel) -> os.stat_result:
    """The data file's status, once it is found to resolve inside the model's folder and
    to be neither a symlink nor a file of several hard links (either may name a file
    anywhere, e.g. one an archive linked on extraction: ``onnx.checker`` refuses both)."""
    path = model.path.parent / model.location  # type: ignore[operator]
    where = f"{model.path}: external data {model.location!r}"
    folder, target = model.path.parent.resolve(), path.resolve()
    if folder not in target.parents:
        raise FormatError(f"{where} resolves outside the model's folder (to {target})")
    if path.is_symlink():
        raise FormatError(f"{where} is a symbolic link: give the file itself")
    try:
        with open_input(path) as f:
            st = os.fstat(f.fileno())
    except FileNotFoundError:
        raise FormatError(f"{where} does not exist") from None
    except InvalidArgumentError as e:
        raise FormatError(f"{where}: {e}") from None
    if st.st_nlink > 1:
        raise FormatError(
            f"{where} has {st.st_nlink} hard links (a hard link may name a file outside the "
            "model's folder): give it a copy of its own"
        )
    return st


def _check_ranges(model: OnnxModel, size: int, where: str) -> None:
    """Every external tensor's range is inside the data file's ``size`` bytes, and no
    two overlap."""
    end = 0
    for init in model.external:
        if init.end > size:
            raise FormatError(
                f"{where}: tensor {init.name!r} needs bytes {init.begin}..{init.end} of a "
                f"{size}-byte file"
            )
        if init.begin < end and init.end > init.begin:
            raise FormatError(f"{where}: tensor {init.name!r} overlaps another tensor's bytes")
        end = max(end, init.end)


def relocated(onnx_bytes: bytes, location: str) -> bytes:
    """The model with every external tensor's location set to ``location`` (the same
    bytes when it already is). ONNX stores the name as UTF-8: another is refused."""
    if not _utf8(Path(location)):
        raise InvalidArgumentError(
            f"the external data file would be named {location!r}, which ONNX cannot store "
            "(its names are UTF-8): give the output a UTF-8 name"
        )
    onnx = import_onnx()
    proto = onnx.ModelProto()
    proto.ParseFromString(onnx_bytes)
    changed = False
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location" and e.value != location:
                e.value, changed = location, True
    return proto.SerializeToString() if changed else onnx_bytes


# ---------------------------------------------------------------------------- wire format


def raw_spans(
    data: bytes | bytearray, path: Path | str
) -> list[tuple[str, tuple[int, int] | None]]:
    """Each top-level initializer's name and the byte range of its ``raw_data`` in
    ``data`` (None without one), in file order. A field repeated where protobuf would
    merge or overwrite (two graphs, two raw_data in one tensor) is refused, so the
    ranges are the bytes the parsed model uses."""
    view = memoryview(data)
    return [_tensor_span(view, a, b, path) for a, b in _initializer_ranges(view, path)]


def external_locations(data: bytes | bytearray | memoryview, path: Path | str) -> set[str]:
    """The external data locations the top-level initializers of the model in ``data``
    name (read from the wire format: their raw bytes are skipped, never copied; a
    location that is not UTF-8 is left out)."""
    view = memoryview(data)
    found = set()
    for a, b in _initializer_ranges(view, path):
        for f, wt, s, e in _fields(view, a, b, path):
            if f == _TENSOR_EXTERNAL and wt == 2:
                entry = {k: bytes(view[s2:e2]) for k, w2, s2, e2 in _fields(view, s, e, path)}
                if entry.get(_ENTRY_KEY) == b"location":
                    try:
                        found.add(entry.get(_ENTRY_VALUE, b"").decode("utf-8"))
                    except UnicodeDecodeError:
                        pass
    return found


def _initializer_ranges(view: memoryview, path: Path | str) -> list[tuple[int, int]]:
    """The byte range of each top-level initializer's TensorProto, in file order."""
    graphs = [(a, b) for f, wt, a, b in _fields(view, 0, len(view), path) if f == _MODEL_GRAPH]
    if len(graphs) != 1:
        raise FormatError(f"{path}: expected one graph, found {len(graphs)}")
    return [
        (a, b)
        for f, wt, a, b in _fields(view, *graphs[0], path)
        if f == _GRAPH_INITIALIZER and wt == 2
    ]


def _tensor_span(view: memoryview, a: int, b: int, path: Path | str) -> tuple[str, Any]:
    names, raws = [], []
    for f, wt, s, e in _fields(view, a, b, path):
        if f == _TENSOR_NAME and wt == 2:
            names.append(bytes(view[s:e]).decode("utf-8", "replace"))
        elif f == _TENSOR_RAW and wt == 2:
            raws.append((s, e))
    if len(names) > 1 or len(raws) > 1:
        raise FormatError(f"{path}: an initializer repeats its name or raw_data field")
    return (names[0] if names else ""), (raws[0] if raws else None)


def _fields(view: memoryview, pos: int, end: int, path: Path | str) -> Iterator[tuple]:
    """(field number, wire type, value begin, value end) of each field in ``view[pos:end]``."""
    while pos < end:
        tag, pos = _varint(view, pos, end, path)
        field, wt = tag >> 3, tag & 7
        if wt == 0:
            start, (_, nxt) = pos, _varint(view, pos, end, path)
        elif wt == 2:
            n, start = _varint(view, pos, end, path)
            nxt = start + n
        elif wt in (1, 5):
            start, nxt = pos, pos + (8 if wt == 1 else 4)
        else:
            raise FormatError(f"{path}: protobuf wire type {wt} at byte {pos} (damaged file)")
        if nxt > end:
            raise FormatError(f"{path}: a field at byte {start} runs past its end (truncated)")
        yield field, wt, start, nxt
        pos = nxt


def _varint(view: memoryview, pos: int, end: int, path: Path | str) -> tuple[int, int]:
    value, shift = 0, 0
    while pos < end and shift < 64:
        b = view[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
    raise FormatError(f"{path}: a protobuf varint at byte {pos} is cut or too long")
