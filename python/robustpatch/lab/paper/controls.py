"""Controls kept beside the paper's arm: a null patch, BatchNorm-only arms, and the parts
of the official BatchNorm route taken apart (signature only / robust-BN swap only).

The null control keeps every per-tensor norm of the signature but points each tensor in a
random direction: a gain the signature shares with it comes from the patch's size, not its
direction. On a BatchNorm backbone it goes through the same BN route as the judged arm
(:func:`.bn.official_patch`), so the two differ only in the delta directions.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

import robustpatch as rp

from ..recipes import reestimate_bn
from .bn import bn_state, deltas_only, has_bn, swap_bn

__all__ = ["random_direction", "has_bn", "bn_only", "robust_bn_swap", "deltas_only"]


def random_direction(sig: rp.Signature, seed: int) -> rp.Signature:
    """A signature with ``sig``'s delta tensors, each replaced by a Gaussian direction of the
    same Frobenius norm (BatchNorm replacements are left out: the arm that uses it decides
    the BN handling, as for the signature it controls)."""
    rng = np.random.default_rng(seed)
    deltas = {}
    for name, e in sig.deltas.items():
        dense = e.dense().astype(np.float64)
        direction = rng.standard_normal(dense.shape)
        deltas[name] = (direction * (np.linalg.norm(dense) / np.linalg.norm(direction))).astype(
            np.float32
        )
    return rp.Signature.from_deltas(deltas, name=f"{sig.name}-random")


def bn_only(model: nn.Module, unlabeled: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose BatchNorm statistics are re-estimated on ``unlabeled``
    (the corrupted training images): the baseline a patch must beat."""
    return reestimate_bn(copy.deepcopy(model), unlabeled)


def robust_bn_swap(model: nn.Module, robust: nn.Module, unlabeled: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with every BatchNorm's affine parameters and statistics taken
    from ``robust`` network-wide, then re-estimated on ``unlabeled``: the official route
    (:func:`.bn.official_patch`) without the signature."""
    return reestimate_bn(swap_bn(model, [bn_state(robust)]), unlabeled)
