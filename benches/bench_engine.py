"""Engine benchmark, per SIMD path: our kernels vs numpy, torch and a plain copy.

All in one run, on one 64M-element target and on 10,000 small tensors.

Run (release build installed):  python benches/bench_engine.py [--simd all] [--quick]
Each SIMD path (--simd scalar|avx2|avx512|avx512vbmi2|all) runs in its own process with
ROBUSTPATCH_SIMD set, since the engine picks its path once per process; a path this
CPU lacks is reported as unavailable. Writes benches/results/engine.json and prints a
Markdown table of each path's ratio to a copy of the same tensor, beside the goal. Each
kernel and its copy take turns, run after run, and the best of each is kept: on a VM
whose memory bandwidth drifts by tens of percent within a minute, a copy timed once at
the start made every later ratio depend on when it ran. Ratios are what matter;
absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from _common import best_time, best_times, smoke_output
from robustpatch import _core

try:
    import torch
except ImportError:  # torch is an optional extra; its columns are then left empty
    torch = None

GROUP = 128
BITS = 4


def bf16_bits(x: np.ndarray) -> np.ndarray:
    b = x.view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


# ---- numpy references -------------------------------------------------------------


def np_quantize_4bit(x: np.ndarray):
    g = x.reshape(-1, GROUP)
    lo, hi = g.min(axis=1), g.max(axis=1)
    scale = (hi - lo) / 15
    inv = np.divide(1, scale, out=np.zeros_like(scale), where=scale > 0)
    codes = np.clip(np.rint((g - lo[:, None]) * inv[:, None]), 0, 15).astype(np.uint8).reshape(-1)
    packed = codes[0::2] | (codes[1::2] << 4)
    return packed, scale, lo


def np_dequantize_4bit(packed, scale, offset):
    codes = np.empty(packed.size * 2, np.float32)
    codes[0::2] = packed & 15
    codes[1::2] = packed >> 4
    return (codes.reshape(-1, GROUP) * scale[:, None] + offset[:, None]).reshape(-1)


# ---- torch references -------------------------------------------------------------


def torch_quantize_4bit(x):
    g = x.view(-1, GROUP)
    lo, hi = g.amin(dim=1), g.amax(dim=1)
    scale = (hi - lo) / 15
    codes = ((g - lo[:, None]) / scale.clamp_min(1e-30)[:, None]).round_().clamp_(0, 15)
    codes = codes.to(torch.uint8).view(-1)
    packed = codes[0::2] | (codes[1::2] << 4)
    return packed, scale, lo


def torch_dequantize_4bit(packed, scale, offset):
    codes = torch.stack((packed & 15, packed >> 4), dim=1).view(-1, GROUP).float()
    return (codes * scale[:, None] + offset[:, None]).view(-1)


# ---- the benchmark ----------------------------------------------------------------


def run(n: int, repeat: int, small_count: int, small_size: int) -> dict:
    rng = np.random.default_rng(0)
    base = (rng.standard_normal(n, dtype=np.float32) * 0.05).astype(np.float32)
    deltas = [(rng.standard_normal(n, dtype=np.float32) * 1e-3) for _ in range(4)]
    quants = []
    for d in deltas:
        quants.append(_core.quantize(d, BITS, "affine", GROUP))
    target = base.copy()
    scratch = np.empty_like(base)
    rows: list[dict] = []
    pool = ThreadPoolExecutor(os.cpu_count())

    def copy_all_cores(dst, src):
        """The copy split over every core, as the engine's kernels are (np.copyto
        releases the GIL): the other floor beside numpy's one-thread copy."""
        parts = list(zip(np.array_split(dst, os.cpu_count()), np.array_split(src, os.cpu_count())))
        list(pool.map(lambda p: np.copyto(*p), parts))

    def add_row(name, ours, copies, numpy_t=None, torch_t=None, note=""):
        copy, copy_all = copies
        rows.append(
            {
                "kernel": name,
                "ours_s": ours,
                "copy_s": copy,
                "copy_all_cores_s": copy_all,
                "numpy_s": numpy_t,
                "torch_s": torch_t,
                "ours_over_copy": ours / copy,
                "ours_over_copy_all_cores": ours / copy_all,
                "numpy_over_ours": None if numpy_t is None else numpy_t / ours,
                "torch_over_ours": None if torch_t is None else torch_t / ours,
                "note": note,
            }
        )

    def against_copy(ours, src, dst, setup=None) -> tuple[float, tuple[float, float]]:
        """Best times of ``ours`` and of copying ``src`` into ``dst`` on one thread and on
        every core, taking turns."""
        t = best_times(
            {
                "ours": ours,
                "copy": lambda: np.copyto(dst, src),
                "copy_all": lambda: copy_all_cores(dst, src),
            },
            repeat,
            setups=None if setup is None else {"ours": setup},
        )
        return t["ours"], (t["copy"], t["copy_all"])

    # Fused apply, 1 and 4 signatures, into f32 (with the exact-undo record).
    # Each timed apply starts from the original weights (the setup, untimed):
    # applied again and again the target drifts and the record grows.
    fresh = lambda: np.copyto(target, base)  # noqa: E731
    ours1, copy1 = against_copy(
        lambda: _core.apply(target, quants[:1], [1.0]), base, scratch, fresh
    )
    ours1_norec, copy1_norec = against_copy(
        lambda: _core.apply(target, quants[:1], [1.0], record=False), base, scratch, fresh
    )
    ours4, copy4 = against_copy(
        lambda: _core.apply(target, quants, [1.0, 0.5, -0.5, 0.25]), base, scratch, fresh
    )
    np_q = [np_quantize_4bit(d) for d in deltas]

    def numpy_apply(k):
        for p, s, o in np_q[:k]:
            target.__iadd__(np_dequantize_4bit(p, s, o))

    np1 = best_time(lambda: numpy_apply(1), repeat)
    np4 = best_time(lambda: numpy_apply(4), max(1, repeat // 2))
    t1 = t4 = None
    if torch is not None:
        tt = torch.from_numpy(target)
        tq = [tuple(torch.from_numpy(np.asarray(a)) for a in q) for q in np_q]

        def torch_apply(k):
            for p, s, o in tq[:k]:
                tt.add_(torch_dequantize_4bit(p, s, o), alpha=1.0)

        t1 = best_time(lambda: torch_apply(1), repeat)
        t4 = best_time(lambda: torch_apply(4), max(1, repeat // 2))
    add_row("apply 1×4-bit g128 → f32 (+undo record)", ours1, copy1, np1, t1)
    add_row("apply 4×4-bit g128 → f32 (+undo record)", ours4, copy4, np4, t4)
    add_row("apply 1×4-bit g128 → f32 (no record)", ours1_norec, copy1_norec)

    # Into half-precision targets: compared with a copy of the same (smaller) tensor.
    for name, half in (("f16", base.astype(np.float16)), ("bf16", bf16_bits(base))):
        work = half.copy()
        ours_h, copy_h = against_copy(
            lambda w=work: _core.apply(w, quants[:1], [1.0]),
            half,
            np.empty_like(half),
            lambda w=work, h=half: np.copyto(w, h),
        )
        th = None
        if torch is not None:
            dt = torch.float16 if name == "f16" else torch.bfloat16
            tt_h = torch.from_numpy(base).to(dt)
            p, s, o = tq[0]
            th = best_time(
                lambda t=tt_h, p=p, s=s, o=o: t.add_(torch_dequantize_4bit(p, s, o)), repeat
            )
        add_row(f"apply 1×4-bit g128 → {name} (+undo record)", ours_h, copy_h, None, th)
        # Without the record: the conversions alone, the floor the record's test sits on.
        ours_hn, copy_hn = against_copy(
            lambda w=work: _core.apply(w, quants[:1], [1.0], record=False),
            half,
            np.empty_like(half),
            lambda w=work, h=half: np.copyto(w, h),
        )
        add_row(f"apply 1×4-bit g128 → {name} (no record)", ours_hn, copy_hn)

    # Quantize + pack.
    ours_q, copy_q = against_copy(
        lambda: _core.quantize(deltas[0], BITS, "affine", GROUP), base, scratch
    )
    np_qt = best_time(lambda: np_quantize_4bit(deltas[0]), max(1, repeat // 2))
    t_qt = None
    if torch is not None:
        td = torch.from_numpy(deltas[0])
        t_qt = best_time(lambda: torch_quantize_4bit(td), repeat)
    add_row("quantize+pack 4-bit g128 (f32 in)", ours_q, copy_q, np_qt, t_qt)

    # Projection: three inputs, one output.
    pre, clean, robust = base, base + deltas[0], base + deltas[1]
    ours_p, copy_p = against_copy(lambda: _core.project(pre, clean, robust), base, scratch)
    sig_out = np.empty_like(pre)
    ours_po, copy_po = against_copy(
        lambda: _core.project(pre, clean, robust, out=sig_out), base, scratch
    )

    def numpy_project():
        dr = robust - pre
        d = clean - pre
        return dr - (np.dot(dr, d) / np.dot(d, d)) * d

    np_p = best_time(numpy_project, max(1, repeat // 2))
    t_p = None
    if torch is not None:
        tp, tc, tr = (torch.from_numpy(a) for a in (pre, clean, robust))

        def torch_project():
            dr = tr - tp
            d = tc - tp
            return dr.sub_(d, alpha=float(torch.dot(dr, d) / torch.dot(d, d)))

        t_p = best_time(torch_project, repeat)
    add_row("projection (3 in, 1 out)", ours_p, copy_p, np_p, t_p)
    add_row("projection, out= buffer", ours_po, copy_po)

    # Many small tensors: per-call overhead of the bindings.
    smalls = [
        (rng.standard_normal(small_size) * 0.05).astype(np.float32) for _ in range(small_count)
    ]
    sq = []
    for s in smalls:
        sq.append([_core.quantize(s * 0.01, BITS, "affine", small_size)])

    def ours_small():
        for t, q in zip(smalls, sq):
            _core.apply(t, q, [1.0])

    small_t = best_time(ours_small, repeat)
    small_copy = best_time(lambda: [np.copyto(np.empty_like(s), s) for s in smalls], repeat)
    rows.append(
        {
            "kernel": f"{small_count} small tensors ({small_size} el.), apply each",
            "ours_s": small_t,
            "copy_s": small_copy,
            "per_tensor_us": small_t / small_count * 1e6,
            "note": "per-call overhead",
        }
    )
    pool.shutdown()
    return {
        "elements": n,
        "repeat": repeat,
        "threads": os.cpu_count(),
        "threads_note": "ours: the engine's pool, one thread per core; copy: numpy, one "
        "thread; copy_all_cores: numpy copies of one slice per core, in threads",
        "machine": platform.processor() or platform.machine(),
        "torch": None if torch is None else torch.__version__,
        "numpy": np.__version__,
        "rows": rows,
    }


def fmt(x, unit="ms"):
    if x is None:
        return "–"
    return f"{x * 1e3:.1f} ms" if unit == "ms" else f"{x:.2f}×"


# Must-show goals (issue 15): ratio to a copy of the same tensor on the AVX-512 path.
GOALS = {
    "apply 1×4-bit g128 → f32 (+undo record)": 0.75,
    "apply 4×4-bit g128 → f32 (+undo record)": 1.2,
    "apply 1×4-bit g128 → f16 (+undo record)": 1.0,
    "apply 1×4-bit g128 → bf16 (+undo record)": 1.0,
    "quantize+pack 4-bit g128 (f32 in)": 1.0,
    "projection, out= buffer": 3.0,
}
PATHS = ("scalar", "avx2", "avx512", "avx512vbmi2")


def table(result: dict) -> str:
    """One row per kernel: each path's ratio to a copy, the goal, numpy/torch vs ours."""
    paths = [p for p in result["paths"] if "rows" in result["paths"][p]]
    head = " | ".join(f"{p} ours/copy" for p in paths)
    widest_path = paths[-1] if paths else "–"
    lines = [
        f"| kernel | {head} | {widest_path} ours/copy on all cores | goal (AVX-512) | "
        "numpy/ours | torch/ours |",
        "|---|" + "---|" * (len(paths) + 4),
    ]
    widest = result["paths"][paths[-1]]["rows"] if paths else []
    for i, r in enumerate(widest):
        cells = []
        for p in paths:
            row = result["paths"][p]["rows"][i]
            if "per_tensor_us" in row:
                cells.append(f"{row['per_tensor_us']:.2f} µs/tensor")
            else:
                cells.append(fmt(row["ours_over_copy"], "x"))
        cells.append(fmt(r.get("ours_over_copy_all_cores"), "x"))
        goal = GOALS.get(r["kernel"])
        goal_s = "≤ 2 µs" if "per_tensor_us" in r else ("–" if goal is None else f"≤ {goal}×")
        lines.append(
            f"| {r['kernel']} | {' | '.join(cells)} | {goal_s} | "
            f"{fmt(r.get('numpy_over_ours'), 'x')} | {fmt(r.get('torch_over_ours'), 'x')} |"
        )
    for p, res in result["paths"].items():
        if "error" in res:
            lines.append(f"\n{p}: not run ({res['error']})")
    return "\n".join(lines)


def run_path(path: str, args: argparse.Namespace) -> dict:
    """Measure one forced path in a fresh process (the engine picks its path once)."""
    # Passive OpenMP waits: torch's threads otherwise spin after each torch op and take
    # the cores from whatever is timed next (ours included).
    env = dict(os.environ, ROBUSTPATCH_SIMD=path, OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, __file__, "--child"]
    cmd += ["--elements", str(args.elements), "--repeat", str(args.repeat)]
    cmd += ["--small-count", str(args.small_count), "--small-size", str(args.small_size)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=64 * 2**20, help="target size (64M = 256 MiB)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--small-count", type=int, default=10_000)
    ap.add_argument("--small-size", type=int, default=256)
    ap.add_argument(
        "--simd", choices=(*PATHS, "all"), default="all", help="SIMD path(s) to force, in turn"
    )
    ap.add_argument(
        "--quick", action="store_true", help="4M elements, 3 repeats, 1,000 small tensors"
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    out = Path(__file__).parent / "results" / "engine.json"
    ap.add_argument("--out", type=Path, default=None, help=f"default {out} (--quick: quick/)")
    args = ap.parse_args()
    args.out = args.out or (smoke_output(out) if args.quick else out)
    if args.quick:
        args.elements, args.repeat, args.small_count = 4 * 2**20, 3, 1000
    if args.child:
        if torch is not None:
            torch.set_num_threads(os.cpu_count() or 1)
        print(json.dumps(run(args.elements, args.repeat, args.small_count, args.small_size)))
        return
    paths = PATHS if args.simd == "all" else (args.simd,)
    result = {
        "elements": args.elements,
        "repeat": args.repeat,
        "threads": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "paths": {p: run_path(p, args) for p in paths},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(table(result))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
