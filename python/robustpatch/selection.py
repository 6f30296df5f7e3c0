"""Which tensors :func:`~robustpatch.extraction.extract` takes: depth order, leading-layer
units, and the layer rules (``"auto"``, ``"all"``, a count, regexes, a parameter budget).

Pure functions of tensor names and shapes; the signature energies that ``"auto"`` weighs
come from the caller (``energies``), computed only when that rule needs them.

>>> depth_key("layers.2.w") < depth_key("layers.10.w") < depth_key("head.w")
True
>>> units_within_budget([10, 10, 80], 0.25)
2
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy as np

from ._warn import warn
from .errors import SelectionError
from .signature import is_bn_stat

__all__ = [
    "AUTO_PARAM_BUDGET",
    "BUFFER_LEAVES",
    "HEAD_MODULES",
    "Layers",
    "choose_layers",
    "depth_key",
    "is_buffer_name",
    "layer_units",
    "units_within_budget",
]

Layers = Union[str, int, Sequence[str]]

#: Share of the parameters ``layers="auto"`` may select (projection method): the paper
#: patches VGG-16's first 7 of 13 convs (≈ 12% of the weights); the demo's measured
#: patch is its first 4 weight layers (23%). A quarter covers both.
AUTO_PARAM_BUDGET = 0.25

#: Leaf names of tensors that are state, not weights: never a layer, never counted as
#: parameters (BatchNorm statistics and counter, input normalisation buffers).
BUFFER_LEAVES = ("running_mean", "running_var", "num_batches_tracked", "mean", "std")

#: First module-path components of output heads, which sort last in natural order.
HEAD_MODULES = ("lm_head", "classifier", "head", "fc")


# ---------------------------------------------------------------------------- depth


def _part_key(part: str) -> tuple[tuple[int, int, str], ...]:
    """Natural order within one path component: ``layer2`` < ``layer10``."""
    return tuple(
        (0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", part) if p
    )


def depth_key(name: str) -> tuple[bool, list[tuple], tuple]:
    """Sort key putting tensor names in depth order when no model order is known.

    Module paths compare component by component, numbers as numbers (``layers.2`` before
    ``layers.10``, a module before its children); modules under an output head
    (:data:`HEAD_MODULES` as the first component) go last; a module's tensors stay
    together. Siblings without numbers (``self_attn``, ``mlp``) keep name order: a name
    cannot tell their execution order.
    """
    module = _module(name)
    path = module.split(".") if module else []
    is_head = bool(path) and path[0] in HEAD_MODULES
    return is_head, [_part_key(p) for p in path], _part_key(name.rsplit(".", 1)[-1])


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def is_buffer_name(name: str) -> bool:
    """True for names of state that is not a weight (leaf in :data:`BUFFER_LEAVES`)."""
    return name.rsplit(".", 1)[-1] in BUFFER_LEAVES


def layer_units(
    names: Sequence[str],
    specs: Callable[[str], tuple],
    is_buffer: Callable[[str], bool] = is_buffer_name,
) -> list[list[str]]:
    """Group tensor names into leading-layer units, in the order given.

    A *weight layer* is a module holding a tensor of 2+ dimensions that is not a buffer
    (conv, linear, embedding; never normalisation ``mean``/``std`` or BatchNorm
    statistics); a unit is one weight layer plus the modules that follow it up to the
    next weight layer (its BatchNorm, bias-only modules...). Modules before the first
    weight layer join the first unit.
    """
    modules: dict[str, list[str]] = {}
    for n in names:
        modules.setdefault(_module(n), []).append(n)
    units: list[list[str]] = []
    has_weight = False  # whether the last unit already holds a weight layer
    for tensors in modules.values():
        is_weight_layer = any(not is_buffer(t) and len(specs(t)[1]) >= 2 for t in tensors)
        if not units or (is_weight_layer and has_weight):
            units.append([])
            has_weight = False
        units[-1].extend(tensors)
        has_weight = has_weight or is_weight_layer
    return units


def units_within_budget(params: Sequence[int], budget: float) -> int:
    """How many leading units hold at most ``budget`` of all parameters (at least one)."""
    total = sum(params)
    cum = k = 0
    for p in params:
        cum += p
        if cum > (budget + 1e-12) * total:
            break
        k += 1
    return max(k, 1)


def _units_for_energy(energies: Sequence[float], share: float) -> int:
    """The fewest leading units holding ``share`` of the total energy (all if it is 0)."""
    total = sum(energies)
    cum = 0.0
    for k, e in enumerate(energies, 1):
        cum += e
        if total > 0 and cum >= share * total * (1 - 1e-12):
            return k
    return len(energies)


def compile_layer_pattern(pattern: Any) -> re.Pattern[str]:
    """A layer regex searched on whole dot-separated name components (see :func:`extract`);
    its leading global flags (``(?i)``) stay in front of the wrapping."""
    if not isinstance(pattern, str):
        raise SelectionError(f"layers: expected a regex string, got {pattern!r}")
    flags = re.match(r"(?:\(\?[aiLmsux]+\))+", pattern)  # (?i)(?s): every leading group
    lead, body = (flags.group(0), pattern[flags.end() :]) if flags else ("", pattern)
    # verbose (?x): a "# comment" in the body runs to the end of its line, not past the
    # wrapping (in a verbose pattern a newline is whitespace)
    end = "\n" if "x" in lead else ""
    try:
        re.compile(pattern)
        return re.compile(rf"{lead}(?:^|(?<=\.))(?:{body}{end})(?=\.|$)")
    except (re.error, OverflowError) as e:  # OverflowError: a repeat count too large
        raise SelectionError(f"layers: invalid regex {pattern!r}: {e}") from None


def _select_pattern(names: Sequence[str], patterns: Sequence[Any]) -> set[str]:
    regs = [compile_layer_pattern(p) for p in patterns]
    chosen = {n for n in names if any(r.search(n) or r.search(_module(n)) for r in regs)}
    if not chosen:
        raise SelectionError(
            f"layers {list(patterns)} match no tensor (a regex matches whole name components,"
            f" e.g. {_module(names[0]) or names[0]!r})"
            if names
            else f"layers {list(patterns)} match no tensor"
        )
    # A selected module's BatchNorm statistics come with it.
    modules = {_module(n) for n in chosen}
    return chosen | {n for n in names if is_bn_stat(n) and _module(n) in modules}


# ---------------------------------------------------------------------------- rules


def _leading(units: list[list[str]], params: list[int], k: int, **info: Any):
    """The first ``k`` units' tensors and the layer info recorded for them."""
    total = sum(params) or 1
    info.update(units=k, of=len(units), param_share=sum(params[:k]) / total)
    if len(units) == 1 and len(units[0]) > 2 and "rule" not in info:
        undotted = [n for n in units[0] if "." not in n]
        if undotted:  # one "layer": a count, budget or auto rule takes the whole model
            warn(
                f"the tensor names do not split into layers (modules are dot-separated "
                f"paths; {undotted[0]!r} has none), so the layer {info['mode']} selects the "
                "whole model: name the tensors with layers= (a regex or a list of them)"
            )
    return [n for u in units[:k] for n in u], info


def _auto_projection(units, params, energies: Sequence[float], share: float):
    """Leading units: the fewest holding ``share`` of the energy, within the budget."""
    k = min(units_within_budget(params, AUTO_PARAM_BUDGET), _units_for_energy(energies, share))
    total = sum(energies) or 1.0
    return _leading(
        units,
        params,
        k,
        mode="auto",
        share=share,
        param_budget=AUTO_PARAM_BUDGET,
        energy_kept=sum(energies[:k]) / total,
        unit_energy=[e / total for e in energies],
        modules=list(dict.fromkeys(_module(n) for u in units[:k] for n in u)),
    )


def choose_layers(
    names: list[str],
    units: list[list[str]],
    params: list[int],
    layers: Layers,
    *,
    method: str,
    share: float,
    param_budget: float | None,
    energies: Callable[[], list[float]],
) -> tuple[list[str], dict[str, Any]]:
    """The tensors ``layers`` selects from ``names`` (grouped in ``units`` of ``params``
    parameters each), and the layer info extract records. ``energies()`` gives each
    unit's signature energy; only the projection's ``"auto"`` rule calls it."""
    is_auto = isinstance(layers, str) and layers == "auto"
    if param_budget is not None:
        if not is_auto:
            raise SelectionError(
                f"param_budget chooses the layers itself: it cannot be combined with "
                f"layers={layers!r}"
            )
        k = units_within_budget(params, param_budget)
        return _leading(units, params, k, mode="budget", param_budget=param_budget)
    if is_auto and method == "difference":
        return _leading(units, params, len(units), mode="auto", rule="every changed tensor")
    if is_auto:
        return _auto_projection(units, params, energies(), share)
    if isinstance(layers, str) and layers == "all":
        return names, {"mode": "all", "units": len(units), "of": len(units)}
    if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        if layers < 1:
            raise SelectionError(f"layers must be at least 1, got {layers}")
        return _leading(units, params, min(int(layers), len(units)), mode="count")
    if not isinstance(layers, (str, list, tuple, set, frozenset)):
        raise SelectionError(
            f"layers: expected 'auto', 'all', a count, a regex or a list of them, got {layers!r}"
        )
    patterns = [layers] if isinstance(layers, str) else list(layers)
    chosen = _select_pattern(names, patterns)
    touched = sum(any(n in chosen for n in u) for u in units)
    info = {"mode": "names", "patterns": patterns, "units": touched, "of": len(units)}
    return [n for n in names if n in chosen], info
