"""Sharded Hugging Face checkpoints: the ``*.safetensors.index.json`` file, validated.

An index maps each tensor name to the shard file holding it::

    {"metadata": {"total_size": 123},
     "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors", ...}}

:func:`load_index` trusts nothing in it: shard names are plain file names in the index's
folder (no ``..``, no path separator, no absolute path), a tensor is listed once (a JSON
object may repeat a key; readers keep either), every shard exists and is a regular file,
and each shard's header holds exactly the tensors the index gives it. Every failure is a
one-line :class:`~robustpatch.errors.FormatError` (or ``FileNotFoundError``) naming the
index, raised before anything is written.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io.inputs import open_input
from ..errors import FormatError, InvalidArgumentError, shown
from . import strict_json
from .safetensors import Header, read_header_from

__all__ = ["INDEX_SUFFIX", "ShardedIndex", "find_index", "is_sharded", "load_index"]

INDEX_SUFFIX = ".index.json"
#: The undo record of a patched sharded checkpoint, in its folder.
RECORD_NAME = "robustpatch.rpundo.json"
#: Endings of the files robustpatch writes beside a shard (undo record, in-place journal).
_OWN_SUFFIXES = (".rpundo", ".rpundo.pending", ".rpjournal", ".rpdone")

#: Largest index read: a real one is about 100 bytes a tensor (a 1 M-tensor model: 100 MB).
MAX_INDEX_BYTES = 256 << 20


@dataclass(frozen=True)
class ShardedIndex:
    """A validated index: ``path`` (the index file), its ``raw`` bytes, its ``metadata``,
    ``shards`` (file names in first-use order) and each shard's parsed ``headers``."""

    path: Path
    raw: bytes
    metadata: dict[str, Any]
    weight_map: dict[str, str]
    headers: dict[str, Header]

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def shards(self) -> list[str]:
        return list(self.headers)

    def shard_path(self, shard: str) -> Path:
        return self.folder / shard

    def tensors_of(self, shard: str) -> set[str]:
        return {t.name for t in self.headers[shard].tensors}


def is_sharded(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a sharded checkpoint: an ``*.index.json``, or a folder
    holding a ``*.safetensors.index.json`` (any other folder is no model file)."""
    p = Path(path)
    if p.name.endswith(INDEX_SUFFIX):
        return True
    return p.is_dir() and any(p.glob("*.safetensors" + INDEX_SUFFIX))


def find_index(path: str | os.PathLike[str]) -> Path:
    """The index file of ``path``: itself, or the one ``*.safetensors.index.json`` in the
    folder ``path`` (InvalidArgumentError if there are several, FileNotFoundError if none)."""
    p = Path(path)
    if not p.is_dir():
        return p
    found = sorted(q for q in p.iterdir() if q.name.endswith(".safetensors" + INDEX_SUFFIX))
    if not found:
        raise FileNotFoundError(
            errno.ENOENT, "no *.safetensors.index.json in this folder", os.fspath(p)
        )
    if len(found) > 1:
        names = ", ".join(q.name for q in found)
        raise InvalidArgumentError(f"{p}: several indexes ({names}); name the one to use")
    return found[0]


def load_index(path: str | os.PathLike[str]) -> ShardedIndex:
    """Read and validate the index of a sharded checkpoint (a file or its folder) and the
    headers of all its shards."""
    index = find_index(path)
    with open_input(index) as f:
        raw = f.read(MAX_INDEX_BYTES + 1)
    if len(raw) > MAX_INDEX_BYTES:
        raise FormatError(f"{index}: index larger than {MAX_INDEX_BYTES >> 20} MiB")
    doc = _parse_json(raw, index)
    weight_map = _weight_map(doc, index)
    metadata = doc.get("metadata", {})
    if not isinstance(metadata, dict):
        raise FormatError(f"{index}: 'metadata' is not an object")
    headers = _shard_headers(index, weight_map)
    return ShardedIndex(index, raw, metadata, weight_map, headers)


def checkpoint_names(index: ShardedIndex) -> set[str]:
    """The names of what robustpatch writes into a sharded output folder: the index, its
    shards, their undo records and the folder's record."""
    from .undo import undo_path_for

    names = {index.path.name, RECORD_NAME, *index.shards}
    return names | {undo_path_for(s).name for s in index.shards}


def _parse_json(raw: bytes, index: Path) -> dict[str, Any]:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise FormatError(f"{index}: {shown(key)} is listed twice")
            out[key] = value
        return out

    try:
        doc = strict_json.loads(raw.decode("utf-8"), object_pairs_hook=pairs)
    except strict_json.NonStandardNumber as e:
        raise FormatError(f"{index}: holds {e}, which JSON does not allow") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{index}: not a JSON index ({e})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{index}: not a safetensors index (not a JSON object)")
    return doc


def _weight_map(doc: dict[str, Any], index: Path) -> dict[str, str]:
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{index}: not a safetensors index ('weight_map' missing or empty)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise FormatError(f"{index}: tensor {shown(name)} maps to {shown(shard)}, not a file")
        check_shard_name(shard, index)
    return weight_map


def check_shard_name(shard: str, index: Path) -> None:
    """A shard is a plain file name beside the index: never a path out of its folder,
    nor a name robustpatch gives its own files there (a patched copy would write its
    undo records over such a shard)."""
    bad = (
        not shard
        or shard in (".", "..")
        or "/" in shard
        or "\\" in shard
        or "\0" in shard
        or os.path.isabs(shard)
        or shard.endswith(INDEX_SUFFIX)
    )
    if bad:
        raise FormatError(f"{index}: shard name {shown(shard)} is not a file name in its folder")
    if shard == RECORD_NAME or shard.endswith(_OWN_SUFFIXES):
        raise FormatError(
            f"{index}: shard name {shown(shard)} is one robustpatch gives its own files "
            f"({RECORD_NAME}, *{', *'.join(_OWN_SUFFIXES)}); rename the shard"
        )


def _shard_headers(index: Path, weight_map: dict[str, str]) -> dict[str, Header]:
    """Each shard's header, checked against the tensors the index gives it."""
    listed: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        listed.setdefault(shard, set()).add(name)
    headers: dict[str, Header] = {}
    owner: dict[str, str] = {}
    for shard, names in listed.items():
        path = index.parent / shard
        if not path.exists():
            raise FileNotFoundError(
                errno.ENOENT, f"shard listed in {index.name} is missing", os.fspath(path)
            )
        with open_input(path) as f:
            header = read_header_from(f, os.fspath(path))
        held = {t.name for t in header.tensors}
        for name in held:
            if name in owner:
                raise FormatError(f"{index}: tensor {shown(name)} is in {owner[name]} and {shard}")
            owner[name] = shard
        _check_agrees(index, shard, names, held)
        headers[shard] = header
    return headers


def _check_agrees(index: Path, shard: str, listed: set[str], held: set[str]) -> None:
    extra, missing = held - listed, listed - held
    if missing:
        name = shown(sorted(missing)[0])
        raise FormatError(f"{index}: tensor {name} is listed in {shard} but not stored there")
    if extra:
        name = shown(sorted(extra)[0])
        raise FormatError(f"{index}: shard {shard} holds tensor {name} the index does not list")
