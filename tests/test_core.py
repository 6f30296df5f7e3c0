"""Property tests of the compiled engine (robustpatch._core) against numpy references."""

import pickle
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import robustpatch as rp
from robustpatch import _core
from rp_testutil import bf16_from_f32, bf16_to_f32

EXAMPLES = settings(max_examples=200, deadline=None)
SPECIAL = np.array(
    [0.0, -0.0, 1e-40, -3e-39, 6e-8, 1e-45, np.inf, -np.inf, 65504.0, 0.99999994],
    dtype=np.float32,
)


def weights(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random weights with the special values (±0, subnormals, ±inf) mixed in."""
    w = rng.normal(0, 0.05, n).astype(np.float32)
    idx = rng.choice(n, size=min(n, len(SPECIAL) * 3), replace=False) if n else []
    w[idx] = SPECIAL[np.arange(len(idx)) % len(SPECIAL)]
    return w


def as_dtype(w: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "f32":
        return w.copy()
    if dtype == "f16":
        return w.astype(np.float16)
    return bf16_from_f32(w)


def widen(t: np.ndarray) -> np.ndarray:
    return bf16_to_f32(t) if t.dtype == np.uint16 else t.astype(np.float32)


def narrow_like(x: np.ndarray, like: np.ndarray) -> np.ndarray:
    if like.dtype == np.uint16:
        return bf16_from_f32(x)
    return x.astype(like.dtype)


@EXAMPLES
@given(bits=st.integers(1, 8), n=st.integers(0, 3000), seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip(bits, n, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, n).astype(np.uint8)
    packed = _core.pack(codes, bits)
    assert packed.nbytes == (n * bits + 7) // 8
    np.testing.assert_array_equal(_core.unpack(packed, bits, n), codes)


@EXAMPLES
@given(
    bits=st.integers(1, 8),
    scheme=st.sampled_from(["affine", "symmetric"]),
    groups=st.integers(1, 20),
    group_len=st.integers(1, 300),
    scale=st.floats(1e-6, 1e3),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantization_error_is_within_half_a_step(bits, scheme, groups, group_len, scale, seed):
    x = (np.random.default_rng(seed).standard_normal(groups * group_len) * scale).astype(np.float32)
    q = _core.quantize(x, bits, scheme, group_len)
    s, o = q.scale, q.offset
    assert s.shape == o.shape == (groups,)
    deq = _core.dequantize(q)
    err = np.abs(x - deq).reshape(groups, group_len).max(axis=1)
    # Half a step, plus the float rounding of code * scale + offset.
    bound = s / 2 * (1 + 1e-6) + 4 * np.finfo(np.float32).eps * (np.abs(x).max() + np.abs(o))
    assert np.all(err <= bound)


@EXAMPLES
@given(
    dtype=st.sampled_from(["f32", "f16", "bf16"]),
    n=st.integers(0, 5000),
    alpha=st.floats(-2, 2, width=32),
    seed=st.integers(0, 2**32 - 1),
)
def test_apply_matches_numpy_bit_for_bit_and_remove_restores(dtype, n, alpha, seed):
    rng = np.random.default_rng(seed)
    target = as_dtype(weights(rng, n), dtype)
    delta = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    original = target.copy()
    # Reference: one f32 add of alpha*delta, one rounding to the target dtype.
    with np.errstate(invalid="ignore", over="ignore"):
        expect = narrow_like(widen(target) + np.float32(alpha) * delta, target)
    undo, _ = _core.apply(target, [delta], [alpha])
    np.testing.assert_array_equal(target.view(np.uint8), expect.view(np.uint8))
    _core.remove(target, [delta], [alpha], *undo)
    np.testing.assert_array_equal(target.view(np.uint8), original.view(np.uint8))


@EXAMPLES
@given(
    dtype=st.sampled_from(["f32", "f16", "bf16"]),
    bits=st.integers(1, 8),
    scheme=st.sampled_from(["affine", "symmetric", "log", "tanh"]),
    groups=st.integers(1, 16),
    group_len=st.sampled_from([1, 7, 27, 128, 576]),
    seed=st.integers(0, 2**32 - 1),
)
def test_fused_quantized_apply_then_remove_is_exact(dtype, bits, scheme, groups, group_len, seed):
    rng = np.random.default_rng(seed)
    n = groups * group_len
    target = as_dtype(weights(rng, n), dtype)
    original = target.copy()
    deltas, alphas = [], [1.0, -0.5, 0.25]
    for _ in alphas:
        d = (rng.standard_normal(n) * 1e-2).astype(np.float32)
        deltas.append(_core.quantize(d, bits, scheme, group_len))
    # The fused sum equals adding the dequantized deltas (close: the kernel folds alpha
    # into scale/offset, so it may differ by float rounding only).
    with np.errstate(invalid="ignore", over="ignore"):
        dense = sum(a * _core.dequantize(q) for a, q in zip(alphas, deltas))
        expect = widen(target) + dense
    undo, _ = _core.apply(target, deltas, alphas)
    finite = np.isfinite(expect)
    np.testing.assert_allclose(widen(target)[finite], expect[finite], rtol=1e-2, atol=1e-4)
    _core.remove(target, deltas, alphas, *undo)
    np.testing.assert_array_equal(target.view(np.uint8), original.view(np.uint8))


@EXAMPLES
@given(n=st.integers(1, 20000), seed=st.integers(0, 2**32 - 1))
def test_projection_matches_numpy(n, seed):
    rng = np.random.default_rng(seed)
    pre = rng.standard_normal(n).astype(np.float32)
    clean = pre + (rng.standard_normal(n) * 0.01).astype(np.float32)
    robust = pre + (rng.standard_normal(n) * 0.01).astype(np.float32) + 0.5 * (clean - pre)
    sig, stats = _core.project(pre, clean, robust)
    dr = (robust - pre).astype(np.float64)
    d = (clean - pre).astype(np.float64)
    coef = dr @ d / (d @ d)
    np.testing.assert_allclose(stats["coef"], coef, rtol=1e-9)
    np.testing.assert_allclose(sig, dr - coef * d, rtol=1e-4, atol=1e-6)
    wide = robust.astype(np.float64)
    np.testing.assert_allclose(stats["norm2_robust"], wide @ wide, rtol=1e-12)
    # Orthogonal to the clean delta, up to f32 rounding of the residual.
    assert abs(sig.astype(np.float64) @ d) <= 1e-5 * np.linalg.norm(dr) * np.linalg.norm(d)


def test_dot_and_cosine_from_codes():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(4096).astype(np.float32)
    b = (0.5 * a + rng.standard_normal(4096) * 0.1).astype(np.float32)
    qa = _core.quantize(a, 8, "affine", 128)
    deq = _core.dequantize(qa)
    assert _core.dot(qa, b) == pytest.approx(float(deq.astype(np.float64) @ b), rel=1e-9)
    cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert _core.cosine(qa, b) == pytest.approx(cos, abs=1e-3)


@pytest.mark.parametrize(
    ("call", "exc", "text"),
    [
        (lambda: _core.quantize(np.zeros(8), 4, "affine", 8), TypeError, "float64"),
        (
            lambda: _core.quantize(np.zeros((4, 4), np.float32)[:, 0], 4, "affine", 4),
            ValueError,
            "contiguous",
        ),
        (lambda: _core.quantize(np.zeros(8, np.float32), 0, "affine", 8), ValueError, "bits"),
        (lambda: _core.quantize(np.zeros(8, np.float32), 9, "affine", 8), ValueError, "bits"),
        (lambda: _core.quantize(np.zeros(10, np.float32), 4, "affine", 4), ValueError, "divide"),
        (lambda: _core.quantize(np.zeros(8, np.float32), 4, "cubic", 8), ValueError, "scheme"),
        (
            lambda: _core.quantize(np.array([1, np.nan], np.float32), 4, "affine", 2),
            _core.NonFiniteError,
            "1",
        ),
        (
            lambda: _core.apply(np.zeros(4, np.float32), [np.zeros(5, np.float32)], [1.0]),
            ValueError,
            "elements",
        ),
        (
            lambda: _core.apply(
                np.zeros(4, np.float32), [np.array([0, 0, np.inf, 0], np.float32)], [1.0]
            ),
            _core.NonFiniteError,
            "index 2",
        ),
        (
            lambda: _core.apply(np.zeros(4, np.float32), [np.zeros(4, np.float32)], [1.0, 2.0]),
            ValueError,
            "alphas",
        ),
        (
            lambda: _core.project(
                np.zeros(3, np.float32), np.zeros(3, np.float16), np.zeros(3, np.float32)
            ),
            TypeError,
            "dtypes",
        ),
        (
            lambda: _core.project(
                np.zeros(3, np.float32), np.zeros(4, np.float32), np.zeros(3, np.float32)
            ),
            ValueError,
            "shapes",
        ),
        (
            lambda: _core.project(
                np.full(3, np.nan, np.float32), np.zeros(3, np.float32), np.zeros(3, np.float32)
            ),
            _core.NonFiniteError,
            "NaN",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(call, exc, text):
    with pytest.raises(exc, match=text):
        call()


def test_nan_delta_leaves_the_target_untouched():
    target = np.arange(8, dtype=np.float32)
    bad = np.zeros(8, np.float32)
    bad[5] = np.nan
    with pytest.raises(_core.NonFiniteError):
        _core.apply(target, [np.ones(8, np.float32), bad], [1.0, 1.0])
    np.testing.assert_array_equal(target, np.arange(8, dtype=np.float32))


def test_read_only_target_is_refused():
    target = np.zeros(8, np.float32)
    target.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _core.apply(target, [np.ones(8, np.float32)], [1.0])


def test_two_threads_run_kernels_concurrently():
    """With the GIL held, the second call could only start after the first ended."""
    n = 1 << 24
    targets = [np.zeros(n, np.float32) for _ in range(2)]
    delta = np.ones(n, np.float32)
    barrier = threading.Barrier(2)
    spans = [None, None]

    def work(i):
        barrier.wait()
        t0 = time.perf_counter()
        for _ in range(3):
            _core.apply(targets[i], [delta], [1.0])
        spans[i] = (t0, time.perf_counter())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    overlap = min(spans[0][1], spans[1][1]) - max(spans[0][0], spans[1][0])
    shorter = min(s[1] - s[0] for s in spans)
    assert overlap > 0.5 * shorter, f"calls overlapped {overlap:.3f}s of {shorter:.3f}s"
    assert np.all(targets[0] == 3) and np.all(targets[1] == 3)


def test_stub_matches_the_compiled_module():
    import ast
    import inspect
    from pathlib import Path

    stub = Path(_core.__file__).with_name("_core.pyi")
    if not stub.exists():
        stub = Path(__file__).parents[1] / "python" / "robustpatch" / "_core.pyi"
    tree = ast.parse(stub.read_text())
    stub_funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    stub_classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    public = {k for k in dir(_core) if not k.startswith("_")}
    funcs = {k for k in public if callable(getattr(_core, k)) and k not in stub_classes}
    assert funcs == set(stub_funcs), "functions in the module and in _core.pyi differ"
    assert stub_classes <= public
    for name, node in stub_funcs.items():
        params = list(inspect.signature(getattr(_core, name)).parameters)
        assert params == [a.arg for a in node.args.args], name


@pytest.mark.parametrize("error", [rp.FormatError, rp.NonFiniteError])
def test_the_engines_errors_survive_pickling(error):
    # created in module "_core": a worker process's error came back as a PicklingError
    e = pickle.loads(pickle.dumps(error("model.safetensors: bad")))
    assert type(e) is error and str(e) == "model.safetensors: bad"
