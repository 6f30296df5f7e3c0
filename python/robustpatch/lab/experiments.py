"""Experiments on robust weight signatures, each returning JSON-able results.

1. :func:`layer_profile`: per layer, how far the robust model is from the clean one and
   the projection coefficient ``⟨Δr, d⟩ / ‖d‖²``.
2. :func:`patch_arms`: clean, BN re-estimation alone, clean + signature under each
   BatchNorm policy, robust, per corruption and severity.
3. :func:`depth_sweep`: the gain against the share of parameters patched (first k layers).
4. :func:`alpha_sweep`: accuracy against the patch strength α.
5. :func:`similarity_matrix`, :func:`detection`: cosine similarity of signatures across
   corruptions, seeds and datasets; which corruption an unknown model was trained on.
6. :func:`composition`: two signatures summed against each alone.
7. :func:`transfer`: a signature from one dataset applied to another dataset's model.
8. :func:`compression`: gain and size against the number of bits.
9. :func:`removal_is_exact`: apply then remove gives back the same bits.

``plot_*`` functions draw each result as a PNG (matplotlib's Agg canvas, no global
state). Accuracies are percentages. A *gain* is an arm's mean accuracy over severities
minus the clean model's; *recovered* is a gain divided by the robust model's gain.

BatchNorm policies of a patched model (see ``DESIGN.md``): ``"signature"`` keeps what the
signature ships (the robust model's running statistics for the layers it patches, blended
by α; the other layers keep the clean model's) and ``"reestimate"`` re-estimates every
BatchNorm layer on unlabeled corrupted training images. "BN re-estimation alone" (the
clean model with re-estimated statistics) is the baseline of the second.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch
from torch import nn

from robustpatch.extraction import extract
from robustpatch.signature import Signature, SignatureSum, detect, similarity, terms
from robustpatch.targets import apply, remove

from . import corruptions as C
from . import models, recipes, training
from .corruptions import SEVERITIES
from .plots import (
    plot_alpha_sweep,
    plot_composition,
    plot_compression,
    plot_depth_sweep,
    plot_layer_profile,
    plot_patch_arms,
    plot_similarity,
    plot_transfer,
)

__all__ = [
    "SEVERITIES",
    "BN_POLICIES",
    "ALPHAS",
    "Task",
    "Unit",
    "state_arrays",
    "depth_units",
    "units_within",
    "units_by_difference",
    "param_fraction",
    "layer_patterns",
    "make_signature",
    "patched",
    "layer_profile",
    "patch_arms",
    "depth_sweep",
    "alpha_sweep",
    "non_decreasing",
    "similarity_matrix",
    "nearest",
    "model_delta",
    "detection",
    "composition",
    "transfer",
    "compression",
    "removal_is_exact",
    "plot_layer_profile",
    "plot_patch_arms",
    "plot_depth_sweep",
    "plot_alpha_sweep",
    "plot_similarity",
    "plot_composition",
    "plot_transfer",
    "plot_compression",
]

BN_POLICIES = ("signature", "reestimate")
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)

Sigs = Union[Signature, SignatureSum, Sequence[Union[Signature, SignatureSum]]]


# ---------------------------------------------------------------------------- data


@dataclass
class Task:
    """A downstream dataset: float [0, 1] images, fixed corrupted test sets (built on
    first use) and unlabeled corrupted training images for BatchNorm re-estimation."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    severities: tuple[int, ...] = SEVERITIES
    scale: str = "imagenet"
    bn_images: int = 500
    test_seed: int = 1000
    _sets: dict = field(default_factory=dict, repr=False)
    _pools: dict = field(default_factory=dict, repr=False)
    _memo: dict = field(default_factory=dict, repr=False)
    _keep: dict = field(default_factory=dict, repr=False)  # models whose id keys _memo

    @classmethod
    def from_sets(cls, name: str, train: Any, test: Any, **kwargs: Any) -> Task:
        """A task from two :class:`~robustpatch.lab.datasets.ImageSet` (uint8 images)."""
        (x, y), (xt, yt) = train.tensors(), test.tensors()
        return cls(name, x.float() / 255, y, xt.float() / 255, yt, **kwargs)

    def test_set(self, corruption: str, severity: int) -> torch.Tensor:
        """The test images under one corruption and severity (fixed seed, cached)."""
        key = (corruption, int(severity))
        if key not in self._sets:
            self._sets[key] = C.corrupt(
                self.x_test,
                corruption,
                int(severity),
                seed=self.test_seed + int(severity),
                scale=self.scale,
            )
        return self._sets[key]

    def pool(self, names: str | Sequence[str]) -> torch.Tensor:
        """Unlabeled corrupted training images (all severities; several corruptions in
        equal shares) for BatchNorm re-estimation, cached."""
        key = (names,) if isinstance(names, str) else tuple(names)
        if key not in self._pools:
            self._pools[key] = recipes.unlabeled_corrupted(
                self.x_train,
                list(key),
                self.bn_images,
                severities=self.severities,
                scale=self.scale,
            )
        return self._pools[key]

    def accuracies(self, model: nn.Module, corruption: str) -> list[float]:
        """Accuracy (%) per severity."""
        return [self._accuracy(model, self.test_set(corruption, s)) for s in self.severities]

    def clean_accuracy(self, model: nn.Module) -> float:
        """Accuracy (%) on the uncorrupted test images."""
        return self._accuracy(model, self.x_test)

    def _accuracy(self, model: nn.Module, x: torch.Tensor) -> float:
        dev = training.model_device(model)
        return 100.0 * training.accuracy(model, x, self.y_test, batch_size=512, device=dev)

    def clean_pool(self) -> torch.Tensor:
        """Unlabeled uncorrupted training images (BatchNorm re-estimation for clean data)."""
        return self.x_train[: self.bn_images]

    def evaluate(self, model: nn.Module, corruption: str) -> dict[str, Any]:
        """``{"severity": [...], "mean": ..., "clean": ..., "clean_adapted": ...}`` (%).

        ``clean``: accuracy on uncorrupted test images of the model as it is;
        ``clean_adapted`` is the same here (see :meth:`evaluate_patched`).
        """
        key = (id(model), "model", corruption)
        if key not in self._memo:
            self._keep[id(model)] = model
            acc = self.accuracies(model, corruption)
            clean = self.clean_accuracy(model)
            self._memo[key] = {
                "severity": acc,
                "mean": float(np.mean(acc)),
                "clean": clean,
                "clean_adapted": clean,
            }
        return copy.deepcopy(self._memo[key])

    def evaluate_patched(
        self,
        clean: nn.Module,
        sigs: Sigs | None,
        alphas: float | Sequence[float],
        bn: str,
        corruption: str,
        pool: str | Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """:meth:`evaluate` of ``patched(clean, sigs, alphas, bn=bn)``, remembered.

        Under ``bn="reestimate"`` the statistics come from :meth:`pool` of ``pool``
        (default: ``corruption``), and ``clean_adapted`` is the clean accuracy of the
        same patched weights with statistics re-estimated on uncorrupted images (the
        policy adapts BatchNorm to the data it is deployed on); ``clean`` keeps the
        corrupted-data statistics. Under ``"signature"`` both are the same number.
        """
        names = corruption if pool is None else pool
        names = (names,) if isinstance(names, str) else tuple(names)
        key = (id(clean), _sigs_key(sigs), _alphas_key(alphas), bn, names, corruption)
        if key not in self._memo:
            self._keep[id(clean)] = clean
            model = patched(clean, sigs, alphas, bn=bn, pool=self.pool(names))
            acc = self.accuracies(model, corruption)
            ev = {"severity": acc, "mean": float(np.mean(acc))}
            ev["clean"] = self.clean_accuracy(model)
            if bn == "reestimate":
                adapted = patched(clean, sigs, alphas, bn="reestimate", pool=self.clean_pool())
                ev["clean_adapted"] = self.clean_accuracy(adapted)
            else:
                ev["clean_adapted"] = ev["clean"]
            self._memo[key] = ev
        return copy.deepcopy(self._memo[key])


def _sigs_key(sigs: Sigs | None) -> tuple:
    """What a patch adds: each stored signature's hash with its coefficient (a scaled
    signature shares its entries, and its hash, with the unscaled one)."""
    if sigs is None:
        return ()
    return tuple((s.content_hash, c) for s, c in terms(sigs))


def _alphas_key(alphas: float | Sequence[float]) -> tuple:
    if isinstance(alphas, (int, float)):
        return (float(alphas),)
    return tuple(float(a) for a in alphas)


def state_arrays(obj: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Floating-point tensors of a model or state dict as numpy copies, in model order."""
    state = obj.state_dict() if isinstance(obj, nn.Module) else obj
    return {
        k: v.detach().cpu().numpy().copy()
        for k, v in state.items()
        if torch.is_tensor(v) and v.is_floating_point()
    }


# ---------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class Unit:
    """One weight layer (a tensor of 2+ dimensions) and the modules with only 1-d
    parameters that follow it (its BatchNorm, biases), with their parameter count."""

    modules: tuple[str, ...]
    params: int


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def depth_units(model: nn.Module, example_input: torch.Tensor | None = None) -> list[Unit]:
    """The model's parameters grouped into units, shallowest first
    (:func:`robustpatch.lab.models.parameters_by_depth`)."""
    groups: list[tuple[list[str], int, str]] = []  # modules, params, weight module
    for name, p in models.parameters_by_depth(model, example_input):
        module = _module_of(name)
        if not groups or (p.dim() >= 2 and module != groups[-1][2]):
            groups.append(([], 0, module if p.dim() >= 2 else ""))
        mods, count, weight = groups[-1]
        if module not in mods:
            mods.append(module)
        groups[-1] = (mods, count + p.numel(), weight or (module if p.dim() >= 2 else ""))
    return [Unit(tuple(m), n) for m, n, _ in groups]


def units_within(units: Sequence[Unit], budget: float) -> int:
    """The most leading units whose parameters stay within ``budget`` (a share of all
    parameters); at least one."""
    total = sum(u.params for u in units)
    k, cum = 0, 0
    for u in units:
        if cum + u.params > budget * total + 1e-9:
            break
        cum += u.params
        k += 1
    return max(k, 1)


def units_by_difference(
    units: Sequence[Unit], profile: Mapping[str, Any], budget: float
) -> list[Unit]:
    """Units taken greedily by the relative difference of their weight layer
    (:func:`layer_profile`), largest first, skipping any that would pass ``budget`` (a
    share of all parameters); returned in depth order."""
    rel = {_module_of(n): v for n, v in zip(profile["layers"], profile["relative_difference"])}
    total = sum(u.params for u in units)
    ranked = sorted(range(len(units)), key=lambda i: -rel.get(units[i].modules[0], -1.0))
    chosen, cum = [], 0
    for i in ranked:
        if cum + units[i].params <= budget * total + 1e-9:
            chosen.append(i)
            cum += units[i].params
    return [units[i] for i in sorted(chosen)]


def layer_patterns(units: Sequence[Unit]) -> list[str]:
    """Regexes selecting these units' modules in :func:`robustpatch.extract`."""
    return [re.escape(m) for u in units for m in u.modules]


def param_fraction(units: Sequence[Unit], k: int) -> float:
    """Share of all parameters in the first ``k`` units."""
    total = sum(u.params for u in units)
    return sum(u.params for u in units[:k]) / total if total else 0.0


def make_signature(
    pre: Mapping[str, np.ndarray],
    clean: Mapping[str, np.ndarray],
    robust: Mapping[str, np.ndarray],
    units: Sequence[Unit] | None = None,
    *,
    method: str = "projection",
    name: str = "signature",
    provenance: Mapping[str, Any] | None = None,
) -> Signature:
    """The signature of the given units (all tensors when ``units`` is None)."""
    layers: Any = "all" if units is None else layer_patterns(units)
    return extract(
        pre,
        clean,
        robust,
        layers,
        method=method,
        name=name,
        order=list(clean),
        provenance=provenance,
    )


def patched(
    clean: nn.Module,
    sigs: Sigs | None,
    alphas: float | Sequence[float] = 1.0,
    *,
    bn: str = "signature",
    pool: torch.Tensor | None = None,
) -> nn.Module:
    """A patched copy of ``clean`` (no signature: a plain copy) under a BatchNorm policy."""
    if bn not in BN_POLICIES:
        raise ValueError(f"unknown BatchNorm policy {bn!r}; expected one of {BN_POLICIES}")
    model = copy.deepcopy(clean)
    if sigs is not None and not (isinstance(sigs, Sequence) and len(sigs) == 0):
        apply(model, sigs, alphas)
    if bn == "reestimate":
        if pool is None:
            raise ValueError("BatchNorm re-estimation needs unlabeled images (pool)")
        recipes.reestimate_bn(model, pool)
    return model.eval()


def _gain(arm: Mapping[str, Any], reference: Mapping[str, Any]) -> float:
    return float(arm["mean"] - reference["mean"])


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


# ---------------------------------------------------------------------------- 1. layers


def layer_profile(
    pre: Mapping[str, np.ndarray],
    clean: Mapping[str, np.ndarray],
    robust: Mapping[str, np.ndarray],
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per weight layer (``names``, default: the tensors of 2+ dimensions that the clean
    fine-tune changed, in model order):

    - ``relative_difference`` ‖θrobust − θclean‖ / ‖θclean‖,
    - ``difference_to_clean_update`` ‖θrobust − θclean‖ / ‖θclean − θpre‖,
    - ``coefficient`` ⟨Δr, d⟩ / ‖d‖² (Δr = θrobust − θpre, d = θclean − θpre),
    - ``signature_energy_share``: the layer's share of ‖Δr − coefficient·d‖²,

    and where the largest relative difference lies (``largest_in_first_third``: among the
    first ⌈n/3⌉ of the n weight layers).
    """
    if names is None:
        names = [
            k
            for k, v in clean.items()
            if v.ndim >= 2 and k in pre and not np.array_equal(v, pre[k])
        ]
    names = list(names)
    if not names:
        raise ValueError("no weight layer (tensor of 2+ dimensions)")
    rows: dict[str, list[float]] = {
        "params": [],
        "relative_difference": [],
        "difference_to_clean_update": [],
        "coefficient": [],
        "signature_energy": [],
    }
    for n in names:
        p, c, r = (np.asarray(a[n], dtype=np.float64).reshape(-1) for a in (pre, clean, robust))
        d, dr, rc = c - p, r - p, r - c
        dd = float(d @ d)
        coef = float(dr @ d) / dd if dd > 0 else 0.0
        sig = dr - coef * d
        rows["params"].append(int(c.size))
        rows["relative_difference"].append(
            float(np.linalg.norm(rc) / max(np.linalg.norm(c), 1e-30))
        )
        rows["difference_to_clean_update"].append(
            float(np.linalg.norm(rc) / math.sqrt(dd)) if dd > 0 else float("nan")
        )
        rows["coefficient"].append(coef)
        rows["signature_energy"].append(float(sig @ sig))
    total = sum(rows["signature_energy"]) or 1.0
    share = [e / total for e in rows.pop("signature_energy")]
    rel = rows["relative_difference"]
    i = int(np.argmax(rel))
    third = math.ceil(len(names) / 3)
    return {
        "layers": names,
        **rows,
        "signature_energy_share": share,
        "largest": names[i],
        "largest_index": i,
        "first_third": third,
        "largest_in_first_third": i < third,
    }


# ---------------------------------------------------------------------------- 2. patch gain


def _add_gains(arms: dict[str, dict[str, Any]]) -> float:
    ref = arms["clean"]
    robust_gain = _gain(arms["robust"], ref) if "robust" in arms else float("nan")
    for arm in arms.values():
        arm["gain"] = _gain(arm, ref)
        arm["recovered"] = _ratio(arm["gain"], robust_gain)
    return robust_gain


def patch_arms(
    task: Task,
    corruption: str,
    clean: nn.Module,
    robust: nn.Module,
    signatures: Mapping[str, Signature],
    policies: Sequence[str] = BN_POLICIES,
) -> dict[str, Any]:
    """Every arm on one corruption: ``clean``, ``bn_reestimation_only``, ``robust`` and,
    per signature label and BatchNorm policy, ``"<label>|<policy>"`` (α = 1).

    Each arm: accuracy per severity, mean, clean accuracy (``clean``, and
    ``clean_adapted``, see :meth:`Task.evaluate_patched`), gain and recovered share.
    """
    arms: dict[str, dict[str, Any]] = {
        "clean": task.evaluate(clean, corruption),
        "bn_reestimation_only": task.evaluate_patched(clean, None, 1.0, "reestimate", corruption),
        "robust": task.evaluate(robust, corruption),
    }
    for label, sig in signatures.items():
        for policy in policies:
            arms[f"{label}|{policy}"] = task.evaluate_patched(clean, sig, 1.0, policy, corruption)
    robust_gain = _add_gains(arms)
    return {"corruption": corruption, "arms": arms, "robust_gain": robust_gain}


# ---------------------------------------------------------------------------- 3. depth


def depth_sweep(
    task: Task,
    corruption: str,
    pre: Mapping[str, np.ndarray],
    clean_arrays: Mapping[str, np.ndarray],
    robust_arrays: Mapping[str, np.ndarray],
    clean: nn.Module,
    units: Sequence[Unit],
    ks: Sequence[int] | None = None,
    *,
    policy: str = "reestimate",
    method: str = "projection",
    reference: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Patch the first k units for each k in ``ks`` (default: every k up to all units).

    Rows: k, share of parameters, mean accuracy, gain over the clean model, clean
    accuracy. ``reference``: the clean model's :meth:`Task.evaluate` (computed if None).
    """
    ref = dict(reference) if reference is not None else task.evaluate(clean, corruption)
    ks = list(ks) if ks is not None else list(range(1, len(units) + 1))
    rows = []
    for k in ks:
        sig = make_signature(pre, clean_arrays, robust_arrays, units[:k], method=method)
        ev = task.evaluate_patched(clean, sig, 1.0, policy, corruption)
        rows.append(
            {
                "units": k,
                "param_fraction": param_fraction(units, k),
                "mean": ev["mean"],
                "gain": _gain(ev, ref),
                "clean": ev["clean"],
                "clean_adapted": ev["clean_adapted"],
            }
        )
    return {
        "corruption": corruption,
        "policy": policy,
        "method": method,
        "rows": rows,
        "clean_mean": ref["mean"],
    }


# ---------------------------------------------------------------------------- 4. alpha


def alpha_sweep(
    task: Task,
    corruption: str,
    clean: nn.Module,
    sig: Signature,
    alphas: Sequence[float] = ALPHAS,
    policies: Sequence[str] = BN_POLICIES,
    *,
    reference: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Mean accuracy (and per severity, clean accuracy) at each α, per BatchNorm policy.

    Under ``"reestimate"`` α = 0 is BN re-estimation alone; under ``"signature"`` it is
    the clean model.
    """
    ref = dict(reference) if reference is not None else task.evaluate(clean, corruption)
    out: dict[str, Any] = {
        "corruption": corruption,
        "alphas": [float(a) for a in alphas],
        "clean_mean": ref["mean"],
        "policies": {},
    }
    for policy in policies:
        rows = []
        for a in alphas:
            ev = task.evaluate_patched(clean, sig, float(a), policy, corruption)
            rows.append({"alpha": float(a), **ev, "gain": _gain(ev, ref)})
        out["policies"][policy] = rows
    return out


def non_decreasing(values: Sequence[float], tolerance: float = 1.0) -> bool:
    """True when no value falls more than ``tolerance`` below the one before it."""
    return all(b >= a - tolerance for a, b in zip(values, values[1:]))


# ---------------------------------------------------------------------------- 5. similarity


def similarity_matrix(sigs: Mapping[str, Signature]) -> dict[str, Any]:
    """Cosine similarity over shared delta entries (:func:`robustpatch.similarity`)."""
    labels = list(sigs)
    m = similarity([sigs[k] for k in labels])
    return {"labels": labels, "matrix": [[float(v) for v in row] for row in m]}


def nearest(sim: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """For each signature, the most similar other one and its cosine."""
    labels, m = sim["labels"], np.asarray(sim["matrix"])
    out = {}
    for i, label in enumerate(labels):
        row = m[i].copy()
        row[i] = -np.inf
        j = int(np.argmax(row))
        out[label] = {"nearest": labels[j], "cosine": float(m[i, j])}
    return out


def model_delta(
    clean: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray], names: Sequence[str]
) -> dict[str, np.ndarray]:
    """``other − clean`` for the named tensors (float32): an unknown model's update."""
    return {n: (other[n].astype(np.float32) - clean[n].astype(np.float32)) for n in names}


def detection(
    queries: Mapping[str, Mapping[str, np.ndarray]], library: Mapping[str, Signature]
) -> dict[str, Any]:
    """Rank the library against each query delta (:func:`robustpatch.detect`).

    ``queries`` maps the true corruption to a model delta (see :func:`model_delta`).
    """
    rows = {}
    for truth, delta in queries.items():
        ranking = detect(delta, library)
        rows[truth] = {
            "ranking": [[name, float(score)] for name, score in ranking],
            "predicted": ranking[0][0],
            "correct": ranking[0][0] == truth,
        }
    return {"queries": rows, "accuracy": float(np.mean([r["correct"] for r in rows.values()]))}


# ---------------------------------------------------------------------------- 6. composition


def composition(
    task: Task,
    a: str,
    b: str,
    clean: nn.Module,
    sig_a: Signature,
    sig_b: Signature,
    policies: Sequence[str] = BN_POLICIES,
    *,
    references: Mapping[str, Mapping[str, Any]] | None = None,
    variants: bool = False,
) -> dict[str, Any]:
    """``sig_a + sig_b`` (α = 1 each) evaluated on corruption ``a`` and on ``b``, beside
    each signature alone on its own corruption.

    The sum does not know which corruption comes, so under ``"reestimate"`` its
    BatchNorm statistics come from unlabeled images of both corruptions in equal shares;
    each signature alone re-estimates on its own corruption. ``references``: the clean
    model's evaluation per corruption (computed when missing). ``kept``: the sum's gain ÷
    the signature's own gain, on its corruption.

    ``variants=True`` adds, under ``"reestimate"``, two diagnostics (``variants``): the sum
    with statistics re-estimated on the evaluated corruption alone (``sum_own_bn``: is
    the loss in the weights or in the mixed statistics?) and the mean ``0.5·(a + b)``.
    """
    refs = dict(references or {})
    for c in (a, b):
        if c not in refs:
            refs[c] = task.evaluate(clean, c)
    both = sig_a + sig_b
    out: dict[str, Any] = {"pair": [a, b], "policies": {}}
    for policy in policies:
        rows = {}
        for c, sig in ((a, sig_a), (b, sig_b)):
            summed = task.evaluate_patched(clean, both, 1.0, policy, c, pool=(a, b))
            own = task.evaluate_patched(clean, sig, 1.0, policy, c)
            g_sum, g_own = _gain(summed, refs[c]), _gain(own, refs[c])
            rows[c] = {
                "sum_mean": summed["mean"],
                "alone_mean": own["mean"],
                "clean_mean": refs[c]["mean"],
                "sum_gain": g_sum,
                "alone_gain": g_own,
                "kept": _ratio(g_sum, g_own),
                "sum_clean_accuracy": summed["clean"],
                "sum_clean_adapted": summed["clean_adapted"],
            }
        out["policies"][policy] = rows
    if variants:
        mean = 0.5 * sig_a + 0.5 * sig_b
        rows = {}
        for c, sig in ((a, sig_a), (b, sig_b)):
            own = task.evaluate_patched(clean, sig, 1.0, "reestimate", c)
            g_own = _gain(own, refs[c])
            own_bn = task.evaluate_patched(clean, both, 1.0, "reestimate", c)
            avg = task.evaluate_patched(clean, mean, 1.0, "reestimate", c, pool=(a, b))
            rows[c] = {
                "sum_own_bn_mean": own_bn["mean"],
                "sum_own_bn_kept": _ratio(_gain(own_bn, refs[c]), g_own),
                "mean_mean": avg["mean"],
                "mean_kept": _ratio(_gain(avg, refs[c]), g_own),
            }
        out["variants"] = rows
    return out


# ---------------------------------------------------------------------------- 7. transfer


def transfer(
    task_b: Task,
    corruption: str,
    clean_b: nn.Module,
    robust_b: nn.Module,
    sig_a: Signature,
    own_b: Signature | None = None,
    policies: Sequence[str] = BN_POLICIES,
) -> dict[str, Any]:
    """A signature made on dataset A applied to dataset B's clean model (fine-tuned from
    the same pretrained weights), against B's own robust model and B's own signature.

    ``ratio``: per policy, the transferred signature's gain ÷ B's robust gain.
    """
    sigs = {"transfer": sig_a}
    if own_b is not None:
        sigs["own"] = own_b
    r = patch_arms(task_b, corruption, clean_b, robust_b, sigs, policies)
    r["ratio"] = {p: r["arms"][f"transfer|{p}"]["recovered"] for p in policies}
    return r


# ---------------------------------------------------------------------------- 8. compression


def compression(
    task: Task,
    corruption: str,
    clean: nn.Module,
    sig: Signature,
    bits: Sequence[int] = tuple(range(1, 9)),
    *,
    policy: str = "reestimate",
    scheme: str = "affine",
    granularity: str = "channel",
    model_nbytes: int | None = None,
    reference: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Quantize ``sig`` to each bit width; gain, bytes stored and how many times smaller
    than ``model_nbytes`` (the float32 robust model), and ``kept``: the gain ÷ the
    unquantized signature's gain. ``reference``: the clean model's evaluation (computed
    when missing)."""
    ref = dict(reference) if reference is not None else task.evaluate(clean, corruption)
    unquantized = task.evaluate_patched(clean, sig, 1.0, policy, corruption)
    g_full = _gain(unquantized, ref)
    rows = []
    for b in bits:
        q = sig.quantize(int(b), scheme, granularity)
        ev = task.evaluate_patched(clean, q, 1.0, policy, corruption)
        rows.append(
            {
                "bits": int(b),
                "mean": ev["mean"],
                "gain": _gain(ev, ref),
                "kept": _ratio(_gain(ev, ref), g_full),
                "nbytes": int(q.nbytes),
                "times_smaller": float(model_nbytes / q.nbytes) if model_nbytes else None,
            }
        )
    sizes = {
        g: {int(b): int(sig.quantize(int(b), scheme, g).nbytes) for b in bits}
        for g in ("tensor", "channel", "group")
    }
    q4 = sig.quantize(4, scheme, granularity)
    breakdown = {
        "codes": sum(e.quant.codes.nbytes for e in q4.deltas.values() if e.quant is not None),
        "scales_offsets": sum(
            e.quant.scale.nbytes + e.quant.offset.nbytes
            for e in q4.deltas.values()
            if e.quant is not None
        ),
        "bn_replacements": sum(e.nbytes for e in q4.bn.values()),
    }
    return {
        "corruption": corruption,
        "policy": policy,
        "scheme": scheme,
        "granularity": granularity,
        "nbytes_by_granularity": sizes,
        "breakdown_4bit": breakdown,
        "unquantized": {
            "mean": unquantized["mean"],
            "gain": g_full,
            "nbytes": int(sig.nbytes),
            "times_smaller": float(model_nbytes / sig.nbytes) if model_nbytes else None,
        },
        "model_nbytes": model_nbytes,
        "rows": rows,
    }


# ---------------------------------------------------------------------------- 9. removal


def _state_bytes(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().cpu().numpy().tobytes() for k, v in model.state_dict().items()}


def removal_is_exact(
    model: nn.Module, sigs: Sigs, alphas: float | Sequence[float] = 1.0
) -> dict[str, Any]:
    """Apply to a copy of ``model``, remove, and compare every tensor's bytes."""
    m = copy.deepcopy(model)
    before = _state_bytes(m)
    undo = apply(m, sigs, alphas)
    changed = sum(before[k] != v for k, v in _state_bytes(m).items())
    counts = remove(m, undo)
    after = _state_bytes(m)
    return {
        "bit_exact": after == before,
        "tensors_changed_by_apply": int(changed),
        "tensors_restored": int(counts["tensors"]),
        "bn_buffers_restored": int(counts["bn_buffers"]),
        "elements_corrected": int(counts["corrected"]),
    }
