"""Signature files read tensor by tensor: a full-model task vector, dense or quantized,
applied with memory near one tensor, not the whole signature.

:func:`open_signature` opens a signature file whose delta entries stay in the file, as
read-only views of a memory map: a dense entry's values in the dtype the file stores
(F32, or compact BF16/F16, which the engine adds directly), a quantized entry's codes,
scales and offsets, which its :class:`~robustpatch._core.QuantTensor` holds without
copying (validated once, as :meth:`Signature.load` validates them).
:meth:`StreamedSignature.release` drops a tensor's pages once it has been applied. The
file is still verified, in one streamed pass that reads it in blocks: the content hash
and that every dense value is finite; before use, or (``background=True``) in a second
thread while it is applied, the patch then committed only once it has passed.
BatchNorm entries are small and loaded as by :meth:`Signature.load`; a file of them
alone is loaded as usual.
"""

from __future__ import annotations

import math
import mmap
import os
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from .. import _core, validate
from .._format.safetensors import Header, TensorInfo, read_tensor
from .._io.inputs import in_thread_on_dup, open_input
from .._io.ranged import pread_blocks
from ..dtypes import NUMPY_OF_LABEL
from ..errors import FormatError, NonFiniteError, shown
from .codec import (
    HEADER_KEYS,
    TENSORS_HASH,
    ContentHasher,
    TensorDigests,
    from_parts,
    hash_algorithm_of,
    quantized_parts,
    read_signature_header,
)
from .entry import Entry
from .model import Signature

__all__ = ["StreamedSignature", "open_signature"]

#: Bytes read per block while the file is verified.
_BLOCK = 8 << 20
_DENSE_LABELS = ("F32", "BF16", "F16")


class StreamedSignature(Signature):
    """A signature whose dense deltas are views of its file (see the module docstring)."""

    path: Path
    _hash: str
    _mm: mmap.mmap
    _ranges: dict[str, list[tuple[int, int]]]
    _check: Future[str]

    def verified(self) -> None:
        """Wait for the file's verification (FormatError / NonFiniteError if it failed)."""
        self._check.result()

    @property
    def content_hash(self) -> str:
        """The hash verified when the file was opened (the values are the file's)."""
        return self._hash

    def release(self, name: str) -> None:
        """Drop the memory pages of entry ``name`` (it has been applied)."""
        _drop(self._mm, self._ranges.get(name, ()))


def _drop(mm: mmap.mmap, spans: list[tuple[int, int]]) -> None:
    """Drop the pages of byte ranges ``spans`` of the map (read again if used again)."""
    if not hasattr(mm, "madvise"):
        return
    page = mmap.PAGESIZE
    for at, size in spans:
        start = at - at % page
        end = -(-(at + size) // page) * page
        mm.madvise(mmap.MADV_DONTNEED, start, min(end, len(mm)) - start)


def open_signature(path: str | os.PathLike[str], background: bool = False) -> Signature:
    """The signature at ``path``: streamed if it holds deltas, else loaded.

    ``background=True`` verifies a streamed file in a second thread while the caller
    applies it: the caller must call :meth:`StreamedSignature.verified` before it
    commits anything (a file that fails raises there)."""
    path = validate.path(path, "signature path")
    with open_input(path) as f:
        header, meta = read_signature_header(f, str(path))
        dense = _dense_specs(meta, header, str(path))
        quant = quantized_parts(meta, header)
        if not dense and not quant:
            return Signature.load(path)
        mapped = dense.keys() | quant
        small = {t.name: read_tensor(f, header, t) for t in header.tensors if t.name not in mapped}
        expected = meta.get("content_hash")
        if not isinstance(expected, str):
            raise FormatError(f"{path}: content hash mismatch (file modified?)")
        check = _start_check(f.fileno(), header, meta, dense, str(path), background)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    sig = _build(path, header, meta, dense, small | _views(mm, header, quant), mm, expected)
    sig._check = check
    return sig


def _start_check(fd: int, header, meta, dense, where: str, background: bool) -> Future[str]:
    """:func:`_verify` of the open file now, or in a thread on a duplicate of ``fd``."""
    if not background:
        done: Future[str] = Future()
        done.set_result(_verify(fd, header, meta, dense, where))
        return done
    return in_thread_on_dup(fd, lambda own: _verify(own, header, meta, dense, where), "rp-verify")


def _dense_specs(meta: dict, header: Header, where: str) -> dict[str, TensorInfo]:
    """The file tensors of the dense delta entries, each checked against its spec."""
    tensors = header.by_name()
    out = {}
    for s in meta["entries"]:
        if not isinstance(s, dict) or s.get("kind") != "delta" or s.get("encoding") != "dense":
            continue
        name, shape = s.get("name"), s.get("shape")
        t = tensors.get(name) if isinstance(name, str) else None
        if t is None:
            raise FormatError(f"{where}: tensor {shown(name)} is missing")
        ok_shape = isinstance(shape, list) and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        )
        if not ok_shape or not isinstance(s.get("dtype"), str):
            raise FormatError(f"{where}: entry {shown(name)} has a bad kind, shape or dtype")
        if t.dtype not in _DENSE_LABELS or math.prod(t.shape) != math.prod(shape):
            raise FormatError(
                f"{where}: tensor {shown(name)} ({t.dtype}, {list(t.shape)}) does not hold "
                f"a dense delta of shape {shape}"
            )
        out[name] = t
    return out


def _views(mm: mmap.mmap, header: Header, names: set[str]) -> dict[str, np.ndarray]:
    """Read-only views of tensors ``names`` in the map (a copy where one is misaligned)."""
    out = {}
    for t in header.tensors:
        if t.name in names:
            count = t.nbytes // NUMPY_OF_LABEL[t.dtype].itemsize
            view = np.frombuffer(mm, NUMPY_OF_LABEL[t.dtype], count, header.data_start + t.begin)
            out[t.name] = (view if view.flags.aligned else view.copy()).reshape(t.shape)
    return out


def _verify(fd: int, header: Header, meta: dict, dense: dict[str, TensorInfo], where: str) -> str:
    """Stream every tensor once: each dense value finite, and the content hash equal to
    the one stored. Returns it."""
    expected = meta.get("content_hash")
    algorithm = hash_algorithm_of(expected)
    try:
        if algorithm == TENSORS_HASH:
            got = _tensors_hash(fd, header, meta, dense)
        else:
            got = _stream_hash(fd, header, meta, dense, algorithm)
    except (NonFiniteError, FormatError) as e:  # name the file: several may be applied
        raise type(e)(f"{where}: {e}") from None
    if got != expected:
        raise FormatError(f"{where}: content hash mismatch (file modified?)")
    return got


def _tensors_hash(fd: int, header: Header, meta: dict, dense: dict[str, TensorInfo]) -> str:
    """The ``tensors-blake3`` hash of the file's tensors as stored, each dense delta
    checked to be stored as robustpatch stores it (as :func:`Signature.load` requires)."""
    digests = TensorDigests(meta["entries"])
    shapes = {s["name"]: tuple(s["shape"]) or (1,) for s in meta["entries"] if s["name"] in dense}
    for t in header.tensors:
        h = _core.Blake3()
        form = _StoredForm(t.dtype) if t.name in dense else None
        for block in _blocks(fd, header, t):
            raw = np.frombuffer(block, np.uint8)
            if form is None:
                h.update(raw)
            elif not h.update_finite(raw, t.dtype):
                raise NonFiniteError(f"{t.name}: delta holds NaN or Inf")
            else:
                form.see(raw)
        if form is not None and (not form.narrowest() or t.shape != shapes[t.name]):
            raise FormatError(
                f"dense delta {shown(t.name)} is not stored as robustpatch stores it "
                f"({t.dtype} {list(t.shape)}): content hash mismatch (file modified?)"
            )
        digests.add(t.name, t.dtype, t.shape, h.hexdigest())
    return digests.hexdigest()


class _StoredForm:
    """Whether a dense delta, seen block by block, is stored in the narrowest dtype that
    holds it exactly (:func:`~robustpatch.signature.codec.compact`): F16 only where
    bfloat16 does not hold every value, F32 only where neither does. A file hashed over
    another form is refused by ``Signature.load``; the streamed reader must agree. Stops
    looking once a block settles it (the first block, for most float32 deltas)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bf16 = label in ("F16", "F32")  # bfloat16 could hold every value seen so far
        self.f16 = label == "F32"  # float16 could

    def see(self, raw: np.ndarray) -> None:
        if not (self.bf16 or self.f16):
            return
        values = raw.view(NUMPY_OF_LABEL[self.label]).astype(np.float32, copy=False)
        bits = values.view(np.uint32)
        self.bf16 = self.bf16 and not (bits & 0xFFFF).any()
        if self.f16:
            with np.errstate(over="ignore"):
                back = values.astype(np.float16).astype(np.float32)
            self.f16 = bool(np.array_equal(back.view(np.uint32), bits))

    def narrowest(self) -> bool:
        return not (self.bf16 or self.f16)


def _stream_hash(fd, header: Header, meta: dict, dense: dict[str, TensorInfo], algorithm) -> str:
    """An older file's hash: one stream over the tensors in name order, dense deltas
    widened to the float32 values it was defined over."""
    hasher = ContentHasher(meta["entries"], algorithm)
    shapes = {s["name"]: tuple(s["shape"]) for s in meta["entries"] if s.get("name") in dense}
    for t in sorted(header.tensors, key=lambda t: t.name):
        label = t.dtype if t.name in dense else None
        if label:
            hasher.tensor(t.name, np.dtype(np.float32), shapes[t.name])
        else:
            hasher.tensor(t.name, NUMPY_OF_LABEL.get(t.dtype, np.dtype(np.uint8)), t.shape)
        for block in _blocks(fd, header, t):
            if not label:
                hasher.update(block)
            elif not hasher.update_values(block, label):
                raise NonFiniteError(f"{t.name}: delta holds NaN or Inf")
    return hasher.hexdigest()


def _blocks(fd: int, header: Header, t: TensorInfo):
    """A tensor's bytes in blocks of whole elements."""
    itemsize = np.dtype(NUMPY_OF_LABEL.get(t.dtype, np.uint8)).itemsize
    at, end = header.data_start + t.begin, header.data_start + t.end
    return pread_blocks(fd, at, end, _BLOCK - _BLOCK % itemsize, f"tensor {t.name!r}")


def _build(path, header, meta, dense, tensors, mm, expected) -> StreamedSignature:
    """The signature: dense entries as views of ``mm``, the rest from ``tensors``
    (quantized parts among them as views of ``mm`` too)."""
    rest = dict(meta, entries=[s for s in meta["entries"] if s.get("name") not in dense])
    rest["content_hash"] = None
    spans = _spans(header, [s.get("name") for s in meta["entries"] if isinstance(s, dict)])

    def drop(e: Entry) -> None:
        """Validating an entry touched its pages (its scales and offsets, and the
        neighbours the kernel maps with them): dropped at once, not held for the file."""
        _drop(mm, spans.get(e.name, []))

    loaded = from_parts(rest, tensors, str(path), check_hash=False, built=drop)  # _verify: hash
    by_name = {e.name: e for e in loaded}
    values = _views(mm, header, dense.keys())
    entries = [
        by_name[s["name"]]
        if s["name"] not in dense
        else Entry(
            s["name"],
            "delta",
            tuple(s["shape"]),
            s["dtype"],
            values=values[s["name"]].reshape(tuple(s["shape"])),
            stats=dict(s.get("stats") or {}),
        )
        for s in meta["entries"]
    ]
    _check_canonical(entries, meta["entries"], str(path))
    sig = StreamedSignature(
        entries,
        name=str(meta.get("name", "signature")),
        meta={k: v for k, v in meta.items() if k not in HEADER_KEYS},
    )
    sig.path, sig._hash, sig._mm = path, expected, mm
    sig._ranges = {e.name: spans[e.name] for e in entries if e.kind == "delta"}
    return sig


def _check_canonical(entries: list[Entry], specs: list[dict], where: str) -> None:
    """Each entry is described in the file exactly as robustpatch writes it. The stream
    hashes the descriptions as stored, a full load (:meth:`Signature.load`) the ones it
    rebuilds: a field added to a description (its hash recomputed) would pass one and
    fail the other, so it fails both."""
    for e, stored in zip(entries, specs):
        if e.spec() != stored:
            extra = sorted(set(stored) ^ set(e.spec())) or sorted(
                k for k in stored if stored[k] != e.spec().get(k)
            )
            raise FormatError(
                f"{where}: entry {shown(e.name)} is not described as robustpatch writes it "
                f"(field {', '.join(map(str, extra))}); content hash mismatch (file modified?)"
            )


def _spans(header: Header, names: list) -> dict[str, list[tuple[int, int]]]:
    """Each delta entry's byte ranges in the file: its values, or its quantized parts."""
    tensors = header.by_name()
    out = {}
    for name in names:
        parts = [tensors.get(n) for n in (name, f"{name}.codes", f"{name}.scale", f"{name}.offset")]
        out[name] = [(header.data_start + t.begin, t.nbytes) for t in parts if t is not None]
    return out
