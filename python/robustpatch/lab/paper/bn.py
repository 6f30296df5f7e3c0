"""The official BatchNorm route, for backbones with BatchNorm.

The official ResNet arm (``model_patching.py``) builds the patched model in this order:
``decompose`` puts every BatchNorm layer's affine parameters and running statistics of the
robust model(s) into the clean model network-wide (the mean over the robust models when
several are summed; BN tensors are swapped, never projected) and adds the signature to the
patched weights; ``load_state_dict``; then ``bn_update`` re-estimates the statistics on
corrupted training images, **on the patched model**. :func:`official_patch` does the same.
Re-estimating before the weights change (the lab's first version) leaves the statistics
stale for the weights the model then runs with.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

import robustpatch as rp

from ..recipes import reestimate_bn

__all__ = [
    "has_bn",
    "bn_modules",
    "deltas_only",
    "weight_deltas",
    "bn_state",
    "swap_bn",
    "route_nbytes",
    "official_patch",
]

#: A BatchNorm layer's tensors that the official ``decompose`` takes from the robust
#: model(s) (``num_batches_tracked`` stays the clean model's).
BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def bn_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's BatchNorm layers by module path."""
    return {
        n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


def deltas_only(sig: rp.Signature) -> rp.Signature:
    """``sig`` without its BatchNorm replacements (running statistics)."""
    return rp.Signature(list(sig.deltas.values()), name=f"{sig.name}-deltas", meta=sig.meta)


def weight_deltas(sig: rp.Signature, model: nn.Module) -> rp.Signature:
    """``sig``'s deltas on tensors outside BatchNorm layers: what the official route adds.
    Its BN affine deltas and statistics are left out, as the swap replaces those tensors."""
    norms = bn_modules(model)
    keep = [e for n, e in sig.deltas.items() if n.rsplit(".", 1)[0] not in norms]
    return rp.Signature(keep, name=f"{sig.name}-weights", meta=sig.meta)


@torch.no_grad()
def bn_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """A copy of every BatchNorm layer's :data:`BN_TENSORS` (what a swap takes), so a
    robust twin need not be kept whole for later sums."""
    return {
        name: {t: getattr(m, t).detach().clone() for t in BN_TENSORS if getattr(m, t) is not None}
        for name, m in bn_modules(model).items()
    }


@torch.no_grad()
def swap_bn(model: nn.Module, robust: Sequence[dict]) -> nn.Module:
    """A copy of ``model`` whose BatchNorm tensors are the mean of the ``robust`` states
    (:func:`bn_state`) network-wide; the statistics are not re-estimated here."""
    if not robust:
        raise ValueError("swap_bn needs at least one robust BatchNorm state")
    out = copy.deepcopy(model)
    for name, m in bn_modules(out).items():
        for t, dest in ((t, getattr(m, t)) for t in BN_TENSORS if getattr(m, t) is not None):
            dest.copy_(torch.stack([r[name][t].to(dest.device) for r in robust]).mean(0))
    return out


def route_nbytes(sig: rp.Signature, model: nn.Module) -> int:
    """Bytes the official route ships: ``sig``'s weight deltas as stored, plus every BN
    layer's robust affine parameters at fp32 (swapped in network-wide; the statistics are
    re-estimated on the target's images, so they need not travel)."""
    affine = sum(
        4 * p.numel()
        for m in bn_modules(model).values()
        for p in (m.weight, m.bias)
        if p is not None
    )
    return weight_deltas(sig, model).nbytes + affine


def official_patch(
    clean: nn.Module,
    robust: Sequence[dict],
    sigs: Sequence[rp.Signature],
    alphas: Sequence[float],
    unlabeled: torch.Tensor,
) -> nn.Module:
    """The official BN route: swap the robust BN in network-wide (:func:`swap_bn`), add each
    signature's weight deltas (:func:`weight_deltas`) times its α, then re-estimate every
    BN layer's statistics on ``unlabeled`` (corrupted training images), in that order."""
    out = swap_bn(clean, robust)
    rp.apply(out, [weight_deltas(s, clean) for s in sigs], alphas=list(alphas))
    return reestimate_bn(out, unlabeled)
