"""Integrity of files and inputs (issue 17): undo records that prove what they restore,
outputs that never overwrite an input, outputs that read back, short one-line errors,
regular files only, and each input opened once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import robustpatch as rp
from robustpatch._format.safetensors import read_tensors, write_tensors
from robustpatch._format.undo import UNDO_KEY, record_digest, undo_path_for
from robustpatch.cli import main
from robustpatch.errors import FormatError, MismatchError
from robustpatch.extract import extract
from rp_testutil import listing, sha, trio


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(model, patched, record): a 4-bit signature applied at α 1.0 (deltas incl. F16, BN)."""
    d = tmp_path_factory.mktemp("pair")
    pre, clean, robust = trio(0, fc_dtype=np.float16)
    write_tensors(d / "model.safetensors", clean)
    sig = extract(pre, clean, robust, layers="all", name="fog").quantize(4)
    rp.apply_file(d / "model.safetensors", [sig], 1.0, d / "p.safetensors")
    return d / "model.safetensors", d / "p.safetensors", undo_path_for(d / "p.safetensors")


# ---------------------------------------------------------------------------- tampering


def _first(tensors: dict, prefix: str, suffix: str = "") -> str:
    return next(
        k for k in tensors if k.startswith(prefix) and k.endswith(suffix) and tensors[k].size
    )


def _flip_value_bit(meta: dict, tensors: dict) -> None:
    key = _first(tensors, "records/", "/values")
    tensors[key] = tensors[key].copy()
    tensors[key][0] ^= 1


def _move_position(meta: dict, tensors: dict) -> None:
    key = _first(tensors, "records/", "/positions")
    tensors[key] = tensors[key].copy()
    p = tensors[key]
    p[0] = p[0] + 1 if p[0] + 1 not in p else p[0] - 1  # still in range, another element


def _halve_alpha(meta: dict, tensors: dict) -> None:
    assert meta["alphas"] == [1.0]
    meta["alphas"] = [0.5]


def _edit_bn_byte(meta: dict, tensors: dict) -> None:
    key = _first(tensors, "bn/")
    tensors[key] = tensors[key].copy()
    tensors[key][0] ^= 0xFF


def _edit_source_header(meta: dict, tensors: dict) -> None:
    """A padding space of the stored header becomes a tab: still a valid, same header."""
    head = tensors["header"].copy()
    assert head[-1] == ord(" ")
    head[-1] = ord("\t")
    tensors["header"] = head


TAMPERINGS = {
    "flip_one_value_bit": _flip_value_bit,
    "move_one_position": _move_position,
    "alpha_1_to_0.5": _halve_alpha,
    "edit_one_batchnorm_byte": _edit_bn_byte,
    "edit_the_stored_original_header": _edit_source_header,
}


def _tampered(pair, folder: Path, tamper, reseal: bool) -> tuple[Path, Path]:
    """A copy of the patched pair whose record is tampered (and, with ``reseal``, given
    a matching record digest, as a forger who knows the format would)."""
    folder.mkdir()
    patched, undo = folder / "p.safetensors", folder / "p.safetensors.rpundo"
    shutil.copyfile(pair[1], patched)
    header, tensors = read_tensors(pair[2])
    meta = json.loads(header.metadata[UNDO_KEY])
    tamper(meta, tensors)
    if reseal:
        meta["record_digest"] = record_digest(meta, tensors)
    labels = {k: "U16" for k, a in tensors.items() if a.dtype == np.uint16}
    write_tensors(undo, tensors, {UNDO_KEY: json.dumps(meta)}, labels)
    return patched, undo


def _refused(tmp_path, capsys, patched: Path, exc: type, match: str) -> str:
    """remove_file and the CLI refuse in one line; nothing written, inputs unchanged."""
    out = tmp_path / "out"
    out.mkdir()
    undo = undo_path_for(patched)
    before = (sha(patched), sha(undo))
    with pytest.raises(exc, match=match) as info:
        rp.remove_file(patched, out / "r.safetensors")
    assert "\n" not in str(info.value)
    code = main(["remove", str(patched), "-o", str(out / "r.safetensors")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("robustpatch: error: ")
    assert listing(out) == {}
    assert (sha(patched), sha(undo)) == before
    return str(info.value)


@pytest.mark.parametrize("tamper", TAMPERINGS.values(), ids=TAMPERINGS.keys())
def test_a_tampered_record_fails_its_own_digest(pair, tmp_path, capsys, tamper):
    patched, undo = _tampered(pair, tmp_path / "in", tamper, reseal=False)
    message = _refused(tmp_path, capsys, patched, FormatError, "record digest")
    assert message.startswith(str(undo)), message


RESEALED = {
    "flip_one_value_bit": "tensor 'conv1.weight'",
    "move_one_position": "tensor 'conv1.weight'",
    "alpha_1_to_0.5": "tensor 'conv1.weight'",  # the first tensor in file order
    "edit_one_batchnorm_byte": "tensor 'bn1.running_mean'",
    "edit_the_stored_original_header": "the original header",
}


@pytest.mark.parametrize("name", RESEALED)
def test_a_resealed_tampered_record_fails_the_restored_bytes(pair, tmp_path, capsys, name):
    patched, _ = _tampered(pair, tmp_path / "in", TAMPERINGS[name], reseal=True)
    message = _refused(tmp_path, capsys, patched, MismatchError, RESEALED[name])
    assert "does not restore" in message, message


def test_an_untampered_record_restores_exactly_after_its_checks(pair, tmp_path):
    rp.remove_file(pair[1], tmp_path / "r.safetensors")
    assert sha(tmp_path / "r.safetensors") == sha(pair[0])


def test_the_record_digest_covers_what_the_record_holds(pair):
    header, tensors = read_tensors(pair[2])
    meta = json.loads(header.metadata[UNDO_KEY])
    assert record_digest(meta, tensors) == meta["record_digest"]
    assert meta["format_version"] == 2 and meta["source_header_digest"].startswith("sha256:")
    assert all(e["digest"].startswith("sha256:") for e in meta["tensors"])
    meta["patched_size"] += 1
    assert record_digest(meta, tensors) != meta["record_digest"]
