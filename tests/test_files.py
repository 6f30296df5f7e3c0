"""Signatures on safetensors files: streaming apply, bit-exact remove, sharded
extraction, and the bad-input suite (each case: a clear error, the input untouched, no
partial output at the destination)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from robustpatch._format.safetensors import read_header, read_tensors, write_tensors
from robustpatch.errors import FormatError, MismatchError, NonFiniteError
from robustpatch.extraction import extract
from robustpatch.files import applied_signatures, apply_file, remove_file, undo_path_for
from robustpatch.signature import Signature, content_hash
from robustpatch.targets import apply
from rp_testutil import copy_model, listing, same_bits, sha, trio


@pytest.fixture(scope="module")
def models():
    return trio(0, fc_dtype="bf16")


@pytest.fixture()
def setup(models, tmp_path):
    """A model file with a gap-free layout, two signature files, and an empty out folder."""
    pre, clean, robust = models
    write_tensors(tmp_path / "model.safetensors", clean, {"format": "pt", "note": "keep me"})
    a = extract(pre, clean, robust, layers="all", name="fog").quantize(4)
    b = extract(pre, clean, robust, layers=["fc", "conv2"], name="noise")
    a.save(tmp_path / "fog.rws")
    b.save(tmp_path / "noise.rws")
    out = tmp_path / "out"
    out.mkdir()
    return tmp_path / "model.safetensors", [tmp_path / "fog.rws", tmp_path / "noise.rws"], out


def test_apply_file_equals_in_memory_apply_and_remove_file_restores_the_sha256(models, setup):
    src, sigs, out = setup
    original = sha(src)
    rep = apply_file(src, sigs, [1.0, 0.5], out / "p.safetensors")
    assert rep.undo == undo_path_for(out / "p.safetensors") and rep.undo.exists()
    assert rep.tensors == 7 and rep.bn_buffers == 2 and rep.record_elements > 0
    expect = copy_model(models[1])
    apply(expect, [Signature.load(s) for s in sigs], [1.0, 0.5])
    _, got = read_tensors(out / "p.safetensors")
    assert same_bits(got, expect)
    remove_file(out / "p.safetensors", out / "restored.safetensors")
    assert sha(out / "restored.safetensors") == original
    assert sha(src) == original


def test_the_patched_file_records_what_was_applied_and_keeps_metadata(setup):
    from safetensors import safe_open

    src, sigs, out = setup
    apply_file(src, sigs, [1.0, 0.5], out / "p.safetensors")
    h = read_header(out / "p.safetensors")
    assert h.metadata["note"] == "keep me" and h.metadata["format"] == "pt"
    applied = applied_signatures(h, out / "p.safetensors")
    assert [(a["name"], a["alpha"]) for a in applied] == [("fog", 1.0), ("noise", 0.5)]
    assert applied[0]["hash"] == Signature.load(sigs[0]).content_hash
    with safe_open(out / "p.safetensors", "np") as f, safe_open(src, "np") as g:
        assert sorted(f.keys()) == sorted(g.keys())  # readable by the reference reader
    # Patching a patched file appends to the record; removing gives the first back.
    apply_file(out / "p.safetensors", sigs[1], -1.0, out / "pp.safetensors")
    assert len(applied_signatures(read_header(out / "pp.safetensors"), "pp")) == 3
    remove_file(out / "pp.safetensors", out / "back.safetensors")
    assert sha(out / "back.safetensors") == sha(out / "p.safetensors")


def test_apply_file_without_undo_writes_no_record(setup):
    src, sigs, out = setup
    rep = apply_file(src, sigs[0], 1.0, out / "p.safetensors", undo=False)
    assert rep.undo is None and listing(out).keys() == {"p.safetensors"}
    with pytest.raises(FileNotFoundError):
        remove_file(out / "p.safetensors", out / "r.safetensors")


def test_remove_refuses_a_patched_file_that_changed(setup):
    src, sigs, out = setup
    apply_file(src, sigs, [1.0, 1.0], out / "p.safetensors")
    h = read_header(out / "p.safetensors")
    t = h.by_name()["conv2.weight"]
    with open(out / "p.safetensors", "r+b") as f:
        f.seek(h.data_start + t.begin + 8)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(MismatchError, match="changed since"):
        remove_file(out / "p.safetensors", out / "r.safetensors")
    assert not (out / "r.safetensors").exists()


def test_progress_reports_every_byte(setup):
    src, sigs, out = setup
    seen = []
    apply_file(src, sigs, 1.0, out / "p.safetensors", progress=seen.append)
    h = read_header(src)
    assert sum(seen) == h.file_size - h.data_start


def test_extract_reads_sharded_checkpoints(models, tmp_path):
    pre, clean, robust = models
    paths = []
    for tag, m in (("pre", pre), ("clean", clean), ("robust", robust)):
        names = list(m)
        half = len(names) // 2
        weight_map = {}
        for i, part in enumerate((names[:half], names[half:])):
            fname = f"{tag}-{i + 1:05d}-of-00002.safetensors"
            write_tensors(tmp_path / fname, {k: m[k] for k in part})
            weight_map.update(dict.fromkeys(part, fname))
        index = tmp_path / f"{tag}.safetensors.index.json"
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        paths.append(index)
    from_files = extract(*paths, layers="all")
    from_dicts = extract(pre, clean, robust, layers="all")
    assert list(from_files.entries) == sorted(
        from_dicts.entries, key=list(from_files.entries).index
    )
    for k, e in from_dicts.entries.items():
        np.testing.assert_array_equal(e.dense(), from_files[k].dense())
    assert from_files.base_fingerprint == from_dicts.base_fingerprint


# ---------------------------------------------------------------------------- bad input


def _refused(src, sigs, out, exc, match, **kw):
    """Apply must fail with ``exc``; the input and the out folder stay as they were."""
    before_src, before_out = sha(src), listing(out)
    with pytest.raises(exc, match=match):
        apply_file(src, sigs, 1.0, out / "p.safetensors", **kw)
    assert sha(src) == before_src
    assert listing(out) == before_out


def _raw_model(path, header: dict, data: bytes, declared_len: int | None = None):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", declared_len or len(text)) + text + data)


def test_truncated_model_file(setup):
    src, sigs, out = setup
    data = src.read_bytes()
    src.write_bytes(data[:-100])
    _refused(src, sigs, out, FormatError, "outside a data buffer")


def test_header_length_past_the_end(setup):
    src, sigs, out = setup
    data = bytearray(src.read_bytes())
    data[:8] = struct.pack("<Q", len(data) + 10)
    src.write_bytes(bytes(data))
    _refused(src, sigs, out, FormatError, "past the end")


def test_overlapping_offsets(setup):
    src, sigs, out = setup
    header = {
        "fc.bias": {"dtype": "F32", "shape": [10], "data_offsets": [0, 40]},
        "conv1.bias": {"dtype": "F32", "shape": [16], "data_offsets": [20, 84]},
    }
    _raw_model(src, header, bytes(84))
    _refused(src, sigs, out, FormatError, "overlap")


def test_out_of_range_offsets(setup):
    src, sigs, out = setup
    header = {"fc.bias": {"dtype": "F32", "shape": [10], "data_offsets": [4000, 4040]}}
    _raw_model(src, header, bytes(40))
    _refused(src, sigs, out, FormatError, "outside a data buffer")


def test_unknown_signature_format_version(setup):
    src, sigs, out = setup
    header, tensors = read_tensors(sigs[1])
    meta = json.loads(header.metadata["robustpatch"])
    meta["format_version"] = 7
    write_tensors(sigs[1], tensors, {"robustpatch": json.dumps(meta)})
    _refused(src, sigs, out, FormatError, "version 7 is newer")


def test_wrong_shapes(models, setup):
    src, sigs, out = setup
    m = copy_model(models[1])
    m["conv2.weight"] = np.zeros((32, 16, 3, 2), np.float32)
    write_tensors(src, m)
    _refused(src, sigs, out, MismatchError, "conv2.weight.*does not match", force=True)


def test_wrong_dtype(models, setup):
    src, sigs, out = setup
    m = copy_model(models[1])
    m["conv2.weight"] = m["conv2.weight"].astype(np.float16)
    write_tensors(src, m)
    _refused(src, sigs, out, MismatchError, "conv2.weight.*F16 but signature")
    apply_file(src, sigs, 1.0, out / "forced.safetensors", force=True)
    remove_file(out / "forced.safetensors", out / "r.safetensors")
    assert sha(out / "r.safetensors") == sha(src)


def test_missing_tensor(models, setup):
    src, sigs, out = setup
    write_tensors(src, {k: v for k, v in models[1].items() if k != "fc.bias"})
    _refused(src, sigs, out, MismatchError, "no tensor 'fc.bias'")


def test_nan_in_a_delta(setup):
    src, sigs, out = setup
    header, tensors = read_tensors(sigs[1])
    meta = json.loads(header.metadata["robustpatch"])
    tensors["fc.bias"][3] = np.nan
    meta["content_hash"] = content_hash(meta["entries"], tensors)
    write_tensors(sigs[1], tensors, {"robustpatch": json.dumps(meta)})
    _refused(src, sigs, out, NonFiniteError, "fc.bias: delta holds NaN")


def test_output_path_equal_to_the_input(setup):
    src, sigs, _ = setup
    before = listing(src.parent)
    with pytest.raises(ValueError, match="is the input"):
        apply_file(src, sigs, 1.0, src)
    with pytest.raises(ValueError, match="is the input"):
        apply_file(src, sigs, 1.0, src.parent / "." / src.name)
    assert listing(src.parent) == before


def test_a_write_that_fails_midway_leaves_no_partial_output(setup, monkeypatch):
    from robustpatch._io import pipeline

    src, sigs, out = setup
    (out / "p.safetensors").write_bytes(b"previous contents")
    calls = []
    real = pipeline.copy_range

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*args, **kw)

    monkeypatch.setattr(pipeline, "copy_range", failing)
    _refused(src, sigs, out, OSError, "No space left")
    assert (out / "p.safetensors").read_bytes() == b"previous contents"
    assert len(calls) == 3


def test_a_failing_undo_write_leaves_no_output(setup, monkeypatch):
    from robustpatch import files

    src, sigs, out = setup

    def failing(*args, **kw):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files.UndoWriter, "finish", failing)
    _refused(src, sigs, out, OSError, "Input/output")


def test_file_calls_check_progress_and_take_one_signature_path(tmp_path):
    # progress=5 failed in the writer thread; signatures="fog.rws" was read as characters
    import robustpatch as rp
    from robustpatch.errors import InvalidArgumentError
    from robustpatch.signature import Signature

    write_tensors(tmp_path / "m.safetensors", {"w": np.zeros(4, np.float32)})
    sig = Signature.from_deltas({"w": np.ones(4, np.float32)})
    sig.save(tmp_path / "s.rws")
    with pytest.raises(InvalidArgumentError, match="progress must be callable"):
        rp.apply_file(tmp_path / "m.safetensors", sig, out=tmp_path / "p.safetensors", progress=5)
    assert not (tmp_path / "p.safetensors").exists()
    rp.apply_file(tmp_path / "m.safetensors", tmp_path / "s.rws", out=tmp_path / "p.safetensors")
    with pytest.raises(InvalidArgumentError, match="progress must be callable"):
        rp.remove_file(tmp_path / "p.safetensors", tmp_path / "r.safetensors", progress=5)
    rp.remove_file(
        tmp_path / "p.safetensors", tmp_path / "r.safetensors", signatures=str(tmp_path / "s.rws")
    )
    assert sha(tmp_path / "r.safetensors") == sha(tmp_path / "m.safetensors")


def test_an_output_written_without_a_record_drops_the_stale_one_beside_it(tmp_path, capsys):
    # inspect showed the old output's record as the new file's
    from robustpatch.cli import main

    write_tensors(tmp_path / "m.safetensors", {"w": np.zeros(4, np.float32)})
    sig = Signature.from_deltas({"w": np.ones(4, np.float32)})
    sig.save(tmp_path / "s.rws")
    out = tmp_path / "p.safetensors"
    apply_file(tmp_path / "m.safetensors", tmp_path / "s.rws", 1.0, out)
    assert undo_path_for(out).exists()
    args = ["apply", str(tmp_path / "m.safetensors"), str(tmp_path / "s.rws"), "-o", str(out)]
    assert main([*args, "--no-undo", "--overwrite", "-q"]) == 0
    assert not undo_path_for(out).exists()
    (tmp_path / "notes.rpundo").write_text("mine")  # not a record: left alone
    remove_target = tmp_path / "notes"
    apply_file(tmp_path / "m.safetensors", tmp_path / "s.rws", 1.0, remove_target, undo=False)
    assert (tmp_path / "notes.rpundo").read_text() == "mine"
