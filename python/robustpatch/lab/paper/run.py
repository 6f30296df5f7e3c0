"""Run the paper's protocol end to end and write its report.

``python -m robustpatch.lab.paper.run --quick --out DIR`` (the embedded subset, 3 seeds)
or ``--data /usr/share/datasets/fashion-mnist`` for the full IDX files (full run: 5 seeds,
longer recipes). Writes ``DIR/paper.json``, ``DIR/paper.md`` and ``DIR/paper_gains.png``.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

import robustpatch as rp

from ...cli.parser import positive_int
from .. import outputs
from ..backbones import efficientnet_lite
from ..backbones.vgg import VGGNoBN
from ..data import fashion_mnist as fm
from ..models import SmallCNN
from ..training import default_device, torch_threads
from . import aggregate, arms, controls, protocol, report

__all__ = ["run_paper", "FULL_SIZES", "main"]

#: Images per class per split read from the full IDX files (``--data``).
FULL_SIZES = fm.SplitSizes(pretrain=1000, task_train=1000, task_val=200, test=1000)


@dataclass(frozen=True)
class _Backbone:
    build: Callable[[], nn.Module]
    pretrain: bool  # False: the weights come pretrained (ImageNet)
    layers: int | None  # the paper's k; None: ProtocolConfig.layers
    full_layers: int  # every conv below the classifier
    # Fine-tune epochs when they differ from the schedule's (None: the schedule's).
    finetune_epochs: int | None = None


_BACKBONES = {
    "vgg": _Backbone(lambda: VGGNoBN(10, seed=0), True, None, 6),
    "bn_cnn": _Backbone(lambda: SmallCNN(10, seed=0), True, None, 6),
    "efficientnet_lite0": _Backbone(
        lambda: efficientnet_lite.EfficientNetLite0(10, seed=0),
        False,
        efficientnet_lite.PAPER_LAYERS,
        efficientnet_lite.CONV_LAYERS,
        protocol.EFFICIENTNET_EPOCHS,
    ),
}


def _json_safe(obj):
    """NaN and ±inf as None (JSON has no such numbers); tuples as lists."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _backbone(name: str, splits, sets, cfg: protocol.ProtocolConfig, device, log) -> dict:
    bb = _BACKBONES[name]
    epochs = min(cfg.schedule.finetune_epochs, bb.finetune_epochs or cfg.schedule.finetune_epochs)
    cfg = replace(cfg, schedule=replace(cfg.schedule, finetune_epochs=epochs))
    pre = bb.build().to(device)
    if bb.pretrain:
        x, y = splits["pretrain"]
        recipe = protocol.recipe(cfg.schedule.pretrain_epochs, 0, cfg, cfg.schedule.pretrain_lr)
        protocol.fit_best(pre, x, y, recipe, None, device)
        log(f"{name}: pretrained")
    layers = (bb.layers or cfg.layers, bb.full_layers)
    seeds, sigs = [], []
    for s in cfg.seeds:
        row, sig = arms.measure_seed(pre, splits, sets, cfg, s, device, layers, log)
        seeds.append(row)
        sigs.append(sig)
    return {
        "claims": aggregate.claim_rows(seeds, sigs, cfg),
        "controls": aggregate.control_rows(seeds, cfg),
        "coefficients": aggregate.coefficient_rows(seeds, cfg),
        "severities": aggregate.severity_rows(seeds, cfg),
        "has_bn": controls.has_bn(pre),
        "layers": layers[0],
        "finetune_epochs": epochs,
        "per_seed": seeds,
    }


def run_paper(
    out_dir: str | Path,
    *,
    quick: bool = True,
    data: str | Path | None = None,
    device: str | None = None,
    threads: int | None = None,
    config: protocol.ProtocolConfig | None = None,
    splits: fm.FashionSplits | None = None,
    progress: Callable[[str], object] = print,
    overwrite: bool = False,
) -> dict:
    """Run the protocol; write ``paper.json``, ``paper.md``, ``paper_gains.png`` in
    ``out_dir`` and return the results.

    ``data``: folder of the full Fashion-MNIST IDX files (default: the embedded subset);
    ``config`` replaces :data:`~.protocol.QUICK` / :data:`~.protocol.FULL`; ``splits``
    replaces the data altogether (miniature runs). ``out_dir`` must be new or empty
    unless ``overwrite``; the config (seeds, corruptions, severity, pair, transfer: checked
    when a :class:`~.protocol.ProtocolConfig` is built) and the backbones are checked
    before any training. ``threads`` sets torch's CPU
    thread count for the run; the caller's is restored afterwards."""
    out = outputs.check_report_folder(out_dir, overwrite)
    cfg = config or (protocol.QUICK if quick else protocol.FULL)
    if not isinstance(cfg, protocol.ProtocolConfig):  # its own checks ran when it was built
        raise rp.InvalidArgumentError(f"config: expected a ProtocolConfig, got {cfg!r}")
    unknown = sorted(set(cfg.backbones) - set(_BACKBONES))
    if unknown:
        raise rp.InvalidArgumentError(
            f"unknown backbone {unknown[0]!r}; expected one of {sorted(_BACKBONES)}"
        )
    dev = default_device(device)
    if splits is None:
        splits = fm.load_embedded() if data is None else fm.load_folder(data, FULL_SIZES)
    out.mkdir(parents=True, exist_ok=True)
    with torch_threads(threads):
        return _run(out, cfg, splits, dev, progress)


def _run(
    out: Path,
    cfg: protocol.ProtocolConfig,
    splits: fm.FashionSplits,
    dev: torch.device,
    progress: Callable[[str], object],
) -> dict:
    start = time.perf_counter()
    sets = arms.build_sets(splits, cfg)
    results = {
        "config": asdict(cfg),
        "data": splits.source,
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "versions": {
            "robustpatch": rp.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "fidelity": report.fidelity_rows(cfg, splits.source),
        "backbones": {b: _backbone(b, splits, sets, cfg, dev, progress) for b in cfg.backbones},
    }
    results["seconds"] = time.perf_counter() - start
    results = _json_safe(results)
    outputs.write_json(out / "paper.json", results)
    report.write_markdown(results, out / "paper.md")
    report.plot_gains(results, out / "paper_gains.png")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m robustpatch.lab.paper.run", description=__doc__.splitlines()[0]
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="3 seeds, embedded subset, VGG arm (≤ 10 min on 2 CPU cores)",
    )
    ap.add_argument("--out", default="report-paper", help="output folder")
    ap.add_argument(
        "--data", help="folder with the Fashion-MNIST IDX files (default: embedded subset)"
    )
    ap.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument(
        "--seeds", type=positive_int, help="number of fine-tune seeds (default 3 quick, 5 full)"
    )
    ap.add_argument("--overwrite", action="store_true", help="replace the report in --out")
    args = ap.parse_args(argv)
    cfg = protocol.QUICK if args.quick else protocol.FULL
    if args.seeds is not None:
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    run_paper(
        args.out,
        quick=args.quick,
        data=args.data,
        device=args.device,
        threads=args.threads,
        config=cfg,
        overwrite=args.overwrite,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
