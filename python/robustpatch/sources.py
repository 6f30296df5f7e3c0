"""The checkpoints :func:`~robustpatch.extraction.extract` reads, behind one
:class:`Source` interface: dicts of numpy arrays, torch state dicts or modules
(:class:`DictSource`), ``.safetensors`` files and sharded checkpoints read through mmap,
one tensor at a time (:class:`FileSource`), and ``.pt``/``.pth`` state dicts.
:func:`open_source` picks the one for an object or a path."""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._format.safetensors import read_header
from ._format.shards import is_sharded, load_index
from .dtypes import NUMPY_OF_LABEL, PATCHABLE, label_of
from .errors import FormatError, InvalidArgumentError
from .selection import depth_key, is_buffer_name
from .signature import is_bn_stat

__all__ = ["Source", "DictSource", "FileSource", "open_source"]


class Source:
    """A checkpoint read lazily: names in depth order, float tensors as numpy arrays.

    ``buffers``: names known to be buffers (a torch module's), beside those
    :func:`is_buffer` recognises by name. ``tied``: names left out because their
    tensor is another name's (tied weights), each to the name kept.
    """

    def __init__(
        self, names: list[str], bn: set[str], where: str, buffers: set[str] | None = None
    ) -> None:
        self.names = names
        self.bn = bn
        self.where = where
        self.buffers = set(buffers or ()) | bn
        self.tied: dict[str, str] = {}
        #: Names the checkpoint holds but not as a float tensor of its own, each to why.
        self.other: dict[str, str] = {}

    def is_buffer(self, name: str) -> bool:
        """True for state that is not a weight (never a layer, not a parameter)."""
        return name in self.buffers or is_buffer_name(name)

    def spec(self, name: str) -> tuple[str, tuple[int, ...]] | None:
        raise NotImplementedError

    def get(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def release(self, name: str) -> None:
        """Forget tensor ``name``'s memory (it has been read); a file's pages go back."""

    def is_float(self, name: str) -> bool:
        spec = self.spec(name)
        return spec is not None and spec[0] in PATCHABLE + ("F64",)

    def float_nbytes(self) -> int:
        """Bytes of all float tensors (the size of the model)."""
        total = 0
        for n in self.names:
            spec = self.spec(n)
            if spec and self.is_float(n):
                total += math.prod(spec[1]) * NUMPY_OF_LABEL[spec[0]].itemsize
        return total


def _untied(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays without the names whose array is an earlier name's memory (tied
    weights: one tensor under two names, which a patch may touch once), and those
    names, each to the name kept."""
    kept: dict[str, np.ndarray] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple[int, int, str, tuple[int, ...]], str] = {}
    for name, a in arrays.items():
        key = (a.__array_interface__["data"][0], a.nbytes, a.dtype.str, a.shape)
        if a.size and key in seen:
            tied[name] = seen[key]
            continue
        seen.setdefault(key, name)
        kept[name] = a
    return kept, tied


class DictSource(Source):
    """A mapping name → numpy array (non-float arrays are ignored).

    ``ordered``: the mapping's order is the model's (it came from a torch module or
    state dict); otherwise names are put in :func:`depth_key` order. ``left_out``: the
    dtype of each tensor the caller left out (for the message that it is missing).
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        bn: set[str] | None = None,
        where="",
        *,
        ordered: bool = False,
        buffers: set[str] | None = None,
        left_out: Mapping[str, str] | None = None,
    ):
        bad = next((k for k in arrays if not isinstance(k, str)), None)
        if bad is not None:
            raise InvalidArgumentError(f"{where or 'checkpoint'}: key {bad!r} is not a name")
        self.arrays, tied = _untied({k: v for k, v in arrays.items() if _is_float_array(v)})
        names = list(self.arrays) if ordered else sorted(self.arrays, key=depth_key)
        bn_names = set(bn or ()) | {k for k in names if is_bn_stat(k)}
        super().__init__(names, bn_names, where, buffers)
        self.tied = tied
        self.other = {k: f"holds it as {_kind(v)}" for k, v in arrays.items() if k not in names}
        self.other |= {k: f"ties it to {kept!r}" for k, kept in tied.items()}
        self.other |= {k: f"holds it as {dtype}" for k, dtype in (left_out or {}).items()}

    def spec(self, name: str) -> tuple[str, tuple[int, ...]] | None:
        a = self.arrays.get(name)
        return None if a is None else (label_of(a), tuple(a.shape))

    def get(self, name: str) -> np.ndarray:
        a = self.arrays[name]
        if a.dtype.name == "bfloat16":
            a = a.view(np.uint16)
        return np.asarray(a, order="C")  # 0-d stays 0-d


def _kind(a: Any) -> str:
    """What a left-out value is, for a message: its dtype, or its type."""
    return str(a.dtype) if isinstance(a, np.ndarray) else type(a).__name__


def _is_float_array(a: Any) -> bool:
    return isinstance(a, np.ndarray) and (
        a.dtype.kind == "f" or a.dtype.name == "bfloat16" or a.dtype == np.uint16
    )


class FileSource(Source):
    """One or several safetensors files (a sharded checkpoint), read through mmap."""

    def __init__(self, files: Sequence[Path], where: str) -> None:
        self._where: dict[str, tuple[int, Any]] = {}
        self._maps: list[mmap.mmap] = []
        self._headers = []
        for i, f in enumerate(files):
            h = read_header(f)
            self._headers.append(h)
            with open(f, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                self._maps.append(mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ))
            for t in h.tensors:
                if t.name in self._where:
                    raise FormatError(f"{where}: tensor {t.name!r} appears in two shards")
                self._where[t.name] = (i, t)
        names = sorted(self._where, key=depth_key)
        super().__init__(names, {n for n in names if is_bn_stat(n)}, where)

    def spec(self, name: str) -> tuple[str, tuple[int, ...]] | None:
        hit = self._where.get(name)
        return None if hit is None else (hit[1].dtype, hit[1].shape)

    def get(self, name: str) -> np.ndarray:
        i, t = self._where[name]
        dtype = NUMPY_OF_LABEL[t.dtype]
        start = self._headers[i].data_start + t.begin
        if start % dtype.itemsize:
            buf = self._maps[i][start : start + t.nbytes]
            return np.frombuffer(buf, dtype).reshape(t.shape)
        arr = np.frombuffer(self._maps[i], dtype, count=t.nbytes // dtype.itemsize, offset=start)
        return arr.reshape(t.shape)

    def release(self, name: str) -> None:
        """Drop the mapped pages of tensor ``name``: reading a whole model through the
        maps then keeps about one tensor resident, not every page touched."""
        i, t = self._where[name]
        mm = self._maps[i]
        if not hasattr(mm, "madvise") or not t.nbytes:
            return
        at = self._headers[i].data_start + t.begin
        start = at - at % mmap.PAGESIZE
        end = min(-(-(at + t.nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE, len(mm))
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def _index_files(path: Path) -> list[Path]:
    """The shards of a sharded checkpoint, validated by :func:`load_index` (plain file
    names in the index's folder, each header agreeing with the index)."""
    index = load_index(path)
    return [index.shard_path(s) for s in index.shards]


def reads_as_index(path: str | os.PathLike[str]) -> bool:
    """Whether a checkpoint path is read as a sharded checkpoint: an index (any ``.json``
    file) or a folder holding a ``*.safetensors.index.json``, as ``apply`` reads one."""
    return Path(path).suffix == ".json" or is_sharded(path)


def open_source(obj: Any) -> Source:
    """A :class:`Source` for a dict of arrays, a torch module/state dict, or a file path."""
    if isinstance(obj, Source):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        if reads_as_index(path):
            return FileSource(_index_files(path), str(path))
        if path.suffix in (".pt", ".pth", ".bin"):
            from .torch_bridge import load_torch_file, numpy_state

            arrays, bn, left_out = numpy_state(load_torch_file(str(path)))
            return DictSource(arrays, bn, str(path), ordered=True, left_out=left_out)
        return FileSource([path], str(path))
    from .torch_bridge import is_torch_object

    if is_torch_object(obj):
        from .torch_bridge import numpy_state

        arrays, bn, left_out = numpy_state(obj)
        where = type(obj).__name__
        buffers = _torch_buffers(obj)
        return DictSource(arrays, bn, where, ordered=True, buffers=buffers, left_out=left_out)
    if isinstance(obj, Mapping):
        return DictSource(obj, where="dict")
    raise InvalidArgumentError(f"cannot read a checkpoint from a {type(obj).__name__}")


def _torch_buffers(obj: Any) -> set[str]:
    """A torch module's registered buffer names (a state dict cannot tell them apart)."""
    named = getattr(obj, "named_buffers", None)
    return {n for n, _ in named()} if callable(named) else set()
