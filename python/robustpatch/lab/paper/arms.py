"""One backbone, one fine-tune seed: train the twins, build every patch, measure them.

Accuracies are in points (0-100). Every number returned here is paired within the seed
(the same clean and robust twins), so :mod:`.stats` can difference them per seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import robustpatch as rp

from ..training import accuracy
from . import controls
from . import protocol as P

__all__ = ["FixedSets", "build_sets", "measure_seed"]


@dataclass
class FixedSets:
    """The corrupted copies every seed shares, drawn once from ``data_seed``:
    ``train[c]``, ``val[c]`` at the protocol's severity, ``test[c][s]`` at severities 1-5;
    ``b_train``/``b_val``/``b_test`` for the transfer corruption on task B."""

    train: dict
    val: dict
    test: dict
    b_train: torch.Tensor
    b_val: torch.Tensor
    b_test: torch.Tensor


def build_sets(data, cfg: P.ProtocolConfig) -> FixedSets:
    s, seed = cfg.severity, cfg.data_seed
    train, val, test = {}, {}, {}
    for i, c in enumerate(cfg.corruptions):
        base = seed + 100 * i
        train[c] = P.corrupted(data["a_train"][0], c, s, base)
        val[c] = P.corrupted(data["a_val"][0], c, s, base + 1)
        test[c] = {k: P.corrupted(data["a_test"][0], c, k, base + 10 + k) for k in range(1, 6)}
    t = cfg.transfer
    return FixedSets(
        train,
        val,
        test,
        P.corrupted(data["b_train"][0], t, s, seed + 50),
        P.corrupted(data["b_val"][0], t, s, seed + 51),
        P.corrupted(data["b_test"][0], t, s, seed + 52),
    )


def _acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device) -> float:
    return 100.0 * accuracy(model, x, y, device=device)


@dataclass
class _Ctx:
    pre: nn.Module
    data: object
    sets: FixedSets
    cfg: P.ProtocolConfig
    device: torch.device
    layers: int
    full_layers: int

    def fit(self, x, y, val, seed: int) -> tuple[nn.Module, dict]:
        model = P.finetune_start(self.pre, 5, seed)
        recipe = P.recipe(self.cfg.schedule.finetune_epochs, seed, self.cfg)
        info = P.fit_best(model, x, y, recipe, val, self.device)
        return model, info


def _patch_models(ctx: _Ctx, clean, robust, seed: int) -> tuple[dict, dict]:
    """Every patched model of one corruption, and the signatures behind them."""
    k, bits = ctx.layers, ctx.cfg.bits
    sig = P.extract_paper(ctx.pre, clean, robust, k, name="paper")
    sigs = {
        "paper": sig,
        "full": P.extract_paper(ctx.pre, clean, robust, ctx.full_layers, name="full"),
        "difference": P.extract_paper(ctx.pre, clean, robust, k, method="difference"),
        "null": controls.random_direction(sig, seed),
        "quant_official": P.quantize_official(sig, bits),
        "quant_ours": P.quantize_ours(sig, bits),
    }
    models = {"clean": clean, "robust": robust}
    models.update({name: P.patched_copy(clean, s, 1.0) for name, s in sigs.items()})
    return models, sigs


def _bn_models(ctx: _Ctx, clean, robust, sig: rp.Signature, unlabeled) -> dict:
    """The BatchNorm arms: re-estimation alone, signature only, robust-BN swap only, both."""
    swapped = controls.robust_bn_swap(clean, robust, unlabeled)
    return {
        "bn_only": controls.bn_only(clean, unlabeled),
        "sig_only": P.patched_copy(clean, controls.deltas_only(sig), 1.0),
        "swap_only": swapped,
        "sig_and_swap": P.patched_copy(swapped, controls.deltas_only(sig), 1.0),
    }


def _corruption(ctx: _Ctx, c: str, clean, seed: int) -> tuple[dict, rp.Signature]:
    sets, y, vy = ctx.sets, ctx.data["a_train"][1], ctx.data["a_val"][1]
    robust, info = ctx.fit(sets.train[c], y, (sets.val[c], vy), seed)
    models, sigs = _patch_models(ctx, clean, robust, seed)
    if controls.has_bn(clean):
        models.update(_bn_models(ctx, clean, robust, sigs["paper"], sets.train[c]))
    ty = ctx.data["a_test"][1]
    tx_clean, tests = ctx.data["a_test"][0], sets.test[c]
    s = ctx.cfg.severity
    row = {
        "robust_checkpoint": info,
        "corrupted": {n: _acc(m, tests[s], ty, ctx.device) for n, m in models.items()},
        "clean_test": {n: _acc(m, tx_clean, ty, ctx.device) for n, m in models.items()},
        "by_severity": {
            n: [_acc(models[n], tests[k], ty, ctx.device) for k in range(1, 6)]
            for n in ("clean", "robust", "paper")
        },
        "coef": P.coefficients(sigs["paper"]),
        "nbytes": {n: sigs[n].nbytes for n in ("paper", "quant_official", "quant_ours")},
        "param_fraction": sum(e.numel for e in sigs["paper"].deltas.values())
        / sum(p.numel() for p in clean.parameters()),
    }
    if not controls.has_bn(clean):
        row["corrupted"]["bn_only"] = row["corrupted"]["clean"]  # nothing to re-estimate
    return row, sigs["paper"]


def _composition(ctx: _Ctx, clean, sigs: dict) -> dict:
    """The pair summed with the official (α/n)² = 0.25 each and with linear α = 1 each."""
    a, b = ctx.cfg.pair
    ty, s = ctx.data["a_test"][1], ctx.cfg.severity
    out = {}
    for label, alphas in (("official", P.official_alphas([1.0, 1.0])), ("linear", [1.0, 1.0])):
        model = P.patched_copy(clean, [sigs[a], sigs[b]], alphas)
        out[label] = {c: _acc(model, ctx.sets.test[c][s], ty, ctx.device) for c in (a, b)}
    return out


def _transfer(ctx: _Ctx, sig_a: rp.Signature, seed: int) -> dict:
    """Task A's signature on task B's clean model, against B's own robust twin."""
    sets, (x, y), (vx, vy) = ctx.sets, ctx.data["b_train"], ctx.data["b_val"]
    clean_b, _ = ctx.fit(x, y, (vx, vy), seed)
    robust_b, _ = ctx.fit(sets.b_train, y, (sets.b_val, vy), seed)
    ty = ctx.data["b_test"][1]
    models = {"clean": clean_b, "robust": robust_b, "patched": P.patched_copy(clean_b, sig_a, 1.0)}
    return {n: _acc(m, sets.b_test, ty, ctx.device) for n, m in models.items()}


def measure_seed(
    pre: nn.Module,
    data,
    sets: FixedSets,
    cfg: P.ProtocolConfig,
    seed: int,
    device: torch.device,
    layers: tuple[int, int],
    log: Callable[[str], None] = lambda _: None,
) -> tuple[dict, dict]:
    """All measurements of one fine-tune seed, and its paper signatures by corruption.
    ``layers``: the leading conv tensors of the paper's patch and of the full patch."""
    ctx = _Ctx(pre, data, sets, cfg, device, *layers)
    clean, info = ctx.fit(*data["a_train"], data["a_val"], seed)
    log(f"seed {seed}: clean twin, best validation epoch {info['epoch'] + 1}")
    per_c, sigs = {}, {}
    for c in cfg.corruptions:
        per_c[c], sigs[c] = _corruption(ctx, c, clean, seed)
        log(f"seed {seed}: {c} done")
    out = {
        "clean_checkpoint": info,
        "per_corruption": per_c,
        "composition": _composition(ctx, clean, sigs),
        "transfer": _transfer(ctx, sigs[cfg.transfer], seed),
        "model_nbytes_fp32": P.nbytes_fp32(clean),
    }
    return out, sigs
