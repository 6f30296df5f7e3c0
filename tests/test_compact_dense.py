"""Compact dense signatures: a dense delta is stored in the narrowest dtype that holds
it exactly (BF16, F16, else F32), reads back to the same float32 values and content
hash, patches a model to the same bytes, and ``inspect`` says how each was stored and
how many unchanged tensors extraction skipped. Files an earlier release wrote, with F32
deltas and a hash over their float32 values, stay readable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from robustpatch import extract
from robustpatch._format.safetensors import read_header, read_tensors, write_tensors
from robustpatch.cli import main
from robustpatch.errors import NonFiniteError
from robustpatch.files import apply_file
from robustpatch.signature import Signature
from robustpatch.signature.codec import META_KEY, compact, content_hash
from rp_testutil import bf16_from_f32, bf16_to_f32


def bf16_pair(rng, n=4, shape=(32, 48)):
    """A clean and a fine-tuned bf16 model: tensor 0 unchanged, the rest nudged by a few
    bf16 steps (so each difference is exact in bf16, by Sterbenz's lemma)."""
    clean, robust = {}, {}
    for i in range(n):
        w = bf16_from_f32(rng.uniform(1.0, 1.9, shape).astype(np.float32))
        clean[f"l{i}.weight"] = w
        step = rng.integers(-3, 4, shape).astype(np.uint16) if i else 0
        robust[f"l{i}.weight"] = (w.astype(np.int32) + step).astype(np.uint16)
    return clean, robust


def extract_saved(folder, clean, robust):
    """Write both models to ``folder``, extract their difference and save it as d.rws."""
    for name, m in (("clean", clean), ("robust", robust)):
        write_tensors(folder / f"{name}.safetensors", m)
    sig = extract(
        None,
        folder / "clean.safetensors",
        folder / "robust.safetensors",
        "all",
        method="difference",
    )
    sig.save(folder / "d.rws")
    return sig


def test_compact_picks_the_narrowest_exact_dtype():
    assert compact(np.array([1.5, -0.0078125, 0.0], np.float32)).dtype == np.uint16
    assert compact(np.array([1.0 + 2**-10], np.float32)).dtype == np.float16  # not bf16
    assert compact(np.array([0.1, 1.0], np.float32)).dtype == np.float32
    big = np.array([1e30 + 2**80], np.float32)  # past float16's range, bf16 loses bits
    assert compact(big).dtype == np.float32


def test_a_bf16_task_vector_is_stored_as_bf16_and_patches_the_same_bytes(tmp_path):
    clean, robust = bf16_pair(np.random.default_rng(0))
    sig = extract_saved(tmp_path, clean, robust)
    stored = {t.name: t.dtype for t in read_header(tmp_path / "d.rws").tensors}
    assert stored == {"l1.weight": "BF16", "l2.weight": "BF16", "l3.weight": "BF16"}
    back = Signature.load(tmp_path / "d.rws")
    assert back.content_hash == sig.content_hash
    for e in sig:
        assert np.array_equal(back[e.name].values.view(np.uint32), e.values.view(np.uint32))
    # the same signature as an earlier release stored it (all F32, its blake3 hash over
    # the float32 values) loads with that hash and patches to the same bytes
    header, tensors = read_tensors(tmp_path / "d.rws")
    f32 = {k: bf16_to_f32(v) for k, v in tensors.items()}
    meta = json.loads(header.metadata[META_KEY])
    meta["content_hash"] = content_hash(meta["entries"], f32, "blake3")
    write_tensors(tmp_path / "old.rws", f32, {META_KEY: json.dumps(meta)})
    assert Signature.load(tmp_path / "old.rws").content_hash == meta["content_hash"]
    a = apply_file(tmp_path / "clean.safetensors", tmp_path / "d.rws", 1.0, tmp_path / "a.st")
    b = apply_file(tmp_path / "clean.safetensors", tmp_path / "old.rws", 1.0, tmp_path / "b.st")
    patched_a, patched_b = read_tensors(a.out)[1], read_tensors(b.out)[1]
    assert patched_a.keys() == patched_b.keys()
    assert all(patched_a[k].tobytes() == patched_b[k].tobytes() for k in patched_a)
    assert read_tensors(a.out)[1]["l2.weight"].tobytes() == robust["l2.weight"].tobytes()
    assert (tmp_path / "d.rws").stat().st_size < 0.6 * (tmp_path / "old.rws").stat().st_size


def test_inspect_says_how_dense_deltas_are_stored_and_what_was_skipped(tmp_path, capsys):
    clean, robust = bf16_pair(np.random.default_rng(1))
    robust["l3.weight"] = bf16_from_f32(np.full((32, 48), 0.1, np.float32))  # not exact
    extract_saved(tmp_path, clean, robust)
    assert main(["inspect", str(tmp_path / "d.rws"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["dense_stored_as"] == {"BF16": 2, "F32": 1}
    assert rep["unchanged_skipped"] == 1
    by_name = {e["name"]: e for e in rep["entries"]}
    assert (
        by_name["l1.weight"]["bytes"] == 32 * 48 * 2
        and by_name["l3.weight"]["bytes"] == 32 * 48 * 4
    )
    assert main(["inspect", str(tmp_path / "d.rws")]) == 0
    assert "stored 2 as BF16, 1 as F32" in capsys.readouterr().out


def test_a_compact_delta_holding_inf_is_refused(tmp_path):
    sig = Signature.from_deltas({"w": np.ones(8, np.float32)}, name="s")
    sig.save(tmp_path / "s.rws")
    header, tensors = read_tensors(tmp_path / "s.rws")
    tensors["w"] = np.full(8, np.inf, np.float16)
    write_tensors(tmp_path / "bad.rws", tensors, {META_KEY: header.metadata[META_KEY]})
    with pytest.raises(NonFiniteError):
        Signature.load(tmp_path / "bad.rws")


def test_sizes_and_ratios_count_dense_deltas_as_stored(tmp_path, capsys):
    # nbytes counted float32, so inspect said "0.5x smaller than the model" of a bf16
    # difference signature the model's size (and "smaller" of one larger than the model)
    w = np.full((64, 32), 0.125, np.float32)  # bfloat16 holds it: 2 bytes a value
    meta = {"source": {"model_nbytes": 64 * 32 * 2}}
    sig = Signature.from_deltas({"w": w}, name="tv", meta=meta)
    assert sig.nbytes == 64 * 32 * 2 and sig.compression_ratio() == 1.0
    sig.save(tmp_path / "tv.rws")
    assert main(["inspect", str(tmp_path / "tv.rws"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["smaller_than_model"] == 1.0
    wide = Signature.from_deltas({"w": w + 0.1}, name="f", meta=meta)  # float32: 4 bytes
    assert wide.nbytes == 64 * 32 * 4
    wide.save(tmp_path / "f.rws")
    assert main(["inspect", str(tmp_path / "f.rws")]) == 0
    assert "2.00x the size of the model it came from" in capsys.readouterr().out
