"""Integrity of files and inputs (issue 17): undo records that prove what they restore,
outputs that never overwrite an input, outputs that read back, short one-line errors,
regular files only, and each input opened once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import robustpatch as rp
from robustpatch._format.safetensors import read_header, read_tensors, write_tensors
from robustpatch._format.undo import UNDO_KEY, record_digest, undo_path_for
from robustpatch.cli import main
from robustpatch.errors import FormatError, InvalidArgumentError, MismatchError
from robustpatch.extraction import extract
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
    assert meta["format_version"] == 4 and meta["source_header_digest"].startswith("blake3:")
    assert all(re.fullmatch("xxh3-128:[0-9a-f]{32}", e["digest"]) for e in meta["tensors"])
    meta["patched_size"] += 1
    assert record_digest(meta, tensors) != meta["record_digest"]


# ---------------------------------------------------------------------------- outputs


def _cli_refuses(capsys, args: list, match: str) -> None:
    code = main([str(a) for a in args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("robustpatch: error: ") and re.search(match, lines[0]), lines


def _alias(target: Path, how: str, folder: Path) -> Path:
    """``target`` itself, a hard link to it or a symlink to it (in ``folder``)."""
    if how == "same":
        return target
    alias = folder / f"alias-{how}"
    (os.link if how == "hardlink" else os.symlink)(target, alias)
    return alias


@pytest.fixture()
def files(pair, tmp_path) -> dict[str, Path]:
    """A model, a signature file and a patched pair, copied into ``tmp_path``."""
    pre, clean, robust = trio(1)
    sig = extract(pre, clean, robust, layers="all", name="fog").quantize(4)
    out = {"model": tmp_path / "model.safetensors", "sig": tmp_path / "sig.rws"}
    write_tensors(out["model"], clean)
    sig.save(out["sig"])
    out["patched"], out["undo"] = tmp_path / "p.safetensors", tmp_path / "p.safetensors.rpundo"
    rp.apply_file(out["model"], [out["sig"]], 1.0, out["patched"])
    return out


HOW = ["same", "hardlink", "symlink"]


def _apply_args(files: dict[str, Path], dest: Path) -> list:
    return ["apply", files["model"], files["sig"], "-o", dest, "--overwrite"]


@pytest.mark.parametrize("how", HOW)
def test_apply_never_writes_over_its_signature_file(files, tmp_path, capsys, how):
    dest = _alias(files["sig"], how, tmp_path)
    before = listing(tmp_path)
    with pytest.raises(InvalidArgumentError, match="is the input"):
        rp.apply_file(files["model"], [files["sig"]], 1.0, dest)
    _cli_refuses(capsys, _apply_args(files, dest), "input")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("victim", ["sig", "model"])
def test_apply_never_writes_its_undo_record_over_an_input(files, tmp_path, capsys, victim):
    """``-o X`` also writes ``X.rpundo``: that must not be an input either."""
    dest = tmp_path / "x.safetensors"
    os.link(files[victim], undo_path_for(dest))
    before = listing(tmp_path)
    with pytest.raises(InvalidArgumentError, match="is the input"):
        rp.apply_file(files["model"], [files["sig"]], 1.0, dest)
    _cli_refuses(capsys, _apply_args(files, dest), "input")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("how", HOW)
def test_remove_never_writes_over_its_undo_record(files, tmp_path, capsys, how):
    dest = _alias(files["undo"], how, tmp_path)
    before = listing(tmp_path)
    with pytest.raises(InvalidArgumentError, match="is the input"):
        rp.remove_file(files["patched"], dest)
    _cli_refuses(capsys, ["remove", files["patched"], "-o", dest, "--overwrite"], "input")
    assert listing(tmp_path) == before


def test_remove_never_writes_over_the_record_given_with_undo(files, tmp_path, capsys):
    record = tmp_path / "elsewhere.rpundo"
    shutil.copyfile(files["undo"], record)
    before = listing(tmp_path)
    with pytest.raises(InvalidArgumentError, match="is the input"):
        rp.remove_file(files["patched"], record, undo=record)
    args = ["remove", files["patched"], "--undo", record, "-o", record, "--overwrite"]
    _cli_refuses(capsys, args, "input")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("how", HOW)
def test_quantize_and_combine_never_write_over_their_input(files, tmp_path, capsys, how):
    dest = _alias(files["sig"], how, tmp_path)
    before = listing(tmp_path)
    _cli_refuses(capsys, ["quantize", files["sig"], "-o", dest, "--overwrite"], "input")
    _cli_refuses(capsys, ["combine", files["sig"], "-o", dest, "--overwrite"], "input")
    assert listing(tmp_path) == before


def test_extract_never_writes_over_a_checkpoint(files, tmp_path, capsys):
    before = listing(tmp_path)
    m = files["model"]
    _cli_refuses(capsys, ["extract", m, files["patched"], m, "-o", m, "--overwrite"], "input")
    assert listing(tmp_path) == before


# ---------------------------------------------------------------------------- read back


def _nested(levels: int) -> dict | int:
    return 0 if levels == 0 else {"a": _nested(levels - 1)}


@pytest.mark.parametrize("levels", [61, 62])
def test_apply_refuses_a_signature_whose_undo_record_would_nest_too_deep(files, tmp_path, levels):
    """The file (provenance leaf at depth 2 + levels <= 64) loads; the record would nest it
    two levels deeper than readers accept: refused at apply time, nothing written."""
    sig = rp.Signature.load(files["sig"])
    sig.meta["provenance"] = _nested(levels)
    sig.save(tmp_path / "deep.rws")
    sig = rp.Signature.load(tmp_path / "deep.rws")  # loads: within the limit
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InvalidArgumentError, match="nests deeper than 64 levels"):
        rp.apply_file(files["model"], [sig], 1.0, out / "p.safetensors")
    assert listing(out) == {}
    rp.apply_file(files["model"], [sig], 1.0, out / "p.safetensors", undo=False)


def test_apply_refuses_a_name_that_pushes_the_header_past_100_mb(files, tmp_path, capsys):
    sig = rp.Signature.load(files["sig"])
    sig.name = "n" * 100_000_000
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InvalidArgumentError, match="over the 100000000-byte limit") as info:
        rp.apply_file(files["model"], [sig], 1.0, out / "p.safetensors")
    assert len(str(info.value)) < 300 + len(str(out))
    assert listing(out) == {}


# ---------------------------------------------------------------------------- short errors


def test_a_50_mb_malformed_entry_gives_a_short_message(files, tmp_path, capsys):
    header, tensors = read_tensors(files["sig"])
    meta = json.loads(header.metadata["robustpatch"])
    meta["entries"][0] = "x" * 50_000_000
    write_tensors(tmp_path / "big.rws", tensors, {"robustpatch": json.dumps(meta)})
    with pytest.raises(FormatError, match=r"malformed entry 'xxx+\.\.\.$") as info:
        rp.Signature.load(tmp_path / "big.rws")
    assert len(str(info.value)) <= 300 + len(str(tmp_path)), len(str(info.value))
    assert main(["inspect", str(tmp_path / "big.rws")]) == 1
    err = capsys.readouterr().err
    assert len(err) <= 320 + len(str(tmp_path)) and err.count("\n") == 1, len(err)


def test_a_50_mb_tensor_name_in_a_bad_header_gives_a_short_message(tmp_path):
    name = "n" * 50_000_000
    text = json.dumps({name: {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "m.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + bytes(4))
    with pytest.raises(FormatError) as info:
        read_header(tmp_path / "m.safetensors")
    assert len(str(info.value)) <= 300, len(str(info.value))


# ---------------------------------------------------------------------------- regular files


def _cli_subprocess(args: list, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a child process: a blocking open() fails the test by timeout, not hang."""
    command = [sys.executable, "-m", "robustpatch.cli", *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("role", ["model", "sig", "undo"])
def test_a_fifo_input_is_refused_without_blocking(files, tmp_path, role):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    f = {**files, role: fifo}
    if role == "undo":
        args = ["remove", f["patched"], "--undo", fifo, "-o", tmp_path / "r.safetensors"]
    else:
        args = ["apply", f["model"], f["sig"], "-o", tmp_path / "o.safetensors"]
    before = listing(tmp_path)
    proc = _cli_subprocess(args, tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0] == f"robustpatch: error: {fifo}: is a FIFO, not a regular file"
    assert listing(tmp_path) == before


@pytest.mark.parametrize(("path", "kind"), [(".", "a directory"), ("/dev/null", "a character")])
def test_a_directory_or_device_is_refused_as_every_input(files, tmp_path, path, kind):
    bad = Path(path)
    out = tmp_path / "out"
    out.mkdir()
    for call in (
        lambda: rp.apply_file(bad, [files["sig"]], 1.0, out / "o"),
        lambda: rp.apply_file(files["model"], [bad], 1.0, out / "o"),
        lambda: rp.remove_file(files["patched"], out / "o", undo=bad),
        lambda: rp.remove_file(bad, out / "o", undo=files["undo"]),
        lambda: rp.Signature.load(bad),
    ):
        with pytest.raises(InvalidArgumentError, match=f"is {kind}.*, not a regular file"):
            call()
    assert listing(out) == {}


# ---------------------------------------------------------------------------- opened once


def _swap_after_header(monkeypatch, path: Path, other: Path) -> None:
    """Replace the file at ``path`` by ``other`` right after its header is read."""
    real = rp.files.read_header_from

    def read_then_swap(f, name):
        header = real(f, name)
        if Path(name) == path:
            os.replace(other, path)
        return header

    monkeypatch.setattr(rp.files, "read_header_from", read_then_swap)


def test_a_model_swapped_after_its_header_is_read_is_patched_as_it_was(
    files, tmp_path, monkeypatch
):
    """Same layout, other values: a re-open by path would pair the old header with the
    new data silently; one handle patches the file as it was when opened."""
    _, clean, _ = trio(1)
    write_tensors(tmp_path / "other.safetensors", {k: v + 1 for k, v in clean.items()})
    expected = tmp_path / "expected.safetensors"
    rp.apply_file(files["model"], [files["sig"]], 1.0, expected, undo=False)
    model_sha = sha(files["model"])
    _swap_after_header(monkeypatch, files["model"], tmp_path / "other.safetensors")
    rp.apply_file(files["model"], [files["sig"]], 1.0, tmp_path / "o.safetensors", undo=False)
    assert sha(files["model"]) != model_sha  # the swap happened
    assert sha(tmp_path / "o.safetensors") == sha(expected)


def test_a_patched_file_swapped_after_its_header_is_read_is_restored_as_it_was(
    files, tmp_path, monkeypatch
):
    shutil.copyfile(files["model"], tmp_path / "other.safetensors")  # same layout
    _swap_after_header(monkeypatch, files["patched"], tmp_path / "other.safetensors")
    rp.remove_file(files["patched"], tmp_path / "r.safetensors")
    assert sha(tmp_path / "r.safetensors") == sha(files["model"])
