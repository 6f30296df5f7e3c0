"""Fleet benchmark: a batch of patched models, and a sharded checkpoint patched and restored.

Part 1 (the fleet). Eight small Llama-style bf16 models (``config.json`` +
``model.safetensors``) and four signatures, each a full-model task vector (dense,
stored by ``save`` in the narrowest dtype that holds it exactly). One grid manifest
builds the 32 outputs (every model × every signature, alpha 1) with ``robustpatch
batch``, three times in one run: ``--workers 1``, ``--workers 2`` and ``--executor ray
--workers 2`` (a local Ray instance, its start-up included). For each: wall time, GB/s
(bytes of the outputs / wall time), peak RSS of the largest process, and the sha256 of
every output, which must agree across the three. Beside it the same fleet built with
mergekit's task arithmetic, one ``mergekit-yaml`` run per output, from fine-tuned
checkpoints ``base + task vector`` made beforehand (not timed); mergekit runs from its
own venv (``--mergekit``, default /tmp/mk-venv/bin/mergekit-yaml). Our outputs carry
an undo record each; mergekit's none.

Part 2 (sharded). A bf16 checkpoint of ``--shards`` shards (``--shard-gib`` GiB in all)
and a 4-bit signature on its leading ``--touch`` share of tensors (0.12, the paper's
shallow patch: only the first shard is touched); in fresh
subprocesses: ``apply_file`` of its index into a folder, then ``remove_file`` back.
Checked: the sha256 of every restored shard equals the original's, the untouched
shards of the output are hard links of the source's; measured: time and peak RSS of
each, against copying the folder (``shutil.copytree``).

Every timed run starts after ``os.sync()``, inputs in the page cache. On a shared
machine the times are noisy: compare the ratios of one run. Output:
benches/results/fleet.json and a Markdown table (stdout and benches/results/fleet.md).

Run:  python benches/bench_fleet.py --quick          # seconds
      python benches/bench_fleet.py --full           # ~100 MB models, a 1 GiB checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import llama_config, llama_shapes, run_measured, settle, sha256, smoke_output
from robustpatch._format.safetensors import write_tensors
from robustpatch.dtypes import narrow, widen
from robustpatch.signature import Signature

RESULTS = Path(__file__).parent / "results"

#: Model shapes: Llama-style (hidden, intermediate, layers, vocab), and the sharded
#: checkpoint (GiB in all, tensor side).
SIZES = {
    "quick": {"llama": (128, 344, 2, 2048), "shard_gib": 0.0625, "side": 512},
    "full": {"llama": (512, 1376, 8, 16000), "shard_gib": 1.0, "side": 2048},
}
N_MODELS, N_SIGS = 8, 4

CHILD = r"""
import json, sys, time
from robustpatch.files import apply_file, remove_file
op, a = sys.argv[1], json.loads(sys.argv[2])
t0 = time.perf_counter()
if op == "apply":
    apply_file(a["src"], a["sigs"], 1.0, a["out"])
else:
    remove_file(a["src"], a["out"])
print(json.dumps({"work_s": time.perf_counter() - t0}))
"""


def note(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- the fleet


def write_model(folder: Path, tensors: dict[str, np.ndarray], config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    write_tensors(folder / "model.safetensors", tensors, {"format": "pt"})
    return folder / "model.safetensors"


def build_fleet(work: Path, llama: tuple, with_mergekit: bool) -> dict:
    """Bases, signatures (task vectors) and, for mergekit, each base + task vector."""
    rng = np.random.default_rng(0)
    shapes, config = llama_shapes(*llama), llama_config(*llama)
    bases = {}
    for m in range(N_MODELS):
        tensors = {
            n: narrow(rng.normal(0, 0.02, s).astype(np.float32), "BF16") for n, s in shapes.items()
        }
        bases[f"m{m}"] = tensors
        write_model(work / "bases" / f"m{m}", tensors, config)
    sigs = {}
    for s in range(N_SIGS):
        deltas = {n: rng.normal(0, 1e-3, sh).astype(np.float32) for n, sh in shapes.items()}
        sig = Signature.from_deltas(deltas, dtypes=dict.fromkeys(shapes, "BF16"), name=f"t{s}")
        (work / "sigs").mkdir(exist_ok=True)
        sig.save(work / "sigs" / f"t{s}.rws")
        sigs[f"t{s}"] = deltas
        if with_mergekit:
            for m, tensors in bases.items():
                tuned = {n: narrow(widen(a) + deltas[n], "BF16") for n, a in tensors.items()}
                write_model(work / "tuned" / f"{m}-t{s}", tuned, config)
    return {"bases": list(bases), "sigs": list(sigs)}


def manifest(work: Path, fleet: dict, out: str) -> Path:
    doc = {
        "grid": {
            "bases": {m: f"bases/{m}/model.safetensors" for m in fleet["bases"]},
            "signatures": {s: [f"sigs/{s}.rws"] for s in fleet["sigs"]},
            "alphas": [1.0],
            "output": f"{out}/{{base}}-{{signatures}}.safetensors",
        }
    }
    path = work / f"{out}.json"
    path.write_text(json.dumps(doc))
    return path


def run_batch(work: Path, fleet: dict, name: str, extra: list[str]) -> dict:
    path = manifest(work, fleet, name)
    note(f"batch {' '.join(extra)}")
    argv = [sys.executable, "-m", "robustpatch.cli", "-q", "batch", str(path), *extra]
    settle()
    wall, rss, out = run_measured(argv)
    lines = [json.loads(ln) for ln in out.splitlines() if ln.strip()]
    assert len(lines) == N_MODELS * N_SIGS and all(ln["status"] == "done" for ln in lines)
    total = sum(ln["bytes"] for ln in lines)
    shas = {Path(ln["output"]).name: ln["sha256"] for ln in lines}
    shutil.rmtree(work / name)  # disk: one fleet at a time
    return {
        "wall_s": wall,
        "outputs": len(lines),
        "peak_rss_mb": rss,
        "bytes": total,
        "gb_s": total / wall / 1e9,
        "sha256": shas,
    }


def run_mergekit(work: Path, fleet: dict, mergekit: str, merges: int) -> dict:
    """``merges`` of the fleet's outputs built by mergekit (all 32 unless fewer asked)."""
    walls, rsss, total = [], [], 0
    pairs = [(m, s) for m in fleet["bases"] for s in fleet["sigs"]][:merges]
    for m, s in pairs:
        cfg = {
            "merge_method": "task_arithmetic",
            "base_model": str(work / "bases" / m),
            "models": [{"model": str(work / "tuned" / f"{m}-{s}"), "parameters": {"weight": 1.0}}],
            "dtype": "bfloat16",
        }
        cfg_path = work / "mk.yml"
        cfg_path.write_text(json.dumps(cfg))  # JSON is YAML
        out = work / "mk-out"
        argv = [mergekit, str(cfg_path), str(out), "--no-copy-tokenizer", "--quiet",
                "--no-write-model-card"]  # fmt: skip
        settle()
        wall, rss, _ = run_measured(argv)
        note(f"mergekit {m}-{s}: {wall:.2f} s")
        walls.append(wall)
        rsss.append(rss)
        total += sum(p.stat().st_size for p in out.glob("*.safetensors"))
        shutil.rmtree(out)
    wall = sum(walls)
    return {"wall_s": wall, "outputs": len(pairs), "peak_rss_mb": max(rsss), "bytes": total,
            "gb_s": total / wall / 1e9, "per_merge_s": [round(w, 3) for w in walls]}  # fmt: skip


# ---------------------------------------------------------------------------- sharded


def build_sharded(folder: Path, gib: float, shards: int, side: int) -> dict[str, list[str]]:
    """A bf16 checkpoint of ``shards`` shards, ``gib`` GiB in all (tensors side × side)."""
    rng = np.random.default_rng(1)
    per_shard = max(1, int(gib * (1 << 30)) // shards // (side * side * 2))
    folder.mkdir(parents=True)
    weight_map, names = {}, {}
    for k in range(shards):
        shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for i in range(per_shard):
            x = rng.standard_normal(side * side, dtype=np.float32) * np.float32(0.02)
            tensors[f"model.layers.{k * per_shard + i}.weight"] = narrow(x, "BF16").reshape(
                side, side
            )
        write_tensors(folder / shard, tensors, {"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        names[shard] = list(tensors)
    total = sum((folder / s).stat().st_size for s in names)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def sharded_signature(
    path: Path, names: dict[str, list[str]], side: int, touch: float
) -> list[str]:
    """4-bit group-128 deltas for the leading ``touch`` share of the tensors (a shallow
    patch, as the paper's ~12%); the shards it touches."""
    rng = np.random.default_rng(2)
    ordered = [(shard, n) for shard, ns in names.items() for n in ns]
    chosen = ordered[: max(1, round(touch * len(ordered)))]
    deltas = {n: rng.normal(0, 1e-3, (side, side)).astype(np.float32) for _, n in chosen}
    sig = Signature.from_deltas(deltas, dtypes=dict.fromkeys(deltas, "BF16"), name="shallow")
    sig.quantize(4, "affine", "group", 128).save(path)
    return sorted({shard for shard, _ in chosen})


def run_sharded(work: Path, gib: float, shards: int, side: int, touch: float) -> dict:
    src = work / "ckpt"
    note(f"sharded: {gib} GiB in {shards} shards")
    names = build_sharded(src, gib, shards, side)
    touched = sharded_signature(work / "shallow.rws", names, side, touch)
    total = sum((src / s).stat().st_size for s in names)
    copy_s = []
    for _ in range(2):
        settle()
        t0 = time.perf_counter()
        shutil.copytree(src, work / "copy")
        copy_s.append(time.perf_counter() - t0)
        shutil.rmtree(work / "copy")
    args = {"src": str(src), "sigs": [str(work / "shallow.rws")], "out": str(work / "patched")}
    settle()
    apply_wall, apply_rss, out = run_measured(
        [sys.executable, "-c", CHILD, "apply", json.dumps(args)]
    )
    apply_s = json.loads(out)["work_s"]
    linked = [s for s in names if s not in touched]
    hard_linked = all(
        (work / "patched" / s).stat().st_ino == (src / s).stat().st_ino for s in linked
    )
    args = {"src": str(work / "patched"), "out": str(work / "restored")}
    settle()
    remove_wall, remove_rss, out = run_measured(
        [sys.executable, "-c", CHILD, "remove", json.dumps(args)]
    )
    remove_s = json.loads(out)["work_s"]
    same = {s: sha256(work / "restored" / s) == sha256(src / s) for s in names}
    index_same = sha256(work / "restored" / "model.safetensors.index.json") == sha256(
        src / "model.safetensors.index.json"
    )
    return {
        "shards": shards,
        "touch": touch,
        "bytes": total,
        "touched_shards": touched,
        "copytree_s": min(copy_s),
        "apply_s": apply_s,
        "apply_process_s": apply_wall,
        "apply_peak_rss_mb": apply_rss,
        "remove_s": remove_s,
        "remove_process_s": remove_wall,
        "remove_peak_rss_mb": remove_rss,
        "apply_vs_copy": apply_s / min(copy_s),
        "remove_vs_copy": remove_s / min(copy_s),
        "untouched_hard_linked": hard_linked,
        "restored_sha256_equal": all(same.values()) and index_same,
    }


# ---------------------------------------------------------------------------- report


def table(result: dict) -> str:
    return "\n\n".join(
        part(result)
        for key, part in (("fleet", fleet_table), ("sharded", sharded_table))
        if key in result
    )


def fleet_table(result: dict) -> str:
    rows = ["| fleet: 8 models × 4 task vectors | outputs | wall (s) | s / output | GB/s | "
            "peak RSS (MB) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in result["fleet"].items():
        per = r["wall_s"] / r["outputs"]
        rows.append(f"| {name} | {r['outputs']} | {r['wall_s']:.2f} | {per:.3f} | "
                    f"{r['gb_s']:.3f} | {r['peak_rss_mb']:.0f} |")  # fmt: skip
    rows.append(f"\nsame sha256 from every robustpatch run: {result['same_outputs']}")
    return "\n".join(rows)


def sharded_table(result: dict) -> str:
    sh = result["sharded"]
    gib = sh["bytes"] / (1 << 30)
    rows = [
        f"| sharded: {gib:.2f} GiB bf16, {sh['shards']} shards, {len(sh['touched_shards'])} "
        f"touched ({sh['touch']:.0%} of the tensors) | time (s) | "
        "× copytree | peak RSS (MB) |",
        "|---|---|---|---|",
        f"| shutil.copytree | {sh['copytree_s']:.2f} | 1.00 | |",
        f"| apply_file (index → folder) | {sh['apply_s']:.2f} | {sh['apply_vs_copy']:.2f} | "
        f"{sh['apply_peak_rss_mb']:.0f} |",
        f"| remove_file (folder → folder) | {sh['remove_s']:.2f} | {sh['remove_vs_copy']:.2f} | "
        f"{sh['remove_peak_rss_mb']:.0f} |",
        f"\nuntouched shards hard-linked: {sh['untouched_hard_linked']}; "
        f"every restored shard's sha256 equals the original's: {sh['restored_sha256_equal']}",
    ]
    return "\n".join(rows)


def run_fleet(work: Path, llama: tuple, args: argparse.Namespace) -> dict:
    """The fleet by each robustpatch executor (and mergekit): times, RSS, same outputs."""
    merges = args.mergekit_merges or (N_MODELS * N_SIGS if args.size == "full" else 2)
    with_mk = bool(args.mergekit) and Path(args.mergekit).exists()
    if args.mergekit and not with_mk:
        note(f"no mergekit at {args.mergekit}: its row is left out (--mergekit PATH)")
    note(f"building the fleet in {work}")
    fleet = build_fleet(work, llama, with_mk)
    runs = {
        "robustpatch batch --workers 1": ["--workers", "1"],
        "robustpatch batch --workers 2": ["--workers", "2"],
    }
    if not args.no_ray:
        runs["robustpatch batch --executor ray --workers 2"] = [
            "--executor",
            "ray",
            "--workers",
            "2",
        ]
    results = {
        name: run_batch(work, fleet, f"out{i}", extra)
        for i, (name, extra) in enumerate(runs.items())
    }
    shas = [r.pop("sha256") for r in results.values()]
    if with_mk:
        results["mergekit-yaml task_arithmetic, one run per output"] = run_mergekit(
            work, fleet, args.mergekit, merges
        )
    shutil.rmtree(work / "tuned", ignore_errors=True)
    return {"fleet": results, "same_outputs": all(s == shas[0] for s in shas)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_const", dest="size", const="quick", help="tiny models (default)"
    )
    size.add_argument(
        "--full",
        action="store_const",
        dest="size",
        const="full",
        help="~100 MB models, 1 GiB checkpoint",
    )
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--shard-gib", type=float, help="sharded checkpoint size (default by size)")
    ap.add_argument(
        "--touch",
        type=float,
        default=0.12,
        help="share of the sharded checkpoint's tensors patched",
    )
    ap.add_argument(
        "--mergekit",
        default="/tmp/mk-venv/bin/mergekit-yaml",
        help="mergekit-yaml to run ('' skips)",
    )
    ap.add_argument(
        "--mergekit-merges",
        type=int,
        help="outputs mergekit builds (default: all 32 with --full, 2 with --quick: "
        "one merge takes ~15 s of start-up)",
    )
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray executor")
    ap.add_argument("--only", choices=("fleet", "sharded"), help="run one part")
    ap.add_argument("--dir", help="work folder (default: a temp folder)")
    ap.add_argument("--out", default=None, help="default results/fleet.json (quick: quick/)")
    args = ap.parse_args()
    cfg = SIZES[args.size or "quick"]
    full_out = RESULTS / "fleet.json"
    args.out = args.out or str(full_out if args.size == "full" else smoke_output(full_out))
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "size": args.size or "quick",
    }
    work = Path(tempfile.mkdtemp(prefix="rp-fleet-", dir=args.dir))
    try:
        if args.only != "sharded":
            result["llama"] = dict(zip(("hidden", "intermediate", "layers", "vocab"), cfg["llama"]))
            result.update(run_fleet(work, cfg["llama"], args))
        if args.only != "fleet":
            gib = args.shard_gib or cfg["shard_gib"]
            result["sharded"] = run_sharded(work, gib, args.shards, cfg["side"], args.touch)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    Path(args.out).with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
