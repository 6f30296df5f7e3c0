"""The file path's pipeline: apply_file / remove_file read the next tensor in one
thread and write the previous one in another while the engine patches the current one.
Each stage keeps file order, the output is the same on every stream (direct I/O or a
kernel copy), and an error in any stage reaches the caller with nothing written and no
thread left running. Also the file path's other speed-ups: undo records sealed with
BLAKE3 (sha256 ones still verify) and in-place ranges mapped in with one madvise."""

from __future__ import annotations

import json
import mmap
import threading
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from robustpatch import files, records
from robustpatch._format.safetensors import read_header, read_tensors, write_tensors
from robustpatch._format.undo import UNDO_KEY, UndoRecord, record_digest
from robustpatch._io import direct
from robustpatch._io.ranged import populate_writable
from robustpatch.errors import FormatError, MismatchError
from robustpatch.files import apply_file, remove_file, undo_path_for
from robustpatch.signature import Signature
from rp_testutil import listing, sha

N_TENSORS = 10


@pytest.fixture()
def model(tmp_path):
    """A 10-tensor model and a 4-bit signature touching every other tensor."""
    rng = np.random.default_rng(15)
    arrays = {
        f"layers.{k}.weight": rng.normal(0, 0.02, (64, 96)).astype(np.float32)
        for k in range(N_TENSORS)
    }
    write_tensors(tmp_path / "model.safetensors", arrays, {"format": "pt"})
    deltas = {
        n: rng.normal(0, 1e-3, a.shape).astype(np.float32)
        for k, (n, a) in enumerate(arrays.items())
        if k % 2 == 0
    }
    Signature.from_deltas(deltas, name="speed").quantize(4).save(tmp_path / "sig.rws")
    out = tmp_path / "out"
    out.mkdir()
    return tmp_path / "model.safetensors", tmp_path / "sig.rws", out, sorted(deltas, key=_order)


def _order(name: str) -> int:
    return int(name.split(".")[1])


def _pipeline_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("robustpatch-")]


def _spy(monkeypatch, events: list, fail: tuple[str, str] | None = None) -> None:
    """Record (stage, tensor, thread) of the undo sink's watch; raise at ``fail``."""
    for stage in ("loaded", "finished"):
        real = getattr(records.RecordToFile, stage)

        def spied(self, t, arr, real=real, stage=stage):
            events.append((stage, t.name, threading.current_thread().name))
            if fail == (stage, t.name):
                raise MismatchError(f"{stage} {t.name}: injected")
            return real(self, t, arr)

        monkeypatch.setattr(records.RecordToFile, stage, spied)


@pytest.mark.parametrize("stream", ["direct", "kernel-copy"])
def test_stages_run_in_their_own_threads_in_file_order(model, monkeypatch, stream):
    src, sig, out, touched = model
    if stream == "direct":  # durable and over the threshold: the DirectWriter stream
        monkeypatch.setattr(direct, "DIRECT_MIN_BYTES", 0)
    events: list = []
    _spy(monkeypatch, events)
    apply_file(src, sig, 1.0, out / "p.safetensors", durable=stream == "direct")
    for stage, thread in (("loaded", "robustpatch-reader"), ("finished", "robustpatch-writer")):
        seen = [(name, th) for st, name, th in events if st == stage]
        assert seen == [(name, thread) for name in touched]
    remove_file(out / "p.safetensors", out / "r.safetensors", durable=stream == "direct")
    assert sha(out / "r.safetensors") == sha(src)
    assert _pipeline_threads() == []


@pytest.mark.parametrize("stage", ["loaded", "finished"])
def test_an_error_in_a_stage_thread_reaches_the_caller(model, monkeypatch, stage):
    src, sig, out, touched = model
    before = listing(src.parent)
    _spy(monkeypatch, [], fail=(stage, touched[2]))
    with pytest.raises(MismatchError, match=f"{stage} {touched[2]}: injected"):
        apply_file(src, sig, 1.0, out / "p.safetensors")
    assert listing(src.parent) == before  # no output, no record, no temporary file
    assert _pipeline_threads() == []


def test_an_engine_error_mid_file_stops_both_threads(model, monkeypatch):
    src, sig, out, touched = model
    before = listing(src.parent)
    real = files.FileTarget.add

    def add(self, name, *args, **kw):
        if name == touched[3]:
            raise RuntimeError("engine failed")
        return real(self, name, *args, **kw)

    monkeypatch.setattr(files.FileTarget, "add", add)
    with pytest.raises(RuntimeError, match="engine failed"):
        apply_file(src, sig, 1.0, out / "p.safetensors")
    assert listing(src.parent) == before
    assert _pipeline_threads() == []


def test_a_tampered_tensor_found_by_the_reader_thread_fails_removal(model):
    src, sig, out, touched = model
    patched = out / "p.safetensors"
    apply_file(src, sig, 1.0, patched)
    before = listing(out)
    header = read_header(patched)
    last = header.by_name()[touched[-1]]
    data = bytearray(patched.read_bytes())
    data[header.data_start + last.end - 5] ^= 0x40  # the last touched tensor (its CRC)
    patched.write_bytes(bytes(data))
    with pytest.raises(MismatchError, match="changed since it was patched"):
        remove_file(patched, out / "r.safetensors")
    assert sorted(listing(out)) == sorted(before)
    assert _pipeline_threads() == []


def _rewrite(undo, edit) -> str:
    """Rewrite a record with ``edit(meta, tensors)`` applied; returns its record digest."""
    header, tensors = read_tensors(undo)
    meta = json.loads(header.metadata[UNDO_KEY])
    edit(meta, tensors)
    labels = {k: "U16" for k, a in tensors.items() if a.dtype == np.uint16}
    write_tensors(undo, tensors, {UNDO_KEY: json.dumps(meta)}, labels)
    return meta["record_digest"]


def _seal_with_sha256(meta, tensors) -> None:
    """As records written before the switch to BLAKE3 were sealed."""
    meta["record_digest"] = "sha256:" + "0" * 64
    meta["record_digest"] = record_digest(meta, tensors)


def _claim_blake3(meta, tensors) -> None:
    meta["record_digest"] = "blake3:" + meta["record_digest"].split(":")[1]


def test_records_are_sealed_with_blake3_and_sha256_records_still_verify(model):
    src, sig, out, touched = model
    patched = out / "p.safetensors"
    apply_file(src, sig, 1.0, patched)
    undo = undo_path_for(patched)
    assert json.loads(read_header(undo).metadata[UNDO_KEY])["record_digest"].startswith("blake3:")
    assert _rewrite(undo, _seal_with_sha256).startswith("sha256:")
    remove_file(patched, out / "r.safetensors")
    assert sha(out / "r.safetensors") == sha(src)
    # The same digest claimed as BLAKE3 is checked as BLAKE3: refused.
    _rewrite(undo, _claim_blake3)
    with pytest.raises(FormatError, match="record digest does not match"):
        remove_file(patched, out / "r2.safetensors")
    assert not (out / "r2.safetensors").exists()


def _resident_kib(mm: mmap.mmap) -> int:
    """The mapping's resident size (``Rss`` of its area in /proc/self/smaps)."""
    view = np.frombuffer(mm, np.uint8, 1)
    start = f"{view.__array_interface__['data'][0]:x}-"
    del view
    lines = Path("/proc/self/smaps").read_text().splitlines()
    at = next(k for k, line in enumerate(lines) if line.startswith(start))
    rss = next(line for line in lines[at + 1 :] if line.startswith("Rss:"))
    return int(rss.split()[1])


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux /proc")
def test_populate_writable_maps_exactly_the_range_in(tmp_path):
    path = tmp_path / "f.bin"
    data = np.random.default_rng(0).integers(0, 256, 32 << 20, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
        untouched = _resident_kib(mm)
        if not populate_writable(mm, (8 << 20) + 100, 8 << 20):
            pytest.skip("MADV_POPULATE_WRITE needs Linux 5.14+")
        populated = _resident_kib(mm)
        assert not populate_writable(mm, 0, 0)  # nothing to map in
        mm[(8 << 20) + 100] ^= 0xFF
        mm.close()
    assert untouched == 0
    # The range, from its first page to its end, mapped in (and not the whole file).
    assert (8 << 10) + 4 <= populated < 16 << 10, populated
    data[(8 << 20) + 100] ^= 0xFF
    assert path.read_bytes() == data.tobytes()  # the mapped pages hold the file's bytes


def test_a_record_renders_as_its_dataclass_does(model):
    """UndoRecord.to_json, built from its fields without deep copies, says what
    ``dataclasses.asdict`` says, in each version: 2 (BLAKE3 tensor digests, no signature
    refs), 3 (refs), 4 (XXH3-128 tensor digests, as written now)."""
    src, sig, out, touched = model
    apply_file(src, sig, 1.0, out / "p.safetensors")
    raw = read_header(undo_path_for(out / "p.safetensors")).metadata[UNDO_KEY]
    record = UndoRecord.parse(raw, "record")
    assert record.signatures and record.tensors
    blake3 = [replace(e, digest="blake3:" + "0" * 64) for e in record.tensors]
    refs = [{"index": 0, "file": "sig.rws"}]
    for rec, version in (
        (replace(record, tensors=blake3, signature_refs=[]), 2),
        (replace(record, tensors=blake3, signature_refs=refs), 3),
        (replace(record, signature_refs=[]), 4),
        (replace(record, signature_refs=refs), 4),
    ):
        meta = asdict(rec)
        if version == 2:
            del meta["signature_refs"]
        del meta["data_size"]  # only an ONNX record's, with external data
        assert rec.to_json() == json.dumps({"format_version": version, "kind": "undo", **meta})
    assert record.to_json() == raw
