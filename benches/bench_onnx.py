"""ONNX deployment benchmark (issue 18): what each deployable variant of the demo's
models costs and keeps.

Trains the demo's models at the demo's sizes (``--quick``: its test-sized config): a
SmallCNN pretrained on procedural shapes, a clean fine-tune on digits and one robust
fine-tune per corruption, and deploys the demo's primary arm per corruption: the 4-bit
shallow projection signature (leading layers within the parameter budget), α = 1,
BatchNorm re-estimated on unlabeled corrupted images. A device gets that arm as two
signature files: the weight deltas and the re-estimated statistics (BatchNorm
replacements). For the clean model and each arm, in one run, five deployments:

- ``torch f32``: the patched, re-estimated torch model (the reference);
- ``ONNX f32 apply``: torch's export of the clean model (``optimize=False``, BatchNorm
  kept) patched on disk by ``rp.onnx.apply`` (checked: its initializers equal the
  patched torch model's export bit for bit, and ``rp.onnx.remove`` gives back the
  export's sha256);
- ``ONNX session``: the clean export patched at load time by ``rp.onnx.session``;
- ``ONNX f16`` and ``ONNX int8`` (static, QDQ, calibrated on 256 clean training
  images): ``rp.onnx.export`` of the patched model (BatchNorm folded);

each with clean accuracy and accuracy per corruption (mean over severities 1-5) through
onnxruntime on CPU, file size (and base model + signature file), latency per image
(batch 1, one thread, median) and the max abs logit error against torch on the clean
test set. Last, switching signatures on a device: ``rp.onnx.session`` against
``rp.onnx.apply`` + a session on the written file (and a plain session of the base
model as the floor), median of ``--repeat``, on the demo's models and on a wider
untrained SmallCNN with a synthetic signature (``--large-widths``: how it scales).

Output: benches/results/onnx.json and benches/results/onnx.md (a Markdown table).
Run:  python benches/bench_onnx.py [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

import robustpatch as rp
import robustpatch.onnx as ro
from _common import sha256
from robustpatch.lab import datasets, models, recipes
from robustpatch.lab import experiments as X
from robustpatch.lab.demo import DemoConfig

RESULTS = Path(__file__).parent / "results"


# ---------------------------------------------------------------------------- models


def train_models(cfg: DemoConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """The demo's pretrained, clean and robust models and the shallow signatures."""
    from robustpatch.lab.demo.config import SCALE, SEVERITIES

    log(f"pretraining on {cfg.pretrain_images} procedural shapes")
    shapes = datasets.procedural_shapes(cfg.pretrain_images, seed=cfg.seed)
    xs, ys = shapes.tensors()
    net = models.SmallCNN(num_classes=shapes.num_classes, seed=cfg.seed)
    models.fit(net, xs, ys, epochs=cfg.pretrain_epochs, seed=cfg.seed, device="cpu")
    pre = {k: v.detach().clone() for k, v in net.state_dict().items()}
    test = datasets.load_digits32("test")
    if cfg.test_images:
        test = test.subset(slice(0, cfg.test_images))
    task = X.Task.from_sets(
        "digits32", datasets.load_digits32("train"), test, scale=SCALE, bn_images=cfg.bn_images
    )

    def finetune(corruption: str | None) -> torch.nn.Module:
        log(f"fine-tuning {corruption or 'clean'}")
        m = models.SmallCNN(num_classes=10, seed=cfg.seed)
        m.load_state_dict(pre)
        transform = (
            recipes.corruption_transform(corruption, SEVERITIES, SCALE) if corruption else None
        )
        recipes.train(m, task.x_train, task.y_train, cfg.finetune, transform, torch.device("cpu"))
        return m.cpu().eval()

    clean = finetune(None)
    units = X.depth_units(clean)
    shallow = units[: X.units_within(units, cfg.budget)]
    pre_np, clean_np = X.state_arrays(pre), X.state_arrays(clean)
    arms = {}
    for c in cfg.corruptions:
        robust = X.state_arrays(finetune(c))
        sig = X.make_signature(pre_np, clean_np, robust, shallow, name=c).quantize(bits=cfg.bits)
        arms[c] = deployable(clean, sig, task.pool(c))
    return {"task": task, "clean": clean, "arms": arms}


def deployable(clean: torch.nn.Module, sig: Any, pool: torch.Tensor) -> dict[str, Any]:
    """The demo's primary arm (shallow signature, α = 1, BatchNorm re-estimated on
    unlabeled corrupted images) as files a device applies: the signature's weight
    deltas, and the re-estimated statistics as BatchNorm replacements (α = 1 replaces)."""
    reference = X.patched(clean, sig, 1.0, bn="reestimate", pool=pool)
    weights = sig.select(n for n, e in sig.entries.items() if e.kind == "delta")
    stats = {
        k: v.numpy().copy()
        for k, v in reference.state_dict().items()
        if k.endswith(("running_mean", "running_var"))
    }
    bn = rp.Signature.from_deltas({}, bn=stats, name=f"{sig.name}-bn")
    return {"sigs": [weights, bn], "torch": reference}


def export_unfolded(model: torch.nn.Module, path: Path) -> Path:
    """torch's export keeping BatchNorm (what rp.onnx.apply patches)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.rand(1, 3, 32, 32),),
            str(path),
            dynamo=True,
            optimize=False,
            dynamic_shapes=({0: "batch"},),
        )
    return path


# ---------------------------------------------------------------------------- measuring


def files_size(path: Path) -> int:
    """The model's bytes and those of the external data it reads (a patched model's data
    file has a name of its own per write)."""
    m = ro.load(path)
    return path.stat().st_size + (m.data_id[2] if m.data_id else 0)


def one_thread() -> Any:
    """Session options of every onnxruntime session here: one intra-op thread."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return opts


def ort_session(path: Path) -> Any:
    return ort.InferenceSession(str(path), one_thread(), providers=["CPUExecutionProvider"])


def rp_session(base: Path, sig: Any) -> Any:
    return ro.session(base, sig, [1.0], sess_options=one_thread())


class Runner:
    """Logits and latency of one deployment (an onnxruntime session or torch)."""

    def __init__(self, sess: Any = None, module: torch.nn.Module | None = None) -> None:
        self.sess, self.module = sess, module

    def logits(self, x: torch.Tensor) -> np.ndarray:
        out = []
        for k in range(0, len(x), 256):
            xb = x[k : k + 256]
            if self.module is not None:
                with torch.no_grad():
                    out.append(self.module(xb).numpy())
            else:
                name = self.sess.get_inputs()[0].name
                out.append(self.sess.run(None, {name: xb.numpy()})[0])
        return np.concatenate(out).astype(np.float32)

    def latency_us(self, x1: torch.Tensor, runs: int) -> float:
        """Median time of one single-image forward pass, in microseconds."""
        times = []
        for k in range(runs + 5):
            t = time.perf_counter()
            self.logits(x1)
            if k >= 5:
                times.append(time.perf_counter() - t)
        return 1e6 * statistics.median(times)


def measure(
    runner: Runner, task: Any, corruptions: list[str], ref: np.ndarray, runs: int
) -> dict[str, Any]:
    y = task.y_test.numpy()
    logits = runner.logits(task.x_test)
    per = {}
    for c in corruptions:
        accs = [
            100.0 * float((runner.logits(task.test_set(c, s)).argmax(1) == y).mean())
            for s in task.severities
        ]
        per[c] = float(np.mean(accs))
    return {
        "clean_acc": 100.0 * float((logits.argmax(1) == y).mean()),
        "corrupted_acc": per,
        "latency_us": runner.latency_us(task.x_test[:1], runs),
        "max_abs_error": float(np.abs(logits - ref).max()),
    }


def initializers(path: Path) -> dict[str, bytes]:
    return {t.name: numpy_helper.to_array(t).tobytes() for t in onnx.load(path).graph.initializer}


def variants(
    name: str, arm: dict[str, Any] | None, data: dict[str, Any], work: Path, base: Path, args: Any
) -> list[dict[str, Any]]:
    """The five deployments of the clean model with ``arm`` (None: the clean model)."""
    task, corruptions = data["task"], list(data["arms"])
    torch_model = data["clean"] if arm is None else arm["torch"]
    sig = None if arm is None else arm["sigs"]
    ref = Runner(module=torch_model).logits(task.x_test)
    base_plus_sig = files_size(base)
    for k, part in enumerate(sig or []):
        base_plus_sig += part.save(work / f"{name}{k}.rws").stat().st_size
    rows = []

    def row(variant: str, runner: Runner, size: int, **extra: Any) -> None:
        m = measure(runner, task, corruptions, ref, args.latency_runs)
        rows.append(
            {"model": name, "variant": variant, "bytes": size, "base_plus_signature": base_plus_sig}
            | m
            | extra
        )
        print(
            f"  {name:>15} {variant:<15} clean {m['clean_acc']:.1f}%  err {m['max_abs_error']:.2g}"
        )

    state = torch_model.state_dict().values()
    f32_bytes = 4 * sum(p.numel() for p in state if p.is_floating_point())
    row("torch f32", Runner(module=torch_model), f32_bytes)
    if sig is None:
        row("ONNX f32", Runner(ort_session(base)), files_size(base))
    else:
        out = ro.apply(base, sig, [1.0], out=work / f"{name}.onnx").out
        torch_export = export_unfolded(torch_model, work / f"{name}_torch.onnx")
        exact = initializers(out) == initializers(torch_export)
        (work / "back").mkdir(exist_ok=True)
        ro.remove(out, work / "back" / base.name)
        restored = sha256(work / "back" / base.name) == sha256(base)
        checks = {"bit_exact": exact, "remove_sha256_ok": restored}
        row("ONNX f32 apply", Runner(ort_session(out)), files_size(out), **checks)
        row("ONNX session", Runner(rp_session(base, sig)), files_size(base))
    calibration = task.x_train[:256]
    for variant, kw in (("ONNX f16", {"dtype": "f16"}), ("ONNX int8", {"int8": "static"})):
        path = work / f"{name}_{variant.split()[1]}.onnx"
        ro.export(
            torch_model, calibration[:8], path, calibration=calibration, min_agreement=0.0, **kw
        )
        row(variant, Runner(ort_session(path)), path.stat().st_size)
    return rows


def switching(cases: list[tuple[str, Path, Any]], work: Path, repeat: int) -> list[dict]:
    """Seconds to get a patched session of each (label, base model, signatures): at load
    time vs rewriting the file first, and a plain session of the base model."""
    rows = []
    for label, base, sig in cases:
        times: dict[str, list[float]] = {
            "plain session": [],
            "rp.onnx.session": [],
            "apply + session": [],
        }
        for k in range(repeat):
            t = time.perf_counter()
            ort_session(base)
            times["plain session"].append(time.perf_counter() - t)
            t = time.perf_counter()
            rp_session(base, sig)
            times["rp.onnx.session"].append(time.perf_counter() - t)
            t = time.perf_counter()
            out = ro.apply(base, sig, [1.0], out=work / f"switch{k}.onnx").out
            ort_session(out)
            times["apply + session"].append(time.perf_counter() - t)
        medians = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"signature": label, "model_bytes": files_size(base)} | medians)
    return rows


def large_case(work: Path, widths: tuple[int, ...]) -> tuple[str, Path, Any]:
    """A wider SmallCNN (untrained) and a synthetic 4-bit signature over its first stage:
    how switching scales with the model's size."""
    model = models.SmallCNN(num_classes=10, widths=widths, seed=0).eval()
    base = export_unfolded(model, work / "large.onnx")
    state = X.state_arrays(model)
    rng = np.random.default_rng(0)
    first = ("features.0.", "features.1.", "features.3.", "features.4.")
    deltas = {
        k: rng.normal(0, 1e-3, v.shape).astype(np.float32)
        for k, v in state.items()
        if k.startswith(first) and v.dtype == np.float32 and "running" not in k
    }
    sig = rp.Signature.from_deltas(deltas, name="synthetic").quantize(bits=4)
    return f"synthetic (widths {'/'.join(map(str, widths))})", base, [sig]


# ---------------------------------------------------------------------------- report


def markdown(result: dict[str, Any]) -> str:
    corruptions = result["corruptions"]
    head = ["model", "variant", "clean acc"] + [f"{c} acc" for c in corruptions]
    head += ["size", "base + sig files", "latency / image", "max abs err vs torch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["model"], r["variant"], f"{r['clean_acc']:.1f}%"]
        cells += [f"{r['corrupted_acc'][c]:.1f}%" for c in corruptions]
        cells += [
            f"{r['bytes'] / 1024:.0f} KiB",
            f"{r['base_plus_signature'] / 1024:.0f} KiB",
            f"{r['latency_us']:.0f} µs",
            f"{r['max_abs_error']:.2g}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    checks = [r for r in result["rows"] if "bit_exact" in r]
    lines.append("")
    lines.append(
        f"rp.onnx.apply initializers equal torch's patched export bit for bit: "
        f"{sum(r['bit_exact'] for r in checks)}/{len(checks)}; rp.onnx.remove gives back the "
        f"export's sha256: {sum(r['remove_sha256_ok'] for r in checks)}/{len(checks)}."
    )
    lines += [
        "",
        "| signature | model files | plain session | rp.onnx.session | apply + session |",
        "|---|---|---|---|---|",
    ]
    for s in result["switching"]:
        cells = [
            f"{1e3 * s[k]:.1f} ms" for k in ("plain session", "rp.onnx.session", "apply + session")
        ]
        size = f"{s['model_bytes'] / 2**20:.2f} MiB"
        lines.append(f"| {s['signature']} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the demo's test-sized models (minutes)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for training")
    ap.add_argument("--latency-runs", type=int, default=None, help="timed single-image runs")
    ap.add_argument("--repeat", type=int, default=5, help="switching timings: runs per signature")
    ap.add_argument(
        "--large-widths",
        type=int,
        nargs=3,
        default=[128, 256, 512],
        help="stage widths of the larger (untrained) SmallCNN of the switching timings",
    )
    ap.add_argument("--out", default=str(RESULTS / "onnx.json"))
    args = ap.parse_args()
    args.latency_runs = args.latency_runs or (30 if args.quick else 200)
    torch.set_num_threads(args.threads)
    cfg = DemoConfig.tiny() if args.quick else DemoConfig.quick()
    t0 = time.perf_counter()
    data = train_models(cfg, lambda s: print(s, flush=True))
    train_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = export_unfolded(data["clean"], work / "clean.onnx")
        rows = variants("clean", None, data, work, base, args)
        for name, arm in data["arms"].items():
            rows += variants(name, arm, data, work, base, args)
        cases = [(name, base, arm["sigs"]) for name, arm in data["arms"].items()]
        cases.append(large_case(work, tuple(args.large_widths)))
        switch = switching(cases, work, args.repeat)
    result = {
        "note": "timings vary between runs: compare within one run",
        "size": "quick" if args.quick else "demo quick config",
        "corruptions": list(data["arms"]),
        "rows": rows,
        "switching": switch,
        "train_seconds": train_s,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
