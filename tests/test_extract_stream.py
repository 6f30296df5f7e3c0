"""Streamed extraction: ``extract_to`` writes each entry as it is computed, the file byte
for byte what ``extract(...).save()`` writes, with memory near a few tensors; sharded
sources are read through their validated index."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from robustpatch._format.safetensors import TensorInfo, encode_header, write_tensors
from robustpatch.cli import main
from robustpatch.errors import FormatError, InvalidArgumentError, NonFiniteError, SelectionError
from robustpatch.extraction import extract, extract_to
from robustpatch.signature import Signature
from rp_testutil import bf16_from_f32, child_peak_mib, listing, trio

MIB = 1 << 20


def write_trio(folder: Path, fc_dtype="bf16") -> list[Path]:
    """pretrained, clean and robust checkpoints (F32, BF16, BatchNorm statistics, an
    unchanged tensor) as safetensors files."""
    paths = []
    for name, model in zip(("pre", "clean", "robust"), trio(3, fc_dtype)):
        model = {k: v for k, v in model.items() if v.dtype.kind != "i"}
        paths.append(folder / f"{name}.safetensors")
        write_tensors(paths[-1], model, {"format": "pt"})
    return paths


@pytest.mark.parametrize("method", ["projection", "difference"])
@pytest.mark.parametrize("bits", [None, 4])
def test_the_streamed_file_is_byte_for_byte_the_saved_signature(tmp_path, method, bits):
    pre, clean, robust = write_trio(tmp_path)
    kw = {"method": method, "layers": "all", "name": "fog", "provenance": {"c": "fog"}}
    sig = extract(pre, clean, robust, **kw)
    if bits:
        sig = sig.quantize(bits, "affine", "group", 64)
    sig.save(tmp_path / "eager.rws")
    quant = {"bits": bits, "group": 64} if bits else {}
    got = extract_to(tmp_path / "streamed.rws", pre, clean, robust, **kw, **quant)
    assert (tmp_path / "streamed.rws").read_bytes() == (tmp_path / "eager.rws").read_bytes()
    loaded = Signature.load(tmp_path / "streamed.rws")
    assert loaded.content_hash == sig.content_hash
    assert (got.entries, got.meta) == (len(sig), sig.meta)
    assert got.nbytes == sum(e.nbytes for e in loaded)  # the stored bytes (compact)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["pre.safetensors", "clean.safetensors", "robust.safetensors", "eager.rws", "streamed.rws"]
    )


@pytest.mark.parametrize("method", ["projection", "difference"])
@pytest.mark.parametrize("bits", [None, 4])
def test_a_large_signature_is_written_once_behind_padded_header_room(
    tmp_path, monkeypatch, method, bits
):
    """Above the size threshold the data is not copied behind the header: it stays where
    it was written, behind room the header fills with spaces. The file holds the same
    signature (header JSON, tensors, content hash) as the one ``save`` writes."""
    from robustpatch.signature import writer

    monkeypatch.setattr(writer, "IN_PLACE_MIN_BYTES", 0)
    pre, clean, robust = write_trio(tmp_path)
    kw = {"method": method, "layers": "all", "name": "fog"}
    sig = extract(pre, clean, robust, **kw)
    if bits:
        sig = sig.quantize(bits, "affine", "group", 64)
    sig.save(tmp_path / "eager.rws")
    quant = {"bits": bits, "group": 64} if bits else {}
    got = extract_to(tmp_path / "streamed.rws", pre, clean, robust, **kw, **quant)
    raw = (tmp_path / "streamed.rws").read_bytes()
    eager = (tmp_path / "eager.rws").read_bytes()
    n, m = (int.from_bytes(b[:8], "little") for b in (raw, eager))
    assert (n + 8) % 4096 == 0 and n > m  # the data starts on a page, behind the room
    assert raw[8 : 8 + n].rstrip(b" ") == eager[8 : 8 + m].rstrip(b" ")
    assert raw[8 + n :] == eager[8 + m :]  # same tensors, same offsets
    loaded = Signature.load(tmp_path / "streamed.rws")
    assert loaded.content_hash == sig.content_hash and got.nbytes == len(eager) - 8 - m
    for e in sig:
        np.testing.assert_array_equal(loaded[e.name].dense(), e.dense())
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["pre.safetensors", "clean.safetensors", "robust.safetensors", "eager.rws", "streamed.rws"]
    )


def test_a_header_larger_than_its_room_is_written_in_front_of_a_copy(tmp_path, monkeypatch):
    from robustpatch.signature import writer

    monkeypatch.setattr(writer, "IN_PLACE_MIN_BYTES", 0)
    monkeypatch.setattr(writer, "_ROOM_BASE", 0)
    monkeypatch.setattr(writer, "_ROOM_PER_ENTRY", 0)  # room: one page, too small
    pre, clean, robust = write_trio(tmp_path)
    kw = {"method": "projection", "layers": "all", "name": "fog", "provenance": {"k": "v" * 5000}}
    extract(pre, clean, robust, **kw).save(tmp_path / "eager.rws")
    extract_to(tmp_path / "streamed.rws", pre, clean, robust, **kw)
    assert (tmp_path / "streamed.rws").read_bytes() == (tmp_path / "eager.rws").read_bytes()


def test_compact_and_skipped_entries_stream_as_they_save(tmp_path):
    """A BF16 delta exact in bf16 is stored BF16, an unchanged tensor is skipped."""
    rng = np.random.default_rng(0)
    clean = {
        "a.weight": bf16_from_f32(rng.uniform(1, 2, (8, 16)).astype(np.float32)),
        "b.weight": rng.standard_normal((8, 16)).astype(np.float32),
        "c.weight": rng.standard_normal((4, 4)).astype(np.float32),
    }
    robust = dict(clean, **{"a.weight": clean["a.weight"] + np.uint16(1)})
    robust["b.weight"] = clean["b.weight"] + np.float32(1e-3)
    for name, model in (("c", clean), ("r", robust)):
        write_tensors(tmp_path / f"{name}.safetensors", model)
    args = (None, tmp_path / "c.safetensors", tmp_path / "r.safetensors")
    kw = {"method": "difference", "layers": "all"}
    extract(*args, **kw).save(tmp_path / "eager.rws")
    got = extract_to(tmp_path / "s.rws", *args, **kw)
    assert (tmp_path / "s.rws").read_bytes() == (tmp_path / "eager.rws").read_bytes()
    assert got.meta["skipped"] == ["c.weight"] and got.entries == 2
    assert got.nbytes == 8 * 16 * 2 + 8 * 16 * 4  # a.weight as BF16, b.weight as F32


def test_extract_to_takes_extracts_options_and_refuses_others(tmp_path):
    """extract_to's options are extract's: the defaults match, a misspelt one is a
    TypeError naming it, and nothing is written."""
    pre, clean, robust = write_trio(tmp_path)
    extract(pre, clean, robust).save(tmp_path / "eager.rws")
    extract_to(tmp_path / "streamed.rws", pre, clean, robust)
    assert (tmp_path / "streamed.rws").read_bytes() == (tmp_path / "eager.rws").read_bytes()
    before = listing(tmp_path)
    with pytest.raises(TypeError, match="'methd'"):
        extract_to(tmp_path / "out.rws", pre, clean, robust, methd="difference")
    assert listing(tmp_path) == before


def test_nothing_to_extract_leaves_the_folder_as_it_was(tmp_path):
    write_tensors(tmp_path / "m.safetensors", {"w": np.ones((4, 4), np.float32)})
    (tmp_path / "out.rws").write_bytes(b"before")
    before = listing(tmp_path)
    same = tmp_path / "m.safetensors"
    with pytest.raises(SelectionError, match="nothing to extract"):
        extract_to(tmp_path / "out.rws", None, same, same, method="difference")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_weight_is_refused_naming_its_tensor(tmp_path, bad):
    clean = {"v": np.ones(3, np.float32), "w": np.zeros((4, 4), np.float32)}
    robust = {"v": np.ones(3, np.float32), "w": np.zeros((4, 4), np.float32)}
    robust["w"][2, 1] = bad
    with pytest.raises(NonFiniteError, match=r"^w: .*NaN or Inf"):
        extract_to(tmp_path / "o.rws", None, clean, robust, method="difference")
    assert os.listdir(tmp_path) == []


def test_a_difference_that_overflows_is_refused_with_its_index(tmp_path):
    """Finite weights whose float32 difference is Inf are refused, naming the tensor
    (the finite-energy shortcut never lets an Inf through)."""
    clean = {"w": np.zeros((4, 4), np.float32)}
    robust = {"w": np.zeros((4, 4), np.float32)}
    clean["w"][2, 1], robust["w"][2, 1] = -3e38, 3e38
    with pytest.raises(NonFiniteError, match=r"^w: .*NaN or Inf"):
        extract_to(tmp_path / "o.rws", None, clean, robust, method="difference")
    assert os.listdir(tmp_path) == []


def test_a_projection_whose_difference_overflows_says_so(tmp_path):
    """Finite weights whose float32 difference overflows: the error names the tensor and
    says a difference overflowed, not only that the weights hold NaN or Inf (they do not)."""
    pre = {"w": np.zeros((4, 4), np.float32)}
    clean = {"w": np.ones((4, 4), np.float32)}
    robust = {"w": np.ones((4, 4), np.float32)}
    pre["w"][2, 1], robust["w"][2, 1] = -3e38, 3e38
    with pytest.raises(NonFiniteError, match=r"^w: .*differences overflow float32"):
        extract_to(tmp_path / "o.rws", pre, clean, robust, layers="all")
    assert os.listdir(tmp_path) == []


def write_sharded(folder: Path, model: dict[str, np.ndarray], weight_map: dict[str, str]):
    folder.mkdir(exist_ok=True)
    for shard in sorted(set(weight_map.values())):
        part = {k: v for k, v in model.items() if weight_map[k] == shard}
        write_tensors(folder / shard, part, {"format": "pt"})
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder / "model.safetensors.index.json"


def test_a_sharded_source_extracts_what_the_single_file_does(tmp_path):
    pre, clean, robust = trio(4)
    models = [{k: v for k, v in m.items() if v.dtype.kind != "i"} for m in (pre, clean, robust)]
    names = sorted(models[0])
    wmap = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    indexes = [write_sharded(tmp_path / k, m, wmap) for k, m in zip("pcr", models)]
    files = []
    for k, m in zip("pcr", models):
        files.append(tmp_path / f"{k}.safetensors")
        write_tensors(files[-1], m)
    extract_to(tmp_path / "sharded.rws", *indexes, layers="all")
    extract_to(tmp_path / "single.rws", *files, layers="all")
    assert (tmp_path / "sharded.rws").read_bytes() == (tmp_path / "single.rws").read_bytes()


def test_extract_to_never_writes_over_a_checkpoint_it_reads(tmp_path, capsys, monkeypatch):
    """The library refuses by itself (not only its CLI): any of the three checkpoints,
    a shard of a sharded one, a FIFO; the CLI's '-' means no pretrained checkpoint only
    in that place (a checkpoint file named '-' is an input like any other)."""
    pre, clean, robust = trio(4)
    models = [{k: v for k, v in m.items() if v.dtype.kind != "i"} for m in (pre, clean, robust)]
    files = write_trio(tmp_path)
    wmap = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(models[1])}
    index = write_sharded(tmp_path / "c", models[1], wmap)
    os.mkfifo(tmp_path / "fifo")
    before = listing(tmp_path)
    for out, trio_files in (
        (files[0], files),
        (files[2], files),
        (tmp_path / "c" / "model-00002-of-00002.safetensors", [files[0], index, files[2]]),
        (tmp_path / "fifo", files),
    ):
        with pytest.raises(InvalidArgumentError):
            extract_to(out, *trio_files, layers="all")
    assert listing(tmp_path) == before
    os.link(files[1], tmp_path / "-")
    monkeypatch.chdir(tmp_path)
    argv = ["extract", "pre.safetensors", "-", "robust.safetensors", "-o", "-", "--overwrite"]
    assert main(argv) == 1 and "is the input" in capsys.readouterr().err
    assert (tmp_path / "-").read_bytes() == files[1].read_bytes()


def test_a_hostile_index_naming_a_file_outside_its_folder_is_refused(tmp_path, capsys):
    """A shard name with ``..`` is refused, though the file it names exists and would
    be read otherwise."""
    model = {"w": np.ones((4, 4), np.float32)}
    write_tensors(tmp_path / "outside.safetensors", model)
    (tmp_path / "ckpt").mkdir()
    index = {"weight_map": {"w": "../outside.safetensors"}}
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(json.dumps(index))
    write_tensors(tmp_path / "robust.safetensors", {"w": np.full((4, 4), 2, np.float32)})
    before = listing(tmp_path)
    hostile = tmp_path / "ckpt" / "model.safetensors.index.json"
    with pytest.raises(FormatError, match="is not a file name in its folder"):
        extract_to(
            tmp_path / "o.rws", None, hostile, tmp_path / "robust.safetensors", method="difference"
        )
    argv = ["extract", "-", str(hostile), str(tmp_path / "robust.safetensors")]
    assert main([*argv, "-o", str(tmp_path / "o.rws"), "--method", "difference"]) != 0
    assert "robustpatch: error:" in capsys.readouterr().err
    assert listing(tmp_path) == before


CHILD = r"""
from robustpatch.extraction import extract_to

if op == "extract":
    extract_to(args["out"], None, args["clean"], args["robust"], method="difference",
               layers="all")
"""


def write_bf16_model(path: Path, n: int, shape: tuple[int, int], seed: int) -> None:
    """``n`` BF16 tensors of ``shape``, written a tensor at a time."""
    rng = np.random.default_rng(seed)
    size = 2 * shape[0] * shape[1]
    infos = [TensorInfo(f"l{i}.weight", "BF16", shape, i * size, (i + 1) * size) for i in range(n)]
    with open(path, "wb") as f:
        f.write(encode_header(infos, {}))
        for _ in infos:
            f.write(bf16_from_f32(rng.standard_normal(shape, dtype=np.float32)).tobytes())


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_a_full_task_vector_is_extracted_near_a_few_tensors(tmp_path):
    """32 BF16 tensors of 2 MiB each side: the float32 task vector is 128 MiB (random
    differences are not exact in bf16). Held whole, with the pages of both inputs, the
    process grows by more than the signature; streamed, by far less."""
    shape, n = (1024, 1024), 32
    write_bf16_model(tmp_path / "c.safetensors", n, shape, 0)
    write_bf16_model(tmp_path / "r.safetensors", n, shape, 1)
    base = child_peak_mib(CHILD, "baseline")
    out = tmp_path / "tv.rws"
    clean, robust = str(tmp_path / "c.safetensors"), str(tmp_path / "r.safetensors")
    grew = child_peak_mib(CHILD, "extract", clean=clean, robust=robust, out=str(out))
    sig_mib = out.stat().st_size / MIB
    assert sig_mib > 127
    assert grew - base < 0.5 * sig_mib, (grew, base)


def test_huge_weights_do_not_make_a_changed_signature_look_zero(tmp_path):
    """‖robust‖² of weights near 1e25 overflows a float32 dot; the reference the
    near-zero warning compares against must stay finite (else every signature warns)."""
    clean = {"w": np.zeros((64, 64), np.float32)}
    robust = {"w": np.full((64, 64), 1e25, np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = extract_to(tmp_path / "o.rws", None, clean, robust, method="difference")
    assert got.entries == 1


def test_a_file_tensor_two_entries_need_is_refused_as_the_signature_refuses_it(tmp_path):
    """BatchNorm statistics ``bn.running_mean`` are stored as ``bn.running_mean.replace``,
    a name the model also uses for a weight: refused, nothing written."""
    clean = {
        "bn.running_mean": np.zeros(4, np.float32),
        "bn.running_mean.replace": np.zeros(4, np.float32),
    }
    robust = {k: v + np.float32(1) for k, v in clean.items()}
    with pytest.raises(InvalidArgumentError, match="both need the file tensor"):
        extract(None, clean, robust, method="difference")
    with pytest.raises(InvalidArgumentError, match="both need the file tensor"):
        extract_to(tmp_path / "o.rws", None, clean, robust, method="difference")
    assert os.listdir(tmp_path) == []


def test_prefetched_items_come_in_order_and_an_error_drawing_one_reaches_the_caller():
    from robustpatch._io.prefetch import prefetched

    def items():
        yield from range(3)
        raise NonFiniteError("item 3")

    got = []
    with pytest.raises(NonFiniteError, match="item 3"):
        with prefetched(items(), "t") as it:
            got.extend(it)
    assert got == [0, 1, 2]


def test_leaving_prefetched_early_stops_its_thread_within_the_items_ahead():
    import threading

    from robustpatch._io.prefetch import prefetched

    drawn = []

    def items():
        for i in range(1000):
            drawn.append(i)
            yield i

    with pytest.raises(RuntimeError):
        with prefetched(items(), "rp-test-prefetch", ahead=2) as it:
            for i in it:
                if i == 5:
                    raise RuntimeError("the caller fails")
    # Items 0-5 taken, at most 2 waiting and 1 being drawn: the thread did not run on.
    assert len(drawn) <= 6 + 2 + 1
    assert not any(t.name == "rp-test-prefetch" for t in threading.enumerate())


def test_an_error_while_writing_stops_the_computation_and_leaves_no_file(tmp_path, monkeypatch):
    from robustpatch.signature import writer

    pre, clean, robust = write_trio(tmp_path)
    before = listing(tmp_path)
    calls = []

    def full_disk(self, *a, **k):
        calls.append(1)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer.SignatureWriter, "_write_tensor", full_disk)
    with pytest.raises(OSError, match="No space"):
        extract_to(tmp_path / "s.rws", pre, clean, robust, layers="all", method="difference")
    assert calls == [1] and listing(tmp_path) == before


def test_float64_checkpoints_are_projected_in_float64():
    # rounded to float32 first: a change below float32's step at the weight's size was
    # lost and the tensor reported "unchanged"; 1e300 was read as Inf
    import robustpatch as rp

    rng = np.random.default_rng(0)
    p = {"a.w": 1 + rng.normal(size=64) * 1e-3, "b.w": rng.normal(size=64)}
    c = {k: v + rng.normal(size=64) * 1e-9 for k, v in p.items()}
    r = {k: v + rng.normal(size=64) * 1e-9 for k, v in p.items()}
    sig = rp.extract(p, c, r, layers="all")
    for k in p:
        dr, d = r[k] - p[k], c[k] - p[k]
        want = (dr - (dr @ d) / (d @ d) * d).astype(np.float32)
        np.testing.assert_allclose(sig[k].dense(), want, rtol=1e-6, atol=1e-16)
    with pytest.warns(rp.errors.ZeroSignatureWarning):  # a 1e-9 change: near zero, kept
        diff = rp.extract(None, c, r, layers="all", method="difference")
    for k in p:
        np.testing.assert_allclose(diff[k].dense(), (r[k] - c[k]).astype(np.float32), rtol=1e-6)
    huge = {"a.w": np.array([1e300, 1.0])}
    with pytest.raises(rp.errors.NonFiniteError, match="a.w: float64 weights .* float32 range"):
        rp.extract({"a.w": np.zeros(2)}, {"a.w": np.ones(2)}, huge, layers="all")


def test_a_float64_checkpoints_signature_patches_its_float32_cast():
    # its entries targeted F64, which nothing patches: refused even with allow_dtype_change
    import robustpatch as rp

    rng = np.random.default_rng(0)
    p = {"a.w": rng.normal(size=(8, 8))}
    c = {k: v + rng.normal(size=v.shape) * 1e-2 for k, v in p.items()}
    r = {k: v + rng.normal(size=v.shape) * 1e-2 for k, v in c.items()}
    sig = rp.extract(p, c, r, layers="all")
    assert [e.dtype for e in sig] == ["F32"]
    model = {k: v.astype(np.float32) for k, v in c.items()}
    before = model["a.w"].copy()
    undo = rp.apply(model, sig)
    rp.remove(model, undo)
    assert model["a.w"].tobytes() == before.tobytes()


def test_a_pretrained_tensor_held_as_int_is_refused_not_taken_for_a_new_head():
    # a file source refused it; a numpy dict or torch model skipped it silently
    import robustpatch as rp

    p = {"a.w": np.zeros(2, np.int32), "b.w": np.zeros(2, np.float32)}
    c = {"a.w": np.ones(2, np.float32), "b.w": np.ones(2, np.float32)}
    r = {"a.w": np.full(2, 2, np.float32), "b.w": np.array([2, 1], np.float32)}
    with pytest.raises(
        rp.errors.MismatchError, match="a.w: the pretrained model holds it as int32"
    ):
        rp.extract(p, c, r, layers="all")
