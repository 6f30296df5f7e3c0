"""Quantized signature files streamed like dense ones: each QuantTensor holds read-only
views of the file's map (no copy), and an undo record refers to the file by content
hash instead of embedding it (``embed_signature=True`` still embeds it)."""

from __future__ import annotations

import mmap
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from robustpatch import _core
from robustpatch._format.safetensors import read_header, write_tensors
from robustpatch._format.undo import read_record
from robustpatch.cli import main
from robustpatch.files import apply_file, remove_file, undo_path_for
from robustpatch.signature import Signature
from robustpatch.signature.streamed import StreamedSignature, open_signature
from rp_testutil import bf16_from_f32, child_peak_mib, listing, sha


@pytest.fixture
def qpair(tmp_path):
    """A model (F32 and BF16 tensors) and a 4-bit signature of every tensor."""
    rng = np.random.default_rng(1)
    model = {
        "a.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "b.weight": bf16_from_f32(rng.uniform(1, 2, (48, 40)).astype(np.float32)),
        "c.bias": rng.standard_normal(40).astype(np.float32),
    }
    write_tensors(tmp_path / "m.safetensors", model, {"format": "pt"})
    deltas = {n: rng.normal(0, 1e-2, a.shape).astype(np.float32) for n, a in model.items()}
    dtypes = {"a.weight": "F32", "b.weight": "BF16", "c.bias": "F32"}
    sig = Signature.from_deltas(deltas, dtypes=dtypes, name="q4")
    sig.quantize(4, "affine", "group", 8).save(tmp_path / "q4.rws")
    return tmp_path


def _quant_tensors(sig: Signature) -> list:
    return [e.quant.tensor for e in sig.deltas.values()]


def test_an_opened_quantized_file_views_its_map_and_equals_the_loaded_one(qpair):
    sig, loaded = open_signature(qpair / "q4.rws"), Signature.load(qpair / "q4.rws")
    assert isinstance(sig, StreamedSignature) and sig.content_hash == loaded.content_hash
    for got, want in zip(_quant_tensors(sig), _quant_tensors(loaded)):
        assert got.is_view and want.is_view  # of the map; of the bytes load read
        for part in ("codes", "scale", "offset"):
            assert np.array_equal(getattr(got, part), getattr(want, part))
            with pytest.raises(ValueError, match="read-only"):
                getattr(got, part)[0] = 0


def _parts_of(buffer, numel: int = 64, glen: int = 8) -> tuple[np.ndarray, ...]:
    """Codes, scales and offsets of a 4-bit tensor as views of ``buffer``."""
    groups = numel // glen
    codes = np.frombuffer(buffer, np.uint8, numel // 2, 0)
    scale = np.frombuffer(buffer, np.float32, groups, numel // 2)
    offset = np.frombuffer(buffer, np.float32, groups, numel // 2 + 4 * groups)
    return codes, scale, offset


def _layout(numel: int = 64, glen: int = 8) -> bytes:
    groups = numel // glen
    codes = np.arange(numel // 2, dtype=np.uint8)
    return codes.tobytes() + np.full(groups, 0.5, np.float32).tobytes() + bytes(4 * groups)


def test_quant_tensor_holds_views_of_a_read_only_map_and_pins_it(tmp_path):
    path = tmp_path / "parts.bin"
    path.write_bytes(_layout())
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    parts = _parts_of(mm)
    t = _core.QuantTensor(*parts, 4, "affine", 8, 64)
    assert t.is_view and np.shares_memory(t.codes, parts[0])
    assert np.array_equal(_core.dequantize(t)[:4], [0.0, 0.0, 0.5, 0.0])  # codes 0, 1
    with pytest.raises(BufferError):
        mm.close()  # the tensor keeps the map's memory alive
    del t, parts
    mm.close()


@pytest.mark.parametrize("kind", ["bytearray", "readonly_view_of_bytearray", "writable_map"])
def test_quant_tensor_copies_parts_that_could_still_change(tmp_path, kind):
    raw = bytearray(_layout())
    if kind == "writable_map":
        path = tmp_path / "parts.bin"
        path.write_bytes(raw)
        with open(path, "r+b") as f:
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_WRITE)
    else:
        buffer = raw if kind == "bytearray" else memoryview(raw).toreadonly()
    parts = [p.copy() if p.flags.writeable else p for p in _parts_of(buffer)]
    for p in parts:
        p.setflags(write=False)
    t = _core.QuantTensor(*parts, 4, "affine", 8, 64)
    assert not t.is_view and not np.shares_memory(t.codes, parts[0])
    raw[0] = 0xFF
    assert int(t.codes[0]) == 0  # later writes to the source do not reach it


def test_bytes_are_immutable_so_their_views_are_held():
    data = _layout()
    t = _core.QuantTensor(*_parts_of(data), 4, "affine", 8, 64)
    assert t.is_view and np.shares_memory(t.codes, np.frombuffer(data, np.uint8))


def test_the_record_refers_to_a_quantized_file_by_hash_and_restores(qpair, capsys):
    src, out = qpair / "m.safetensors", qpair / "p.safetensors"
    apply_file(src, qpair / "q4.rws", 1.0, out)
    record = read_record(undo_path_for(out))
    assert record.signature_refs == [{"index": 0, "file": "q4.rws"}]
    assert record.signatures[0]["content_hash"] == open_signature(qpair / "q4.rws").content_hash
    names = [t.name for t in read_header(undo_path_for(out)).tensors]
    assert not any(n.startswith("sig") for n in names)
    assert main(["inspect", str(undo_path_for(out))]) == 0
    assert "(by reference)" in capsys.readouterr().out
    remove_file(out, qpair / "r.safetensors")
    assert sha(qpair / "r.safetensors") == sha(src)


def test_embed_signature_embeds_a_quantized_file(qpair):
    src, out = qpair / "m.safetensors", qpair / "p.safetensors"
    argv = ["apply", str(src), str(qpair / "q4.rws"), "-o", str(out), "--embed-signature", "-q"]
    assert main(argv) == 0
    assert read_record(undo_path_for(out)).signature_refs == []
    names = {t.name for t in read_header(undo_path_for(out)).tensors}
    assert "sig0/a.weight.codes" in names
    os.unlink(qpair / "q4.rws")
    remove_file(out, qpair / "r.safetensors")
    assert sha(qpair / "r.safetensors") == sha(src)


def test_a_missing_quantized_file_is_named_by_hash_and_place(qpair, capsys):
    src, out = qpair / "m.safetensors", qpair / "p.safetensors"
    apply_file(src, qpair / "q4.rws", 1.0, out)
    want = read_record(undo_path_for(out)).signatures[0]["content_hash"]
    (qpair / "kept").mkdir()
    shutil.move(qpair / "q4.rws", qpair / "kept" / "q4.rws")
    before = listing(qpair)
    with pytest.raises(FileNotFoundError) as info:
        remove_file(out, qpair / "r.safetensors")
    assert want in str(info.value) and str(qpair / "q4.rws") in str(info.value)
    assert main(["remove", str(out), "-o", str(qpair / "r.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("robustpatch: error: ") and want in err and "\n" not in err
    other = Signature.load(qpair / "kept" / "q4.rws").scaled(2.0).materialize()
    other.save(qpair / "other.rws")
    with pytest.raises(FileNotFoundError, match=want) as info:  # not given, nor in place
        remove_file(out, qpair / "r.safetensors", signatures=[qpair / "other.rws"])
    assert str(qpair / "other.rws") in str(info.value)  # the places looked
    os.unlink(qpair / "other.rws")
    assert listing(qpair) == before
    remove_file(out, qpair / "r.safetensors", signatures=[qpair / "kept" / "q4.rws"])
    assert sha(qpair / "r.safetensors") == sha(src)


def test_in_place_records_refer_to_a_quantized_file_too(qpair):
    src = qpair / "m.safetensors"
    original = sha(src)
    apply_file(src, qpair / "q4.rws", 1.0, inplace=True)
    assert read_record(undo_path_for(src)).signature_refs[0]["file"] == "q4.rws"
    remove_file(src, inplace=True)
    assert sha(src) == original


def test_a_quantized_file_with_edited_metadata_fails_its_hash_before_the_plan(qpair: Path):
    """The plan check (dtypes) runs while the file is verified in a second thread: a
    file that fails its hash is the error reported, not the mismatch it causes."""
    import json

    from robustpatch.errors import FormatError

    path = qpair / "q4.rws"
    header = read_header(path)
    meta = json.loads(header.metadata["robustpatch"])
    meta["entries"][0]["dtype"] = "F16"
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    tensors = {}
    with open(path, "rb") as f:
        for t in header.tensors:
            f.seek(8 + header_len + t.begin)
            dtype = {"U8": np.uint8, "F32": np.float32}[t.dtype]
            tensors[t.name] = np.frombuffer(f.read(t.nbytes), dtype).reshape(t.shape)
    write_tensors(qpair / "bad.rws", tensors, {"robustpatch": json.dumps(meta)})
    before = listing(qpair)
    for inplace in (False, True):
        out = None if inplace else qpair / "o.safetensors"
        with pytest.raises(FormatError, match="content hash mismatch"):
            apply_file(qpair / "m.safetensors", qpair / "bad.rws", 1.0, out, inplace=inplace)
        assert listing(qpair) == before


CHILD = r"""
from robustpatch.files import apply_file

apply_file(args["src"], [args["sig"]], 1.0, args["out"])
"""


def _bf16_model_and_4bit_signature(folder: Path, tensors: int) -> tuple[Path, Path]:
    """``tensors`` BF16 tensors of 1 MiB (one block repeated) and a 4-bit signature of
    every one (one shared delta: the quantized parts grow with ``tensors``)."""
    rng = np.random.default_rng(tensors)
    block = bf16_from_f32(rng.standard_normal((1024, 512)).astype(np.float32))
    names = [f"layer{k}.weight" for k in range(tensors)]
    model = folder / f"m{tensors}.safetensors"
    write_tensors(model, dict.fromkeys(names, block), {"format": "pt"})
    delta = rng.normal(0, 1e-2, block.shape).astype(np.float32)
    sig = Signature.from_deltas(dict.fromkeys(names, delta), dtypes=dict.fromkeys(names, "BF16"))
    sig.quantize(4, "affine", "group", 128).save(folder / f"q{tensors}.rws")
    return model, folder / f"q{tensors}.rws"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_applying_a_quantized_file_does_not_hold_it_in_memory(tmp_path):
    """Peak memory of a 4-bit full-model apply does not grow with the signature: its
    parts are views of the map whose pages are dropped per tensor, and the record refers
    to the file. (Loading and copying it, as before, grew by twice its size.)"""
    peaks, sizes = {}, {}
    for tensors in (32, 160):  # signatures of 9 and 45 MiB, the same 1 MiB tensors
        model, sig = _bf16_model_and_4bit_signature(tmp_path, tensors)
        out = tmp_path / f"p{tensors}.safetensors"
        peaks[tensors] = child_peak_mib(CHILD, "apply", src=str(model), sig=str(sig), out=str(out))
        sizes[tensors] = sig.stat().st_size / (1 << 20)
        for p in (model, out, undo_path_for(out)):
            p.unlink()
    grown, sig_grown = peaks[160] - peaks[32], sizes[160] - sizes[32]
    assert grown < 0.3 * sig_grown, (peaks, sizes)
