"""`robustpatch demo`: the whole story on embedded data, on CPU by default.

Pretrain a small CNN on procedural shapes; fine-tune a clean and, per corruption, a
robust twin on digits from the same weights, seed and data order; extract the robust
weight signature of each robust twin; patch the clean model with it (with and
without BatchNorm re-estimation, unquantized and at 4 bits); evaluate everything on
the corrupted test set at five severities, beside "BN re-estimation alone"; remove the
patch and check the model is bit-identical again. Writes `results.json`, figures and
`report.md` to the output folder.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from robustpatch.extract import extract
from robustpatch.patch import apply, remove

from . import corruptions, datasets, models, recipes

SEVERITIES = (1, 2, 3, 4, 5)
# One of each family: noise, blur, weather, digital.
DEMO_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "fog", "contrast")
# ImageNet-C strengths: at CIFAR-C strengths, digits barely suffer (see the report).
SCALE = "imagenet"


@dataclass
class DemoConfig:
    """Sizes of one demo run; `quick()` fits in a few minutes on 2 CPU cores."""

    pretrain_images: int = 8000
    pretrain_epochs: int = 6
    finetune: recipes.TrainConfig = None  # type: ignore[assignment]
    corruptions: tuple[str, ...] = DEMO_CORRUPTIONS
    layers: str = "auto"
    bits: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.finetune is None:
            self.finetune = recipes.TrainConfig(
                epochs=8, lr=0.02, batch_size=64, milestones=[5, 7], seed=self.seed
            )

    @classmethod
    def tiny(cls) -> DemoConfig:
        """Seconds, for tests: the pipeline and the report, not the science."""
        return cls(
            pretrain_images=600,
            pretrain_epochs=1,
            finetune=recipes.TrainConfig(epochs=1, lr=0.02, batch_size=64, milestones=[1]),
            corruptions=("contrast",),
        )

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(
            pretrain_images=4000,
            pretrain_epochs=4,
            finetune=recipes.TrainConfig(epochs=5, lr=0.02, batch_size=64, milestones=[3, 4]),
        )


def _float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


def corrupt_batch(name: str) -> recipes.Transform:
    """A training transform: each batch corrupted at a random severity 1–5."""

    def transform(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        severity = int(torch.randint(1, 6, (1,), generator=gen))
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        return corruptions.corrupt(x, name, severity, seed=seed, scale=SCALE)

    return transform


def corrupted_test_sets(x: torch.Tensor, names: tuple[str, ...]) -> dict:
    """Fixed corrupted copies of the test images, per corruption and severity."""
    return {
        (n, s): corruptions.corrupt(x, n, s, seed=1000 + s, scale=SCALE)
        for n in names
        for s in SEVERITIES
    }


def _accuracies(model: nn.Module, sets: dict, name: str, y: torch.Tensor) -> list[float]:
    return [100.0 * recipes.accuracy(model, sets[(name, s)], y) for s in SEVERITIES]


def _with_bn_reestimated(model: nn.Module, x_unlabeled: torch.Tensor) -> nn.Module:
    return recipes.reestimate_bn(copy.deepcopy(model), x_unlabeled)


def _state_bits(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().cpu().numpy().tobytes() for k, v in model.state_dict().items()}


def evaluate_patch(
    clean: nn.Module,
    robust: nn.Module,
    pre_state: dict,
    name: str,
    data: dict,
    config: DemoConfig,
) -> dict:
    """All arms for one corruption; returns JSON-able results."""
    x_test, y_test, sets = data["x_test"], data["y_test"], data["sets"]
    # Unlabeled corrupted images for BN re-estimation (from the training split).
    unlabeled = corrupt_batch(name)(data["x_train"][:512], torch.Generator().manual_seed(7))
    arms: dict[str, list[float]] = {
        "clean": _accuracies(clean, sets, name, y_test),
        "bn_reestimation_only": _accuracies(
            _with_bn_reestimated(clean, unlabeled), sets, name, y_test
        ),
        "robust": _accuracies(robust, sets, name, y_test),
    }
    clean_sd = {k: v.detach().cpu().numpy() for k, v in clean.state_dict().items()}
    robust_sd = {k: v.detach().cpu().numpy() for k, v in robust.state_dict().items()}
    pre_np = {k: v.numpy() for k, v in pre_state.items()}
    order = list(clean.state_dict())
    result: dict = {"arms": arms, "signatures": {}}
    for method in ("projection", "difference"):
        sig = extract(
            pre_np, clean_sd, robust_sd, config.layers, method=method, name=name, order=order
        )
        variants = {
            f"{method}": sig,
            f"{method}_{config.bits}bit": sig.quantize(config.bits, "affine", "channel"),
        }
        for label, s in variants.items():
            patched = copy.deepcopy(clean)
            before = _state_bits(patched)
            undo = apply(patched, s, 1.0)
            arms[f"patched_{label}"] = _accuracies(patched, sets, name, y_test)
            arms[f"patched_{label}+bn"] = _accuracies(
                _with_bn_reestimated(patched, unlabeled), sets, name, y_test
            )
            clean_acc = 100.0 * recipes.accuracy(patched, x_test, y_test)
            remove(patched, undo)
            result["signatures"][label] = {
                "tensors": len(s.deltas),
                "nbytes": s.nbytes,
                "params_touched": int(sum(e.numel for e in s.deltas.values())),
                "clean_accuracy_patched": clean_acc,
                "removal_bit_exact": _state_bits(patched) == before,
            }
    total = sum(p.numel() for p in clean.parameters())
    for info in result["signatures"].values():
        info["param_fraction"] = info["params_touched"] / total
    result["model_fp32_bytes"] = sum(p.numel() * 4 for p in robust.state_dict().values())
    result["clean_accuracy"] = {
        "clean": 100.0 * recipes.accuracy(clean, x_test, y_test),
        "robust": 100.0 * recipes.accuracy(robust, x_test, y_test),
    }
    return result


def summarize(name: str, r: dict) -> dict:
    """Mean accuracy over severities per arm, and the share of the robust gain recovered."""
    mean = {arm: float(np.mean(v)) for arm, v in r["arms"].items()}
    gap = mean["robust"] - mean["clean"]
    recovered = {
        arm: (mean[arm] - mean["clean"]) / gap if gap > 0 else float("nan")
        for arm in mean
        if arm.startswith("patched")
    }
    return {"corruption": name, "mean": mean, "robust_gain": gap, "recovered": recovered}


def run(
    out: Path,
    quick: bool = True,
    device: str | None = None,
    log: Callable[[str], None] = print,
    config: DemoConfig | None = None,
) -> dict:
    """Run the demo; write report files under `out`; return the results.

    `config` overrides the size chosen by `quick` (see `DemoConfig.tiny` for tests).
    """
    config = config or (DemoConfig.quick() if quick else DemoConfig())
    dev = models.default_device(device)
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    log(f"[1/4] pretraining on {config.pretrain_images} procedural shapes ({dev})")
    shapes = datasets.procedural_shapes(config.pretrain_images, seed=config.seed)
    xs, ys = shapes.tensors()
    net = models.SmallCNN(num_classes=shapes.num_classes, seed=config.seed)
    models.fit(net, xs, ys, epochs=config.pretrain_epochs, seed=config.seed, device=dev)
    pre_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}

    train, test = datasets.load_digits32("train"), datasets.load_digits32("test")
    x_train, y_train = (lambda t: (_float(t[0]), t[1]))(train.tensors())
    x_test, y_test = (lambda t: (_float(t[0]), t[1]))(test.tensors())

    def make_model() -> nn.Module:
        m = models.SmallCNN(num_classes=10, seed=config.seed)
        return m

    # The classifier head of the pretrained model has the pretraining task's classes;
    # shapes and digits both have 10, so the whole state transfers.
    log("[2/4] fine-tuning the clean model on digits")
    clean = make_model()
    clean.load_state_dict(pre_state)
    recipes.train(clean, x_train, y_train, config.finetune, device=dev)
    clean = clean.cpu()
    data = {
        "x_train": x_train,
        "x_test": x_test,
        "y_test": y_test,
        "sets": corrupted_test_sets(x_test, config.corruptions),
    }
    results: dict = {"per_corruption": {}, "summary": []}
    for i, name in enumerate(config.corruptions):
        log(f"[3/4] {name} ({i + 1}/{len(config.corruptions)}): robust fine-tune, extract, patch")
        robust = make_model()
        robust.load_state_dict(pre_state)
        recipes.train(robust, x_train, y_train, config.finetune, corrupt_batch(name), device=dev)
        r = evaluate_patch(clean, robust.cpu(), pre_state, name, data, config)
        results["per_corruption"][name] = r
        results["summary"].append(summarize(name, r))
    results["config"] = {
        "quick": quick,
        "device": str(dev),
        "scale": SCALE,
        "seed": config.seed,
        "finetune": recipes.config_dict(config.finetune),
        "pretrain_images": config.pretrain_images,
        "layers": config.layers,
        "bits": config.bits,
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    results["seconds"] = time.perf_counter() - t0
    log("[4/4] writing the report")
    write_report(out, results)
    return results


def write_report(out: Path, results: dict) -> None:
    """results.json, one figure per corruption, and report.md."""
    (out / "results.json").write_text(json.dumps(results, indent=2))
    figures = _figures(out, results)
    lines = [
        "# robustpatch demo report",
        "",
        f"Device {results['config']['device']}, {results['seconds']:.0f} s, seed "
        f"{results['config']['seed']}, corruption strengths: {results['config']['scale']}-C "
        "parameters on 32-px digits.",
        "",
        "Mean accuracy (%) over severities 1–5 on the corrupted digits test set. "
        "`+bn`: BatchNorm statistics re-estimated on unlabeled corrupted images. "
        "*Recovered*: share of the robust model's gain over the clean model.",
        "",
    ]
    for s in results["summary"]:
        name = s["corruption"]
        r = results["per_corruption"][name]
        lines += [f"## {name}", "", f"![{name}]({figures[name]})", ""]
        lines += ["| arm | mean acc | recovered | params touched | size |", "|---|---|---|---|---|"]
        for arm, acc in s["mean"].items():
            rec = s["recovered"].get(arm)
            label = arm.removeprefix("patched_").removesuffix("+bn")
            info = r["signatures"].get(label) if arm.startswith("patched") else None
            touched = f"{100 * info['param_fraction']:.1f}%" if info else ""
            size = f"{info['nbytes'] / 1024:.1f} KiB" if info else ""
            rec_s = f"{100 * rec:.0f}%" if rec is not None and rec == rec else ""
            lines.append(f"| {arm} | {acc:.1f} | {rec_s} | {touched} | {size} |")
        exact = all(i["removal_bit_exact"] for i in r["signatures"].values())
        lines += [
            "",
            f"Clean accuracy: clean model {r['clean_accuracy']['clean']:.1f}%, robust "
            f"{r['clean_accuracy']['robust']:.1f}%. Removal bit-exact: {exact}. "
            f"fp32 robust model: {r['model_fp32_bytes'] / 1024:.0f} KiB.",
            "",
        ]
    (out / "report.md").write_text("\n".join(lines))


def _figures(out: Path, results: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {}
    for name, r in results["per_corruption"].items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for arm, acc in r["arms"].items():
            if arm.startswith("patched") and "difference" in arm:
                continue
            ax.plot(SEVERITIES, acc, marker="o", label=arm)
        ax.set_xlabel("severity")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(name)
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fname = f"{name}.png"
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)
        names[name] = fname
    return names
