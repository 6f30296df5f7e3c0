"""The metadata of an undo record (the JSON under ``__metadata__["robustpatch.undo"]``):
:class:`UndoRecord` and its entries, and :meth:`UndoRecord.parse`, which validates every
key (presence, type, range, the lengths that must agree) so that a crafted record is
refused with one line naming the file and the problem. The file around it is
:mod:`robustpatch._format.undo`."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .. import validate
from ..dtypes import NUMPY_OF_LABEL
from ..errors import FormatError, InvalidArgumentError, NonFiniteError, shown
from ..signature import parse_meta_json

# 2: digests (version 1 records have none); 3: signatures by reference; 4: tensor digests
# may be XXH3-128 (``xxh3-128:``, see ``undo.digest``)
UNDO_VERSION = 4
KINDS = ("delta", "bn")

#: Largest size a record may claim for a file (the format's offsets are 64-bit).
_MAX_SIZE = (1 << 63) - 1
_CHECKSUM = re.compile(r"crc32:[0-9a-f]{8}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DIGEST = re.compile(r"(sha256|blake3):[0-9a-f]{64}")
_TENSOR_DIGEST = re.compile(r"(sha256|blake3):[0-9a-f]{64}|xxh3-128:[0-9a-f]{32}")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the patched file that the record restores."""

    name: str
    kind: str  # "delta": records/<name>/*; "bn": bn/<name>
    dtype: str  # its safetensors dtype in the patched (and source) file
    checksum: str  # of its patched bytes
    digest: str | None = None  # of its original bytes (None in a version 1 record)


@dataclass(frozen=True)
class UndoRecord:
    """The metadata of an undo record: what was applied and to which file."""

    source_size: int
    patched_size: int
    patched_header_sha256: str
    alphas: list[float]
    signatures: list[dict[str, Any]]  # each signature's file metadata (from_parts checks it)
    tensors: list[TensorEntry]
    source_header_digest: str | None = None  # None in a version 1 record
    record_digest: str | None = None
    #: Signatures kept by reference, not embedded: ``{"index": k, "file": path}``, the
    #: path relative to the record's folder (version 3; the others are embedded).
    signature_refs: list[dict[str, Any]] = field(default_factory=list)
    #: ONNX with external data: the patched data file's size (None elsewhere, and in
    #: records written before it was kept; readers that predate it ignore it).
    data_size: int | None = None

    def to_json(self) -> str:
        """The record's JSON, in the oldest version that holds it: 2 (as before), 3 if it
        refers to signatures, 4 if its tensor digests are XXH3-128.

        Built from the fields as they are (their values are JSON already), not through
        ``asdict``, which deep-copies every signature's metadata: a writer renders the
        record four times, and for a full-model signature the copies cost more than the
        rest of the record's bookkeeping."""
        meta = {f.name: getattr(self, f.name) for f in fields(self)}
        meta["tensors"] = [asdict(e) for e in self.tensors]
        version = self._version()
        if version == 2:
            del meta["signature_refs"]
        if self.data_size is None:
            del meta["data_size"]
        return json.dumps({"format_version": version, "kind": "undo", **meta})

    def _version(self) -> int:
        if any(str(e.digest).startswith("xxh3-128:") for e in self.tensors):
            return 4
        return 3 if self.signature_refs else 2

    @classmethod
    def parse(cls, raw: str, where: str) -> UndoRecord:
        """Validate the record's JSON (FormatError naming ``where`` and the problem)."""
        meta = parse_meta_json(raw, where, "undo metadata")
        check = _Checker(where)
        if not isinstance(meta, dict):
            raise check.fail("undo metadata is not a JSON object")
        version = _check_version(check, meta)
        if meta.get("kind", "undo") != "undo":
            raise check.fail(f"kind is {shown(meta.get('kind'))}, not 'undo'")
        signatures = check.list_of(meta, "signatures", dict, "objects")
        alphas = check.list_of(meta, "alphas", (int, float), "numbers")
        if len(alphas) != len(signatures):
            raise check.fail(f"{len(alphas)} alphas for {len(signatures)} signatures")
        for a in alphas:
            try:
                validate.alpha(a)
            except (InvalidArgumentError, NonFiniteError) as e:
                raise check.fail(str(e)) from None
        digests = version >= 2
        refs = check.list_of(meta, "signature_refs", dict, "objects") if version >= 3 else []
        _check_refs(check, refs, len(signatures))
        return cls(
            source_size=check.size(meta, "source_size"),
            patched_size=check.size(meta, "patched_size"),
            patched_header_sha256=check.text(meta, "patched_header_sha256", _SHA256),
            alphas=[float(a) for a in alphas],
            signatures=signatures,
            tensors=_tensor_entries(
                check, check.list_of(meta, "tensors", dict, "objects"), version
            ),
            source_header_digest=check.digest(meta, "source_header_digest", digests),
            record_digest=check.digest(meta, "record_digest", digests),
            signature_refs=refs,
            data_size=check.size(meta, "data_size") if "data_size" in meta else None,
        )

    def applied(self) -> list[dict[str, Any]]:
        """Each signature's name, content hash and α, and whether the record embeds it."""
        referenced = {r["index"] for r in self.signature_refs}
        return [
            {
                "name": m.get("name"),
                "hash": m.get("content_hash"),
                "alpha": a,
                "embedded": k not in referenced,
            }
            for k, (m, a) in enumerate(zip(self.signatures, self.alphas))
        ]


def _check_refs(check: _Checker, refs: list[dict[str, Any]], n: int) -> None:
    """Each reference names a new signature index and a file path."""
    seen = set()
    for r in refs:
        k, file = r.get("index"), r.get("file")
        if not _is(k, int) or not 0 <= k < n or k in seen or not isinstance(file, str) or not file:
            raise check.fail(f"bad signature reference {shown(r)}")
        seen.add(k)


class _Checker:
    """Type and range checks of JSON values, each failing as one FormatError line."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, problem: str) -> FormatError:
        return FormatError(f"{self.where}: bad undo record: {problem}")

    def get(self, obj: dict[str, Any], key: str, what: str = "") -> Any:
        if key not in obj:
            raise self.fail(f"missing key {key!r}{what}")
        return obj[key]

    def list_of(self, obj: dict[str, Any], key: str, kind: Any, kinds: str) -> list[Any]:
        value = self.get(obj, key)
        if not isinstance(value, list) or not all(_is(v, kind) for v in value):
            raise self.fail(f"{key} must be a list of {kinds}, got {shown(value)}")
        return value

    def size(self, obj: dict[str, Any], key: str) -> int:
        value = self.get(obj, key)
        if not _is(value, int) or not 0 <= value <= _MAX_SIZE:
            raise self.fail(f"{key} must be a byte count from 0 to 2**63-1, got {shown(value)}")
        return value

    def text(self, obj: dict[str, Any], key: str, form: re.Pattern[str], what: str = "") -> str:
        value = self.get(obj, key, what)
        if not isinstance(value, str) or not form.fullmatch(value):
            raise self.fail(f"{key}{what} is malformed: {shown(value)}")
        return value

    def digest(self, obj: dict[str, Any], key: str, present: bool, what: str = "") -> str | None:
        """A ``sha256:<hex>`` digest, required where ``present`` (else ignored: None)."""
        return self.text(obj, key, _DIGEST, what) if present else None


def _is(value: Any, kind: Any) -> bool:
    """isinstance, except that a JSON ``true``/``false`` is never a number."""
    return isinstance(value, kind) and not isinstance(value, bool)


def _check_version(check: _Checker, meta: dict[str, Any]) -> int:
    version = meta.get("format_version")
    if not _is(version, int) or version < 1:
        raise check.fail(f"missing or invalid format_version {shown(version)}")
    if version > UNDO_VERSION:
        raise FormatError(
            f"{check.where}: undo format version {version} is newer than this robustpatch "
            f"supports ({UNDO_VERSION}); upgrade robustpatch"
        )
    return version


def _tensor_entries(check: _Checker, raw: list[dict[str, Any]], version: int) -> list[TensorEntry]:
    out, seen = [], set()
    pattern = _TENSOR_DIGEST if version >= 4 else _DIGEST
    for e in raw:
        name = check.get(e, "name", " in a tensors entry")
        if not isinstance(name, str) or name in seen:
            raise check.fail(f"tensors entry name {shown(name)} is not a new string")
        seen.add(name)
        at = f" of tensor {shown(name)}"
        kind, dtype = check.get(e, "kind", at), check.get(e, "dtype", at)
        if kind not in KINDS:
            raise check.fail(f"kind{at} is {shown(kind)}, not one of {list(KINDS)}")
        if not isinstance(dtype, str) or dtype not in NUMPY_OF_LABEL:
            raise check.fail(f"dtype{at} is {shown(dtype)}, not a safetensors float dtype")
        sum_ = check.text(e, "checksum", _CHECKSUM, at)
        digest = check.text(e, "digest", pattern, at) if version >= 2 else None
        out.append(TensorEntry(name, kind, dtype, sum_, digest))
    return out
