"""Every warning of the public API names the caller's line, not one inside robustpatch,
whatever the path to it (list comprehensions have a frame of their own before Python
3.12) and the thread that computed it (``extract_to`` quantizes in a second thread)."""

import warnings

import numpy as np
import pytest

import robustpatch as rp


def _origins(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    assert caught, "the call warned"
    return {(w.filename, str(w.message).split(":")[0]) for w in caught}


def _models(seed=0):
    rng = np.random.default_rng(seed)
    base = {
        "a": rng.standard_normal(131).astype(np.float32),  # 131 is prime: groups of 1
        "b": rng.standard_normal(64).astype(np.float32),
        "c": rng.standard_normal(64).astype(np.float32),  # three undotted names: one "layer"
    }
    clean = {k: v + 0.01 for k, v in base.items()}
    robust = {
        k: v + 0.02 * rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()
    }
    return base, clean, robust


def test_extraction_and_quantization_warnings_name_the_caller(tmp_path):
    base, clean, robust = _models()
    # undotted names: the layer count selects the whole model
    assert {f for f, _ in _origins(lambda: rp.extract(base, clean, robust, layers=2))} == {__file__}
    with pytest.warns(UserWarning):
        sig = rp.extract(base, clean, robust, layers=2)
    assert _origins(lambda: sig.quantize(4)) == {(__file__, "a")}
    out = tmp_path / "s.rws"
    origins = _origins(lambda: rp.extract_to(out, base, clean, robust, layers=2, bits=4))
    assert {f for f, _ in origins} == {__file__} and (__file__, "a") in origins


def test_algebra_warnings_name_the_caller():
    base, clean, robust = _models()
    with pytest.warns(UserWarning):
        sig = rp.extract(base, clean, robust, layers=2)
        other = rp.extract({k: v + 1 for k, v in base.items()}, clean, robust, layers=2)
    assert {f for f, _ in _origins(lambda: rp.combine([sig, sig], [1, -1]))} == {__file__}
    assert {f for f, _ in _origins(lambda: rp.combine([sig, other], [1, 1]))} == {__file__}
    assert {f for f, _ in _origins(lambda: rp.detect({"z": np.ones(3, np.float32)}, [sig]))} == {
        __file__
    }


def test_zero_signature_warning_names_the_caller():
    rng = np.random.default_rng(1)
    p = {"a.w": 1 + rng.normal(size=64) * 1e-3}
    c = {k: v + rng.normal(size=64) * 1e-9 for k, v in p.items()}
    r = {k: v + rng.normal(size=64) * 1e-9 for k, v in p.items()}
    call = lambda: rp.extract(None, c, r, layers="all", method="difference")  # noqa: E731
    assert {f for f, _ in _origins(call)} == {__file__}
