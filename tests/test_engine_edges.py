"""The engine's edges: errors mapped in one place (I/O errors keep their kind, values out of
range are InvalidArgumentError, inputs that do not fit are MismatchError), integers taken
wide and range-checked in the engine, and the CLI's one-line refusals of the same values."""

from __future__ import annotations

import copy
import errno
import json
import pickle

import numpy as np
import pytest

import robustpatch as rp
from robustpatch import _core
from robustpatch.errors import InvalidArgumentError, MismatchError
from rp_testutil import trio, usage_error

F32_MAX = float(np.finfo(np.float32).max)

X8 = np.arange(8, dtype=np.float32)


# ---------------------------------------------------------------------------- wide integers


@pytest.mark.parametrize("bits", [300, -1, 0, 9, 1 << 40, -(1 << 62)])
def test_engine_quantize_refuses_bits_out_of_range_as_invalid_argument(bits):
    with pytest.raises(InvalidArgumentError, match=f"bits must be in 1..=8, got {bits}$"):
        _core.quantize(X8, bits, "affine", 8)


@pytest.mark.parametrize("group", [0, -1, -(1 << 40)])
def test_engine_quantize_refuses_a_group_below_one(group):
    with pytest.raises(InvalidArgumentError, match=f"group length must be ≥ 1, got {group}$"):
        _core.quantize(X8, 4, "affine", group)


@pytest.mark.parametrize(
    "call",
    [
        lambda: _core.pack(np.zeros(8, np.uint8), 300),
        lambda: _core.unpack(np.zeros(1, np.uint8), -1, 8),
        lambda: _core.QuantTensor(
            np.zeros(4, np.uint8),
            np.ones(1, np.float32),
            np.zeros(1, np.float32),
            256,
            "affine",
            8,
            8,
        ),
    ],
    ids=["pack", "unpack", "QuantTensor"],
)
def test_every_bits_argument_is_range_checked(call):
    with pytest.raises(InvalidArgumentError, match="bits must be in 1..=8"):
        call()


@pytest.mark.parametrize("big", [1 << 64, -(1 << 63) - 1, 1 << 200])
@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("bits", lambda v: _core.quantize(X8, v, "affine", 8)),
        ("group_len", lambda v: _core.quantize(X8, 4, "affine", v)),
        ("bits", lambda v: _core.pack(np.zeros(8, np.uint8), v)),
        ("n", lambda v: _core.unpack(np.zeros(1, np.uint8), 1, v)),
        ("stop", lambda v: _core.dequantize(_core.quantize(X8, 4, "affine", 8), 0, v)),
        ("itemsize", lambda v: _core.tensor_digest(np.zeros(8, np.uint8), v)),
        ("file_len", lambda v: _core.parse_header(b"\0" * 16, v)),
    ],
)
def test_an_int_past_64_bits_is_refused_by_name(name, call, big):
    # it was a bare OverflowError ("Python int too large to convert to C long")
    with pytest.raises(InvalidArgumentError, match=f"{name} must (fit in 64 bits|be ≥ 0)"):
        call(big)


def test_a_bool_is_not_taken_for_an_int():
    # bits=True gave 1-bit codes
    for flag in (True, np.bool_(True)):
        with pytest.raises(TypeError, match="bits must be an int, got bool"):
            _core.quantize(X8, flag, "affine", 8)
    assert _core.quantize(X8, np.int64(4), "affine", np.int32(8)).bits == 4  # numpy ints are
    with pytest.raises(TypeError, match="numel must be an int, got bool"):
        _core.QuantTensor(
            np.zeros(1, np.uint8),
            np.ones(1, np.float32),
            np.zeros(1, np.float32),
            1,
            "affine",
            1,
            True,
        )


def test_fortran_ordered_arrays_are_refused_not_read_transposed():
    # numpy's as_slice took Fortran order: apply added the transpose, dot paired wrong
    a = np.arange(16, dtype=np.float32).reshape(4, 4)
    f = np.asfortranarray(a)
    target = np.zeros((4, 4), np.float32)
    p = np.zeros((4, 4), np.float32)
    calls = [
        lambda: _core.apply(target, [f], [1.0], record=False),
        lambda: _core.apply(np.asfortranarray(target), [a], [1.0], record=False),
        lambda: _core.quantize(f, 8, "affine", 16),
        lambda: _core.dot(a, f),
        lambda: _core.project(p, f, 2 * a),
        lambda: _core.project(p, a, 2 * a, out=np.asfortranarray(np.zeros((4, 4), np.float32))),
        lambda: _core.tensor_digest(np.asfortranarray(np.zeros((4, 4), np.uint8)), 1),
    ]
    for call in calls:
        with pytest.raises(InvalidArgumentError, match="not C-contiguous"):
            call()
    assert not target.any()


def test_remove_refuses_a_non_finite_dense_delta_before_touching_the_target():
    # only apply checked: a NaN delta filled the target with NaN and returned normally
    y = np.ones(8, np.float32)
    with pytest.raises(rp.errors.NonFiniteError, match="delta 0 holds NaN or Inf"):
        _core.remove(y, [np.full(8, np.nan, np.float32)], [1.0])
    assert (y == 1).all()


@pytest.mark.parametrize("scheme", ["affine", "symmetric", "log", "tanh"])
def test_a_quant_tensor_whose_codes_decode_past_float32_is_refused_when_built(scheme):
    # quantize refused such a range, the constructor (and unpickling) took it: Inf decodes
    big = np.array([3e38], np.float32)
    with pytest.raises(InvalidArgumentError, match="group 0 .* decodes past the float32 range"):
        _core.QuantTensor(np.full(8, 255, np.uint8), big, big, 4, scheme, 16, 16)
    q = _core.quantize(np.linspace(-1, 1, 16, dtype=np.float32), 4, scheme, 16)
    assert np.isfinite(_core.dequantize(q)).all()  # a range the quantizer makes is fine


def test_a_negative_count_is_refused_not_wrapped():
    with pytest.raises(InvalidArgumentError, match="n must be ≥ 0, got -8"):
        _core.unpack(np.zeros(1, np.uint8), 1, -8)


@pytest.mark.parametrize(
    ("flag", "value", "text"),
    [
        ("--bits", 300, "argument --bits: expected bits from 1 to 8 (an integer), got 300"),
        ("--bits", -1, "argument --bits: expected bits from 1 to 8 (an integer), got -1"),
        ("--group", 0, "argument --group: expected a positive integer group size, got 0"),
    ],
)
def test_cli_quantize_refuses_bad_bits_and_group_in_one_line(capsys, tmp_path, flag, value, text):
    line = usage_error(
        capsys, "quantize", tmp_path / "in.rws", "-o", tmp_path / "out.rws", flag, value
    )
    assert line == f"robustpatch quantize: error: {text}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [({"bits": 300}, "bits"), ({"bits": -1}, "bits"), ({"group": 0}, "group")],
)
def test_api_quantize_refuses_bad_bits_and_group(kwargs, text):
    sig = rp.extract(*trio(0), layers="all")
    with pytest.raises(InvalidArgumentError, match=text):
        sig.quantize(**kwargs)


# ---------------------------------------------------------------------------- error mapping


def test_a_missing_file_is_file_not_found_from_the_engine(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError) as e:
        _core.read_header(str(missing))
    assert (e.value.errno, e.value.filename) == (errno.ENOENT, str(missing))
    assert str(e.value) == f"[Errno 2] No such file or directory: '{missing}'"


def test_a_folder_keeps_its_os_error_kind(tmp_path):
    with pytest.raises(IsADirectoryError) as e:
        _core.read_header(str(tmp_path))
    assert e.value.errno == errno.EISDIR and e.value.filename == str(tmp_path)


def test_a_missing_model_is_file_not_found_through_the_api(tmp_path):
    sig = rp.extract(*trio(0), layers="all")
    with pytest.raises(FileNotFoundError):
        rp.apply_file(tmp_path / "missing.safetensors", [sig], 1.0, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_inputs_that_do_not_fit_are_a_mismatch_error():
    with pytest.raises(MismatchError, match="elements"):
        _core.apply(np.zeros(4, np.float32), [np.zeros(5, np.float32)], [1.0])
    with pytest.raises(MismatchError, match="2 alphas"):
        _core.apply(np.zeros(4, np.float32), [np.zeros(4, np.float32)], [1.0, 2.0])


def test_a_bad_container_is_a_format_error_and_a_wrong_dtype_a_type_error():
    with pytest.raises(rp.errors.FormatError, match="too short"):
        _core.parse_header(b"\x01", 1)
    with pytest.raises(TypeError, match="float64"):
        _core.quantize(np.zeros(8), 4, "affine", 8)


# ---------------------------------------------------------------------------- QuantTensor


def _parts(q: _core.QuantTensor) -> tuple:
    return (q.codes.copy(), q.scale.copy(), q.offset.copy(), q.bits, q.scheme, q.group_len, q.numel)


def test_quantize_gives_a_quant_tensor_with_its_spec():
    q = _core.quantize(np.arange(256, dtype=np.float32), 4, "Symmetric", 64)
    assert isinstance(q, _core.QuantTensor)
    assert (q.bits, q.scheme, q.group_len, q.numel) == (4, "symmetric", 64, 256)
    assert (q.codes.shape, q.scale.shape, q.offset.shape, q.nbytes) == ((128,), (4,), (4,), 160)


def test_a_quant_tensor_cannot_be_changed_after_validation():
    q = _core.quantize(np.arange(64, dtype=np.float32), 4, "affine", 16)
    for arr in (q.codes, q.scale, q.offset):
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = 1
        with pytest.raises(ValueError):
            arr.flags.writeable = True
    with pytest.raises(AttributeError):
        q.bits = 8


def test_a_quant_tensor_is_validated_when_built():
    q = _core.quantize(np.arange(64, dtype=np.float32), 4, "affine", 16)
    codes, scale, offset, *spec = _parts(q)
    scale[2] = np.nan
    with pytest.raises(rp.errors.NonFiniteError, match="group 2"):
        _core.QuantTensor(codes, scale, offset, *spec)
    with pytest.raises(MismatchError, match="bytes"):
        _core.QuantTensor(codes[:-1], q.scale, offset, *spec)
    with pytest.raises(MismatchError, match="scales"):
        _core.QuantTensor(codes, q.scale[:-1], offset, *spec)


def test_a_rebuilt_quant_tensor_owns_a_copy_of_its_parts():
    q = _core.quantize(np.arange(64, dtype=np.float32), 4, "affine", 16)
    parts = _parts(q)
    again = _core.QuantTensor(*parts)
    parts[1][:] = np.nan
    np.testing.assert_array_equal(_core.dequantize(again), _core.dequantize(q))


def test_the_engine_takes_quant_tensors_not_tuples():
    q = _core.quantize(np.ones(64, np.float32), 4, "affine", 16)
    target = np.zeros(64, np.float32)
    _core.apply(target, [q], [2.0], record=False)
    np.testing.assert_allclose(target, 2.0 * _core.dequantize(q))
    assert _core.dot(q, q) == pytest.approx(float(_core.dequantize(q) @ _core.dequantize(q)))
    with pytest.raises(TypeError, match="tuple"):
        _core.apply(target, [_parts(q)], [1.0])


@pytest.mark.parametrize(("start", "stop"), [(0, 64), (16, 48), (32, 64), (48, 100), (0, 100)])
def test_dequantize_a_range_matches_the_whole(start, stop):
    x = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    q = _core.quantize(x[:100], 3, "affine", 4)
    whole = _core.dequantize(q)
    assert _core.dequantize(q, start, stop).tobytes() == whole[start:stop].tobytes()


@pytest.mark.parametrize(("start", "stop"), [(4, 12), (8, 6), (0, 101), (8, 14), (-8, 8)])
def test_dequantize_refuses_a_range_off_groups_or_bytes(start, stop):
    q = _core.quantize(np.zeros(100, np.float32), 3, "affine", 4)
    with pytest.raises(InvalidArgumentError):
        _core.dequantize(q, start, stop)


def test_signature_entries_hold_the_validated_tensor(tmp_path):
    sig = rp.extract(*trio(0), layers="all").quantize(4)
    sig.save(tmp_path / "s.rws")
    for s in (sig, rp.Signature.load(tmp_path / "s.rws")):
        for e in s.deltas.values():
            assert isinstance(e.quant.tensor, _core.QuantTensor)
            assert e.delta() is e.quant.tensor


def test_a_quant_tensor_pickles_by_value_and_is_validated_when_unpickled():
    q = _core.quantize(np.arange(64, dtype=np.float32), 4, "log", 16)
    back = pickle.loads(pickle.dumps(q))
    assert (back.bits, back.scheme, back.group_len, back.numel) == (4, "log", 16, 64)
    assert _core.dequantize(back).tobytes() == _core.dequantize(q).tobytes()
    cls, parts = q.__reduce__()
    bad = (parts[0], np.full(4, np.nan, np.float32), *parts[2:])
    with pytest.raises(rp.errors.NonFiniteError):
        pickle.loads(pickle.dumps(_Reduced(cls, bad)))


class _Reduced:
    """Pickles as ``cls(*parts)``: a QuantTensor pickle whose parts were tampered with."""

    def __init__(self, cls, parts):
        self.cls, self.parts = cls, parts

    def __reduce__(self):
        return self.cls, self.parts


def test_a_quantized_signature_copies_and_pickles():
    sig = rp.extract(*trio(0), layers="all").quantize(4)
    for other in (copy.deepcopy(sig), pickle.loads(pickle.dumps(sig))):
        assert other.content_hash == sig.content_hash
    e = next(iter(sig.deltas.values()))
    assert copy.copy(e.quant.tensor) is e.quant.tensor is copy.deepcopy(e.quant.tensor)


# ---------------------------------------------------------------------------- hashes


def test_blake3_matches_the_reference_vectors_however_fed():
    assert _core.Blake3().hexdigest() == (
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    )
    h = _core.Blake3()
    h.update(b"ab")
    h.update(np.frombuffer(b"c", np.uint8))
    assert h.hexdigest() == "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
    big = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8)
    whole, parts = _core.Blake3(), _core.Blake3()
    whole.update(big)
    for k in range(0, big.size, 1 << 19):
        parts.update(big[k : k + (1 << 19)].tobytes())
    assert whole.hexdigest() == parts.hexdigest()


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 4095, 1 << 20])
def test_the_engine_crc32_is_zlibs(n):
    import zlib

    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    assert _core.crc32(data) == zlib.crc32(data.tobytes()) == _core.crc32(data.tobytes())


def test_blake3_refuses_other_dtypes_and_strided_arrays():
    with pytest.raises(TypeError):
        _core.Blake3().update(np.zeros(4, np.float32))
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        _core.Blake3().update(np.zeros(8, np.uint8)[::2])


def _fingerprint_by_definition(pre: dict, names) -> str:
    """The base fingerprint as README defines it, by the reference XXH3 (PyPI xxhash)."""
    import xxhash  # a test dependency: the reference implementation of XXH3

    lines = []
    for n in sorted(names):
        t = np.ascontiguousarray(pre[n])
        raw = t.reshape(-1).view(np.uint8).tobytes()
        block = 4096 * t.itemsize
        blocks = b"".join(
            xxhash.xxh3_128_intdigest(raw[i : i + block]).to_bytes(16, "little")
            for i in range(0, len(raw), block)
        )
        digest = xxhash.xxh3_128_intdigest(blocks).to_bytes(16, "little").hex()
        dtype = {"float32": "F32", "float16": "F16", "float64": "F64"}[t.dtype.name]
        lines.append(json.dumps([n, list(t.shape), dtype, digest]) + "\n")
    whole = _core.Blake3()
    whole.update("".join(lines).encode())
    return "tensors-xxh3-128:" + whole.hexdigest()


def test_the_base_fingerprint_follows_its_definition_and_sees_one_changed_weight():
    pre, clean, robust = trio(0)
    # Large enough for several hash blocks on the engine's parallel path, odd-sized so
    # the last block is partial; a float16 tensor; a float64 one (projected in float32,
    # fingerprinted as stored).
    rng = np.random.default_rng(1)
    pre["big.weight"] = rng.normal(0, 1, 300_007).astype(np.float32)
    pre["half.weight"] = rng.normal(0, 1, 9_001).astype(np.float16)
    pre["wide.weight"] = rng.normal(0, 1, 5_000).astype(np.float64)
    for m, scale in ((clean, 0.01), (robust, 0.02)):
        for k in ("big.weight", "half.weight", "wide.weight"):
            m[k] = (pre[k] + rng.normal(0, scale, pre[k].shape)).astype(pre[k].dtype)
    sig = rp.extract(pre, clean, robust, layers="all")
    # BatchNorm statistics are replacements (not projected): hashed on their own.
    assert {"big.weight", "half.weight", "wide.weight", "bn1.running_mean"} <= {e.name for e in sig}
    assert sig.base_fingerprint == _fingerprint_by_definition(pre, [e.name for e in sig])
    pre["big.weight"][300_000] = np.nextafter(pre["big.weight"][300_000], np.float32(9))
    assert rp.extract(pre, clean, robust, layers="all").base_fingerprint != sig.base_fingerprint


def _compactable_signature() -> rp.Signature:
    """Dense deltas of each stored form (BF16- and F16-exact, and F32) and a quantized one."""
    rng = np.random.default_rng(3)
    deltas = {
        "bf.weight": (rng.integers(-64, 64, (300, 70)) / 8).astype(np.float32),
        "h.weight": (rng.integers(-999, 999, 5000) / 1024).astype(np.float32),
        "f.weight": rng.normal(0, 1e-3, (40, 50)).astype(np.float32),
    }
    dense = rp.Signature.from_deltas(deltas)
    quant = rp.Signature.from_deltas({"q.weight": rng.normal(0, 1, 4096).astype(np.float32)})
    return rp.Signature([*dense, *quant.quantize(4)], name="mixed")


def _tensors_hash_by_definition(path) -> str:
    """The ``tensors-blake3`` definition, from the file's raw bytes: BLAKE3 over the
    sorted-key JSON of the entry specs, then per tensor in name order the JSON line
    [name, safetensors label, shape, BLAKE3 hex of its stored bytes]."""
    from robustpatch._format.safetensors import read_header

    header = read_header(path)
    raw = open(path, "rb").read()
    meta = json.loads(header.metadata["robustpatch"])
    h = _core.Blake3()
    h.update(json.dumps(meta["entries"], sort_keys=True).encode())
    for t in sorted(header.tensors, key=lambda t: t.name):
        one = _core.Blake3()
        one.update(raw[header.data_start + t.begin : header.data_start + t.end])
        h.update(json.dumps([t.name, t.dtype, list(t.shape), one.hexdigest()]).encode())
    return "tensors-blake3:" + h.hexdigest()


def test_new_signatures_hash_their_tensors_as_stored(tmp_path):
    from robustpatch._format.safetensors import read_header
    from robustpatch.signature.streamed import open_signature
    from robustpatch.signature.writer import SignatureWriter

    sig = _compactable_signature()
    sig.save(tmp_path / "s.rws")
    stored = {t.name: t.dtype for t in read_header(tmp_path / "s.rws").tensors}
    assert stored["bf.weight"] == "BF16" and stored["h.weight"] == "F16"
    assert stored["f.weight"] == "F32" and stored["q.weight.codes"] == "U8"
    want = _tensors_hash_by_definition(tmp_path / "s.rws")
    assert sig.content_hash == want
    assert rp.Signature.load(tmp_path / "s.rws").content_hash == want
    streamed = open_signature(tmp_path / "s.rws")
    assert streamed.content_hash == want
    # Its values are the file's narrow views: hashed and saved again as the same file.
    assert rp.Signature.content_hash.fget(streamed) == want
    streamed.save(tmp_path / "again.rws")
    assert (tmp_path / "again.rws").read_bytes() == (tmp_path / "s.rws").read_bytes()
    # The entry-by-entry writer (digests taken as it writes) stores the same hash.
    with SignatureWriter(tmp_path / "w.rws", expected_entries=4) as w:
        for e in sig:
            w.add(e)
        w.commit(sig.name, sig.meta)
    assert _tensors_hash_by_definition(tmp_path / "w.rws") == want
    assert rp.Signature.load(tmp_path / "w.rws").content_hash == want


def test_a_blake3_v1_signature_still_verifies_loaded_and_streamed(tmp_path):
    """Files written before carry ``blake3:`` over one stream of the tensors with dense
    deltas as float32 values (here BF16 and F16 stored): they load, stream and keep it."""
    from robustpatch._format.safetensors import read_tensors, write_tensors
    from robustpatch.signature import content_hash
    from robustpatch.signature.streamed import open_signature

    sig = _compactable_signature()
    sig.save(tmp_path / "s.rws")
    header, tensors = read_tensors(tmp_path / "s.rws")
    meta = json.loads(header.metadata["robustpatch"])
    meta["content_hash"] = content_hash(meta["entries"], sig.file_tensors(), "blake3")
    write_tensors(tmp_path / "old.rws", tensors, {"robustpatch": json.dumps(meta)})
    old = rp.Signature.load(tmp_path / "old.rws")
    assert old.content_hash == meta["content_hash"] and old.content_hash.startswith("blake3:")
    streamed = open_signature(tmp_path / "old.rws")
    assert streamed.content_hash == meta["content_hash"]
    tensors["bf.weight"] = tensors["bf.weight"].copy()
    tensors["bf.weight"].reshape(-1)[7] ^= 1
    write_tensors(tmp_path / "bad.rws", tensors, {"robustpatch": json.dumps(meta)})
    with pytest.raises(rp.errors.FormatError, match="content hash mismatch"):
        rp.Signature.load(tmp_path / "bad.rws")
    with pytest.raises(rp.errors.FormatError, match="content hash mismatch"):
        open_signature(tmp_path / "bad.rws")


def test_a_sha256_signature_still_verifies_and_keeps_its_hash(tmp_path):
    from robustpatch._format.safetensors import read_tensors, write_tensors
    from robustpatch.signature import content_hash

    sig = rp.extract(*trio(0), layers="all").quantize(4)
    sig.save(tmp_path / "s.rws")
    header, tensors = read_tensors(tmp_path / "s.rws")
    meta = json.loads(header.metadata["robustpatch"])
    meta["content_hash"] = content_hash(meta["entries"], tensors, "sha256")
    write_tensors(tmp_path / "old.rws", tensors, {"robustpatch": json.dumps(meta)})
    old = rp.Signature.load(tmp_path / "old.rws")
    assert old.content_hash == meta["content_hash"] and old.content_hash.startswith("sha256:")
    assert (0.5 * old).content_hash == old.content_hash
    meta["content_hash"] = "sha256:" + "0" * 64
    write_tensors(tmp_path / "bad.rws", tensors, {"robustpatch": json.dumps(meta)})
    with pytest.raises(rp.errors.FormatError, match="content hash mismatch"):
        rp.Signature.load(tmp_path / "bad.rws")


@pytest.mark.parametrize(
    ("values", "bits"),
    [
        ([F32_MAX, -1.1e31, F32_MAX / 2, 0.0], 4),  # x − lo overflowed: the max got code 0
        ([F32_MAX, 0.1 * F32_MAX], 2),  # level·scale + offset decoded to Inf
    ],
)
def test_an_affine_group_past_the_float32_range_is_refused_not_decoded_wrong(values, bits):
    from robustpatch.signature import Signature

    sig = Signature.from_deltas({"w": np.array(values, np.float32)})
    with pytest.raises(InvalidArgumentError, match="too wide to decode in f32"):
        sig.quantize(bits=bits, scheme="affine", granularity="tensor")


def test_a_tensor_named_like_the_metadata_key_is_never_written(tmp_path):
    # saved, but every reader refused the file: a duplicate "__metadata__" key
    from robustpatch._format.safetensors import write_tensors

    sig = rp.Signature.from_deltas({"__metadata__": np.ones(4, np.float32)}, name="s")
    for write in (
        lambda: sig.save(tmp_path / "s.rws"),
        lambda: write_tensors(tmp_path / "m.safetensors", {"__metadata__": X8}),
    ):
        with pytest.raises(InvalidArgumentError, match="cannot be named '__metadata__'"):
            write()
    assert list(tmp_path.iterdir()) == []


def test_an_alpha_past_float32_is_named_as_given():
    # 1e39 arrived as float32 inf and was reported as "alpha 0 is inf"
    with pytest.raises(rp.errors.NonFiniteError, match="alpha 1 = 1e[+]?39 is past the float32"):
        _core.apply(np.ones(8, np.float32), [X8, X8], [1.0, 1e39])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: _core.pack(np.zeros(8, np.int64), 4), "codes: expected .* uint8, got .*int64"),
        (lambda: _core.crc32(bytearray(b"abc")), "data: expected .* uint8 \\(or bytes\\)"),
        (lambda: _core.compact([1.0]), "values: expected .* float32, got .*list"),
        (
            lambda: _core.QuantTensor(
                np.zeros(4, np.uint8), np.ones(1), np.zeros(1, np.float32), 4, "affine", 8, 8
            ),
            "scale: expected .* float32, got .*float64",
        ),
    ],
)
def test_an_array_of_the_wrong_dtype_is_named_with_the_dtype_it_needs(call, message):
    # "'ndarray' object cannot be converted to 'PyArray<T, D>'" named no dtype
    with pytest.raises(TypeError, match=message):
        call()


def test_positions_that_alias_the_target_are_named():
    # the refusal blamed the target ("array is read-only")
    y = X8.copy()
    with pytest.raises(InvalidArgumentError, match="positions: shares memory"):
        _core.remove(y, [X8], [0.5], y.view(np.uint32), X8.view(np.uint32).copy())
