"""Signature algebra keeps the form: α·sig shares the stored (quantized) entries with a
weight, a + b keeps both as terms fused at apply time; only materialize()/combine()
decode. Similarity, detect and combine take scaled signatures and sums."""

from __future__ import annotations

import numpy as np
import pytest

import robustpatch as rp
from robustpatch import apply, apply_file, combine, detect, remove, remove_file, similarity
from robustpatch._format.safetensors import write_tensors
from robustpatch.errors import (
    InvalidArgumentError,
    MismatchError,
    NonFiniteError,
    ZeroSignatureWarning,
)
from robustpatch.extraction import extract
from robustpatch.signature import Signature, SignatureSum, terms
from rp_testutil import copy_model, same_bits, trio


@pytest.fixture(scope="module")
def models():
    return trio(0)


@pytest.fixture(scope="module")
def pair(models):
    """Two 4-bit signatures with deltas and BatchNorm replacements."""
    pre, clean, robust = models
    rng = np.random.default_rng(9)
    other = dict(robust, **{"bn1.running_mean": robust["bn1.running_mean"] - 1})
    for k in ("conv1.weight", "conv2.weight", "fc.weight"):
        other[k] = (clean[k] + rng.normal(0, 0.05, clean[k].shape)).astype(np.float32)
    a = extract(pre, clean, robust, layers="all", name="a").quantize(4)
    b = extract(pre, clean, other, layers="all", name="b").quantize(4)
    return a, b


def _stored_arrays(sig: Signature) -> list[np.ndarray]:
    return [x for e in sig for x in e.file_tensors().values()]


def test_scaling_shares_the_quantized_entries_and_their_stats(pair):
    a, _ = pair
    half = 0.5 * a
    assert isinstance(half, Signature) and half.weight == 0.5 and a.weight == 1.0
    assert half.name == a.name and half.nbytes == a.nbytes
    for name, e in a.entries.items():
        assert half[name] is e  # same entry: same codes, same stats
    assert any(e.stats for e in half)
    assert (a * 0.5).weight == 0.5 and (-half).weight == -0.5 and (3 * half).weight == 1.5
    first = next(iter(a.entries))
    assert half.unit().weight == 1.0 and half.unit()[first] is a[first]
    assert half.content_hash == a.content_hash  # the weight is not part of the stored data
    for name, energy in a.energy().items():
        assert (2 * a).energy()[name] == 4 * energy


def test_a_sum_keeps_its_terms_without_decoding(pair):
    a, b = pair
    s = 0.5 * a + 2 * b
    assert isinstance(s, SignatureSum)
    got = s.terms()
    assert [(t.name, c) for t, c in got] == [("a", 0.5), ("b", 2.0)]
    for t, _ in got:
        assert t.weight == 1.0
        assert all(e.is_quantized and e.values is None for e in t.deltas.values())
    shared = {id(x) for x in _stored_arrays(a) + _stored_arrays(b)}
    assert {id(x) for t, _ in got for x in _stored_arrays(t)} <= shared  # no new arrays
    assert s.nbytes == a.nbytes + b.nbytes
    assert (a + a).nbytes == a.nbytes  # an entry two terms share counts once
    assert s.name == "0.5*a+2*b"


def test_sums_subtract_negate_and_scale_term_by_term(pair):
    a, b = pair
    as_pairs = lambda x: [(t.name, c) for t, c in x.terms()]  # noqa: E731
    assert as_pairs(a - b) == as_pairs(a + (-1) * b) == [("a", 1.0), ("b", -1.0)]
    assert as_pairs(-(a + 0.5 * b)) == [("a", -1.0), ("b", -0.5)]
    assert as_pairs(2 * (a - b) + a) == [("a", 2.0), ("b", -2.0), ("a", 1.0)]
    assert (a - 0.5 * b).name == "a-0.5*b"


def test_terms_expand_items_at_their_alphas(pair):
    a, b = pair
    got = terms([0.5 * a + b, b], [2.0, -1.0])
    assert [(t.name, x) for t, x in got] == [("a", 1.0), ("b", 2.0), ("b", -1.0)]


def test_applying_a_sum_is_bit_identical_to_applying_its_parts(models, pair):
    _, clean, _ = models
    a, b = pair
    summed, parts = copy_model(clean), copy_model(clean)
    undo = apply(summed, 0.5 * a + 2 * b)
    apply(parts, [a, b], alphas=[0.5, 2])
    assert same_bits(summed, parts)
    assert not same_bits(summed, clean)
    assert [(x["name"], x["hash"], x["alpha"]) for x in undo.applied] == [
        ("a", a.content_hash, 0.5),
        ("b", b.content_hash, 2.0),
    ]
    remove(summed, undo)
    assert same_bits(summed, clean)


def test_a_scaled_signature_applies_like_its_alpha(models, pair):
    _, clean, _ = models
    a, _ = pair
    scaled, direct = copy_model(clean), copy_model(clean)
    apply(scaled, 0.25 * a, alphas=2.0)
    apply(direct, a, alphas=0.5)
    assert same_bits(scaled, direct)  # BatchNorm blend included (weight 0.5)


def test_an_effective_alpha_outside_float32_is_refused_before_any_change(models, pair):
    _, clean, _ = models
    a, _ = pair
    model = copy_model(clean)
    big = 1e30 * a
    with pytest.raises(InvalidArgumentError, match="float32"):
        apply(model, big, alphas=1e30)
    with pytest.raises(InvalidArgumentError, match="float32"):
        big * 1e30
    assert same_bits(model, clean)


def test_a_scaled_signature_or_a_sum_is_not_saved_without_materialize(pair, tmp_path):
    a, b = pair
    for x in (0.5 * a, a + b):
        with pytest.raises(InvalidArgumentError, match=r"materialize\(\)"):
            x.save(tmp_path / "x.rws")
    assert list(tmp_path.iterdir()) == []
    dense = (0.5 * a + 2 * b).materialize()
    assert dense.weight == 1.0 and not any(e.is_quantized for e in dense)
    loaded = Signature.load(dense.save(tmp_path / "dense.rws"))
    assert loaded.content_hash == dense.content_hash


def test_materialize_equals_the_decoded_weighted_sum(pair):
    a, b = pair
    dense = (0.5 * a + 2 * b).materialize()
    for name, e in a.deltas.items():
        want = np.float32(0.5) * e.dense() + np.float32(2) * b[name].dense()
        np.testing.assert_array_equal(dense[name].dense(), want)
    ref = combine([a, b], [0.5, 2])
    assert dense.content_hash == ref.content_hash
    assert dense.name == "0.5*a+2*b"
    assert [c["coef"] for c in dense.meta["components"]] == [0.5, 2.0]
    assert (0.5 * a).materialize().content_hash == combine([a], [0.5]).content_hash
    assert a.materialize().name == "a" and not any(e.is_quantized for e in a.materialize())


def test_materialized_batchnorm_follows_the_blend_rule(pair):
    a, b = pair
    zero = (a - a).materialize()
    assert all(not np.any(e.dense()) for e in zero.deltas.values())
    assert zero.bn.keys() == a.bn.keys()  # a − a keeps a's replacements (−1 clips to 0)
    assert not (-a).materialize().bn  # only a negative weight: no replacement left
    both = (a + b).materialize()
    mean = (a["bn1.running_mean"].values + b["bn1.running_mean"].values) / 2
    np.testing.assert_allclose(both["bn1.running_mean"].values, mean, rtol=1e-6)
    assert both["bn1.running_mean"].weight == 2.0


def test_a_sum_of_different_shapes_fails_when_fused(pair):
    a, _ = pair
    wrong = Signature.from_deltas({"fc.bias": np.ones(3, np.float32)}, name="w")
    with pytest.raises(MismatchError, match=r"fc.bias: shape \(10,\) in .* but \(3,\) in"):
        (a + wrong).materialize()


def test_quantizing_a_sum_fuses_then_codes_it(pair):
    a, b = pair
    q = (a + b).quantize(8)
    assert all(e.is_quantized and e.quant.bits == 8 for e in q.deltas.values())
    with pytest.raises(InvalidArgumentError, match="bits"):
        (a + b).quantize(99)


def test_similarity_of_sums_equals_that_of_their_dense_form(models, pair):
    a, b = pair
    da, db = a.dequantize(), b.dequantize()
    forms = [da + 2 * db, da - db, 3 * da]
    dense = [f.materialize() for f in forms]
    np.testing.assert_allclose(similarity(forms), similarity(dense), rtol=1e-5, atol=1e-6)
    m = similarity([a, 2 * a, -a])
    np.testing.assert_allclose(m[0], [1, 1, -1], rtol=0, atol=1e-9)


def test_detect_and_combine_take_sums(pair):
    a, b = pair
    ranking = detect(a + 0.01 * b, {"b": b, "mix": 0.5 * a + 0.5 * b, "a": 2 * a})
    assert ranking[0][0] == "a"
    assert ranking[0][1] > ranking[1][1] > ranking[2][1]
    np.testing.assert_allclose(
        detect(a, [a + b])[0][1], detect(a, [(a + b).materialize()])[0][1], rtol=1e-5
    )
    via_sum = combine([a + b, b], [2.0, 1.0])
    flat = combine([a, b, b], [2.0, 2.0, 1.0])
    assert via_sum.content_hash == flat.content_hash


def test_a_sum_patches_a_file_like_its_parts_and_is_removed_exactly(models, pair, tmp_path):
    _, clean, _ = models
    a, b = pair
    src = tmp_path / "model.safetensors"
    write_tensors(src, clean)
    apply_file(src, 0.5 * a + 2 * b, out=tmp_path / "sum.safetensors")
    apply_file(src, [a, b], [0.5, 2], out=tmp_path / "parts.safetensors")
    sum_bytes = (tmp_path / "sum.safetensors").read_bytes()
    assert sum_bytes == (tmp_path / "parts.safetensors").read_bytes()
    remove_file(tmp_path / "sum.safetensors", tmp_path / "restored.safetensors")
    assert (tmp_path / "restored.safetensors").read_bytes() == src.read_bytes()


# ---------------------------------------------------------------------------- review findings


def test_similarity_of_scaled_signatures_past_the_float32_range_is_exact():
    # c·δ was multiplied in float32: 1e10 x 1e30 overflowed and the matrix held NaN
    a = rp.Signature.from_deltas({"w": np.array([1e30, -1e30, 2e30, 0], np.float32)}, name="a")
    b = rp.Signature.from_deltas({"w": np.array([1, -1, 2, 0], np.float32)}, name="b")
    got = rp.similarity([1e10 * a, b])
    assert np.allclose(got, 1.0) and rp.detect(1e10 * a, [b])[0][1] == pytest.approx(1.0)


def test_detect_compares_a_tensor_only_in_one_shape():
    # a transposed tensor (same element count) was compared element by element
    w = np.random.default_rng(0).normal(size=(10, 128)).astype(np.float32)
    fc = rp.Signature.from_deltas({"fc.weight": w, "fc.bias": w[0]}, name="fc")
    transposed = rp.Signature.from_deltas({"fc.weight": w.T.copy(), "fc.bias": w[0]}, name="t")
    ((name, score),) = rp.detect(fc, [transposed])
    assert name == "t" and score == pytest.approx(1.0)  # over fc.bias alone


def test_combine_refuses_one_tensor_made_for_two_dtypes():
    # the result took the first signature's dtype: it depended on the order
    w = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    a = rp.Signature.from_deltas({"w": w}, name="a")
    b = rp.Signature.from_deltas({"w": w.astype(np.float16)}, name="b")
    for pair in ([a, b], [b, a]):
        with pytest.raises(MismatchError, match="w: made for F(32|16) in '[ab]' but F(16|32) in"):
            rp.combine(pair, [1, 1])


def test_combine_and_detect_refuse_arguments_of_the_wrong_kind(tmp_path):
    s = rp.Signature.from_deltas({"w": np.ones(4, np.float32)}, name="s")
    s.save(tmp_path / "s.rws")
    assert rp.combine(str(tmp_path / "s.rws"), [2.0])["w"].dense().tolist() == [2.0] * 4
    with pytest.raises(InvalidArgumentError, match="at least one signature"):
        rp.combine([], [])
    with pytest.raises(InvalidArgumentError, match="names must be strings"):
        rp.detect({1: np.ones(4, np.float32)}, [s])


def test_a_streamed_signature_combines_and_dequantizes_as_float32(tmp_path):
    # its dense delta is a view of the file's bfloat16 bits: combine read 0.5 as 16128
    from robustpatch.signature.streamed import open_signature

    v = {
        "w": np.array([0.5, -2.0, 1.0, 0.25] * 4, np.float32),  # stored as bfloat16 bits
        "h": np.array([1 + 2**-10, -0.5] * 8, np.float32),  # as float16
    }
    Signature.from_deltas(v, name="bf").save(tmp_path / "s.rws")
    s = open_signature(tmp_path / "s.rws")
    assert {e.values.dtype for e in s} == {np.dtype(np.uint16), np.dtype(np.float16)}
    for name, values in v.items():
        assert s[name].dense().dtype == np.float32 and s[name].dense().tolist() == values.tolist()
        assert combine([s], [2.0])[name].dense().tolist() == (2 * values).tolist()
        assert s.dequantize()[name].dense().tolist() == values.tolist()


def test_cosines_stay_within_one():
    # a signature against a multiple of itself came out as 1.0000000000000007
    rng = np.random.default_rng(0)
    for seed in range(40):
        w = np.random.default_rng(seed).normal(size=int(rng.integers(10, 3000)))
        a = Signature.from_deltas({"w": w.astype(np.float32)}, name="a")
        m = similarity([a, 3 * a, -7 * a])
        assert np.all(np.abs(m) <= 1.0)
        assert all(-1.0 <= score <= 1.0 for _, score in detect(5 * a, [a, -a]))


def test_combine_refuses_batchnorm_replacements_for_two_dtypes():
    # the result took the first one's dtype: swapping the inputs changed the output
    r = np.ones(4, np.float32)
    a = Signature.from_deltas({}, bn={"bn.running_var": r}, name="a")
    b = Signature.from_deltas({}, bn={"bn.running_var": r}, dtypes={"bn.running_var": "F16"})
    for pair in ([a, b], [b, a]):
        with pytest.raises(MismatchError, match="bn.running_var: BatchNorm .* dtypes"):
            combine(pair, [1, 1])


def test_numpy_scalars_scale_a_signature():
    # numpy took the signature for a sequence of entries: TypeError, or an empty array
    a = Signature.from_deltas({"w": np.ones(3, np.float32)}, name="a")
    for factor in (np.float64(0.5), np.linspace(0, 1, 3)[1], np.float32(0.5)):
        scaled = factor * a
        assert isinstance(scaled, Signature) and scaled.weight == 0.5
    assert isinstance(np.float64(2) * Signature([]), Signature)


@pytest.mark.parametrize("meta", [{"source": "paper X"}, {"fingerprints": "abc"}])
def test_metadata_a_file_could_not_hold_is_refused_when_built(meta):
    # accepted here, it failed far away: combine raised AttributeError
    with pytest.raises(InvalidArgumentError, match="is not a JSON object"):
        Signature.from_deltas({"w": np.ones(3, np.float32)}, name="s", meta=meta)


def test_a_combination_past_float32_says_so():
    big = Signature.from_deltas({"w": np.full(3, 3e37, np.float32)}, name="big")
    with pytest.raises(NonFiniteError, match="w: the combination passes the float32 range"):
        combine([big, big], [20, 1])


def test_combine_warns_when_the_parts_cancel():
    a = Signature.from_deltas({"w": np.arange(3, dtype=np.float32)}, name="a")
    with pytest.warns(ZeroSignatureWarning, match="'a-a' is zero"):
        combine([a, a], [1, -1])


def test_combine_keeps_each_parts_base_and_warns_across_bases():
    w = {"w": np.ones(3, np.float32)}
    x = Signature.from_deltas(w, name="x", meta={"fingerprints": {"base": "b:1"}})
    y = Signature.from_deltas(w, name="y", meta={"fingerprints": {"base": "b:2"}})
    other = Signature.from_deltas({"v": np.ones(3, np.float32)}, name="o", meta=y.meta)
    with pytest.warns(UserWarning, match="'x' and 'y' touch the same tensors but .* different"):
        xy = combine([x, y], [1, 1])
    assert [c["base"] for c in xy.meta["components"]] == ["b:1", "b:2"]
    assert xy.base_fingerprint is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # other tensors: fingerprints cannot be compared
        combine([x, other], [1, 1])


def test_detect_says_when_a_score_measures_nothing():
    # "+0.000" for a signature sharing no tensor with the query read as "orthogonal"
    w = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    a = Signature.from_deltas({"a": w}, name="a")
    transposed = Signature.from_deltas({"a": w.T.copy()}, name="t")
    zero = Signature.from_deltas({"a": np.zeros_like(w)}, name="z")
    with pytest.warns(UserWarning, match="'a' shares no tensor"):
        assert detect(transposed, [a]) == [("a", 0.0)]
    with pytest.warns(UserWarning, match="'a' is compared on tensors where the query is zero"):
        assert detect(zero, [a]) == [("a", 0.0)]
    with pytest.raises(MismatchError, match="a: shape"):  # one tensor in two shapes
        detect(a + transposed, [a])
