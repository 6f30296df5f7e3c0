"""The engine's SIMD paths seen from Python: ROBUSTPATCH_SIMD forces one (each run
in a fresh process, since the path is chosen once per process), every path the CPU
runs gives the same bytes, a bad or unavailable path is a clear error, and the
projection's out= buffer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from robustpatch import _core
from robustpatch.errors import InvalidArgumentError, MismatchError

# Applies 1 and 3 quantized signatures (g128, the fused path, and g8, the tile
# path) to f32/f16/bf16 targets, removes them, and prints a digest of everything.
CHILD = r"""
import hashlib, json, numpy as np
from robustpatch import _core
rng = np.random.default_rng(5)
n = 128 * 37
out = {}
qs = [_core.quantize((rng.standard_normal(n) * 1e-2).astype(np.float32), 4, "affine", g)
      for g in (128, 8, n)]
base = (rng.standard_normal(n) * 0.05).astype(np.float32)
for name, t in (("f32", base), ("f16", base.astype(np.float16)),
                ("bf16", (base.view(np.uint32) >> 16).astype(np.uint16))):
    for k in (1, 3):
        w = t.copy()
        rec, over = _core.apply(w, qs[:k], [0.5, -1.0, 2.0][:k])
        h = hashlib.sha256(w.tobytes())
        for a in rec:
            h.update(np.ascontiguousarray(a).tobytes())
        _core.remove(w, qs[:k], [0.5, -1.0, 2.0][:k], *rec)
        out[f"{name}/{k}"] = [h.hexdigest(), over, bool(np.array_equal(w, t))]
print(json.dumps(out))
"""


def run_child(simd: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ROBUSTPATCH_SIMD"}
    if simd is not None:
        env["ROBUSTPATCH_SIMD"] = simd
    return subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120
    )


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def runs(path: str) -> bool:
    need = {
        "scalar": set(),
        "avx2": {"avx2", "fma", "f16c", "popcnt"},
        "avx512": {"avx2", "fma", "f16c", "popcnt", "avx512f", "avx512bw", "avx512vl"},
    }
    need["avx512vbmi2"] = need["avx512"] | {"avx512vbmi", "avx512_vbmi2"}
    return need[path] <= cpu_flags()


def test_every_forced_path_gives_the_same_bytes_and_restores():
    default = run_child(None)
    assert default.returncode == 0, default.stderr
    want = json.loads(default.stdout)
    assert all(restored for _, _, restored in want.values())
    for path in ("scalar", "avx2", "avx512", "avx512vbmi2"):
        if not runs(path):
            continue
        got = run_child(path)
        assert got.returncode == 0, f"{path}: {got.stderr}"
        assert json.loads(got.stdout) == want, path


def test_unknown_or_unavailable_path_is_a_clear_error():
    bad = run_child("avx1024")
    assert bad.returncode != 0
    last = bad.stderr.strip().splitlines()[-1]
    assert "ROBUSTPATCH_SIMD=avx1024" in last and "avx2, avx512 or avx512vbmi2" in last
    for path in ("avx2", "avx512", "avx512vbmi2"):
        if not runs(path):
            refused = run_child(path)
            assert refused.returncode != 0 and "lacks" in refused.stderr


def signature_inputs(n=5000, seed=0):
    rng = np.random.default_rng(seed)
    pre = rng.standard_normal(n).astype(np.float32)
    clean = pre + rng.standard_normal(n).astype(np.float32) * 0.01
    robust = pre + rng.standard_normal(n).astype(np.float32) * 0.01
    return pre, clean, robust


def test_project_into_out_matches_a_fresh_result():
    pre, clean, robust = signature_inputs()
    sig, stats = _core.project(pre, clean, robust)
    out = np.full(pre.shape, np.nan, np.float32)
    sig2, stats2 = _core.project(pre, clean, robust, out=out)
    assert sig2 is out
    assert np.array_equal(sig.view(np.uint32), out.view(np.uint32))
    assert stats2 == stats


def test_project_out_of_the_wrong_shape_or_aliasing_an_input_is_refused():
    pre, clean, robust = signature_inputs()
    before = [a.copy() for a in (pre, clean, robust)]
    with pytest.raises(MismatchError, match="out has shape"):
        _core.project(pre, clean, robust, out=np.empty(pre.size - 1, np.float32))
    with pytest.raises(InvalidArgumentError, match="not share memory"):
        _core.project(pre, clean, robust, out=robust)
    frozen = np.empty(pre.shape, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(InvalidArgumentError, match="writeable"):
        _core.project(pre, clean, robust, out=frozen)
    for a, b in zip((pre, clean, robust), before):
        assert np.array_equal(a, b)
