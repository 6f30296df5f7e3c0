"""The demo's run: pretrain, fine-tune the twins, run the experiments, collect results."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import robustpatch
from robustpatch.signature import Signature

from .. import datasets, models, outputs, recipes, training
from .. import experiments as X
from .claims import claims
from .config import POLICY, PRIMARY, SCALE, SEVERITIES, DemoConfig
from .report import write_report

# ---------------------------------------------------------------------------- progress


class _Progress:
    """A tqdm bar over the run's steps when asked for and installed; log lines always."""

    def __init__(self, total: int, enabled: bool, log: Callable[[str], None]) -> None:
        self.log_fn = log
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc="demo", unit="step", file=sys.stderr)
            except ImportError:
                self.bar = None

    def log(self, msg: str) -> None:
        if self.bar is not None:
            with self.bar.external_write_mode(file=sys.stderr):
                self.log_fn(msg)
        else:
            self.log_fn(msg)

    def step(self, what: str = "") -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(1)

    def note(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------- helpers


def corrupt_batch(name: str) -> recipes.Transform:
    """A training transform: each batch corrupted at a random severity 1–5."""
    return recipes.corruption_transform(name, SEVERITIES, SCALE)


def _fp32_nbytes(model: nn.Module) -> int:
    """Bytes of the model's floating-point tensors stored as float32."""
    return sum(4 * v.numel() for v in model.state_dict().values() if v.is_floating_point())


def _touched(sig: Signature, params: dict[str, int]) -> int:
    return sum(params[n] for n in sig.deltas if n in params)


def _load_avg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def provenance(device: torch.device) -> dict[str, Any]:
    """What produced the numbers: versions, commit, thread count and device."""
    return {
        "robustpatch": robustpatch.__version__,
        "commit": git_commit(Path(robustpatch.__file__).parent),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }


def git_commit(package_dir: Path) -> str:
    """The commit of the git checkout `package_dir` is tracked in (``-dirty`` when tracked
    files differ from it), or ``"unknown"`` outside a checkout (an installed wheel)."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["git", "-C", str(package_dir), *args], capture_output=True, text=True, timeout=30
        )

    try:
        # Tracked, not merely inside some repository (a venv in a project's tree).
        if git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:
            return "unknown"
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


@dataclass
class _Run:
    """What the stages share."""

    config: DemoConfig
    device: torch.device
    out: Path
    progress: _Progress
    pre_state: dict[str, torch.Tensor] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t

    def new_model(self) -> nn.Module:
        m = models.SmallCNN(num_classes=10, seed=self.config.seed)
        m.load_state_dict(self.pre_state)
        return m

    def finetune(self, task: X.Task, corruption: str | None, seed: int, label: str) -> nn.Module:
        cfg = dataclasses.replace(self.config.finetune, seed=seed)
        transform = corrupt_batch(corruption) if corruption else None
        model = self.new_model()

        def tick(epoch: int, loss: float) -> None:
            self.progress.note(f"{label} epoch {epoch + 1}/{cfg.epochs} loss {loss:.3f}")

        with self.stage("fine-tuning"):
            recipes.train(model, task.x_train, task.y_train, cfg, transform, self.device, tick)
        model = model.cpu().eval()
        if self.config.save_files:
            meta = recipes.checkpoint_metadata(
                recipe="corruption" if corruption else "clean",
                dataset=task.name,
                corruption=corruption,
                seed=seed,
                config=cfg,
                pretrained="procedural_shapes",
                scale=SCALE,
            )
            self.save_model(model, f"{label}.safetensors", meta)
        self.progress.step(label)
        return model

    def save_model(self, model: nn.Module, name: str, meta: dict) -> None:
        path = recipes.save_checkpoint(model, self.out / "files" / name, **meta)
        self.files[f"files/{name}"] = path.stat().st_size

    def save_signature(self, sig: Signature, name: str) -> int:
        path = sig.save(self.out / "files" / name)
        size = path.stat().st_size
        self.files[f"files/{name}"] = size
        return size


# ---------------------------------------------------------------------------- run


def run(
    out: Path,
    quick: bool = True,
    device: str | None = None,
    log: Callable[[str], None] = print,
    config: DemoConfig | None = None,
    progress: bool = False,
    threads: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Run the demo; write the report under `out`; return the results.

    `config` overrides the size chosen by `quick` (see `DemoConfig.tiny` for tests);
    `progress` shows a tqdm bar (log lines are written through `log` either way);
    `threads` sets torch's CPU thread count for the run (None: leave it; the caller's
    count is restored afterwards); `out` must be new or empty unless `overwrite`
    (checked before any training).
    """
    out = outputs.check_report_folder(out, overwrite)
    custom = config is not None
    config = config or (DemoConfig.quick() if quick else DemoConfig())
    config.check()
    dev = models.default_device(device)
    out.mkdir(parents=True, exist_ok=True)
    # Float sums split differently across threads and training amplifies the
    # difference, so a CPU run reproduces exactly only at the same thread count.
    with training.torch_threads(threads):
        return _demo(out, config, custom, quick, dev, log, progress)


def _demo(
    out: Path,
    config: DemoConfig,
    custom: bool,
    quick: bool,
    dev: torch.device,
    log: Callable[[str], None],
    progress: bool,
) -> dict:
    n = len(config.corruptions)
    seeds = [config.seed] + ([config.second_seed] if config.second_seed is not None else [])
    trained = _digits_seeds(config, seeds)
    transfer_on = config.transfer_images[0] > 0
    steps = 1 + len(trained) * (1 + n) + (1 + n if transfer_on else 0) + n + 4
    steps += 1 if config.robustifiers else 0
    steps += 1 if replicate_seeds(config) else 0
    bar = _Progress(steps, progress, log)
    ctx = _Run(config, dev, out, bar)
    t0 = time.perf_counter()
    load_start = _load_avg()
    try:
        results = _run(ctx, seeds, transfer_on)
    finally:
        bar.close()
    results["seconds"] = time.perf_counter() - t0
    results["timings"] = {k: round(v, 1) for k, v in ctx.timings.items()}
    results["machine"] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load_start,
        "load_average_end": _load_avg(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    results["provenance"] = provenance(dev)
    results["config"]["size"] = "custom" if custom else ("quick" if quick else "full")
    results["files"] = ctx.files
    results["claims"] = claims(results)
    write_report(out, results)
    return results


def _run(ctx: _Run, seeds: list[int], transfer_on: bool) -> dict:
    config, bar = ctx.config, ctx.progress
    # -- pretraining, once per run
    bar.log(f"[1/6] pretraining on {config.pretrain_images} procedural shapes ({ctx.device})")
    with ctx.stage("pretraining"):
        shapes = datasets.procedural_shapes(config.pretrain_images, seed=config.seed)
        xs, ys = shapes.tensors()
        net = models.SmallCNN(num_classes=shapes.num_classes, seed=config.seed)
        models.fit(net, xs, ys, epochs=config.pretrain_epochs, seed=config.seed, device=ctx.device)
    ctx.pre_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    if config.save_files:
        meta = recipes.checkpoint_metadata(
            recipe="pretrain",
            dataset="procedural_shapes",
            seed=config.seed,
            images=config.pretrain_images,
            epochs=config.pretrain_epochs,
        )
        ctx.save_model(net.cpu(), "pretrained.safetensors", meta)
    bar.step("pretrained")

    # -- data
    task_kw = dict(scale=SCALE, bn_images=config.bn_images)
    test = datasets.load_digits32("test")
    if config.test_images:
        test = test.subset(slice(0, config.test_images))
    digits = X.Task.from_sets("digits32", datasets.load_digits32("train"), test, **task_kw)
    patterns = None
    if transfer_on:
        n_tr, n_te = config.transfer_images
        pat = datasets.procedural_patterns(n_tr + n_te, seed=config.seed + 1)
        patterns = X.Task.from_sets(
            "patterns", pat.subset(slice(0, n_tr)), pat.subset(slice(n_tr, n_tr + n_te)), **task_kw
        )

    # -- fine-tuning: same pretrained weights, seed and data order within a seed
    bar.log("[2/6] fine-tuning clean and robust twins")
    clean: dict[tuple[str, int], nn.Module] = {}
    robust: dict[tuple[str, str, int], nn.Module] = {}
    trained = _digits_seeds(config, seeds)
    jobs = [(digits, s) for s in trained] + ([(patterns, config.seed)] if patterns else [])
    for task, s in jobs:
        clean[(task.name, s)] = ctx.finetune(task, None, s, f"{task.name}-clean-s{s}")
        for c in config.corruptions:
            robust[(task.name, c, s)] = ctx.finetune(task, c, s, f"{task.name}-{c}-s{s}")
    tasks = {t.name: t for t, _ in jobs}
    clean_acc = {f"{name}/seed{s}": tasks[name].clean_accuracy(m) for (name, s), m in clean.items()}
    bar.log("      clean accuracy: " + ", ".join(f"{k} {v:.1f}%" for k, v in clean_acc.items()))

    s0 = config.seed
    clean0 = clean[("digits32", s0)]
    pre = X.state_arrays(ctx.pre_state)
    clean_np = X.state_arrays(clean0)
    units = X.depth_units(clean0)
    k = X.units_within(units, config.budget)
    params = {name: p.numel() for name, p in clean0.named_parameters()}
    total_params = sum(params.values())
    weight_names = [name for name, p in models.parameters_by_depth(clean0) if p.dim() >= 2]
    results: dict[str, Any] = {
        "config": _config_dict(config, ctx.device),
        "units": [{"modules": list(u.modules), "params": u.params} for u in units],
        "shallow_units": k,
        "shallow_param_fraction": X.param_fraction(units, k),
        "total_params": total_params,
        "models": {k: {"clean_accuracy": v} for k, v in clean_acc.items()},
        "per_corruption": {},
    }

    # -- experiments 1-4, 8, 9 per corruption
    shallow: dict[str, Signature] = {}
    for i, c in enumerate(config.corruptions):
        bar.log(f"[3/6] {c} ({i + 1}/{len(config.corruptions)}): signatures, patches, sweeps")
        with ctx.stage("experiments per corruption"):
            r, sig = _per_corruption(
                ctx,
                c,
                digits,
                pre,
                clean_np,
                clean0,
                robust[("digits32", c, s0)],
                units,
                k,
                weight_names,
                params,
                total_params,
            )
        results["per_corruption"][c] = r
        shallow[c] = sig
        bar.step(c)

    # -- claim 2 again on other fine-tune seeds
    if replicate_seeds(config):
        bar.log(f"      claim 2 on fine-tune seeds {replicate_seeds(config)}")
        with ctx.stage("seed replicates"):
            results["replicates"] = _replicates(
                config, digits, pre, units[:k], clean, robust, replicate_seeds(config)
            )
        bar.step("replicates")

    # -- 5. similarity and detection
    bar.log("[4/6] similarity across corruptions, seeds and datasets; detection")
    with ctx.stage("similarity"):
        results["similarity"] = _similarity(
            ctx, pre, units[:k], clean, robust, shallow, seeds, patterns is not None
        )
    bar.step("similarity")

    # -- 6. composition
    bar.log("[5/6] composition and transfer")
    with ctx.stage("composition"):
        comps = []
        if config.composition and len(config.corruptions) >= 2:
            refs = {c: digits.evaluate(clean0, c) for c in config.corruptions}
            for a, b in itertools.combinations(config.corruptions, 2):
                comp = X.composition(
                    digits, a, b, clean0, shallow[a], shallow[b], references=refs, variants=True
                )
                comp["removal"] = X.removal_is_exact(clean0, shallow[a] + shallow[b])
                comps.append(comp)
        results["composition"] = comps
    bar.step("composition")

    # -- 7. transfer
    with ctx.stage("transfer"):
        results["transfer"] = {}
        if patterns is not None:
            clean_b = clean[("patterns", s0)]
            clean_b_np = X.state_arrays(clean_b)
            for c in config.corruptions:
                robust_b = robust[("patterns", c, s0)]
                own = X.make_signature(
                    pre, clean_b_np, X.state_arrays(robust_b), units[:k], name=f"patterns:{c}"
                )
                results["transfer"][c] = X.transfer(patterns, c, clean_b, robust_b, shallow[c], own)
    bar.step("transfer")

    if config.robustifiers:
        bar.log(f"      robustifiers compared ({config.robustifiers} size)")
        with ctx.stage("robustifiers"):
            results["robustifiers"] = _compare_robustifiers(ctx)
        bar.step("robustifiers")

    bar.log("[6/6] writing the report")
    results["summary"] = [summarize(c, results["per_corruption"][c]) for c in config.corruptions]
    bar.step("report")
    return results


def _digits_seeds(config: DemoConfig, seeds: list[int]) -> list[int]:
    """Every seed with digits twins: the similarity ``seeds`` and the replicates."""
    return sorted(set(seeds) | set(replicate_seeds(config)))


def replicate_seeds(config: DemoConfig) -> list[int]:
    """The fine-tune seeds claim 2 is measured on (empty: no replication)."""
    n = config.replicates
    return [config.seed + i for i in range(n)] if n >= 2 else []


# Two-sided 95% quantiles of Student's t by degrees of freedom (1-10).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def mean_ci(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and the half-width of a 95% t interval (NaN where
    a value is undefined or there are fewer than two)."""
    v = np.asarray(values, dtype=np.float64)
    nan = float("nan")
    mean = float(v.mean()) if len(v) and np.all(np.isfinite(v)) else nan
    sd = float(v.std(ddof=1)) if len(v) >= 2 and mean == mean else nan
    ci = _T95[min(len(v) - 2, len(_T95) - 1)] * sd / math.sqrt(len(v)) if sd == sd else nan
    return {"mean": mean, "sd": sd, "ci95": ci, "n": len(v)}


def _replicates(
    config: DemoConfig,
    task: X.Task,
    pre: dict,
    shallow_units: list[X.Unit],
    clean: dict,
    robust: dict,
    seeds: list[int],
) -> dict:
    """Claim 2's numbers (primary arm) for each fine-tune seed, and their mean ± 95% CI."""
    out = {}
    for c in config.corruptions:
        rows = []
        for s in seeds:
            cl, rb = clean[("digits32", s)], robust[("digits32", c, s)]
            sig = X.make_signature(
                pre, X.state_arrays(cl), X.state_arrays(rb), shallow_units, name=c
            )
            a = X.patch_arms(task, c, cl, rb, {"shallow": sig}, policies=(POLICY,))["arms"]
            p = a[PRIMARY]
            rows.append(
                {
                    "seed": s,
                    "robust_gain": a["robust"]["gain"],
                    "recovered": p["recovered"],
                    "vs_bn_only": p["mean"] - a["bn_reestimation_only"]["mean"],
                    "clean_loss": a["clean"]["clean"] - p["clean_adapted"],
                }
            )
        stats = {
            key: mean_ci([r[key] for r in rows])
            for key in ("robust_gain", "recovered", "vs_bn_only", "clean_loss")
        }
        out[c] = {"seeds": rows, "stats": stats}
    return out


def _compare_robustifiers(ctx: _Run) -> dict:
    """The five robustifiers of lab.robustifiers on the same digits (issue 7's table)."""
    from .. import robustifiers as R

    size = ctx.config.robustifiers
    if size not in ("tiny", "default"):
        raise ValueError(f"robustifiers must be 'tiny', 'default' or None, got {size!r}")
    config = R.ComparisonConfig.tiny() if size == "tiny" else R.ComparisonConfig()
    out = ctx.out / "robustifiers" if ctx.config.save_files else None
    return R.compare_methods(config, device=ctx.device, out=out, log=ctx.progress.log)


def _per_corruption(
    ctx: _Run,
    c: str,
    task: X.Task,
    pre: dict,
    clean_np: dict,
    clean: nn.Module,
    robust: nn.Module,
    units: list[X.Unit],
    k: int,
    weight_names: list[str],
    params: dict[str, int],
    total_params: int,
) -> tuple[dict, Signature]:
    config = ctx.config
    robust_np = X.state_arrays(robust)
    profile = X.layer_profile(pre, clean_np, robust_np, weight_names)
    by_diff = X.units_by_difference(units, profile, config.budget)
    prov = {
        "corruption": c,
        "dataset": task.name,
        "seed": config.seed,
        "scale": SCALE,
        "recipe": "corruption fine-tune, severities 1-5",
    }

    def sig(sel: list[X.Unit] | None, method: str = "projection") -> Signature:
        return X.make_signature(
            pre, clean_np, robust_np, sel, method=method, name=c, provenance=prov
        )

    q = f"shallow-{config.bits}bit"
    sigs = {"shallow": sig(units[:k])}
    sigs[q] = sigs["shallow"].quantize(config.bits, "affine", "channel")
    if "shallow-difference" in config.variants:
        sigs["shallow-difference"] = sig(units[:k], "difference")
    if "budget-by-difference" in config.variants:
        sigs["budget-by-difference"] = sig(by_diff)
    sigs["full"] = sig(units)
    if "full-difference" in config.variants:
        sigs["full-difference"] = sig(units, "difference")

    r = X.patch_arms(task, c, clean, robust, sigs)
    ref = r["arms"]["clean"]
    r["layer_profile"] = profile
    r["depth_sweep"] = X.depth_sweep(
        task, c, pre, clean_np, robust_np, clean, units, config.depth_ks, reference=ref
    )
    r["alpha_sweep"] = X.alpha_sweep(task, c, clean, sigs["shallow"], config.alphas, reference=ref)
    model_nbytes = _fp32_nbytes(robust)
    r["compression"] = X.compression(
        task, c, clean, sigs["shallow"], config.bit_range, model_nbytes=model_nbytes, reference=ref
    )
    r["removal"] = {
        "shallow, α=1": X.removal_is_exact(clean, sigs["shallow"], 1.0),
        f"{q}, α=1": X.removal_is_exact(clean, sigs[q], 1.0),
        "full, α=0.75": X.removal_is_exact(clean, sigs["full"], 0.75),
    }
    r["signatures"] = {
        label: {
            "entries": len(s.entries),
            "nbytes": int(s.nbytes),
            "params_touched": _touched(s, params),
            "param_fraction": _touched(s, params) / total_params,
            "modules": sorted({n.rsplit(".", 1)[0] for n in s.deltas if n in params}),
        }
        for label, s in sigs.items()
    }
    r["model_fp32_bytes"] = model_nbytes
    if config.save_files:
        r["files"] = {
            "signature": ctx.save_signature(sigs["shallow"], f"{c}.rws"),
            f"signature_{config.bits}bit": ctx.save_signature(sigs[q], f"{c}-{config.bits}bit.rws"),
            "robust_model": ctx.files.get(f"files/digits32-{c}-s{config.seed}.safetensors"),
        }
    return r, sigs["shallow"]


def _similarity(
    ctx: _Run,
    pre: dict,
    shallow_units: list[X.Unit],
    clean: dict,
    robust: dict,
    shallow: dict[str, Signature],
    seeds: list[int],
    with_patterns: bool,
) -> dict:
    config = ctx.config
    sigs = {f"{c}/s{config.seed}": s for c, s in shallow.items()}
    queries = {}
    for s in seeds[1:]:
        clean_s = X.state_arrays(clean[("digits32", s)])
        for c in config.corruptions:
            robust_s = X.state_arrays(robust[("digits32", c, s)])
            sigs[f"{c}/s{s}"] = X.make_signature(
                pre, clean_s, robust_s, shallow_units, name=f"{c}/s{s}"
            )
            names = list(shallow[c].deltas)
            queries[c] = X.model_delta(clean_s, robust_s, names)
    if with_patterns:
        clean_b = X.state_arrays(clean[("patterns", config.seed)])
        for c in config.corruptions:
            robust_b = X.state_arrays(robust[("patterns", c, config.seed)])
            sigs[f"patterns:{c}"] = X.make_signature(pre, clean_b, robust_b, shallow_units)
    sim = X.similarity_matrix(sigs)
    out = {"matrix": sim, "nearest": X.nearest(sim)}
    if queries:
        out["detection"] = X.detection(queries, shallow)
    return out


def _config_dict(config: DemoConfig, dev: torch.device) -> dict:
    d = dataclasses.asdict(config)
    d["finetune"] = recipes.config_dict(config.finetune)
    d["device"] = str(dev)
    d["scale"] = SCALE
    d["primary_arm"] = PRIMARY
    return d


def summarize(name: str, r: dict) -> dict:
    """Mean accuracy over severities per arm, and the share of the robust gain recovered
    by every patched arm."""
    mean = {arm: v["mean"] for arm, v in r["arms"].items()}
    recovered = {
        arm: v["recovered"]
        for arm, v in r["arms"].items()
        if arm not in ("clean", "bn_reestimation_only", "robust")
    }
    return {
        "corruption": name,
        "mean": mean,
        "robust_gain": r["robust_gain"],
        "recovered": recovered,
    }
