"""Signatures in memory: extraction, quantization, the file format, algebra, and
apply/remove on dicts of numpy arrays."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import robustpatch as rp
from robustpatch._format.safetensors import read_tensors, write_tensors
from robustpatch.cli import main
from robustpatch.dtypes import narrow, widen
from robustpatch.errors import (
    FormatError,
    InvalidArgumentError,
    MismatchError,
    NonFiniteError,
    SelectionError,
)
from robustpatch.extraction import extract, extract_to
from robustpatch.signature import (
    Signature,
    combine,
    content_hash,
    detect,
    group_len_for,
    similarity,
)
from robustpatch.targets import apply, remove, subtract
from rp_testutil import copy_model, same_bits, trio

PROPS = settings(max_examples=40, deadline=None)


@pytest.fixture(scope="module")
def models():
    return trio(0)


@pytest.fixture(scope="module")
def sig(models):
    return extract(*models, layers="all", name="fog", provenance={"corruption": "fog"})


def _projection(pre, clean, robust):
    dr = robust.astype(np.float64) - pre
    d = clean.astype(np.float64) - pre
    return dr - (dr.ravel() @ d.ravel()) / (d.ravel() @ d.ravel()) * d


# ---------------------------------------------------------------------------- extract


def test_projection_signature_matches_numpy_and_bn_is_replacement(models, sig):
    pre, clean, robust = models
    assert "bn1.num_batches_tracked" not in sig
    for name in ("conv1.weight", "conv2.weight", "fc.weight", "bn1.weight"):
        e = sig[name]
        assert e.kind == "delta" and e.dtype == "F32" and e.shape == pre[name].shape
        np.testing.assert_allclose(
            e.dense(), _projection(pre[name], clean[name], robust[name]), atol=1e-6
        )
        assert e.stats["energy"] == pytest.approx(float(np.sum(e.dense() ** 2)), rel=1e-4)
    for name in ("bn1.running_mean", "bn1.running_var"):
        assert sig[name].kind == "bn"
        np.testing.assert_array_equal(sig[name].values, robust[name])
    assert sig.meta["method"] == "projection"
    assert sig.meta["layers"]["mode"] == "all"
    assert sig.meta["provenance"] == {"corruption": "fog"}
    assert sig.base_fingerprint.startswith("tensors-xxh3-128:")


def test_difference_method_is_robust_minus_clean(models):
    _, clean, robust = models
    s = extract(None, clean, robust, layers="all", method="difference")
    np.testing.assert_array_equal(
        s["conv2.weight"].dense(), robust["conv2.weight"] - clean["conv2.weight"]
    )
    assert s.meta["method"] == "difference"


def test_auto_layers_keep_the_shallow_layers_that_hold_the_energy(models):
    s = extract(*models, layers="auto", energy=0.9)
    # robust differs from clean mostly in conv1/bn1: one unit (conv1 + its BatchNorm).
    assert set(s.entries) == {
        "conv1.weight",
        "conv1.bias",
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
    }
    info = s.meta["layers"]
    assert info["mode"] == "auto" and info["units"] == 1 and info["of"] == 3
    assert info["energy_kept"] >= 0.9
    # All the energy would take every layer, but auto stays within a quarter of the
    # parameters (conv1's unit holds 7.5%, conv1 + conv2 79%); a budget of 1 takes all.
    capped = extract(*models, layers="auto", energy=1.0).meta["layers"]
    assert capped["units"] == 1 and capped["param_share"] <= 0.25
    assert extract(*models, param_budget=1.0).meta["layers"]["units"] == 3


def test_layer_count_and_patterns(models):
    two = extract(*models, layers=2)
    assert "conv2.weight" in two and "fc.weight" not in two
    info = two.meta["layers"]
    assert (info["mode"], info["units"], info["of"]) == ("count", 2, 3)
    fc = extract(*models, layers=["fc"])
    assert set(fc.entries) == {"fc.weight", "fc.bias"}
    bn = extract(*models, layers=r"bn\d")
    assert set(bn.entries) == {"bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"}
    with pytest.raises(ValueError, match="match no tensor"):
        extract(*models, layers=["nothing"])


def test_files_give_depth_order_whatever_their_byte_order(models, tmp_path):
    from safetensors.numpy import save_file

    from robustpatch.extraction import open_source

    resnet = {
        k: np.zeros(4 if "bn" in k else (2, 2), np.float32)
        for k in (
            "conv1.weight",
            "bn1.weight",
            "layer1.0.conv1.weight",
            "layer1.0.bn1.weight",
            "layer2.0.conv1.weight",
            "layer10.0.conv1.weight",
            "fc.weight",
        )
    }
    # Natural order of module paths, the head last: the stem's BatchNorm sorts before
    # its conv (a name cannot tell) and joins the first layer.
    depth = [
        "bn1.weight",
        "conv1.weight",
        "layer1.0.bn1.weight",
        "layer1.0.conv1.weight",
        "layer2.0.conv1.weight",
        "layer10.0.conv1.weight",
        "fc.weight",
    ]
    write_tensors(tmp_path / "kept.safetensors", resnet)
    assert open_source(tmp_path / "kept.safetensors").names == depth
    save_file(resnet, tmp_path / "sorted.safetensors")  # sorts by dtype, then name
    assert open_source(tmp_path / "sorted.safetensors").names == depth
    pre, clean, robust = models
    order = list(reversed(list(clean)))
    s = extract(pre, clean, robust, layers=1, order=order)
    assert set(s.entries) == {"fc.weight", "fc.bias"}


def test_extract_refuses_mismatched_checkpoints(models):
    pre, clean, robust = models
    bad = dict(robust, **{"fc.weight": np.zeros((10, 64), np.float32)})
    with pytest.raises(ValueError, match="differ"):
        extract(pre, clean, bad)
    with pytest.raises(ValueError, match="not in the robust"):
        extract(pre, clean, {k: v for k, v in robust.items() if k != "fc.bias"})
    with pytest.raises(MismatchError, match="'fc.bias' is in the robust model but not in the"):
        extract(pre, {k: v for k, v in clean.items() if k != "fc.bias"}, robust)


def test_extract_refuses_a_pretrained_tensor_of_another_dtype_or_shape(models):
    pre, clean, robust = models
    for bad in ({"fc.weight": pre["fc.weight"].astype(np.float16)}, {"fc.bias": np.zeros(3)}):
        with pytest.raises(MismatchError, match="pretrained .* and clean .* differ"):
            extract(dict(pre, **bad), clean, robust, layers="all")
    # one it lacks (a new head) is skipped and listed; a layer left out is not checked
    head = extract({k: v for k, v in pre.items() if k != "fc.weight"}, clean, robust, layers="all")
    assert "fc.weight" in head.meta["skipped"] and "fc.weight" not in head.entries
    half = {k: v.astype(np.float16) if k == "fc.weight" else v for k, v in pre.items()}
    assert "fc.weight" not in extract(half, clean, robust, layers="conv1").entries


# ---------------------------------------------------------------------------- quantization


def test_group_length_rules():
    assert group_len_for((16, 3, 3, 3), "tensor", 128) == 432
    assert group_len_for((16, 3, 3, 3), "channel", 128) == 27
    assert group_len_for((32, 16, 3, 3), "group", 128) == 128
    assert group_len_for((16, 3, 3, 3), "group", 128) == 108  # largest divisor ≤ 128
    assert group_len_for((10,), "group", 128) == 10
    # One element per channel would store two floats per element: one scale instead.
    assert group_len_for((64,), "channel", 128) == 64
    assert group_len_for((8, 1, 1, 1), "channel", 128) == 8


@pytest.mark.parametrize("scheme", ["affine", "symmetric", "log", "tanh"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_quantized_entries_decode_close_to_the_delta(sig, scheme, granularity):
    q = sig.quantize(8, scheme, granularity, 64)
    for name, e in sig.deltas.items():
        d = e.dense()
        err = np.abs(q[name].dense() - d).max()
        assert err <= 0.05 * np.abs(d).max() + 1e-7, (name, err)
    assert q.meta["quantization"]["scheme"] == scheme
    assert q.bn.keys() == sig.bn.keys()  # BN replacements stay float32


def test_four_bit_group_128_file_is_under_015_of_the_f32_delta(tmp_path):
    rng = np.random.default_rng(1)
    deltas = {
        "a.weight": rng.normal(0, 1e-3, (1024, 1024)).astype(np.float32),
        "b.weight": rng.normal(0, 1e-3, (2048, 768)).astype(np.float32),
    }
    q = Signature.from_deltas(deltas).quantize(4, "affine", "group", 128)
    q.save(tmp_path / "q.rws")
    f32_bytes = sum(d.nbytes for d in deltas.values())
    ratio = (tmp_path / "q.rws").stat().st_size / f32_bytes
    assert ratio <= 0.15, ratio
    assert q.delta_ratio == pytest.approx(0.5625 / 4)


# ---------------------------------------------------------------------------- files


def _assert_same_signature(a: Signature, b: Signature) -> None:
    assert a.name == b.name and list(a.entries) == list(b.entries)
    for name in a.entries:
        ea, eb = a[name], b[name]
        assert ea.spec() == eb.spec()
        for k, v in ea.file_tensors().items():
            assert v.tobytes() == eb.file_tensors()[k].tobytes()
    assert a.content_hash == b.content_hash


@pytest.mark.parametrize("bits", [None, 2, 4, 8])
def test_save_load_round_trip_is_identical(sig, tmp_path, bits):
    s = sig if bits is None else sig.quantize(bits, "affine", "group", 64)
    s.meta["effect"] = {"accuracy_before": 0.5, "accuracy_after": 0.8}
    path = s.save(tmp_path / "s.rws")
    loaded = Signature.load(path)
    _assert_same_signature(s, loaded)
    assert loaded.meta["effect"] == s.meta["effect"]
    assert loaded.meta["provenance"] == {"corruption": "fog"}
    assert loaded.base_fingerprint == s.base_fingerprint


def test_signature_files_load_with_the_safetensors_package(sig, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    q = sig.quantize(4)
    q.save(tmp_path / "q.rws")
    tensors = load_file(tmp_path / "q.rws")
    assert tensors.keys() == q.file_tensors().keys()
    for k, v in q.file_tensors().items():
        np.testing.assert_array_equal(tensors[k], v)
    assert tensors["conv1.weight.codes"].dtype == np.uint8
    assert tensors["bn1.running_mean.replace"].dtype == np.float32
    with safe_open(tmp_path / "q.rws", "np") as f:
        meta = json.loads(f.metadata()["robustpatch"])
    assert meta["format_version"] == 1
    entry = {e["name"]: e for e in meta["entries"]}["conv1.weight"]
    assert entry["bits"] == 4 and entry["scheme"] == "affine" and entry["dtype"] == "F32"
    assert entry["granularity"] == "group" and entry["group_len"] == 108
    assert meta["content_hash"] == q.content_hash


def _rewrite(path, edit_meta=None, edit_tensors=None, rehash=False):
    header, tensors = read_tensors(path)
    meta = json.loads(header.metadata["robustpatch"])
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    if rehash:
        meta["content_hash"] = content_hash(meta["entries"], tensors)
    write_tensors(path, tensors, {"robustpatch": json.dumps(meta)}, labels={})


def test_a_modified_file_fails_the_content_hash(sig, tmp_path):
    path = sig.save(tmp_path / "s.rws")

    def flip(t):
        t["conv1.weight"].reshape(-1)[3] += 1e-3

    _rewrite(path, edit_tensors=flip)
    with pytest.raises(FormatError, match="content hash mismatch"):
        Signature.load(path)


def test_an_unknown_format_version_is_refused(sig, tmp_path):
    path = sig.save(tmp_path / "s.rws")
    _rewrite(path, edit_meta=lambda m: m.update(format_version=2))
    with pytest.raises(FormatError, match="version 2 is newer"):
        Signature.load(path)


def test_a_plain_safetensors_file_is_not_a_signature(tmp_path):
    write_tensors(tmp_path / "m.safetensors", {"w": np.zeros(3, np.float32)})
    with pytest.raises(FormatError, match="not a robustpatch signature"):
        Signature.load(tmp_path / "m.safetensors")


def test_nan_in_a_delta_is_refused(sig, tmp_path):
    bad = np.ones((3, 3), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(NonFiniteError, match="w: delta holds NaN or Inf at flat index 5"):
        Signature.from_deltas({"w": bad})
    path = sig.save(tmp_path / "s.rws")

    def poison(t):
        t["conv1.weight"].reshape(-1)[0] = np.nan

    _rewrite(path, edit_tensors=poison, rehash=True)
    with pytest.raises(NonFiniteError, match=r"s\.rws: conv1\.weight"):  # names the file
        Signature.load(path)


def test_nan_in_a_quantized_scale_is_refused(sig, tmp_path):
    path = sig.quantize(4).save(tmp_path / "q.rws")

    def poison(t):
        t["conv2.weight.scale"][0] = np.inf

    _rewrite(path, edit_tensors=poison, rehash=True)
    with pytest.raises(NonFiniteError, match="conv2.weight: scale"):
        Signature.load(path)


# ---------------------------------------------------------------------------- apply / remove


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_remove_restores_a_dict_bit_for_bit(dtype):
    fc = {"F32": np.float32, "F16": np.float16, "BF16": "bf16"}[dtype]
    pre, clean, robust = trio(3, fc_dtype=fc)
    s = extract(pre, clean, robust, layers="all")
    assert s["fc.weight"].dtype == dtype
    model = copy_model(clean)
    undo = apply(model, [s, s.quantize(3, "tanh", "channel")], [0.7, -1.3])
    assert not same_bits(model, clean)
    report = remove(model, undo)
    assert same_bits(model, clean)
    assert report["tensors"] == len(s.deltas) and report["bn_buffers"] == 2


def test_apply_adds_alpha_times_the_delta_rounded_once(models, sig):
    _, clean, _ = models
    model = copy_model(clean)
    apply(model, sig, 0.75)
    for name, e in sig.deltas.items():
        expect = clean[name] + np.float32(0.75) * e.dense()
        np.testing.assert_array_equal(model[name], expect)


def test_bn_statistics_are_blended_toward_the_replacement(models, sig):
    _, clean, robust = models
    for alpha in (1.0, 0.25):
        model = copy_model(clean)
        undo = apply(model, sig, alpha)
        for name in ("bn1.running_mean", "bn1.running_var"):
            expect = (1 - alpha) * clean[name].astype(np.float64) + alpha * robust[name]
            np.testing.assert_allclose(model[name], expect, rtol=1e-6)
        remove(model, undo)
        assert same_bits(model, clean)
    model = copy_model(clean)
    apply(model, sig, -1.0)  # a negative α never extrapolates statistics
    np.testing.assert_array_equal(model["bn1.running_var"], clean["bn1.running_var"])


def test_two_replacements_share_the_blend_and_a_plus_b_matches(models):
    pre, clean, robust = models
    a = extract(pre, clean, robust, layers="all", name="a")
    other = dict(robust, **{"bn1.running_mean": robust["bn1.running_mean"] - 1})
    b = extract(pre, clean, other, layers="all", name="b")
    both, summed = copy_model(clean), copy_model(clean)
    apply(both, [a, b], [1.0, 1.0])
    apply(summed, a + b, 1.0)
    mean = (robust["bn1.running_mean"] + other["bn1.running_mean"]) / 2
    np.testing.assert_allclose(both["bn1.running_mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(summed["bn1.running_mean"], mean, rtol=1e-6)
    for name in a.deltas:
        np.testing.assert_allclose(both[name], summed[name], rtol=1e-6, atol=1e-6)


def _target_and_sigs(seed, n, quantized):
    rng = np.random.default_rng(seed)
    target = {"w": rng.normal(0, 0.1, n).astype(np.float32), "v": rng.normal(0, 1, (4, 8))}
    target["v"] = target["v"].astype(np.float32)
    mk = lambda: {k: rng.normal(0, 1e-2, v.shape).astype(np.float32) for k, v in target.items()}  # noqa: E731
    a, b = Signature.from_deltas(mk(), name="a"), Signature.from_deltas(mk(), name="b")
    if quantized:
        a, b = a.quantize(4, "affine", "tensor"), b.quantize(6, "symmetric", "tensor")
    return target, a, b


@PROPS
@given(
    n=st.integers(1, 600),
    seed=st.integers(0, 2**32 - 1),
    quantized=st.booleans(),
    alpha=st.floats(-2, 2),
    beta=st.floats(-2, 2),
)
def test_apply_a_then_b_matches_apply_a_plus_b(n, seed, quantized, alpha, beta):
    target, a, b = _target_and_sigs(seed, n, quantized)
    one_by_one, fused, summed = copy_model(target), copy_model(target), copy_model(target)
    apply(one_by_one, a, alpha)
    apply(one_by_one, b, beta)
    apply(fused, [a, b], [alpha, beta])
    apply(summed, alpha * a + beta * b, 1.0)
    for k in target:
        scale = np.abs(target[k]).max() + 0.1
        np.testing.assert_allclose(one_by_one[k], summed[k], rtol=0, atol=1e-6 * scale)
        np.testing.assert_allclose(fused[k], summed[k], rtol=0, atol=1e-6 * scale)


@PROPS
@given(
    n=st.integers(1, 600),
    seed=st.integers(0, 2**32 - 1),
    quantized=st.booleans(),
    alpha=st.floats(-3, 3),
)
def test_alpha_scales_the_change_linearly(n, seed, quantized, alpha):
    target, a, _ = _target_and_sigs(seed, n, quantized)
    unit, scaled = copy_model(target), copy_model(target)
    apply(unit, a, 1.0)
    apply(scaled, a, alpha)
    for k in target:
        change1 = unit[k].astype(np.float64) - target[k]
        change = scaled[k].astype(np.float64) - target[k]
        # In the target's dtype: numpy 1.x widens float32 scalar + 0.1 to float64 (no NEP 50).
        ulp = np.spacing(target[k].dtype.type(np.abs(target[k]).max() + 0.1)).astype(np.float64)
        np.testing.assert_allclose(change, alpha * change1, rtol=0, atol=4 * ulp * (1 + abs(alpha)))


def test_similarity_and_detect_rank_the_matching_signature_first():
    pre, clean, robust = trio(5)
    rng = np.random.default_rng(9)
    other = copy_model(robust)
    for k in ("conv1.weight", "conv2.weight", "fc.weight"):
        other[k] = (clean[k] + rng.normal(0, 0.05, clean[k].shape)).astype(np.float32)
    fog = extract(pre, clean, robust, layers="all", name="fog")
    noise = extract(pre, clean, other, layers="all", name="noise")
    m = similarity([fog, fog.quantize(4), noise])
    assert m.shape == (3, 3) and np.allclose(np.diag(m), 1)
    assert m[0, 1] > 0.99 and abs(m[0, 2]) < 0.5 and np.allclose(m, m.T)
    # An unknown fine-tune's raw weight difference is recognised.
    query = {k: robust[k].astype(np.float32) - clean[k] for k in ("conv1.weight", "conv2.weight")}
    ranking = detect(query, {"noise": noise, "fog": fog.quantize(4)})
    assert [name for name, _ in ranking] == ["fog", "noise"]
    assert ranking[0][1] > 0.9


def test_similarity_counts_a_tensor_one_signature_lacks_as_zero():
    x = np.array([3, 0, 0, 0], np.float32)
    y = np.array([0, 4, 0, 0], np.float32)
    a = Signature.from_deltas({"x": x}, name="a")
    b = Signature.from_deltas({"x": x, "y": y}, name="b")
    # ⟨a, b⟩ = 9 over the union {x, y}; ‖a‖ = 3, ‖b‖ = 5.
    np.testing.assert_allclose(similarity([a, b]), [[1, 0.6], [0.6, 1]], rtol=0, atol=1e-12)


@pytest.mark.parametrize("other", [(4, 64), (16, 8)], ids=["same-count", "other-count"])
def test_similarity_refuses_one_tensor_in_two_shapes_as_combine_does(other):
    rng = np.random.default_rng(0)
    a = Signature.from_deltas({"w": rng.normal(size=(16, 16)).astype(np.float32)}, name="a")
    b = Signature.from_deltas({"w": rng.normal(size=other).astype(np.float32)}, name="b")
    with pytest.raises(MismatchError, match=r"w: shape \(16, 16\) in .a. but"):
        similarity([a, b])
    with pytest.raises(MismatchError, match=r"w: shape \(16, 16\) in .a. but"):
        combine([a, b], [1.0, 1.0])


def test_similarity_over_the_union_holds_for_packed_codes():
    rng = np.random.default_rng(4)
    shared = {k: rng.normal(0, 1, 256).astype(np.float32) for k in ("p", "q")}
    extra = {"r": rng.normal(0, 2, 256).astype(np.float32)}
    a = Signature.from_deltas(shared).quantize(4)
    b = Signature.from_deltas({**shared, **extra}).quantize(4)
    dense = {k: e.dense().astype(np.float64) for k, e in b.deltas.items()}
    na = sum(float(a[k].dense().astype(np.float64) @ a[k].dense()) for k in shared)
    nb = sum(float(v @ v) for v in dense.values())
    dot = sum(float(a[k].dense().astype(np.float64) @ dense[k]) for k in shared)
    expect = dot / np.sqrt(na * nb)
    assert expect < 0.7  # "r" holds most of b's energy
    assert similarity([a, b])[0, 1] == pytest.approx(expect, rel=1e-5)


# ---------------------------------------------------------------------------- refusals


@pytest.fixture()
def fc_sig(models):
    return extract(*models, layers="fc")


def test_a_missing_tensor_is_refused_and_nothing_changes(models, fc_sig):
    model = {k: v for k, v in copy_model(models[1]).items() if k != "fc.bias"}
    before = copy_model(model)
    with pytest.raises(MismatchError, match="no tensor 'fc.bias'"):
        apply(model, fc_sig)
    assert same_bits(model, before)


def test_a_wrong_shape_is_refused_and_nothing_changes(models, fc_sig):
    model = copy_model(models[1])
    model["fc.weight"] = np.zeros((10, 127), np.float32)
    before = copy_model(model)
    with pytest.raises(MismatchError, match="does not match"):
        apply(model, fc_sig, force=True)  # a different element count is never forced
    model["fc.weight"] = np.zeros((20, 64), np.float32)
    with pytest.raises(MismatchError, match="force=True"):
        apply(model, fc_sig)
    assert model["fc.bias"].tobytes() == before["fc.bias"].tobytes()
    undo = apply(model, fc_sig, force=True)
    remove(model, undo)


def test_a_wrong_dtype_is_refused_unless_forced(models, fc_sig):
    model = copy_model(models[1])
    model["fc.weight"] = model["fc.weight"].astype(np.float16)
    before = copy_model(model)
    with pytest.raises(MismatchError, match="F16 but signature .* made for F32"):
        apply(model, fc_sig)
    assert same_bits(model, before)
    undo = apply(model, fc_sig, force=True)
    remove(model, undo)
    assert same_bits(model, before)
    model["fc.weight"] = model["fc.weight"].astype(np.float64)
    with pytest.raises(MismatchError, match="F64"):
        apply(model, fc_sig, force=True)


def test_a_nan_alpha_is_refused(models, sig):
    model = copy_model(models[1])
    with pytest.raises(NonFiniteError):
        apply(model, sig, float("nan"))
    assert same_bits(model, models[1])


def test_a_failure_midway_rolls_back(models, sig, monkeypatch):
    from robustpatch import targets

    model = copy_model(models[1])
    calls = []
    real = targets.NumpyTarget.add

    def flaky(self, name, deltas, alphas, record):
        calls.append(name)
        if len(calls) == 3:
            raise OSError("simulated failure")
        return real(self, name, deltas, alphas, record)

    monkeypatch.setattr(targets.NumpyTarget, "add", flaky)
    with pytest.raises(OSError, match="simulated"):
        apply(model, sig, 0.5)
    assert same_bits(model, models[1])


def test_a_read_only_array_is_refused_before_anything_changes(models, sig):
    model = copy_model(models[1])
    model["fc.bias"].flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        apply(model, sig)
    model["fc.bias"].flags.writeable = True
    assert same_bits(model, models[1])


def test_an_undo_record_is_used_once_and_checks_its_target(models, sig):
    model = copy_model(models[1])
    undo = apply(model, sig)
    with pytest.raises(MismatchError):
        remove({k: v for k, v in model.items() if k != "fc.weight"}, undo)
    remove(model, undo)
    with pytest.raises(ValueError, match="already used"):
        remove(model, undo)


def test_subtract_without_record_is_approximate_and_says_so(models, sig):
    clean = models[1]
    model = {
        k: narrow(widen(v), "BF16") if v.dtype == np.float32 else v.copy() for k, v in clean.items()
    }
    s = Signature.from_deltas(
        {k: e.dense() * 30 for k, e in sig.deltas.items()}, dtypes=dict.fromkeys(sig.deltas, "BF16")
    )
    before = copy_model(model)
    apply(model, s, 1.0)
    report = subtract(model, s, 1.0)
    wrong = sum(int(np.sum(model[k] != before[k])) for k in s.deltas)
    assert wrong > 0  # why remove() keeps a record: plain subtraction leaves wrong bits
    assert report["inconsistent"] <= wrong  # a lower bound on the damage
    assert report["tensors"] == len(s.deltas)


def test_tied_weights_are_refused_rather_than_patched_twice():
    w = np.zeros(8, np.float32)
    model = {"embed.weight": w, "head.weight": w}
    s = Signature.from_deltas({k: np.ones(8, np.float32) for k in model})
    with pytest.raises(MismatchError, match="share memory"):
        apply(model, s)
    assert not w.any()
    apply(model, s.select(["embed.weight"]))
    assert np.all(model["head.weight"] == 1)


def test_a_zero_dimensional_tensor_keeps_its_shape_through_file_and_patch(tmp_path):
    """A 0-d parameter (CLIP's logit_scale) stays 0-d in the signature, its file, a
    quantized copy and a patched model file, and is restored bit for bit."""
    s = Signature.from_deltas(
        {"logit_scale": np.array(0.5, np.float32), "w": np.full(3, 0.25, np.float32)}
    )
    assert s["logit_scale"].shape == () and s.quantize(4)["logit_scale"].shape == ()
    model = {"logit_scale": np.array(2.0, np.float32), "w": np.ones(3, np.float32)}
    undo = apply(model, s)
    assert model["logit_scale"].shape == () and model["logit_scale"] == np.float32(2.5)
    remove(model, undo)
    assert model["logit_scale"] == np.float32(2.0)
    s.save(tmp_path / "s.rws")
    assert Signature.load(tmp_path / "s.rws")["logit_scale"].shape == ()
    write_tensors(tmp_path / "m.safetensors", model)
    assert read_tensors(tmp_path / "m.safetensors")[1]["logit_scale"].shape == ()
    rp.apply_file(tmp_path / "m.safetensors", [tmp_path / "s.rws"], 1.0, tmp_path / "p.safetensors")
    rp.remove_file(tmp_path / "p.safetensors", tmp_path / "r.safetensors")
    assert (tmp_path / "r.safetensors").read_bytes() == (tmp_path / "m.safetensors").read_bytes()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"deltas": {"w": np.ones(4, np.float32)}, "dtypes": {"w": 5}}, "target dtype"),
        ({"deltas": {5: np.ones(4, np.float32)}}, "tensor name must be a string"),
    ],
)
def test_a_signature_that_no_file_could_hold_is_refused_when_built(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        Signature.from_deltas(**kwargs)


def test_remove_refuses_a_tensor_changed_since_the_patch_and_changes_nothing():
    """Restoring a tensor reloaded after the patch would mix the record's originals
    into its new values (remove reported success)."""
    rng = np.random.default_rng(3)
    model = {"w": rng.normal(size=(32, 32)).astype(np.float32)}
    undo = apply(model, Signature.from_deltas({"w": np.full((32, 32), 0.01, np.float32)}))
    model["w"][...] = rng.normal(size=(32, 32)).astype(np.float32)  # reloaded in place
    reloaded = model["w"].copy()
    with pytest.raises(MismatchError, match="w: changed since the patch"):
        remove(model, undo)
    assert np.array_equal(model["w"], reloaded) and not undo.removed


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"name": ["x"]}, InvalidArgumentError),
        ({"layers": 3.5}, SelectionError),
        ({"layers": None}, SelectionError),
        ({"layers": True}, SelectionError),
        ({"provenance": "fog"}, InvalidArgumentError),  # these four were TypeErrors
        ({"effect": [1]}, InvalidArgumentError),
        ({"order": "conv1.weight"}, InvalidArgumentError),
        ({"progress": 5}, InvalidArgumentError),
        ({"provenance": {"x": float("nan")}}, InvalidArgumentError),  # after the extraction
    ],
)
def test_extract_refuses_options_of_the_wrong_type(models, tmp_path, kwargs, error):
    pre, clean, robust = models
    with pytest.raises(error):
        extract(pre, clean, robust, **kwargs)
    with pytest.raises(error):
        extract_to(tmp_path / "s.rws", pre, clean, robust, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_provenance_nested_past_the_load_limit_is_refused_before_any_work(models, tmp_path):
    # it failed at the save, after the whole extraction, without naming provenance
    pre, clean, robust = models
    deep = cur = {}
    for _ in range(70):
        cur["x"] = cur = {}
    calls = []
    for call in (extract, lambda *a, **k: extract_to(tmp_path / "s.rws", *a, **k)):
        with pytest.raises(InvalidArgumentError, match="provenance cannot be saved.*deeper"):
            call(pre, clean, robust, provenance=deep, progress=calls.append)
    assert calls == [] and list(tmp_path.iterdir()) == []


def test_views_that_overlap_are_refused_as_tied_weights():
    """Two names whose arrays share some bytes: the second patch would add to the first
    and no record restores the overlap, so both are refused; views side by side are not."""
    buf = np.random.default_rng(1).normal(size=8).astype(np.float32)
    orig = buf.copy()
    s = Signature.from_deltas(
        {"a": np.full(6, 1000.0, np.float32), "b": np.full(6, 1e-3, np.float32)}
    )
    with pytest.raises(MismatchError, match="share memory"):
        apply({"a": buf[0:6], "b": buf[2:8]}, s)
    with pytest.raises(MismatchError, match="share memory"):
        apply({"b": buf[2:8], "a": buf[0:6]}, s)
    assert np.array_equal(buf, orig)
    side = {"a": buf[0:4], "b": buf[4:8]}
    undo = apply(side, Signature.from_deltas({k: np.ones(4, np.float32) for k in side}))
    remove(side, undo)
    assert np.array_equal(buf, orig)


def test_numpy_values_in_provenance_are_saved_as_json(sig, tmp_path):
    s = sig.select(["fc.bias"])
    s.meta["effect"] = {"accuracy": np.float32(0.75), "per_class": np.arange(3)}
    loaded = Signature.load(s.save(tmp_path / "s.rws"))
    assert loaded.meta["effect"] == {"accuracy": 0.75, "per_class": [0, 1, 2]}


def test_the_engine_api_never_imports_torch(tmp_path):
    import subprocess
    import sys

    code = """
import sys, numpy as np
from robustpatch import cli, extract, files, signature, targets
s = signature.Signature.from_deltas({"w": np.ones(4, np.float32)})
m = {"w": np.zeros(4, np.float32)}
targets.remove(m, targets.apply(m, s))
assert "torch" not in sys.modules, "torch was imported"
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _rewrite_meta(src, dst, edit) -> None:
    """``src`` with its robustpatch metadata edited by ``edit`` (no rehash: the edited
    fields are read before the content hash is checked)."""
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["robustpatch"])
    edit(meta)
    header["__metadata__"]["robustpatch"] = json.dumps(meta)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def _bn_signature(tmp_path):
    s = Signature.from_deltas(
        {"w": np.ones(4, np.float32)}, bn={"bn.running_mean": np.zeros(4, np.float32)}, name="s"
    )
    s.save(tmp_path / "s.rws")
    return tmp_path / "s.rws"


def test_a_batchnorm_weight_past_the_float_range_is_a_format_error(tmp_path):
    # it was an OverflowError traceback
    edit = lambda m: m["entries"][-1].update(weight=10**400)  # noqa: E731
    _rewrite_meta(_bn_signature(tmp_path), tmp_path / "bad.rws", edit)
    with pytest.raises(FormatError, match="has a bad weight"):
        Signature.load(tmp_path / "bad.rws")


def test_an_earlier_releases_nan_metadata_reads_as_text_and_saves_again(tmp_path, capsys):
    # earlier releases saved NaN metadata; refusing it would strand what they patched, and
    # keeping it as a float made quantize, save and rename of such a file fail
    provenance = {"x": float("nan"), "y": [float("inf"), -float("inf")], "z": 0.5}
    _rewrite_meta(
        _bn_signature(tmp_path), tmp_path / "old.rws", lambda m: m.update(provenance=provenance)
    )
    text = {"x": "NaN", "y": ["Infinity", "-Infinity"], "z": 0.5}
    assert Signature.load(tmp_path / "old.rws").meta["provenance"] == text
    assert main(["inspect", str(tmp_path / "old.rws"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(c))
    assert rep["provenance"] == text
    assert (
        main(["quantize", str(tmp_path / "old.rws"), "--bits", "4", "-o", str(tmp_path / "q.rws")])
        == 0
    )
    assert Signature.load(tmp_path / "q.rws").meta["provenance"] == text


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"source": {"model_nbytes": -1}}, "model_nbytes -1 is not a byte count"),
        ({"skipped": "none"}, "'skipped' in the metadata is not a list"),
        ({"fingerprints": 5}, "fingerprints must be a mapping"),
        ({"provenance": {(1, 2): 3}}, "keys must be str"),
        ({"provenance": {"x": float("nan")}}, "not JSON compliant"),
        (None, None),
    ],
    ids=["nbytes", "skipped", "fingerprints", "key", "nan", "deep"],
)
def test_save_refuses_metadata_its_load_would_refuse_and_writes_nothing(tmp_path, meta, match):
    # save wrote files load refused (or raised TypeError/RecursionError)
    if match is None:  # nested past the 64 levels a load reads
        deep: list = [0]
        for _ in range(70):
            deep = [deep]
        meta, match = {"provenance": deep}, "nests deeper than 64 levels"
    s = Signature.from_deltas({"w": np.ones(4, np.float32)}, name="s")
    s.meta.update(meta)  # after it was built (which checks the keys it reads back)
    with pytest.raises(InvalidArgumentError, match=match):
        s.save(tmp_path / "s.rws")
    assert list(tmp_path.iterdir()) == []


def test_a_signature_meta_that_is_no_mapping_is_refused_when_built():
    with pytest.raises(InvalidArgumentError, match="meta must be a mapping"):
        Signature.from_deltas({"w": np.ones(4, np.float32)}, meta=5)


def test_a_tensor_one_dict_checkpoint_holds_otherwise_is_named_with_why(models):
    # "is in the clean model but not in the robust one", when the robust one held it
    # as an int tensor, or tied to another name
    pre, clean, robust = models
    ints = dict(robust, **{"conv1.bias": robust["conv1.bias"].astype(np.int32)})
    with pytest.raises(
        MismatchError, match=r"not in the robust one \(the robust model holds it as int32\)"
    ):
        extract(pre, clean, ints)
    tied_clean = dict(clean, **{"x.weight": clean["conv1.weight"]})
    untied_robust = dict(robust, **{"x.weight": robust["conv1.weight"].copy()})
    with pytest.raises(MismatchError, match=r"ties it to 'conv1.weight'"):
        extract(pre, tied_clean, untied_robust)


def test_extract_takes_any_iterable_of_names_as_its_order(models):
    # the check added for a wrong type refused dict keys and generators
    pre, clean, robust = models
    a = extract(pre, clean, robust, layers="all", order=clean.keys())
    b = extract(pre, clean, robust, layers="all", order=(n for n in clean))
    assert list(a.entries) == list(b.entries)


def test_a_tensor_given_a_delta_and_a_batchnorm_replacement_is_refused(tmp_path):
    # a file target applied the delta alone and listed both signatures as applied; in
    # memory the refusal spoke of tied weights
    model = {"bn.running_mean": np.zeros(4, np.float32)}
    write_tensors(tmp_path / "m.safetensors", model)
    a = Signature.from_deltas({"bn.running_mean": np.full(4, 0.5, np.float32)}, name="a")
    b = Signature.from_deltas({}, bn={"bn.running_mean": np.full(4, 3.0, np.float32)}, name="b")
    with pytest.raises(MismatchError, match="both a delta and a BatchNorm replacement"):
        apply(model, [a, b])
    with pytest.raises(MismatchError, match="both a delta and a BatchNorm replacement"):
        rp.apply_file(tmp_path / "m.safetensors", [a, b], out=tmp_path / "p.safetensors")
    assert not (tmp_path / "p.safetensors").exists() and not model["bn.running_mean"].any()


def test_a_signature_from_arrays_keeps_copies_so_removal_stays_exact():
    # it kept the caller's array: changed after apply, remove subtracted the new values
    d = np.full(4, 0.1, np.float32)
    model = {"w": np.zeros(4, np.float32)}
    undo = apply(model, Signature.from_deltas({"w": d}))
    d[:] = 0.3
    remove(model, undo)
    assert not model["w"].any()
    w = np.ones(4, np.float32)  # its own delta: the engine refused it with a panic
    apply({"w": w}, Signature.from_deltas({"w": w}))
    assert (w == 2).all()


def test_a_delta_sharing_memory_with_its_target_is_refused_not_a_panic():
    # the engine's borrow of the delta panicked (a BaseException, past except Exception)
    from robustpatch.signature import dense_entry

    w = np.ones(4, np.float32)
    with pytest.raises(InvalidArgumentError, match="shares memory with an array this call writes"):
        apply({"w": w}, Signature([dense_entry("w", w)]))
    assert (w == 1).all()


def test_groups_that_fall_back_past_float32_size_warn():
    # a prime-sized tensor took groups of 1: 68 bits a weight at 4 bits, silently
    sig = Signature.from_deltas(
        {"prime": np.ones(1009, np.float32), "even": np.ones(1024, np.float32)}
    )
    with pytest.warns(UserWarning, match="prime: no group of up to 128 elements divides its 1009"):
        sig.quantize(bits=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Signature.from_deltas(
            {"even": np.ones(1024, np.float32), "s": np.ones(3, np.float32)}
        ).quantize(bits=4)


def test_an_undo_shows_what_it_undoes_in_one_short_line(models, sig):
    # the dataclass repr printed every record array: 578 KB for 50 tensors of 256 x 256
    model = copy_model(models[1])
    undo = apply(model, sig, 0.5)
    text = repr(undo)
    assert text.startswith(f"Undo({sig.name!r} x 0.5;") and "\n" not in text and len(text) < 200
    assert undo == undo and undo != apply(copy_model(models[1]), sig, 0.5)  # by identity


def test_a_dict_of_deltas_or_no_signature_at_all_is_refused(models, sig, tmp_path):
    # a dict's keys were read as paths (FileNotFoundError: 'w'); an empty list patched
    # nothing and apply_file still wrote a copy and an undo record
    model = copy_model(models[1])
    with pytest.raises(InvalidArgumentError, match="Signature.from_deltas"):
        apply(model, {"fc.weight": np.zeros_like(model["fc.weight"])})
    with pytest.raises(InvalidArgumentError, match="no signatures given"):
        apply(model, [])
    assert same_bits(model, models[1])
    from robustpatch._format.safetensors import write_tensors

    write_tensors(tmp_path / "m.safetensors", models[1])
    with pytest.raises(InvalidArgumentError, match="no signatures given"):
        rp.apply_file(tmp_path / "m.safetensors", [], 1.0, tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_the_public_functions_type_hints_resolve():
    # SignatureLike named its classes as strings: get_type_hints(rp.apply) raised NameError
    import typing

    for fn in (rp.apply, rp.apply_file, rp.subtract, rp.combine, rp.detect, rp.similarity):
        assert "return" in typing.get_type_hints(fn)
