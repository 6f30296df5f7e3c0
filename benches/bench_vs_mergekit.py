"""robustpatch against mergekit's task arithmetic on one Llama-style bf16 model.

Generates (seeded) a Llama-style model of about ``--size-gb`` GB in bfloat16 (a
``config.json`` and ``model.safetensors``, as a Hugging Face folder) and a fine-tune of
it that changes every tensor by a few bf16 steps: one full task vector. Then, in one
run, each step a separate process timed by ``/usr/bin/time -v`` (wall time and peak
resident set):

- ``cp`` of the model (the floor: every byte read and written once);
- mergekit's task arithmetic (``mergekit-yaml``, base + 1.0 × (fine-tune − base));
- ``robustpatch extract --method difference --layers all`` then ``apply``: end to
  end, and the dense apply alone (the task vector is streamed, the record refers to it);
- a 4-bit group-128 quantization of the task vector applied to the whole model (the
  record refers to it by content hash; again with ``--embed-signature``), and removed;
- an in-place shallow patch (embeddings + the first 2 layers, ≤ 10% of the bytes,
  ``apply --inplace``) and its in-place removal (sha256 checked);
- ``robustpatch similarity DIR --json`` over ``--sigs`` 4-bit signatures, its
  agreement with the cosine of the dequantized deltas (numpy, float64), and the
  pairwise dot kernel on the first ``--pairwise`` of them for comparison.

Outputs are checked: mergekit's and ours must equal the fine-tune tensor for tensor.
Writes ``benches/results/vs_mergekit.json`` and ``.md`` (a Markdown table). Timings on a
shared machine are noisy: ratios within one run are what matter.

Run:  python benches/bench_vs_mergekit.py [--quick] [--mergekit /tmp/mk-venv/bin/mergekit-yaml]
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

from _common import llama_config, llama_shapes, run_measured, sha256, smoke_output
from robustpatch._format.safetensors import TensorInfo, encode_header, read_header
from robustpatch.signature import Signature

RESULTS = Path(__file__).parent / "results"
CLI = [sys.executable, "-m", "robustpatch.cli", "-q"]


# ---------------------------------------------------------------------------- the models


def write_pair(base: Path, ft: Path, dims: tuple[int, int, int, int], seed: int) -> int:
    """The base model and its fine-tune (every element moved by -2..2 bf16 steps, so
    each difference is exact in bf16); returns the model's size in bytes."""
    rng = np.random.default_rng(seed)
    shapes = llama_shapes(*dims)
    infos, offset = [], 0
    for name, shape in shapes.items():
        n = 2 * int(np.prod(shape))
        infos.append(TensorInfo(name, "BF16", shape, offset, offset + n))
        offset += n
    pool = (rng.standard_normal(1 << 22, dtype=np.float32) * 0.02).view(np.uint32) >> 16
    pool = pool.astype(np.uint16)
    steps = rng.integers(-2, 3, 1 << 22).astype(np.int32)
    head = encode_header(infos, {"format": "pt"})
    for folder in (base, ft):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(llama_config(*dims)))
    with open(base / "model.safetensors", "wb") as fb, open(ft / "model.safetensors", "wb") as ff:
        fb.write(head)
        ff.write(head)
        for k, t in enumerate(infos):
            n = t.nbytes // 2
            shift = (k * 7919) % (1 << 20)
            b = np.resize(np.roll(pool, shift), n)
            if t.name.endswith("norm.weight"):
                b[:] = 0x3F80  # 1.0, as a trained RMSNorm starts
            f = (b.astype(np.int32) + np.resize(np.roll(steps, shift), n)).astype(np.uint16)
            fb.write(b.tobytes())
            ff.write(f.tobytes())
    return len(head) + offset


# ---------------------------------------------------------------------------- measuring


def timed(argv: list) -> dict:
    """Wall seconds and peak RSS (MB) of ``argv``, rounded for the table."""
    wall, rss, _ = run_measured(argv)
    return {"wall_s": round(wall, 3), "peak_rss_mb": round(rss, 1)}


def settle() -> None:
    os.sync()
    time.sleep(0.5)


def best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["wall_s"])


def repeat(n: int, argv: list, before=None) -> dict:
    runs = []
    for _ in range(n):
        if before is not None:
            before()
        settle()
        runs.append(timed(argv))
    return best(runs)


def tensors_equal(a: Path, b_files: list[Path]) -> tuple[int, int]:
    """(equal, total) tensors of ``a`` against the same names in ``b_files``."""
    want = read_header(a)
    have = {}
    for f in b_files:
        h = read_header(f)
        have.update({t.name: (f, h, t) for t in h.tensors})
    equal = 0
    with open(a, "rb") as fa:
        for t in want.tensors:
            if t.name not in have:
                continue
            f, h, u = have[t.name]
            fa.seek(want.data_start + t.begin)
            x = fa.read(t.nbytes)
            with open(f, "rb") as fb:
                fb.seek(h.data_start + u.begin)
                equal += x == fb.read(u.nbytes) and u.dtype == t.dtype
    return equal, len(want.tensors)


# ---------------------------------------------------------------------------- the steps


def run_mergekit(mk: str, base: Path, ft: Path, out: Path, repeats: int) -> dict:
    cfg = out.parent / "task_arithmetic.yml"
    cfg.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        f"  - model: {ft}\n    parameters:\n      weight: 1.0\ndtype: bfloat16\n"
    )
    argv = [mk, cfg, out, "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
    r = repeat(repeats, argv, lambda: shutil.rmtree(out, ignore_errors=True))
    files = sorted(out.glob("*.safetensors"))
    r["equal_tensors"], r["tensors"] = tensors_equal(ft / "model.safetensors", files)
    return r


def run_ours(work: Path, base: Path, ft: Path, repeats: int) -> dict:
    model, tv, out = base / "model.safetensors", work / "tv.rws", work / "ours.safetensors"

    def clean_out() -> None:
        for p in (out, Path(str(out) + ".rpundo")):
            p.unlink(missing_ok=True)

    def clean_tv() -> None:
        tv.unlink(missing_ok=True)

    extract = [*CLI, "extract", "-", model, ft / "model.safetensors", "-o", tv]
    extract += ["--method", "difference", "--layers", "all"]
    ex = repeat(repeats, extract, clean_tv)
    ap = repeat(repeats, [*CLI, "apply", model, tv, "-o", out], clean_out)
    equal = tensors_equal(ft / "model.safetensors", [out])
    record = Path(str(out) + ".rpundo").stat().st_size
    rm = repeat(repeats, [*CLI, "remove", out, "-o", work / "restored.safetensors", "--overwrite"])
    restored = sha256(work / "restored.safetensors") == sha256(model)
    (work / "restored.safetensors").unlink()
    return {
        "extract": ex,
        "apply_dense": ap | {"equal_tensors": equal[0], "tensors": equal[1]},
        "end_to_end": {
            "wall_s": round(ex["wall_s"] + ap["wall_s"], 3),
            "peak_rss_mb": max(ex["peak_rss_mb"], ap["peak_rss_mb"]),
        },
        "remove_dense": rm | {"restored_sha256_equal": restored},
        "signature_bytes": tv.stat().st_size,
        "undo_record_bytes": record,
    }


def run_quantized(work: Path, base: Path, repeats: int) -> dict:
    """The 4-bit signature of every tensor applied (its record refers to it by content
    hash), the same with ``--embed-signature`` (the record holds a copy of it), and the
    removal (sha256 checked)."""
    model, tv4 = base / "model.safetensors", work / "tv4.rws"
    subprocess.run([*CLI, "quantize", work / "tv.rws", "-o", tv4, "--bits", "4"], check=True)
    out, record = work / "q.safetensors", work / "q.safetensors.rpundo"

    def clean() -> None:
        for p in (out, record):
            p.unlink(missing_ok=True)

    argv = [*CLI, "apply", model, tv4, "-o", out]
    embedded = repeat(repeats, [*argv, "--embed-signature"], clean)
    embedded["undo_record_bytes"] = record.stat().st_size
    r = repeat(repeats, argv, clean)
    r["undo_record_bytes"] = record.stat().st_size
    restored = work / "q_restored.safetensors"
    rm = repeat(repeats, [*CLI, "remove", out, "-o", restored, "--overwrite"])
    rm["restored_sha256_equal"] = sha256(restored) == sha256(model)
    restored.unlink()
    clean()
    return r | {
        "signature_bytes": tv4.stat().st_size,
        "embedded": embedded,
        "remove": rm,
    }


def run_inplace(work: Path, base: Path, ft: Path, repeats: int) -> dict:
    """A shallow signature (input embeddings + layers 0-1: 9% of the full model's
    bytes) applied in place and removed."""
    model = base / "model.safetensors"
    shallow = work / "shallow.rws"
    layers = [r"model\.embed_tokens", r"model\.layers\.[01]"]
    argv = [*CLI, "extract", "-", model, ft / "model.safetensors", "-o", shallow]
    argv += ["--method", "difference", *[x for r in layers for x in ("--layers", r)]]
    subprocess.run(argv, check=True)
    sig = Signature.load(shallow)
    touched = sum(2 * e.numel for e in sig.deltas.values())
    target = work / "inplace.safetensors"
    shutil.copyfile(model, target)
    original = sha256(target)
    runs, removes = [], []
    for _ in range(repeats):
        settle()
        runs.append(timed([*CLI, "apply", target, shallow, "--inplace"]))
        settle()
        removes.append(timed([*CLI, "remove", target, "--inplace"]))
    restored = sha256(target) == original
    target.unlink()
    return {
        "apply_inplace": best(runs),
        "remove_inplace": best(removes),
        "touched_share": round(touched / model.stat().st_size, 4),
        "restored_sha256_equal": restored,
    }


def run_similarity(work: Path, n: int, numel: int, pairwise: int, seed: int) -> dict:
    """``n`` 4-bit signatures (8 tensors each) around 8 directions, compared."""
    from robustpatch.signature import algebra

    rng = np.random.default_rng(seed)
    lib = work / "library"
    lib.mkdir(exist_ok=True)
    per = numel // 8
    centres = [rng.standard_normal((8, per)).astype(np.float32) for _ in range(8)]
    sigs = []
    for i in range(n):
        d = centres[i % 8] + 0.8 * rng.standard_normal((8, per)).astype(np.float32)
        s = Signature.from_deltas({f"t{k}": d[k] for k in range(8)}, name=f"s{i:03d}")
        s = s.quantize(4, "affine", "group", 128)
        s.save(lib / f"s{i:03d}.rws")
        sigs.append(s)
    settle()
    wall, rss, out = run_measured([*CLI, "similarity", lib, "--json"])
    r = {"wall_s": round(wall, 3), "peak_rss_mb": round(rss, 1)}
    got = np.array(json.loads(out)["cosine"])
    deq = np.stack(
        [np.concatenate([s[f"t{k}"].dense().astype(np.float64) for k in range(8)]) for s in sigs]
    )
    g = deq @ deq.T
    norms = np.sqrt(np.diag(g))
    ref = g / np.outer(norms, norms)
    forms = [algebra._Deltas(s) for s in sigs[:pairwise]]
    t0 = time.perf_counter()
    for i in range(pairwise):
        for j in range(i + 1, pairwise):
            algebra._cosine(forms[i], forms[j], union=True)
    pair_s = time.perf_counter() - t0
    pairs = pairwise * (pairwise - 1) // 2
    return r | {
        "signatures": n,
        "elements_per_signature": per * 8,
        "max_abs_diff_vs_dequantized": float(np.abs(got - ref).max()),
        "pairwise_kernel_s_per_pair": pair_s / pairs,
        "pairwise_kernel_pairs_timed": pairs,
        "pairwise_kernel_estimate_all_pairs_s": round(pair_s / pairs * n * (n - 1) / 2, 2),
    }


# ---------------------------------------------------------------------------- report


def table(res: dict) -> str:
    cp = res["cp"]["wall_s"]
    mk = res["mergekit"]
    ours = res["ours"]
    rows = [
        ("cp (model copy)", res["cp"]),
        ("mergekit task arithmetic", mk),
        ("robustpatch extract (difference)", ours["extract"]),
        ("robustpatch apply (dense, streamed)", ours["apply_dense"]),
        ("robustpatch extract + apply", ours["end_to_end"]),
        ("robustpatch remove (dense)", ours["remove_dense"]),
        ("robustpatch apply (4-bit, every tensor)", res["quantized"]),
        ("robustpatch apply (4-bit, --embed-signature)", res["quantized"]["embedded"]),
        ("robustpatch remove (4-bit)", res["quantized"]["remove"]),
        (
            f"robustpatch apply --inplace ({100 * res['inplace']['touched_share']:.1f}% of bytes)",
            res["inplace"]["apply_inplace"],
        ),
        ("robustpatch remove --inplace", res["inplace"]["remove_inplace"]),
    ]
    lines = [
        "| step | wall s | × cp | × mergekit | peak RSS MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['wall_s']:.2f} | {r['wall_s'] / cp:.2f} | "
            f"{r['wall_s'] / mk['wall_s']:.3f} | {r['peak_rss_mb']:.0f} |"
        )
    s = res["similarity"]
    lines += [
        "",
        f"similarity of {s['signatures']} 4-bit signatures ({s['elements_per_signature']} "
        f"elements each): {s['wall_s']:.2f} s (CLI, whole process), peak RSS "
        f"{s['peak_rss_mb']:.0f} MB; max |cosine − dequantized cosine| = "
        f"{s['max_abs_diff_vs_dequantized']:.2e}; pairwise dot kernel "
        f"{1e3 * s['pairwise_kernel_s_per_pair']:.2f} ms per pair (≈ "
        f"{s['pairwise_kernel_estimate_all_pairs_s']:.1f} s for all pairs)",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.1, help="model size (bf16)")
    ap.add_argument("--quick", action="store_true", help="a ~60 MB model, 40 signatures")
    ap.add_argument("--mergekit", default="/tmp/mk-venv/bin/mergekit-yaml")
    ap.add_argument("--repeat", type=int, default=1, help="runs per step (best kept)")
    ap.add_argument("--sigs", type=int, default=200, help="signatures for similarity")
    ap.add_argument("--sig-elements", type=int, default=1 << 18, help="elements per signature")
    ap.add_argument("--pairwise", type=int, default=40, help="signatures for the pairwise timing")
    ap.add_argument("--dir", help="work folder (default: a temp folder)")
    ap.add_argument(
        "--out", default=None, help="default results/vs_mergekit.json (--quick: quick/)"
    )
    args = ap.parse_args()
    full_out = RESULTS / "vs_mergekit.json"
    args.out = args.out or str(smoke_output(full_out) if args.quick else full_out)
    if args.quick:
        dims, args.sigs, args.sig_elements, args.pairwise = (256, 704, 4, 8000), 40, 1 << 14, 10
    else:  # 27 layers of 1280 x 3456, an 8000 vocabulary: 1.11 GB at --size-gb 1.1
        dims = (1280, 3456, max(3, round(27 * args.size_gb / 1.1)), 8000)
    work = Path(args.dir or tempfile.mkdtemp(prefix="rp-vs-mk-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base, ft = work / "base", work / "ft"
        size = write_pair(base, ft, dims, seed=19)
        res = {
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
            "model": {"bytes": size, "dims": dims, "dtype": "BF16"},
            "note": "timings vary between runs: compare ratios within one run",
        }
        res["cp"] = repeat(
            args.repeat, ["cp", base / "model.safetensors", work / "copy.safetensors"]
        )
        (work / "copy.safetensors").unlink()
        res["mergekit"] = run_mergekit(args.mergekit, base, ft, work / "mk_out", args.repeat)
        shutil.rmtree(work / "mk_out")
        res["ours"] = run_ours(work, base, ft, args.repeat)
        res["quantized"] = run_quantized(work, base, args.repeat)
        res["inplace"] = run_inplace(work, base, ft, args.repeat)
        res["similarity"] = run_similarity(work, args.sigs, args.sig_elements, args.pairwise, 5)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        md = table(res)
        out.with_suffix(".md").write_text(md + "\n")
        print(md)
    finally:  # a failed run leaves no gigabytes in /tmp either
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
