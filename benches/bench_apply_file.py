"""File patching benchmark: apply a signature to a large safetensors model on disk.

Builds a model file of ``--size-gib`` GiB (float32 tensors; a few float16/bf16), a
4-bit group-128 signature touching ``--touch`` of its tensors, then measures in one run:

- ``shutil.copyfile`` of the model (the floor: every byte must be written once);
- ``apply_file`` (atomic, no fsync, like the copy) in a fresh subprocess: time and peak
  RSS (``VmHWM``);
- ``remove_file`` likewise, and (with ``--verify``) that the restored file's sha256
  equals the original's. Just before it, a control: ``shutil.copyfile`` of a twin of
  remove's input (written by a second ``apply_file``), at the point of the round where
  remove ran before. On the 2-core development VM, whatever copied there (the kernel's
  own ``copy_file_range`` too) took 2.5-4x as long as the first copyfile of the round,
  and remove timed there read 3.5x; timed after the control it reads 1.3-1.5x. The cost
  follows the page cache's state at that moment (it varied with how full it was), not
  the code: compare each contender with the copy timed next to it;
- ``apply_file`` of a second 4-bit signature touching every tensor (``--full``; the
  pipelined path: read, engine and write on their own threads);
- the copy followed by fsync, and ``apply_file(durable=True)`` (fsynced: both are bound
  by the disk's write bandwidth).

Every timed run starts after ``os.sync()`` with the model in the page cache; runs are
interleaved and the best of ``--repeat`` is kept. Ratios are what matter. A durable
``apply_file`` of a large model writes with direct I/O (the disk's write bandwidth is
its floor, as it is for copyfile + fsync). Output:
benches/results/apply_file.json and a Markdown table beside it (apply_file.md).
Timings vary between runs (page cache, writeback): compare ratios within one run.

Run:  python benches/bench_apply_file.py [--size-gib 2] [--tensors 200] [--touch 0.1]
      [--full] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import settle, sha256
from robustpatch._format.safetensors import TensorInfo, encode_header
from robustpatch.signature import Signature

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from robustpatch.files import apply_file, remove_file
op, args = sys.argv[1], json.loads(sys.argv[2])
t1 = time.perf_counter()
durable = args.get("durable", False)
if op == "apply":
    apply_file(args["src"], args["sigs"], 1.0, args["out"], durable=durable)
else:
    remove_file(args["src"], args["out"], durable=durable)
t2 = time.perf_counter()
try:  # VmHWM: this process's own peak (ru_maxrss can carry the parent's over exec)
    status = open("/proc/self/status").read()
    peak_kb = int(status.split("VmHWM:")[1].split()[0])
except (OSError, IndexError):
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"import_s": t1 - t0, "work_s": t2 - t1, "peak_rss_mb": peak_kb / 1024}))
"""


def build_model(path: Path, size: int, n: int, seed: int) -> list[TensorInfo]:
    """Write a model of about ``size`` bytes in ``n`` tensors, one tensor at a time."""
    rng = np.random.default_rng(seed)
    per = size // n // 4 // 1024 * 1024  # elements per tensor, a multiple of 1024
    infos, offset = [], 0
    for i in range(n):
        label = "F16" if i % 50 == 7 else "BF16" if i % 50 == 9 else "F32"
        nbytes = per * (2 if label != "F32" else 4)
        infos.append(
            TensorInfo(f"layers.{i}.weight", label, (per // 1024, 1024), offset, offset + nbytes)
        )
        offset += nbytes
    with open(path, "wb") as f:
        f.write(encode_header(infos, {"format": "pt"}))
        for t in infos:
            x = rng.normal(0, 0.02, t.shape[0] * t.shape[1]).astype(np.float32)
            if t.dtype == "F16":
                x = x.astype(np.float16)
            elif t.dtype == "BF16":
                x = (x.view(np.uint32) >> 16).astype(np.uint16)
            f.write(x.tobytes())
    return infos


def build_signature(path: Path, infos: list[TensorInfo], touch: float, seed: int) -> int:
    rng = np.random.default_rng(seed + 1)
    k = max(1, round(len(infos) * touch))
    chosen = [infos[i] for i in np.linspace(0, len(infos) - 1, k).astype(int)]
    entries = {}
    for t in chosen:
        entries[t.name] = rng.normal(0, 1e-3, t.shape).astype(np.float32)
    dtypes = {t.name: t.dtype for t in chosen}
    sig = Signature.from_deltas(entries, dtypes=dtypes, name="bench")
    sig.quantize(4, "affine", "group", 128).save(path)
    return k


def child(op: str, **args) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, op, json.dumps(args)],
        capture_output=True,
        text=True,
        check=True,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def copy_and_fsync(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_outputs(work: Path) -> None:
    for name in ("patched.safetensors", "twin.safetensors", "restored.safetensors", "copy.bin"):
        (work / name).unlink(missing_ok=True)
        (work / (name + ".rpundo")).unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--tensors", type=int, default=200)
    ap.add_argument("--touch", type=float, default=0.1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", help="work folder (default: a temp folder next to the results)")
    ap.add_argument("--verify", action="store_true", help="sha256 of original vs restored")
    ap.add_argument("--full", action="store_true", help="also a signature on every tensor")
    ap.add_argument("--quick", action="store_true", help="a 0.25 GiB model, one run")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "apply_file.json"))
    args = ap.parse_args()
    if args.quick:
        args.size_gib, args.tensors, args.repeat = 0.25, 50, 1

    work = Path(tempfile.mkdtemp(prefix="rp-bench-", dir=args.dir))
    try:
        model, sig = work / "model.safetensors", work / "sig.rws"
        infos = build_model(model, int(args.size_gib * (1 << 30)), args.tensors, 0)
        touched = build_signature(sig, infos, args.touch, 0)
        full_sig = work / "full.rws"
        if args.full:
            build_signature(full_sig, infos, 1.0, 1)
        size = model.stat().st_size
        copy_s, copy_sync_s, apply_runs, remove_runs, durable_runs = [], [], [], [], []
        copy_fresh_s = []
        full_runs = []
        shutil.copyfile(model, work / "warm.bin")  # warm the page cache
        os.remove(work / "warm.bin")
        patched, restored = work / "patched.safetensors", work / "restored.safetensors"
        twin = work / "twin.safetensors"
        verified = None
        for _ in range(args.repeat):  # interleaved, so drifts hit every contender alike
            clean_outputs(work)
            settle()
            copy_s.append(timed(lambda: shutil.copyfile(model, work / "copy.bin")))
            os.remove(work / "copy.bin")
            settle()
            copy_sync_s.append(timed(lambda: copy_and_fsync(model, work / "copy.bin")))
            os.remove(work / "copy.bin")
            settle()
            apply_runs.append(child("apply", src=str(model), sigs=[str(sig)], out=str(patched)))
            # the control: a copy of a just-written twin of remove's input (docstring)
            child("apply", src=str(model), sigs=[str(sig)], out=str(twin))
            settle()
            copy_fresh_s.append(timed(lambda: shutil.copyfile(twin, work / "copy.bin")))
            os.remove(work / "copy.bin")
            settle()
            remove_runs.append(child("remove", src=str(patched), out=str(restored)))
            if args.verify and verified is None:
                verified = sha256(model) == sha256(restored)
            clean_outputs(work)
            settle()
            durable_runs.append(
                child("apply", src=str(model), sigs=[str(sig)], out=str(patched), durable=True)
            )
            if args.full:
                clean_outputs(work)
                settle()
                full_runs.append(
                    child("apply", src=str(model), sigs=[str(full_sig)], out=str(patched))
                )
        best_apply = min(apply_runs, key=lambda r: r["work_s"])
        best_remove = min(remove_runs, key=lambda r: r["work_s"])
        result = {
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            },
            "file_bytes": size,
            "tensors": len(infos),
            "touched_tensors": touched,
            "signature_bytes": sig.stat().st_size,
            "undo_bytes": (work / "patched.safetensors.rpundo").stat().st_size,
            "copyfile_s": min(copy_s),
            "copyfile_fsync_s": min(copy_sync_s),
            "apply_s": best_apply["work_s"],
            "apply_peak_rss_mb": max(r["peak_rss_mb"] for r in apply_runs),
            "remove_s": best_remove["work_s"],
            "remove_peak_rss_mb": max(r["peak_rss_mb"] for r in remove_runs),
            "apply_vs_copy": best_apply["work_s"] / min(copy_s),
            "remove_vs_copy": best_remove["work_s"] / min(copy_s),
            "copyfile_fresh_s": min(copy_fresh_s),
            "remove_vs_copy_fresh": best_remove["work_s"] / min(copy_fresh_s),
            "apply_durable_s": min(r["work_s"] for r in durable_runs),
            "apply_durable_vs_copy_fsync": min(r["work_s"] for r in durable_runs)
            / min(copy_sync_s),
            "apply_full_s": min((r["work_s"] for r in full_runs), default=None),
            "full_signature_bytes": full_sig.stat().st_size if args.full else None,
            "restored_sha256_equal": verified,
            "note": "timings vary between runs: compare ratios within one run",
            "runs": {
                "apply_full": full_runs,
                "copyfile_s": copy_s,
                "copyfile_fsync_s": copy_sync_s,
                "copyfile_fresh_s": copy_fresh_s,
                "apply": apply_runs,
                "remove": remove_runs,
                "apply_durable": durable_runs,
            },
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    md = table(result)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)


def table(result: dict) -> str:
    """The run as a Markdown table: each step's best time and its ratio to copyfile."""
    gib, copy = result["file_bytes"] / (1 << 30), result["copyfile_s"]
    rows = [
        ("shutil.copyfile", copy, None),
        ("apply_file", result["apply_s"], result["apply_peak_rss_mb"]),
        ("remove_file", result["remove_s"], result["remove_peak_rss_mb"]),
        (
            "shutil.copyfile of a just-written twin of remove's input (control)",
            result["copyfile_fresh_s"],
            None,
        ),
        ("shutil.copyfile + fsync", result["copyfile_fsync_s"], None),
        ("apply_file(durable=True)", result["apply_durable_s"], None),
    ]
    if result["apply_full_s"] is not None:
        rows.append(("apply_file, 4-bit signature on every tensor", result["apply_full_s"], None))
    lines = [
        f"| {gib:.2f} GiB, {result['tensors']} tensors, {result['touched_tensors']} touched "
        "| time (s) | × copyfile | peak RSS (MB) |",
        "|---|---|---|---|",
    ]
    for name, secs, rss in rows:
        lines.append(
            f"| {name} | {secs:.2f} | {secs / copy:.2f} | {'' if rss is None else f'{rss:.0f}'} |"
        )
    if result["restored_sha256_equal"] is not None:
        lines.append(f"\nrestored sha256 equals original: {result['restored_sha256_equal']}")
    lines.append(f"\n{result['note']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
