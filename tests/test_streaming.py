"""Streamed signatures: a dense signature file is applied tensor by tensor (peak memory
near one tensor, not the signature), and the undo record refers to it by content hash
instead of embedding it; ``remove`` finds it beside the record or by ``--signature``,
refuses one with another hash, and still embeds on request."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from robustpatch._format.safetensors import encode_header, read_header, write_tensors
from robustpatch._format.undo import read_record
from robustpatch.cli import main
from robustpatch.errors import FormatError, MismatchError, NonFiniteError
from robustpatch.files import apply_file, remove_file, undo_path_for
from robustpatch.signature import Signature
from robustpatch.signature.streamed import StreamedSignature, open_signature
from rp_testutil import bf16_from_f32, child_peak_mib, listing, sha

MIB = 1 << 20


def write_model(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from robustpatch._format.safetensors import write_tensors

    write_tensors(path, tensors, {"format": "pt"})


@pytest.fixture
def pair(tmp_path):
    """A model (F32 and BF16 tensors) and a dense full-model signature of it."""
    rng = np.random.default_rng(0)
    model = {
        "a.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "b.weight": bf16_from_f32(rng.uniform(1, 2, (48, 40)).astype(np.float32)),
        "c.bias": rng.standard_normal(40).astype(np.float32),
    }
    write_model(tmp_path / "m.safetensors", model)
    deltas = {
        "a.weight": rng.normal(0, 1e-2, (64, 32)).astype(np.float32),
        "b.weight": np.full((48, 40), 2.0**-7, np.float32),  # exact in bf16: stored BF16
        "c.bias": rng.normal(0, 1e-2, 40).astype(np.float32),
    }
    dtypes = {"a.weight": "F32", "b.weight": "BF16", "c.bias": "F32"}
    Signature.from_deltas(deltas, dtypes=dtypes, name="tv").save(tmp_path / "tv.rws")
    return tmp_path


def test_a_streamed_signature_is_the_loaded_one_and_patches_the_same_bytes(pair):
    sig = open_signature(pair / "tv.rws")
    loaded = Signature.load(pair / "tv.rws")
    assert isinstance(sig, StreamedSignature) and sig.content_hash == loaded.content_hash
    assert read_header(pair / "tv.rws").by_name()["b.weight"].dtype == "BF16"
    eager = apply_file(pair / "m.safetensors", loaded, 1.0, pair / "eager.safetensors")
    streamed = apply_file(pair / "m.safetensors", pair / "tv.rws", 1.0, pair / "s.safetensors")
    raw = lambda p: p.read_bytes()[8 + int.from_bytes(p.read_bytes()[:8], "little") :]  # noqa: E731
    assert raw(eager.out) == raw(streamed.out)


def test_a_modified_streamed_signature_is_refused(pair):
    data = bytearray((pair / "tv.rws").read_bytes())
    data[-5] ^= 0x40
    (pair / "bad.rws").write_bytes(bytes(data))
    before = listing(pair)
    with pytest.raises(FormatError, match="content hash mismatch"):
        apply_file(pair / "m.safetensors", pair / "bad.rws", 1.0, pair / "o.safetensors")
    assert listing(pair) == before
    with pytest.raises(FormatError, match="content hash mismatch"):  # rolled back
        apply_file(pair / "m.safetensors", pair / "bad.rws", 1.0, inplace=True)
    assert listing(pair) == before


@pytest.mark.parametrize("field", [("weight", float("nan")), ("weight", 0.5), ("note", "x")])
def test_an_entry_with_a_field_robustpatch_does_not_write_is_refused_streamed_or_not(pair, field):
    """Its hash recomputed over the stored description: a full load refuses it (it hashes
    the description it rebuilds), and so must the stream (which hashes the stored one)."""
    from robustpatch._format.safetensors import read_tensors, write_tensors
    from robustpatch.signature.codec import content_hash

    header, tensors = read_tensors(pair / "tv.rws")
    meta = json.loads(header.metadata["robustpatch"])
    meta["entries"][0][field[0]] = field[1]
    algorithm = meta["content_hash"].split(":", 1)[0]
    meta["content_hash"] = content_hash(meta["entries"], tensors, algorithm)
    labels = {t.name: t.dtype for t in header.tensors}
    write_tensors(pair / "odd.rws", tensors, {"robustpatch": json.dumps(meta)}, labels=labels)
    before = listing(pair)
    refusal = "content hash mismatch|holds NaN, which JSON"  # NaN: refused as it is read
    with pytest.raises(FormatError, match=refusal):
        Signature.load(pair / "odd.rws")
    with pytest.raises(FormatError, match=refusal):
        apply_file(pair / "m.safetensors", pair / "odd.rws", 1.0, pair / "o.safetensors")
    assert listing(pair) == before


def test_the_record_refers_to_the_signature_and_remove_finds_it(pair, capsys):
    src, out = pair / "m.safetensors", pair / "p.safetensors"
    apply_file(src, pair / "tv.rws", 0.5, out)
    record = read_record(undo_path_for(out))
    assert record.signature_refs == [{"index": 0, "file": "tv.rws"}]
    names = [t.name for t in read_header(undo_path_for(out)).tensors]
    assert not any(n.startswith("sig") for n in names)  # nothing embedded
    assert main(["inspect", str(undo_path_for(out))]) == 0
    assert "(by reference)" in capsys.readouterr().out
    remove_file(out, pair / "r.safetensors")
    assert sha(pair / "r.safetensors") == sha(src)


def test_remove_takes_a_moved_signature_by_flag_and_refuses_a_wrong_one(pair, capsys):
    src, out = pair / "m.safetensors", pair / "p.safetensors"
    apply_file(src, pair / "tv.rws", 1.0, out)
    (pair / "kept").mkdir()
    shutil.move(pair / "tv.rws", pair / "kept" / "tv.rws")
    other = Signature.from_deltas({"a.weight": np.ones((64, 32), np.float32)}, name="tv")
    other.save(pair / "other.rws")
    before = listing(pair)
    with pytest.raises(FileNotFoundError, match="--signature"):
        remove_file(out, pair / "r.safetensors")
    with pytest.raises(FileNotFoundError, match=r"none of those given \(.*other.rws\) is it"):
        remove_file(out, pair / "r.safetensors", signatures=[pair / "other.rws"])
    shutil.copy(pair / "other.rws", pair / "tv.rws")  # a wrong file where the record looks
    with pytest.raises(MismatchError, match="is not the signature"):
        remove_file(out, pair / "r.safetensors")
    os.unlink(pair / "tv.rws")
    assert listing(pair) == before
    code = main(
        [
            "remove",
            str(out),
            "-o",
            str(pair / "r.safetensors"),
            "--signature",
            str(pair / "kept" / "tv.rws"),
            "-q",
        ]
    )
    assert code == 0 and sha(pair / "r.safetensors") == sha(src)


def test_embed_signature_keeps_the_record_self_contained(pair):
    src, out = pair / "m.safetensors", pair / "p.safetensors"
    assert (
        main(["apply", str(src), str(pair / "tv.rws"), "-o", str(out), "--embed-signature", "-q"])
        == 0
    )
    assert read_record(undo_path_for(out)).signature_refs == []
    os.unlink(pair / "tv.rws")
    remove_file(out, pair / "r.safetensors")
    assert sha(pair / "r.safetensors") == sha(src)


def test_in_place_records_refer_to_the_signature_too(pair):
    src = pair / "m.safetensors"
    original = sha(src)
    apply_file(src, pair / "tv.rws", 1.0, inplace=True)
    assert read_record(undo_path_for(src)).signature_refs[0]["file"] == "tv.rws"
    remove_file(src, inplace=True)
    assert sha(src) == original


# ---------------------------------------------------------------------------- memory

CHILD = r"""
from robustpatch.files import apply_file, remove_file
from robustpatch.signature import Signature

if op == "apply":
    apply_file(args["src"], [args["sig"]], 1.0, args["out"])
elif op == "remove":
    remove_file(args["src"], args["out"])
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_a_full_model_task_vector_is_applied_and_removed_near_one_tensor(tmp_path):
    """32 tensors of 4 MiB and a dense F32 task vector over all of them (128 MiB): apply
    and remove grow the process far less than the signature's size."""
    rng = np.random.default_rng(1)
    shape, n = (1024, 1024), 32
    infos = []
    from robustpatch._format.safetensors import TensorInfo

    for i in range(n):
        infos.append(TensorInfo(f"l{i}.weight", "F32", shape, i * 4 * MIB, (i + 1) * 4 * MIB))
    block = (rng.standard_normal(MIB, dtype=np.float32) * np.float32(0.02)).tobytes()
    with open(tmp_path / "m.safetensors", "wb") as f:
        f.write(encode_header(infos, {}))
        for _ in infos:
            f.write(block)
    sig_path = tmp_path / "tv.rws"
    deltas = {t.name: rng.normal(0, 1e-3, shape).astype(np.float32) for t in infos}
    Signature.from_deltas(deltas, name="tv").save(sig_path)
    del deltas
    base = child_peak_mib(CHILD, "baseline")
    out = tmp_path / "p.safetensors"
    grew = child_peak_mib(
        CHILD, "apply", src=str(tmp_path / "m.safetensors"), sig=str(sig_path), out=str(out)
    )
    back = child_peak_mib(CHILD, "remove", src=str(out), out=str(tmp_path / "r.safetensors"))
    assert sha(tmp_path / "r.safetensors") == sha(tmp_path / "m.safetensors")
    sig_mib = sig_path.stat().st_size / MIB
    assert sig_mib > 127
    for what, p in (("apply", grew), ("remove", back)):
        assert p - base < 0.4 * sig_mib, (what, p, base)  # loaded whole: over sig_mib


def test_a_record_with_sha256_digests_from_before_still_restores_exactly(pair):
    """Records written before BLAKE3 hold sha256 digests: each is checked with its own."""
    from robustpatch._format.safetensors import read_tensors, write_tensors
    from robustpatch._format.undo import UNDO_KEY, digest, record_digest

    src, out = pair / "m.safetensors", pair / "p.safetensors"
    apply_file(src, pair / "tv.rws", 1.0, out, embed_signature=True)
    header, tensors = read_tensors(undo_path_for(out))
    meta = json.loads(header.metadata[UNDO_KEY])
    originals = read_tensors(src)[1]
    for e in meta["tensors"]:
        e["digest"] = digest(originals[e["name"]], "sha256")
    meta["source_header_digest"] = digest(tensors["header"].tobytes(), "sha256")
    meta["record_digest"] = record_digest(meta, tensors)
    labels = {k: "U16" for k, a in tensors.items() if a.dtype == np.uint16}
    write_tensors(undo_path_for(out), tensors, {UNDO_KEY: json.dumps(meta)}, labels)
    assert read_record(undo_path_for(out)).tensors[0].digest.startswith("sha256:")
    remove_file(out, pair / "r.safetensors")
    assert sha(pair / "r.safetensors") == sha(src)


def test_remove_refuses_a_referenced_signature_whose_bytes_changed(pair):
    """Its metadata still names the right hash: the bytes fail their verification (run
    beside the removal) and nothing is written, in place or not."""
    src, out, inplace = pair / "m.safetensors", pair / "p.safetensors", pair / "c.safetensors"
    apply_file(src, pair / "tv.rws", 1.0, out)
    shutil.copyfile(src, inplace)
    apply_file(inplace, pair / "tv.rws", 1.0, inplace=True)
    data = bytearray((pair / "tv.rws").read_bytes())
    data[-5] ^= 0x40
    (pair / "tv.rws").write_bytes(bytes(data))
    before = listing(pair)
    with pytest.raises(FormatError, match="content hash mismatch"):
        remove_file(out, pair / "r.safetensors")
    with pytest.raises(FormatError, match="content hash mismatch"):
        remove_file(inplace, inplace=True)
    assert listing(pair) == before


def test_a_signature_given_for_one_reference_leaves_the_others_found_beside_the_record(pair):
    # giving one of two signatures refused the other, still where the record says
    src, out = pair / "m.safetensors", pair / "p.safetensors"
    second = Signature.from_deltas({"a.weight": np.full((64, 32), 0.5, np.float32)}, name="b")
    second.save(pair / "b.rws")
    apply_file(src, [pair / "tv.rws", pair / "b.rws"], [1.0, 1.0], out)
    remove_file(out, pair / "r.safetensors", signatures=[pair / "b.rws"])
    assert sha(pair / "r.safetensors") == sha(src)


def test_a_record_written_through_a_linked_folder_finds_its_signature(pair):
    # the reference was made from the link's text: ".." then left the real folder elsewhere
    src = pair / "m.safetensors"
    (pair / "real" / "sub").mkdir(parents=True)
    (pair / "lk").symlink_to(pair / "real" / "sub")
    apply_file(src, pair / "tv.rws", 1.0, pair / "lk" / "p.safetensors")
    for name in (pair / "lk" / "p.safetensors", pair / "real" / "sub" / "p.safetensors"):
        remove_file(name, pair / "r.safetensors")
        assert sha(pair / "r.safetensors") == sha(src)
        os.unlink(pair / "r.safetensors")


@pytest.mark.parametrize(
    ("values", "label", "flat"),
    [
        (np.full((64, 32), 0.125, np.float32), "F32", False),  # bfloat16 holds it
        (np.full((64, 32), 1 + 2**-10, np.float32), "F32", False),  # float16 holds it
        (np.full((64, 32), 0.125, np.float16), "F16", False),  # bfloat16 holds it
        (np.full((64, 32), 0.1, np.float32), "F32", True),  # its own form, but flattened
    ],
)
def test_a_dense_delta_stored_in_another_form_is_refused_by_every_reader(pair, values, label, flat):
    # hashed over another form than robustpatch's: the streamed reader (apply, apply
    # --inplace, remove's finder) verified it while Signature.load refused it, and an
    # apply --embed-signature wrote a record whose remove failed the hash check
    from robustpatch.signature.codec import (
        META_KEY,
        TensorDigests,
        encode_meta,
        header_object,
        tensor_digest,
    )

    src = pair / "m.safetensors"
    sig = Signature.from_deltas({"a.weight": values.astype(np.float32)}, name="f")
    specs = [e.spec() for e in sig]
    stored = values.reshape(-1) if flat else values
    digests = TensorDigests(specs)
    digests.add("a.weight", label, stored.shape, tensor_digest(stored))
    meta = encode_meta(header_object("f", {}, specs, digests.hexdigest()))
    write_tensors(pair / "f.rws", {"a.weight": stored}, {META_KEY: meta})
    before = listing(pair)
    for embed in (True, False):
        with pytest.raises(FormatError, match=r"f\.rws: dense delta 'a\.weight' is not stored as"):
            apply_file(src, pair / "f.rws", 1.0, pair / "p.safetensors", embed_signature=embed)
        assert listing(pair) == before
    with pytest.raises(FormatError, match="content hash mismatch"):
        Signature.load(pair / "f.rws")
    sig.save(pair / "g.rws")  # the same delta as robustpatch stores it
    apply_file(src, pair / "g.rws", 1.0, pair / "p.safetensors", embed_signature=True)


def test_a_nan_in_a_streamed_signature_names_its_file(pair):
    # with several signatures applied, "a.weight: delta holds NaN or Inf" named none
    src, tv = pair / "m.safetensors", pair / "tv.rws"
    header = read_header(tv)
    t = next(t for t in header.tensors if t.name == "a.weight")
    with open(tv, "r+b") as f:
        f.seek(header.data_start + t.begin)
        f.write(np.array([np.nan], np.float32).view(np.uint8).tobytes()[: t.nbytes])
    with pytest.raises(NonFiniteError, match=r"tv\.rws: a\.weight: delta holds NaN"):
        apply_file(src, tv, 1.0, pair / "p.safetensors")
    assert not (pair / "p.safetensors").exists()
