"""Helpers shared by the signature, file, CLI and memory tests."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from robustpatch.cli import main
from robustpatch.dtypes import narrow, widen


def perturb(arrays: dict, rng: np.random.Generator, scale: float) -> dict:
    """A copy of a model with every float tensor moved by N(0, scale)."""
    out = {}
    for k, v in arrays.items():
        if v.dtype.kind == "i":
            out[k] = v.copy()
        elif v.dtype == np.uint16:  # bf16 bits
            out[k] = narrow(widen(v) + rng.normal(0, scale, v.shape).astype(np.float32), "BF16")
        else:
            out[k] = (v + rng.normal(0, scale, v.shape)).astype(v.dtype)
    return out


def toy_model(rng: np.random.Generator, fc_dtype=np.float32) -> dict:
    """conv → BatchNorm → conv → fc, like a small CNN's state dict."""
    fc = rng.normal(0, 0.1, (10, 128)).astype(np.float32)
    return {
        "conv1.weight": rng.normal(0, 0.2, (16, 3, 3, 3)).astype(np.float32),
        "conv1.bias": rng.normal(0, 0.1, 16).astype(np.float32),
        "bn1.weight": (1 + rng.normal(0, 0.1, 16)).astype(np.float32),
        "bn1.bias": rng.normal(0, 0.1, 16).astype(np.float32),
        "bn1.running_mean": rng.normal(0, 0.1, 16).astype(np.float32),
        "bn1.running_var": (1 + rng.random(16)).astype(np.float32),
        "bn1.num_batches_tracked": np.array([7], np.int64),
        "conv2.weight": rng.normal(0, 0.1, (32, 16, 3, 3)).astype(np.float32),
        "fc.weight": narrow(fc, "BF16") if fc_dtype == "bf16" else fc.astype(fc_dtype),
        "fc.bias": np.zeros(10, np.float32),
    }


def trio(seed: int = 0, fc_dtype=np.float32) -> tuple[dict, dict, dict]:
    """pretrained, clean, robust: clean and robust differ from pretrained, robust most in
    the shallow layers (as the paper observes)."""
    rng = np.random.default_rng(seed)
    pre = toy_model(rng, fc_dtype)
    clean = perturb(pre, rng, 0.01)
    robust = perturb(clean, rng, 0.002)
    for k in ("conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias"):
        robust[k] = (robust[k] + rng.normal(0, 0.05, robust[k].shape)).astype(np.float32)
    robust["bn1.running_mean"] = robust["bn1.running_mean"] + np.float32(0.5)
    robust["bn1.running_var"] = robust["bn1.running_var"] * np.float32(2)
    return pre, clean, robust


def copy_model(m: dict) -> dict:
    return {k: v.copy() for k, v in m.items()}


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a
    )


def sha(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks (model files may be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def listing(folder: str | os.PathLike) -> dict[str, str]:
    """name → sha256 of every file in a folder (to prove nothing else appeared)."""
    return {p.name: sha(p) for p in sorted(Path(folder).iterdir()) if p.is_file()}


def bf16_from_f32(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bits (uint16), nearest even: the reference for the kernels."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    nan = ((b >> 16) | 0x40).astype(np.uint16)
    return np.where(np.isnan(x), nan, rounded)


def bf16_to_f32(b: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bits (uint16) to float32, exactly."""
    return (b.astype(np.uint32) << 16).view(np.float32)


# A child process starts with ``op`` and ``args`` bound and ends by printing its VmHWM.
_CHILD_PROLOGUE = """
import json, sys
op, args = sys.argv[1], json.loads(sys.argv[2])
"""
_CHILD_EPILOGUE = """
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(json.dumps({"peak_mib": int(line.split()[1]) / 1024}))
"""


def child_peak_mib(body: str, op: str, **args) -> float:
    """Peak resident set (MiB) of a fresh interpreter that runs ``body`` with ``op`` and
    the JSON-able ``args`` bound: memory tests measure each operation on its own."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    script = _CHILD_PROLOGUE + body + _CHILD_EPILOGUE
    proc = subprocess.run(
        [sys.executable, "-c", script, op, json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]


def usage_error(capsys, *argv) -> str:
    """The one error line of a CLI call argparse refuses (exit 2, no traceback)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1, err
    return errors[0]


class FakeJob:
    """A stand-in for a batch job: what the process pool's runner reads of one."""

    def __init__(self, output: str) -> None:
        self.output = output


def fake_run_job(job: FakeJob, index: int) -> dict:
    """A job for the pool's runner that kills its own worker when its output's name
    says so (as the out-of-memory killer would), else creates its output (when it is a
    full path) and reports itself done."""
    import signal
    import time

    time.sleep(0.3)  # jobs overlap: a job runs on the other worker, more wait in the queue
    if os.path.basename(job.output).startswith("kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    if os.path.isabs(job.output):
        Path(job.output).touch()  # the job ran
    return {"job": index, "output": job.output, "status": "done", "seconds": 0.0}
