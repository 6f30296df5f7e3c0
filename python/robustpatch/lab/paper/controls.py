"""Controls kept beside the paper's arm: a null patch, BatchNorm-only arms, the official
BatchNorm decomposition (signature only / robust-BN swap only / both).

The null control keeps every per-tensor norm of the signature but points each tensor in a
random direction: a gain the signature shares with it comes from the patch's size, not its
direction.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

import robustpatch as rp

from ..recipes import reestimate_bn

__all__ = ["random_direction", "has_bn", "bn_only", "robust_bn_swap", "deltas_only"]


def random_direction(sig: rp.Signature, seed: int) -> rp.Signature:
    """A signature with ``sig``'s delta tensors, each replaced by a Gaussian direction of the
    same Frobenius norm (BatchNorm replacements are left out)."""
    rng = np.random.default_rng(seed)
    deltas = {}
    for name, e in sig.deltas.items():
        dense = e.dense().astype(np.float64)
        direction = rng.standard_normal(dense.shape)
        deltas[name] = (direction * (np.linalg.norm(dense) / np.linalg.norm(direction))).astype(
            np.float32
        )
    return rp.Signature.from_deltas(deltas, name=f"{sig.name}-random")


def deltas_only(sig: rp.Signature) -> rp.Signature:
    """``sig`` without its BatchNorm replacements (the official "signature only" arm)."""
    return rp.Signature(list(sig.deltas.values()), name=f"{sig.name}-deltas", meta=sig.meta)


def has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def bn_only(model: nn.Module, unlabeled: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose BatchNorm statistics are re-estimated on ``unlabeled``
    (the corrupted training images): the baseline a patch must beat."""
    return reestimate_bn(copy.deepcopy(model), unlabeled)


@torch.no_grad()
def robust_bn_swap(model: nn.Module, robust: nn.Module, unlabeled: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with every BatchNorm's affine parameters and statistics taken
    from ``robust`` network-wide, then re-estimated on ``unlabeled`` (the official ResNet
    arm's swap)."""
    out = copy.deepcopy(model)
    mods = dict(robust.named_modules())
    for name, m in out.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.load_state_dict(mods[name].state_dict())
    return reestimate_bn(out, unlabeled)
