"""Whether signatures fit an ONNX model, and which initializer each of their tensors is.

A signature names tensors as the torch state dict did. torch's exporter keeps those
names as initializer names, with one exception: weights tied to each other (a language
model's output projection sharing the embedding) become one initializer, under one of
the names, which need not be the name the signature kept (``meta["tied"]``: each name
left out, to the name kept). Such a tensor patches the one initializer of its tie that
the model holds.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import MismatchError
from ..targets import Plan, check_plan
from .model import OnnxModel

__all__ = ["FOLDING_HINT", "check_fits", "fitted_plan", "tie_aliases", "renamed"]

#: How to export a model whose BatchNorm layers keep their own initializers.
FOLDING_HINT = (
    "was a BatchNorm folded into a convolution at export? export without folding: "
    "torch.onnx.export(model, args, path, optimize=False) (torch >= 2.6), and apply the "
    "signature to that file (rp.onnx.export patches in torch and folds afterwards)"
)


def fitted_plan(
    model: OnnxModel, plan: Plan, force: bool = False, allow_dtype_change: bool = False
) -> Plan:
    """``plan`` keyed by the model's initializer names (ties resolved), once every
    tensor is checked to fit (MismatchError naming the first that does not)."""
    aliases = tie_aliases(model, plan)
    check_fits(model, plan, force, allow_dtype_change, aliases=aliases)
    return renamed(plan, aliases)


def check_fits(
    model: OnnxModel,
    plan: Plan,
    force: bool = False,
    allow_dtype_change: bool = False,
    *,
    aliases: dict[str, str] | None = None,
) -> None:
    """Refuse (MismatchError) a plan whose tensors are not initializers of the same shape
    stored as bytes, naming the first such tensor and how to export without folding.
    ``aliases``: the initializer of each tied tensor (default: :func:`tie_aliases`)."""
    if aliases is None:
        aliases = tie_aliases(model, plan)
    for name in plan.names:
        init_name = aliases.get(name, name)
        _check_initializer(model, init_name, _sig_shape(plan, name))
    check_plan(
        plan,
        lambda n: model.spec(aliases.get(n, n)),
        force,
        allow_dtype_change=allow_dtype_change,
        model=model.path,
    )


def _check_initializer(model: OnnxModel, name: str, sig_shape: tuple[int, ...]) -> None:
    """Initializer ``name`` holds bytes of a fixed-size dtype, as many elements as the
    signature's tensor, in raw_data or external data."""
    init = model.initializers[name]
    if init.label is None:
        raise MismatchError(
            f"{model.path}: initializer {name!r} has an ONNX data type whose elements "
            "are not whole bytes of one size (such as INT4 or STRING): it cannot be patched"
        )
    if math.prod(init.shape) != math.prod(sig_shape):
        raise MismatchError(
            f"{model.path}: initializer {name!r} has shape {list(init.shape)}, the signature "
            f"{list(sig_shape)} ({FOLDING_HINT})"
        )
    if not init.raw:
        raise MismatchError(
            f"{model.path}: initializer {name!r} is stored in typed fields, not raw_data: "
            "re-save it with onnx.save_model (onnx.numpy_helper.from_array writes raw_data)"
        )


def _sig_shape(plan: Plan, name: str) -> tuple[int, ...]:
    for sig in plan.sigs:
        if name in sig.entries:
            return sig.entries[name].shape
    raise KeyError(name)


# ---------------------------------------------------------------------------- tied weights


def tie_aliases(model: OnnxModel, plan: Plan) -> dict[str, str]:
    """The initializer of each tensor of ``plan`` that the model holds under a name it
    is tied to, not its own (MismatchError for a tensor the model holds under neither,
    naming its ties, or under several of them)."""
    aliases = {}
    for name in plan.names:
        if name in model.initializers:
            continue
        twins = _twins(plan, name)
        held = [t for t in twins if t in model.initializers]
        if len(held) == 1:
            aliases[name] = held[0]
        elif held:
            raise MismatchError(
                f"{model.path} has no initializer {name!r} but several tied to it in the "
                f"model the signature came from ({', '.join(map(repr, held))}): the export "
                "keeps them apart, and patching one would leave the others as they were"
            )
        elif twins:
            raise MismatchError(
                f"{model.path} has no initializer {name!r}, nor {_or(twins)} tied to it in "
                "the model the signature came from"
            )
        else:
            raise MismatchError(
                f"{model.path} has no initializer {name!r} that a signature touches "
                f"({FOLDING_HINT})"
            )
    return aliases


def _twins(plan: Plan, name: str) -> list[str]:
    """The names tied to ``name`` in the models the plan's signatures came from."""
    twins: set[str] = set()
    for sig in plan.sigs:
        tied = _tied(sig.meta)
        kept = tied.get(name, name)  # the name kept for the tensor ``name`` is
        twins |= {k for k, v in tied.items() if v == kept} | {kept}
    return sorted(twins - {name})


def _tied(meta: Any) -> dict[str, str]:
    """A signature's ``meta["tied"]``: names to names (anything else in a file ignored)."""
    tied = meta.get("tied") if isinstance(meta, dict) else None
    if not isinstance(tied, dict):
        return {}
    return {k: v for k, v in tied.items() if isinstance(k, str) and isinstance(v, str)}


def _or(names: list[str]) -> str:
    return " or ".join(map(repr, names))


def renamed(plan: Plan, aliases: dict[str, str]) -> Plan:
    """``plan`` with each tensor under its initializer's name: a tied tensor's terms join
    those given to that initializer directly (a tensor moved by deltas and blended as
    BatchNorm both is refused, as :func:`robustpatch.targets.make_plan` refuses it)."""
    if not aliases:
        return plan
    out = Plan(plan.sigs, plan.alphas)
    for src, dst in ((plan.deltas, out.deltas), (plan.bn, out.bn)):
        for name, (values, weights) in src.items():
            values_to, weights_to = dst.setdefault(aliases.get(name, name), ([], []))
            values_to.extend(values)
            weights_to.extend(weights)
    both = next((n for n in out.deltas if n in out.bn), None)
    if both is not None:
        raise MismatchError(
            f"{both}: the signatures give this initializer both a delta and a BatchNorm "
            "replacement (under names tied to each other); apply them one after the other"
        )
    return out
