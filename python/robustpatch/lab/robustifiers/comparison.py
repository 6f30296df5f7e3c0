"""The five robustifiers side by side, and robust weight signatures extracted from each."""

from __future__ import annotations

import contextlib
import copy
import math
import platform
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .. import evaluate, outputs
from ..models import SmallCNN, default_device
from ..training import DeviceArg, LossFn, TrainConfig
from .common import (
    DEFAULT_CORRUPTIONS,
    SCALE,
    AttackConfig,
    _digits,
    _jsonable,
    _timed,
    corruption_loss,
    cross_entropy_loss,
    pgd_loss,
    six_epochs,
    train_with_loss,
)
from .daft import HeadConfig, adversarial_head, distillation_loss
from .nonrobustness import DiscrepancyConfig, discrepancy_loss
from .small_teacher import (
    AugMixConfig,
    PartialTuneConfig,
    _corrupted_sets,
    _corruption_metrics,
    _pretrained,
    _relative_mce,
    augmix_finetune,
    robustify_with_small_teacher,
)

# =============================================================================================
# Comparison
# =============================================================================================

METHODS: dict[str, str] = {
    "corruption_finetune": "corruption fine-tuning",
    "pgd_adversarial": "PGD adversarial training",
    "discrepancy": "discrepancy mitigation",
    "daft": "DAFT",
    "small_teacher": "small-teacher tuning",
}
"""The comparison's rows (keys of ``results["rows"]``) and their display names."""

COLUMNS: dict[str, str] = {
    "clean_accuracy": "clean acc %",
    "corruption_accuracy": "corruption acc %",
    "mCE": "mCE % (vs twin)",
    "pgd_accuracy": "PGD acc %",
    "train_seconds": "train s",
    "signature_bytes": "RWS bytes",
    "patched_clean_change": "RWS clean Δ",
    "patched_corruption_gain": "RWS corr. gain",
    "patched_pgd_gain": "RWS PGD gain",
    "difference_bytes": "diff. bytes",
    "difference_clean_change": "diff. clean Δ",
    "difference_corruption_gain": "diff. corr. gain",
    "difference_pgd_gain": "diff. PGD gain",
}
"""The comparison's columns (keys of every row) and their display names."""


@dataclass
class ComparisonConfig:
    """Sizes and settings of :func:`compare_methods`.

    ``widths``: the model every method robustifies (and the small teacher of the
    small-teacher row); ``large_widths``: the large model of the small-teacher row;
    ``daft_teacher_widths``: DAFT's teacher (``None``: the clean twin serves as DAFT's
    standard-trained teacher). All fine-tunes share ``finetune``; models are pretrained on
    ``pretrain_images`` procedural shapes. Corruption training uses ``train_corruptions``,
    evaluation ``test_corruptions`` x ``severities`` at ImageNet-C strength; PGD evaluation
    ``eval_eps`` with ``eval_steps``. Signatures: ``signature_layers`` (as in
    :func:`robustpatch.extract`), ``bits``-bit affine quantization in groups of ``group``.
    """

    widths: tuple[int, ...] = (16, 32, 64)
    large_widths: tuple[int, ...] = (32, 64, 128)
    daft_teacher_widths: tuple[int, ...] | None = (32, 64, 128)
    pretrain_images: int = 4000
    pretrain_epochs: int = 4
    finetune: TrainConfig = six_epochs(0.05)
    train_images: int | None = None
    test_images: int | None = None
    train_corruptions: tuple[str, ...] = DEFAULT_CORRUPTIONS
    test_corruptions: tuple[str, ...] = DEFAULT_CORRUPTIONS
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    attack: AttackConfig = field(default_factory=AttackConfig)
    discrepancy: DiscrepancyConfig = field(default_factory=DiscrepancyConfig)
    daft_head: HeadConfig = field(default_factory=HeadConfig)
    daft_temperature: float = 4.0
    daft_kd_weight: float = 0.9
    daft_student_eps: float = 4 / 255
    daft_student_steps: int = 1
    augmix: AugMixConfig = field(default_factory=AugMixConfig)
    partial: PartialTuneConfig = field(default_factory=PartialTuneConfig)
    eval_eps: float = 8 / 255
    eval_steps: int = 10
    signature_layers: Any = "auto"
    bits: int = 4
    group: int = 128
    seed: int = 0

    @classmethod
    def tiny(cls) -> ComparisonConfig:
        """About a minute on 2 CPU cores: the pipeline and the table, not the science."""
        ft = TrainConfig(epochs=3, lr=0.05, batch_size=64, milestones=[2])
        ops = ("gaussian_noise", "contrast")
        return cls(
            widths=(8, 16, 32),
            large_widths=(16, 32, 64),
            daft_teacher_widths=None,
            pretrain_images=1000,
            pretrain_epochs=2,
            finetune=ft,
            test_images=200,
            train_corruptions=ops,
            test_corruptions=ops,
            severities=(2, 4),
            attack=AttackConfig(eps=8 / 255, steps=2),
            discrepancy=DiscrepancyConfig(beta=1.0, eps=8 / 255, steps=2),
            daft_head=HeadConfig(epochs=5),
            augmix=AugMixConfig(ops=ops, width=2, depth=(1, 2)),
            partial=PartialTuneConfig(
                train=TrainConfig(epochs=2, lr=0.02, batch_size=64, milestones=[1]),
                augmix=AugMixConfig(ops=ops, width=2, depth=(1, 2)),
            ),
            eval_steps=5,
        )


def _state_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _evaluate_model(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sets: Mapping[tuple[str, int], torch.Tensor],
    cfg: ComparisonConfig,
    dev: torch.device,
) -> dict[str, Any]:
    corr = _corruption_metrics(model, sets, y, dev)
    return {
        "clean_accuracy": 100 * evaluate.accuracy(model, x, y, device=dev),
        "corruption_accuracy": corr["mean"],
        "per_corruption": corr["per_corruption"],
        "pgd_accuracy": 100
        * evaluate.robust_accuracy(
            model, x, y, attack="pgd", eps=cfg.eval_eps, steps=cfg.eval_steps, device=dev
        ),
    }


def _signature_arm(
    name: str,
    pre: dict[str, np.ndarray],
    clean: nn.Module,
    robust: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sets: Mapping[tuple[str, int], torch.Tensor],
    cfg: ComparisonConfig,
    dev: torch.device,
    folder: Path,
    method: str = "projection",
    layers: Any = None,
) -> dict[str, Any]:
    """Extract (``method``), quantize, save, reload and apply a signature to the clean twin;
    evaluate the patched model."""
    from robustpatch.extraction import extract
    from robustpatch.signature import Signature, is_bn_stat
    from robustpatch.targets import apply

    clean_np, robust_np = _state_numpy(clean), _state_numpy(robust)
    sig = extract(
        pre,
        clean_np,
        robust_np,
        cfg.signature_layers if layers is None else layers,
        method=method,
        name=name,
        order=list(clean.state_dict()),
        provenance={"method": name, "dataset": "digits32", "seed": cfg.seed},
    )
    q = sig.quantize(cfg.bits, "affine", "group", cfg.group)
    path = q.save(folder / f"{name}.{method}.rws")
    loaded = Signature.load(path)
    patched = copy.deepcopy(clean).cpu()
    state = patched.state_dict()  # tensors share storage with the module: patched in place
    apply(state, loaded, 1.0)
    patched.to(dev)
    metrics = _evaluate_model(patched, x, y, sets, cfg, dev)
    # weights the signature could touch: float state entries except BatchNorm statistics
    total = sum(
        v.numel()
        for k, v in clean.state_dict().items()
        if v.is_floating_point() and not is_bn_stat(k)
    )
    touched = sum(e.numel for e in loaded.deltas.values())
    return {
        "file_bytes": path.stat().st_size,
        "payload_bytes": int(loaded.nbytes),
        "tensors": len(loaded.deltas),
        "bn_buffers": len(loaded.bn),
        "params_touched": int(touched),
        "param_fraction": touched / total,
        "layers": {
            k: v for k, v in sig.meta.get("layers", {}).items() if k in ("mode", "units", "of")
        },
        "patched": metrics,
    }


def _train_methods(
    cfg: ComparisonConfig,
    xtr: torch.Tensor,
    ytr: torch.Tensor,
    xte: torch.Tensor,
    yte: torch.Tensor,
    sets: Mapping[tuple[str, int], torch.Tensor],
    dev: torch.device,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Train the clean twins and the five robust models of :func:`compare_methods`."""
    say(f"pretraining the model {cfg.widths} on {cfg.pretrain_images} shapes")
    base, _ = _pretrained(cfg.widths, cfg.pretrain_images, cfg.pretrain_epochs, cfg.seed, dev)
    pre_state = {k: v.detach().cpu().clone() for k, v in base.state_dict().items()}

    def from_pre() -> SmallCNN:
        m = SmallCNN(10, widths=cfg.widths, seed=cfg.seed)
        m.load_state_dict(pre_state)
        return m.to(dev)

    def run(loss: LossFn) -> tuple[nn.Module, float]:
        m = from_pre()
        _, secs = _timed(train_with_loss, m, xtr, ytr, cfg.finetune, loss, device=dev)
        return m, secs

    say("clean fine-tune (the clean twin)")
    clean, clean_secs = run(cross_entropy_loss())
    robust: dict[str, tuple[nn.Module, float, dict[str, Any]]] = {}
    say("corruption fine-tuning")
    m, s = run(corruption_loss(cfg.train_corruptions))
    robust["corruption_finetune"] = (m, s, {})
    say("PGD adversarial training")
    m, s = run(pgd_loss(cfg.attack))
    robust["pgd_adversarial"] = (m, s, {})
    say("discrepancy-mitigating fine-tuning")
    m, s = run(discrepancy_loss(cfg.discrepancy))
    robust["discrepancy"] = (m, s, {})

    say("DAFT: teacher, adversarial head, distillation")
    t_start = time.perf_counter()
    if cfg.daft_teacher_widths is None:
        teacher = clean
        teacher_secs = 0.0
    else:
        teacher = SmallCNN(10, widths=cfg.daft_teacher_widths, seed=cfg.seed + 1)
        _, teacher_secs = _timed(
            train_with_loss, teacher, xtr, ytr, cfg.finetune, cross_entropy_loss(), device=dev
        )
    daft_teacher = adversarial_head(teacher, xtr, ytr, cfg.daft_head, device=dev)
    head_secs = time.perf_counter() - t_start - teacher_secs
    m, s = run(
        distillation_loss(
            daft_teacher,
            cfg.daft_temperature,
            cfg.daft_kd_weight,
            cfg.daft_student_eps,
            cfg.daft_student_steps,
        )
    )
    robust["daft"] = (
        m,
        s + head_secs + teacher_secs,
        {
            "teacher_seconds": teacher_secs,
            "head_seconds": head_secs,
            "student_seconds": s,
            "teacher_reused_clean_twin": cfg.daft_teacher_widths is None,
            "teacher_clean_accuracy": 100 * evaluate.accuracy(daft_teacher, xte, yte, device=dev),
        },
    )

    say(f"small-teacher tuning: large model {cfg.large_widths}")
    large_base, _ = _pretrained(
        cfg.large_widths, cfg.pretrain_images, cfg.pretrain_epochs, cfg.seed, dev
    )
    large_pre = _state_numpy(large_base)
    large_clean = large_base
    train_with_loss(large_clean, xtr, ytr, cfg.finetune, cross_entropy_loss(), device=dev)
    small_teacher = from_pre()
    _, st_secs = _timed(
        augmix_finetune, small_teacher, xtr, ytr, cfg.finetune, cfg.augmix, device=dev
    )
    tuned, info = robustify_with_small_teacher(
        large_clean, small_teacher, xtr, ytr, cfg.partial, device=dev
    )
    robust["small_teacher"] = (
        tuned,
        info["seconds"],
        {
            "teacher_seconds": st_secs,
            "tuned_fraction": info["fraction"],
            "tuned_params": info["tuned_params"],
            "total_params": info["total_params"],
            "tuned": info["tuned"],
            "teacher_corruption_accuracy": _corruption_metrics(small_teacher, sets, yte, dev)[
                "mean"
            ],
        },
    )

    return {
        "pre_state": pre_state,
        "clean": clean,
        "clean_seconds": clean_secs,
        "large_pre": large_pre,
        "large_clean": large_clean,
        "robust": robust,
    }


def compare_methods(
    config: ComparisonConfig | None = None,
    *,
    device: DeviceArg = None,
    out: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the five robustifiers on the same digits, from the same pretrained start.

    Every row is a robust model with a *clean twin*: the same architecture fine-tuned on
    clean digits from the same pretrained weights with the same seed and data order
    (``finetune``). Rows: ``corruption_finetune`` (cross-entropy on corrupted batches),
    ``pgd_adversarial`` (PGD training), ``discrepancy`` (:func:`discrepancy_loss`), ``daft``
    (adversarial-head teacher distilled into the pretrained model), ``small_teacher`` (the
    small model robustified with AugMix + JSD, then a few tensors of the *large* model tuned
    by distillation; its clean twin is the large clean model). For each: clean, corruption
    and PGD accuracy, mCE relative to the clean twin, training time, and two ``bits``-bit
    signatures (robust vs clean twin): the paper's projection (columns ``signature_bytes``,
    ``patched_*``) and the plain difference (``difference_*``). Each is saved to a file,
    reloaded, applied to the clean twin (alpha 1), and the patched twin's change in clean,
    corruption and PGD accuracy is recorded.

    Args:
        config: sizes (``ComparisonConfig.tiny()`` for tests).
        device: default CUDA if available, else CPU.
        out: if given, a folder receiving ``comparison.json``, ``comparison.md`` and the
            signature files; otherwise signatures go to a temporary folder.
        log: progress messages.

    Returns:
        A JSON-able dict: ``rows`` (per method, every key of :data:`COLUMNS` plus details),
        ``baselines`` (the clean twins), ``columns``, ``methods``, ``seconds``, ``config``.
    """
    cfg = config or ComparisonConfig()
    dev = default_device(device)
    say = log or (lambda _m: None)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    xtr, ytr, xte, yte = _digits(cfg.train_images, cfg.test_images, cfg.seed)
    sets = _corrupted_sets(xte, cfg.test_corruptions, cfg.severities, cfg.seed)

    trained = _train_methods(cfg, xtr, ytr, xte, yte, sets, dev, say)
    pre_state, clean, clean_secs = trained["pre_state"], trained["clean"], trained["clean_seconds"]
    large_pre, large_clean, robust = trained["large_pre"], trained["large_clean"], trained["robust"]
    say("evaluating, extracting and applying signatures")
    baselines = {
        "clean": {**_evaluate_model(clean, xte, yte, sets, cfg, dev), "train_seconds": clean_secs},
        "clean_large": _evaluate_model(large_clean, xte, yte, sets, cfg, dev),
    }
    pre_np = {k: v.numpy().copy() for k, v in pre_state.items()}
    rows: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        if out is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        else:
            folder = Path(out)
            folder.mkdir(parents=True, exist_ok=True)
        for name, (model, secs, extra) in robust.items():
            twin_name = "clean_large" if name == "small_teacher" else "clean"
            twin = large_clean if name == "small_teacher" else clean
            pre = large_pre if name == "small_teacher" else pre_np
            metrics = _evaluate_model(model, xte, yte, sets, cfg, dev)
            twin_m = baselines[twin_name]
            # small-teacher tuning changed only its tuned tensors: sign exactly those
            tuned = extra.get("tuned")
            layers = [re.escape(n) for n in tuned] if tuned else None
            sigs = {
                method: _signature_arm(
                    name, pre, twin, model, xte, yte, sets, cfg, dev, folder, method, layers
                )
                for method in ("projection", "difference")
            }

            proj, diff = (
                {
                    k: sigs[method]["patched"][f"{k}_accuracy"] - twin_m[f"{k}_accuracy"]
                    for k in ("clean", "corruption", "pgd")
                }
                for method in ("projection", "difference")
            )
            rows[name] = {
                "method": METHODS[name],
                "clean_accuracy": metrics["clean_accuracy"],
                "corruption_accuracy": metrics["corruption_accuracy"],
                "mCE": _relative_mce(metrics["per_corruption"], twin_m["per_corruption"]),
                "pgd_accuracy": metrics["pgd_accuracy"],
                "train_seconds": secs,
                "signature_bytes": sigs["projection"]["file_bytes"],
                "patched_clean_change": proj["clean"],
                "patched_corruption_gain": proj["corruption"],
                "patched_pgd_gain": proj["pgd"],
                "difference_bytes": sigs["difference"]["file_bytes"],
                "difference_clean_change": diff["clean"],
                "difference_corruption_gain": diff["corruption"],
                "difference_pgd_gain": diff["pgd"],
                "twin": twin_name,
                "per_corruption": metrics["per_corruption"],
                "signatures": sigs,
                "details": extra,
            }
    results = {
        "methods": dict(METHODS),
        "columns": dict(COLUMNS),
        "rows": rows,
        "baselines": baselines,
        "seconds": time.perf_counter() - t0,
        "config": {
            **_jsonable(asdict(cfg)),
            "device": str(dev),
            "scale": SCALE,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
        },
    }
    results = _jsonable(results)
    if out is not None:
        folder = Path(out)
        evaluate.save_json(results, folder / "comparison.json")
        outputs.write_text(folder / "comparison.md", comparison_markdown(results))
    return results


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def comparison_markdown(results: Mapping[str, Any]) -> str:
    """The :func:`compare_methods` result as a Markdown report (one table plus notes)."""
    cols = results.get("columns", COLUMNS)
    lines = [
        "# Robustifiers compared",
        "",
        "Digits test set; corruption accuracy is the mean over "
        f"{', '.join(results['config']['test_corruptions'])} at severities "
        f"{', '.join(str(s) for s in results['config']['severities'])} "
        f"({results['config'].get('scale', SCALE)}-C strength); PGD: L-inf eps "
        f"{results['config']['eval_eps'] * 255:.0f}/255, {results['config']['eval_steps']} steps. "
        "mCE is relative to each row's clean twin (100 = as fragile as the clean twin). "
        f"Signature: {results['config']['bits']}-bit affine, groups of "
        f"{results['config']['group']}, file size; *patched gain*: the signature applied "
        "(alpha = 1) to the clean twin, minus the clean twin, in accuracy points.",
        "",
        "| method | " + " | ".join(cols.values()) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name, row in results["rows"].items():
        cells = []
        for key in cols:
            v = row.get(key)
            if key.endswith("_bytes"):
                cells.append(_fmt(int(v)) if v is not None else "n/a")
            elif key == "train_seconds":
                extra = row.get("details", {}).get("teacher_seconds")
                s = _fmt(v)
                if name == "small_teacher" and extra is not None:
                    s += f" (+{_fmt(extra)} teacher)"
                cells.append(s)
            else:
                cells.append(_fmt(v))
        lines.append(f"| {row.get('method', name)} | " + " | ".join(cells) + " |")
    lines += ["", "Clean twins (plain fine-tunes from the same pretrained weights):", ""]
    lines += ["| model | clean acc % | corruption acc % | PGD acc % |", "|---|---|---|---|"]
    for name, b in results["baselines"].items():
        lines.append(
            f"| {name} | {_fmt(b['clean_accuracy'])} | {_fmt(b['corruption_accuracy'])} | "
            f"{_fmt(b['pgd_accuracy'])} |"
        )
    st = results["rows"].get("small_teacher", {}).get("details", {})
    if st:
        lines += [
            "",
            f"Small-teacher tuning changed {100 * st['tuned_fraction']:.1f}% of the large "
            f"model's parameters ({st['tuned_params']:,} of {st['total_params']:,}); its row's "
            "clean twin is the large clean model.",
        ]
    lines += [
        "",
        f"Total {results['seconds']:.0f} s on {results['config']['device']} "
        f"({results['config'].get('threads', '?')} torch threads).",
        "",
    ]
    return "\n".join(lines)
