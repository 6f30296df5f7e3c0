"""One backbone, one fine-tune seed: train the twins, build every patch, measure them.

Accuracies are in points (0-100). Every number returned here is paired within the seed
(the same clean and robust twins), so :mod:`.stats` can difference them per seed.

On a BatchNorm backbone every signature arm (the judged ``paper`` arm, the full, difference,
quantized and null patches, the sum and the transfer) follows the official BN route
(:func:`.bn.official_patch`: robust BN swapped in network-wide, weight deltas added, then BN
re-estimated on the corrupted training images); ``paper_shipped_bn`` (ours) is the paper
patch with the first k layers' robust BN statistics it ships, not re-estimated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import robustpatch as rp

from ..training import accuracy
from . import bn, controls
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


Patcher = Callable[[list, list], nn.Module]


def _patcher(clean: nn.Module, robust_bn: list[dict] | None, unlabeled) -> Patcher:
    """How this backbone applies signatures ``(sigs, alphas) -> model``: a plain apply
    without BatchNorm; with it, the official BN route (:func:`.bn.official_patch`: robust
    BN ``robust_bn`` swapped in, weight deltas added, then BN re-estimated on ``unlabeled``)."""
    if robust_bn is None:
        return lambda sigs, alphas: P.patched_copy(clean, sigs, alphas)
    return lambda sigs, alphas: bn.official_patch(clean, robust_bn, sigs, alphas, unlabeled)


def _patch_models(ctx: _Ctx, clean, robust, seed: int, patch: Patcher) -> tuple[dict, dict]:
    """Every patched model of one corruption, and the signatures behind them. All go
    through ``patch``, so the null control gets the judged arm's BN handling."""
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
    models.update({name: patch([s], [1.0]) for name, s in sigs.items()})
    return models, sigs


def _bn_models(clean, robust, sig: rp.Signature, unlabeled) -> dict:
    """Beside the official BN route (the judged ``paper`` arm): the paper patch with the
    first k layers' robust BN statistics it ships, not re-estimated (ours); BN
    re-estimation alone; and the official route taken apart: the weight deltas alone, the
    robust-BN swap (re-estimated) alone."""
    return {
        "paper_shipped_bn": P.patched_copy(clean, sig, 1.0),
        "bn_only": controls.bn_only(clean, unlabeled),
        "sig_only": P.patched_copy(clean, bn.weight_deltas(sig, clean), 1.0),
        "swap_only": controls.robust_bn_swap(clean, robust, unlabeled),
    }


def _corruption(ctx: _Ctx, c: str, clean, seed: int) -> tuple[dict, rp.Signature, dict | None]:
    """One corruption's row, its paper signature, and its robust twin's BN state (None
    without BatchNorm), kept for the sum and the transfer."""
    sets, y, vy = ctx.sets, ctx.data["a_train"][1], ctx.data["a_val"][1]
    robust, info = ctx.fit(sets.train[c], y, (sets.val[c], vy), seed)
    robust_bn = bn.bn_state(robust) if bn.has_bn(clean) else None
    patch = _patcher(clean, None if robust_bn is None else [robust_bn], sets.train[c])
    models, sigs = _patch_models(ctx, clean, robust, seed, patch)
    if robust_bn is not None:
        models.update(_bn_models(clean, robust, sigs["paper"], sets.train[c]))
    ty = ctx.data["a_test"][1]
    tx_clean, tests = ctx.data["a_test"][0], sets.test[c]
    s = ctx.cfg.severity

    def size(sig: rp.Signature) -> int:  # what the arm's route ships
        return sig.nbytes if robust_bn is None else bn.route_nbytes(sig, clean)

    row = {
        "robust_checkpoint": info,
        "corrupted": {n: _acc(m, tests[s], ty, ctx.device) for n, m in models.items()},
        "clean_test": {n: _acc(m, tx_clean, ty, ctx.device) for n, m in models.items()},
        "by_severity": {
            n: [_acc(models[n], tests[k], ty, ctx.device) for k in range(1, 6)]
            for n in ("clean", "robust", "paper")
        },
        "coef": P.coefficients(sigs["paper"]),
        "nbytes": {n: size(sigs[n]) for n in ("paper", "quant_official", "quant_ours")},
        "param_fraction": sum(e.numel for e in sigs["paper"].deltas.values())
        / sum(p.numel() for p in clean.parameters()),
    }
    if robust_bn is None:
        row["corrupted"]["bn_only"] = row["corrupted"]["clean"]  # nothing to re-estimate
    return row, sigs["paper"], robust_bn


def _composition(ctx: _Ctx, clean, sigs: dict, robust_bn: dict) -> dict:
    """The pair summed with the official (α/n)² = 0.25 each and with linear α = 1 each.
    With BatchNorm, as the official route sums: the mean of both robust twins' BN,
    re-estimated on both corruptions' training images."""
    a, b = ctx.cfg.pair
    ty, s = ctx.data["a_test"][1], ctx.cfg.severity
    states = None if robust_bn[a] is None else [robust_bn[a], robust_bn[b]]
    patch = _patcher(clean, states, torch.cat([ctx.sets.train[a], ctx.sets.train[b]]))
    out = {}
    for label, alphas in (("official", P.official_alphas([1.0, 1.0])), ("linear", [1.0, 1.0])):
        model = patch([sigs[a], sigs[b]], alphas)
        out[label] = {c: _acc(model, ctx.sets.test[c][s], ty, ctx.device) for c in (a, b)}
    return out


def _transfer(ctx: _Ctx, sig_a: rp.Signature, bn_a: dict | None, seed: int) -> dict:
    """Task A's signature on task B's clean model, against B's own robust twin. With
    BatchNorm the official route: A's robust BN swapped in, re-estimated on B's corrupted
    training images."""
    sets, (x, y), (vx, vy) = ctx.sets, ctx.data["b_train"], ctx.data["b_val"]
    clean_b, _ = ctx.fit(x, y, (vx, vy), seed)
    robust_b, _ = ctx.fit(sets.b_train, y, (sets.b_val, vy), seed)
    patch = _patcher(clean_b, None if bn_a is None else [bn_a], sets.b_train)
    ty = ctx.data["b_test"][1]
    models = {"clean": clean_b, "robust": robust_b, "patched": patch([sig_a], [1.0])}
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
    per_c, sigs, robust_bn = {}, {}, {}
    for c in cfg.corruptions:
        per_c[c], sigs[c], robust_bn[c] = _corruption(ctx, c, clean, seed)
        log(f"seed {seed}: {c} done")
    out = {
        "clean_checkpoint": info,
        "per_corruption": per_c,
        "composition": _composition(ctx, clean, sigs, robust_bn),
        "transfer": _transfer(ctx, sigs[cfg.transfer], robust_bn[cfg.transfer], seed),
        "model_nbytes_fp32": P.nbytes_fp32(clean),
    }
    return out, sigs
