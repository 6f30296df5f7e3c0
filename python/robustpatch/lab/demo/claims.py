"""The claims: each measured number against its threshold, with a verdict per sub-claim."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .config import FAMILIES, POLICY, PRIMARY

# A sub-claim that misses its threshold by at most this share of the threshold's
# magnitude is a near miss (70% → from 63%, 5 points → from 4.5, ≤ 2 points → up to
# 2.2, 30× → from 27×); exact checks (counts, layer positions, orderings, bit-exactness)
# have no near miss, and an undefined number fails.
NEAR_MISS = 0.10
VERDICTS = ("holds", "near miss", "fails")
NEAR_MISS_RULE = (
    f"*near miss*: short of its threshold by at most {100 * NEAR_MISS:.0f}% of the "
    "threshold's magnitude (≥ 70% is a near miss from 63%, ≥ 5 points from 4.5, ≤ 2 points "
    "up to 2.2, ≥ 30× from 27×); exact checks — counts, a layer's position, an ordering, "
    "bit-exactness — have no near miss, and an undefined number (n/a) fails."
)


def verdict(value: float, op: str, threshold: float, near: bool = True) -> str:
    """``"holds"``, ``"near miss"`` or ``"fails"`` for ``value op threshold``, op one of
    ``≥``, ``≤``, ``>`` (see NEAR_MISS)."""
    if value != value:
        return "fails"
    short = value - threshold if op == "≤" else threshold - value
    if short < 0 or (short == 0 and op != ">"):
        return "holds"
    # The tolerance absorbs float noise at the band's edge (0.7 − 0.63 > 0.07).
    band = NEAR_MISS * abs(threshold) * (1 + 1e-9)
    return "near miss" if near and short <= band else "fails"


def _check(
    what: str,
    value: float,
    op: str,
    threshold: float,
    unit: str = "",
    spec: str = ".1f",
    near: bool = True,
    measured: str | None = None,
    threshold_text: str | None = None,
) -> dict:
    """One sub-claim: the number, its threshold and the verdict (display texts included)."""
    return {
        "claim": what,
        "value": value,
        "op": op,
        "threshold": threshold,
        "measured": measured
        or (_shown(value, op, threshold, spec) + unit if value == value else "n/a"),
        "threshold_text": threshold_text or f"{op} {_fmt(threshold, 'g')}{unit}",
        "verdict": verdict(value, op, threshold, near),
    }


def _shown(value: float, op: str, threshold: float, spec: str) -> str:
    """`value` with as many more decimals as it takes for the shown number to land on
    the same side of the threshold as the number itself (2.04 ≤ 2 fails: not "2.0")."""
    text = _fmt(value, spec)
    holds = verdict(value, op, threshold, near=False) == "holds"
    sign = "+" if spec.startswith("+") else ""
    for digits in range(2, 5):
        shown = float(text.replace("−", "-"))
        if (verdict(shown, op, threshold, near=False) == "holds") == holds:
            break
        text = _fmt(value, f"{sign}.{digits}f")
    return text


def _claim(cid: Any, text: str, checks: list[dict], notes: list[str] | None = None) -> dict:
    """A claim from its sub-claims: it holds when every one holds, fails when any fails."""
    found = {c["verdict"] for c in checks}
    overall = (
        "fails"
        if "fails" in found or not checks
        else ("near miss" if "near miss" in found else "holds")
    )
    return {
        "id": cid,
        "claim": text,
        "checks": checks,
        "verdict": overall,
        "passed": overall == "holds",
        "notes": notes or [],
    }


def verdict_counts(claim_rows: list[dict]) -> dict[str, int]:
    """How many sub-claims hold, nearly hold and fail."""
    counts = dict.fromkeys(VERDICTS, 0)
    for row in claim_rows:
        for c in row["checks"]:
            counts[c["verdict"]] += 1
    return counts


def _signed(x: float) -> str:
    """``x`` with its sign, a true minus for losses (``−3.2``, ``+0.4``)."""
    return _fmt(x, "+.1f")


def _fmt(x: float, spec: str = ".1f") -> str:
    """``x`` formatted with a true minus sign, ``n/a`` where undefined (NaN)."""
    return format(x, spec).replace("-", "−") if x == x else "n/a"


def _pct(x: float) -> str:
    return f"{_fmt(100 * x, '.0f')}%" if x == x else "n/a"


def claims(results: dict) -> list[dict]:
    """The six claims (and removal), each as sub-claims judged on the measured numbers."""
    rows = [_claim1(results), _claim2(results)]
    if "replicates" in results:
        rows.append(_claim2_over_seeds(results["replicates"]))
    rows += [_claim3(results), _claim4(results), _claim5(results), _claim6(results)]
    rows.append(_claim_removal(results))
    return rows


def _claim1(results: dict) -> dict:
    pc = results["per_corruption"]
    drops = {c: r["arms"]["clean"]["clean"] - r["arms"]["clean"]["mean"] for c, r in pc.items()}
    hurt = [c for c, d in drops.items() if d >= 20]
    fams = sorted({f for f, members in FAMILIES.items() for c in hurt if c in members})
    return _claim(
        1,
        "≥ 4 corruptions (noise, blur, weather, digital) on which the clean model loses ≥ 20 "
        "points (mean over severities)",
        [
            _check(
                "corruptions costing the clean model ≥ 20 points",
                len(hurt),
                "≥",
                4,
                spec=".0f",
                near=False,
            ),
            _check("families among them", len(fams), "≥", 4, spec=".0f", near=False),
        ],
        [
            "clean model's loss, clean → corrupted test: "
            + ", ".join(f"{c} {_signed(-d)}" for c, d in drops.items())
            + f"; families hurt: {', '.join(fams) or 'none'}."
        ],
    )


def _claim2(results: dict) -> dict:
    pc = results["per_corruption"]
    frac = max(r["signatures"]["shallow"]["param_fraction"] for r in pc.values())
    checks = [_check("parameters the shallow signature patches", 100 * frac, "≤", 25, "%")]
    static = []
    for c, r in pc.items():
        a = r["arms"]
        p = a[PRIMARY]
        checks += [
            _check(f"{c}: robust gain recovered", 100 * p["recovered"], "≥", 70, "%", ".0f"),
            _check(
                f"{c}: patched − BN-only",
                p["mean"] - a["bn_reestimation_only"]["mean"],
                "≥",
                5,
                " points",
                "+.1f",
            ),
            _check(
                f"{c}: clean accuracy lost",
                a["clean"]["clean"] - p["clean_adapted"],
                "≤",
                2,
                " points",
            ),
        ]
        static.append(f"{c} {_fmt(a['clean']['clean'] - p['clean'])}")
    return _claim(
        2,
        "patched clean model (≤ 25% of parameters) recovers ≥ 70% of the robust gain, beats "
        "BN re-estimation alone by ≥ 5 points, loses ≤ 2 points of clean accuracy",
        checks,
        [
            "clean accuracy lost is measured with BN statistics re-estimated on clean images "
            "(adapted); keeping the corrupted-data statistics (static) it is: "
            + ", ".join(static)
            + " points."
        ],
    )


#: Claim 2's sub-claims on seed means: label, statistic, scale, comparison, threshold, unit, format.
_CLAIM2_MEANS = (
    ("robust gain recovered", "recovered", 100, "≥", 70, "%", ".0f"),
    ("patched − BN-only", "vs_bn_only", 1, "≥", 5, " points", "+.1f"),
    ("clean accuracy lost", "clean_loss", 1, "≤", 2, " points", ".1f"),
)


def _claim2_over_seeds(reps: dict) -> dict:
    """Claim 2 judged on the mean over fine-tune seeds (intervals shown, not used)."""
    checks, n = [], 0
    for c, r in reps.items():
        st = r["stats"]
        n = st["recovered"]["n"]
        checks += [
            _check(
                f"{c}: {label}, mean",
                scale * st[key]["mean"],
                op,
                threshold,
                unit,
                measured=_ci(st[key], scale, spec) + unit,
            )
            for label, key, scale, op, threshold, unit, spec in _CLAIM2_MEANS
        ]
    return _claim(
        "2s",
        f"claim 2 on the mean over {n} fine-tune seeds (± half-width of a 95% t interval, "
        "shown, not judged)",
        checks,
    )


def _ci(stat: dict, scale: float, spec: str) -> str:
    """``mean ± ci`` of a :func:`mean_ci` result, scaled (n/a where undefined)."""
    if stat["mean"] != stat["mean"]:
        return "n/a"
    ci = (
        f" ± {_fmt(scale * stat['ci95'], spec.lstrip('+'))}" if stat["ci95"] == stat["ci95"] else ""
    )
    return f"{_fmt(scale * stat['mean'], spec)}{ci}"


def _claim3(results: dict) -> dict:
    checks = []
    for c, r in results["per_corruption"].items():
        prof = r["layer_profile"]
        g_full = r["arms"][f"full|{POLICY}"]["gain"]
        share = r["arms"][PRIMARY]["gain"] / g_full if g_full > 0 else float("nan")
        n = len(prof["layers"])
        checks += [
            _check(
                f"{c}: layer of the largest difference",
                prof["largest_index"] + 1,
                "≤",
                prof["first_third"],
                spec=".0f",
                near=False,
                measured=f"{prof['largest_index'] + 1} of {n}",
                threshold_text=f"≤ {prof['first_third']} (first third)",
            ),
            _check(f"{c}: shallow gain ÷ full gain", 100 * share, "≥", 80, "%", ".0f"),
        ]
    return _claim(
        3,
        "the per-layer difference is largest in the first third of the layers; the shallow "
        "patch recovers ≥ 80% of the full patch's gain",
        checks,
    )


def _claim4_not_run(text: str, missing: str) -> dict:
    return _claim(4, text, [_check(missing, float("nan"), ">", 0, near=False, measured="not run")])


def _claim4_margins(labels: list[str], m: np.ndarray) -> list[tuple[str, float, float]]:
    """Per signature: (label, cosine to its twin, to the nearest other corruption's);
    signatures without a twin or without another corruption are left out."""
    out = []
    for i, lbl in enumerate(labels):
        if lbl.startswith("patterns:"):
            continue
        c = lbl.split("/")[0]
        twins = [m[i, j] for j, o in enumerate(labels) if o.startswith(f"{c}/") and j != i]
        others = [
            m[i, j] for j, o in enumerate(labels) if o.split("/")[0].removeprefix("patterns:") != c
        ]
        if twins and others:
            out.append((lbl, max(twins), max(others)))
    return out


def _claim4(results: dict) -> dict:
    text = (
        "each signature is more similar to the same corruption's signature from another "
        "seed than to any other corruption's"
    )
    sim = results.get("similarity", {}).get("matrix")
    second = results["config"].get("second_seed")
    if not sim or not any(lbl.endswith(f"/s{second}") for lbl in sim["labels"]):
        return _claim4_not_run(text, "second fine-tune seed")
    margins = _claim4_margins(sim["labels"], np.asarray(sim["matrix"]))
    if not margins:  # one corruption only, or the second seed equal to the first
        return _claim4_not_run(text, "a twin from another seed and another corruption")
    checks = [
        _check(
            f"{lbl}: cosine to its twin − to the nearest other",
            twin - other,
            ">",
            0,
            spec="+.2f",
            near=False,
        )
        for lbl, twin, other in margins
    ]
    pairs = [f"{lbl} twin {twin:.2f}, nearest other {other:.2f}" for lbl, twin, other in margins]
    notes = ["; ".join(pairs) + "."]
    det = results["similarity"].get("detection")
    if det:
        notes.append(f"detection from the second-seed twins: {100 * det['accuracy']:.0f}% correct.")
    return _claim(4, text, checks, notes)


def _claim5(results: dict) -> dict:
    checks, notes = [], []
    tr = results.get("transfer") or {}
    for c, t in tr.items():
        checks.append(
            _check(
                f"transfer {c}: share of B's own robust gain",
                100 * t["ratio"][POLICY],
                "≥",
                50,
                "%",
                ".0f",
            )
        )
        if t["ratio"][POLICY] != t["ratio"][POLICY]:
            notes.append(f"transfer {c} undefined: B's robust gain {_signed(t['robust_gain'])}.")
    if not tr:
        checks.append(
            _check("transfer digits → patterns", float("nan"), "≥", 50, "%", measured="not run")
        )
    comps = results.get("composition") or []
    kept = [
        (f"{'+'.join(r['pair'])} on {c}", row["kept"])
        for r in comps
        for c, row in r["policies"][POLICY].items()
    ]
    # An undefined share (the signature alone has no gain) counts as the worst.
    worst = min(kept, key=lambda kv: kv[1] if kv[1] == kv[1] else -math.inf, default=None)
    if worst is None:
        checks.append(
            _check("sums of two signatures", float("nan"), "≥", 70, "%", measured="not run")
        )
    else:
        checks.append(
            _check(
                f"sums of two: worst share of a signature's gain kept ({worst[0]})",
                100 * worst[1],
                "≥",
                70,
                "%",
                ".0f",
            )
        )
        held = sum(v >= 0.7 for _, v in kept)
        notes.append(f"sums keep ≥ 70% of each signature's gain in {held}/{len(kept)} cases.")
    for c, r in results["per_corruption"].items():
        vals = [row["mean"] for row in r["alpha_sweep"]["policies"][POLICY] if row["alpha"] <= 1.0]
        steps = [b - a for a, b in zip(vals, vals[1:])]
        checks.append(
            _check(
                f"{c}: worst step in accuracy as α rises 0 → 1",
                min(steps, default=0.0),
                "≥",
                -1,
                " points",
                "+.1f",
            )
        )
    return _claim(
        5,
        "transfer A→B gains ≥ 50% of B's own robust gain; two signatures summed keep ≥ 70% of "
        "each one's gain; accuracy does not fall as α rises over 0…1 (within 1 point)",
        checks,
        notes,
    )


def _claim6(results: dict) -> dict:
    pc = results["per_corruption"]
    bits = results["config"]["bits"]
    checks = []
    for c, r in pc.items():
        row = next((x for x in r["compression"]["rows"] if x["bits"] == bits), None)
        kept, smaller = (100 * row["kept"], row["times_smaller"]) if row else (math.nan, math.nan)
        checks += [
            _check(f"{c}: unquantized gain kept at {bits} bits", kept, "≥", 95, "%", ".0f"),
            _check(f"{c}: times smaller than the fp32 robust model", smaller, "≥", 30, "×"),
        ]
    notes = []
    first = next(iter(pc.values()))["compression"]
    sizes = first.get("nbytes_by_granularity")
    if sizes:
        nb = first["model_nbytes"]
        notes.append(
            f"judged at per-channel scales; at {bits} bits per tensor "
            f"{nb / sizes['tensor'][bits]:.1f}×, per group of 128 "
            f"{nb / sizes['group'][bits]:.1f}× smaller."
        )
    return _claim(
        6,
        f"a {bits}-bit signature keeps ≥ 95% of the unquantized gain and is ≥ 30× smaller "
        "than the fp32 robust model",
        checks,
        notes,
    )


def _claim_removal(results: dict) -> dict:
    checks = [
        v["bit_exact"] for r in results["per_corruption"].values() for v in r["removal"].values()
    ]
    checks += [r["removal"]["bit_exact"] for r in results.get("composition") or []]
    n = len(checks)
    return _claim(
        "R",
        "removing a patch gives back the model bit for bit",
        [
            _check(
                "apply → remove round trips bit-identical",
                sum(checks) if n else math.nan,
                "≥",
                n,
                spec=".0f",
                near=False,
                measured=f"{sum(checks)}/{n}",
                threshold_text=f"all {n}",
            )
        ],
    )


def _notes(results: dict) -> list[str]:
    """Measured context for every failed claim (from the numbers, never hand-written)."""
    pc = results["per_corruption"]
    names = list(pc)
    failed = {c["id"] for c in results["claims"] if not c["passed"]}
    out = []
    if failed & {2, 3}:
        for c in names:
            a = pc[c]["arms"]
            alt = a.get("budget-by-difference|reestimate")
            rows = pc[c]["depth_sweep"]["rows"]
            g_rob = pc[c]["robust_gain"]
            need = next((r for r in rows if g_rob > 0 and r["gain"] >= 0.7 * g_rob), None)
            g_full = a[f"full|{POLICY}"]["gain"]
            need80 = next((r for r in rows if g_full > 0 and r["gain"] >= 0.8 * g_full), None)
            msg = f"{c}: shallow patch recovers {_pct(a[PRIMARY]['recovered'])} of the robust gain"
            if alt:
                msg += (
                    f"; layers chosen by relative difference within the same budget recover "
                    f"{_pct(alt['recovered'])} (clean accuracy −"
                    f"{a['clean']['clean'] - alt['clean_adapted']:.1f})"
                )
            msg += (
                "; 70% of the robust gain first reached with "
                + (f"{100 * need['param_fraction']:.0f}% of the parameters" if need else "no k")
                + "; 80% of the full patch's gain with "
                + (f"{100 * need80['param_fraction']:.0f}%" if need80 else "no k")
                + f"; the robust model's own clean accuracy is {a['robust']['clean']:.1f}%."
            )
            out.append(msg)
    if 4 in failed and results.get("similarity", {}).get("detection"):
        det = results["similarity"]["detection"]
        wrong = [t for t, r in det["queries"].items() if not r["correct"]]
        out.append(
            f"Similarity: detection from the second-seed twins is right for "
            f"{len(det['queries']) - len(wrong)}/{len(det['queries'])} corruptions"
            + (f" (wrong: {', '.join(wrong)})" if wrong else "")
            + "."
        )
    if 5 in failed:
        for c, t in (results.get("transfer") or {}).items():
            a = t["arms"]
            if t["ratio"][POLICY] != t["ratio"][POLICY] or t["ratio"][POLICY] < 0.5:
                out.append(
                    f"Transfer {c}: patterns clean {a['clean']['mean']:.1f}, BN-only "
                    f"{a['bn_reestimation_only']['mean']:.1f}, transferred signature "
                    f"{a['transfer|reestimate']['mean']:.1f}, patterns robust "
                    f"{a['robust']['mean']:.1f} (robust gain {t['robust_gain']:+.1f})."
                )
        comps = results.get("composition") or []
        pairs = [row for r in comps for row in (r.get("variants") or {}).values()]
        if pairs:
            ok_own = sum(row["sum_own_bn_kept"] >= 0.7 for row in pairs)
            ok_mean = sum(row["mean_kept"] >= 0.7 for row in pairs)
            out.append(
                f"Composition diagnostics: the sum with own-corruption BN statistics keeps "
                f"≥ 70% in {ok_own}/{len(pairs)} cases, the mean 0.5·(a+b) in "
                f"{ok_mean}/{len(pairs)} (see the Composition section)."
            )
        out.append(
            "α (BN re-estimated): best α "
            + ", ".join(
                f"{c} {max(rows, key=lambda r: r['mean'])['alpha']:g}"
                for c in names
                for rows in [pc[c]["alpha_sweep"]["policies"][POLICY]]
            )
            + "."
        )
    if not out:
        out.append("Every claim held.")
    return out
