"""From per-seed measurements to judged claims and control rows.

Differences are paired within a seed; shares are ratios of means over seeds with a Fieller
interval (:func:`.stats.ratio_of_means`); everything else is a mean with a t interval.
"""

from __future__ import annotations

import numpy as np

import robustpatch as rp

from . import verdicts as V
from .stats import Interval, ratio_of_means, t_interval

__all__ = ["claim_rows", "control_rows", "severity_rows", "coefficient_rows", "cos_margins"]

_BY_ID = {c.id: c for c in V.CLAIMS}


def _col(seeds: list[dict], c: str, table: str, arm: str) -> np.ndarray:
    return np.array([s["per_corruption"][c][table][arm] for s in seeds], dtype=np.float64)


def _gain(seeds: list[dict], c: str, arm: str) -> np.ndarray:
    return _col(seeds, c, "corrupted", arm) - _col(seeds, c, "corrupted", "clean")


def cos_margins(sigs: list[dict], corruptions: tuple[str, ...]) -> dict[str, list[float]]:
    """Per corruption, per seed: mean cosine to the same corruption's signature from the
    other seeds minus the largest cosine to another corruption's from the same seed."""
    labels = [(i, c) for i in range(len(sigs)) for c in corruptions]
    m = rp.similarity([sigs[i][c] for i, c in labels])
    pos = {lab: k for k, lab in enumerate(labels)}
    out: dict[str, list[float]] = {c: [] for c in corruptions}
    for (i, c), k in pos.items():
        twins = [m[k, pos[(j, c)]] for j in range(len(sigs)) if j != i]
        others = [m[k, pos[(i, o)]] for o in corruptions if o != c]
        if twins and others:
            out[c].append(float(np.mean(twins) - max(others)))
    return out


def _row(cid: str, where: str, interval: Interval) -> dict:
    return {"where": where, **V.judge(_BY_ID[cid], interval)}


def _corruption_claims(seeds: list[dict], c: str, margins: list[float]) -> list[dict]:
    ct = lambda arm: _col(seeds, c, "clean_test", arm)  # noqa: E731
    gain = _gain(seeds, c, "paper")
    sizes = [
        s["model_nbytes_fp32"] / s["per_corruption"][c]["nbytes"]["quant_official"] for s in seeds
    ]
    rows = [
        _row("1", c, t_interval(ct("clean") - _col(seeds, c, "corrupted", "clean"))),
        _row("2a", c, ratio_of_means(gain, _gain(seeds, c, "robust"))),
        _row("2b", c, t_interval(_gain(seeds, c, "paper") - _gain(seeds, c, "bn_only"))),
        _row("2c", c, t_interval(ct("clean") - ct("paper"))),
        _row("3", c, ratio_of_means(gain, _gain(seeds, c, "full"))),
    ]
    if margins:
        rows.append(_row("4", c, t_interval(margins)))
    rows += [
        _row("6a", c, ratio_of_means(_gain(seeds, c, "quant_official"), gain)),
        _row("6b", c, t_interval(sizes)),
    ]
    return rows


def _transfer_claim(seeds: list[dict], corruption: str) -> dict:
    tr = {k: np.array([s["transfer"][k] for s in seeds]) for k in ("clean", "robust", "patched")}
    ratio = ratio_of_means(tr["patched"] - tr["clean"], tr["robust"] - tr["clean"])
    return _row("5a", f"A → B, {corruption}", ratio)


def _sum_claims(seeds: list[dict], pair: tuple[str, str]) -> list[dict]:
    rows = []
    for c in pair:
        summed = np.array([s["composition"]["official"][c] for s in seeds])
        base = _col(seeds, c, "corrupted", "clean")
        rows.append(
            _row(
                "5b",
                f"{'+'.join(pair)} on {c}",
                ratio_of_means(summed - base, _gain(seeds, c, "paper")),
            )
        )
    return rows


def claim_rows(seeds: list[dict], sigs: list[dict], cfg) -> list[dict]:
    """Every pre-registered claim, per corruption where it is per corruption."""
    margins = cos_margins(sigs, cfg.corruptions) if len(sigs) > 1 else {}
    rows = []
    for c in cfg.corruptions:
        rows += _corruption_claims(seeds, c, margins.get(c, []))
    rows.append(_transfer_claim(seeds, cfg.transfer))
    rows += _sum_claims(seeds, cfg.pair)
    return sorted(rows, key=lambda r: [x.id for x in V.CLAIMS].index(r["id"]))


#: Control arms shown as gains over the clean model (points): label, arm. On a BatchNorm
#: backbone every signature arm goes through the official BN route (see :mod:`.arms`).
CONTROL_ARMS = (
    ("robust twin", "robust"),
    ("paper patch (first k conv tensors, α = 1)", "paper"),
    ("full patch (every conv tensor)", "full"),
    ("difference signature (robust − clean, first k)", "difference"),
    ("4-bit per-tensor linear (official)", "quant_official"),
    ("4-bit affine per group of 128 (ours)", "quant_ours"),
    (
        "paper patch with its shipped first-k robust BN statistics, not re-estimated (ours)",
        "paper_shipped_bn",
    ),
    ("BN re-estimation alone", "bn_only"),
    ("BN: weight deltas only, clean BN (official route without the swap)", "sig_only"),
    ("BN: robust-BN swap, re-estimated (official route without the signature)", "swap_only"),
)

#: The BN route's label on the judged arm's row of a BatchNorm backbone.
OFFICIAL_BN = "; official BN route: robust BN swapped in, deltas added, then re-estimated"


def _null_row(seeds: list[dict], c: str, has_bn: bool) -> dict:
    """The null control against the same BN handling without a patch: the clean model
    without BatchNorm, the robust-BN swap (re-estimated) with it; otherwise the null would
    "gain" what the BN route gains and fail for a reason unrelated to direction."""
    base = "swap_only" if has_bn else "clean"
    null = t_interval(_gain(seeds, c, "null") - _gain(seeds, c, base))
    text = V.NULL_CONTROL.text + (
        " (same BN route; gain over the robust-BN swap alone)" if has_bn else ""
    )
    return {"where": c, "arm": text, "gain": null.as_dict(), "verdict": V.null_verdict(null)}


def control_rows(seeds: list[dict], cfg) -> list[dict]:
    """Gains of every arm and the null control's verdict, per corruption."""
    rows = []
    for c in cfg.corruptions:
        have = seeds[0]["per_corruption"][c]["corrupted"]
        has_bn = "swap_only" in have
        for label, arm in CONTROL_ARMS:
            if arm in have:
                label += OFFICIAL_BN if has_bn and arm == "paper" else ""
                rows.append(
                    {"where": c, "arm": label, "gain": t_interval(_gain(seeds, c, arm)).as_dict()}
                )
        if has_bn:
            own = _gain(seeds, c, "paper") - _gain(seeds, c, "swap_only")
            rows.append(
                {
                    "where": c,
                    "arm": "paper patch over the robust-BN swap alone (the signature's own part)",
                    "gain": t_interval(own).as_dict(),
                }
            )
        rows.append(_null_row(seeds, c, has_bn))
    a, b = cfg.pair
    for label in ("official", "linear"):
        for c in (a, b):
            vals = np.array([s["composition"][label][c] for s in seeds]) - _col(
                seeds, c, "corrupted", "clean"
            )
            rows.append(
                {"where": c, "arm": f"{a}+{b}, {label} α", "gain": t_interval(vals).as_dict()}
            )
    return rows


def severity_rows(seeds: list[dict], cfg) -> list[dict]:
    """Secondary table: accuracies averaged over severities 1-5 (test only; twins trained
    at the fixed severity)."""
    rows = []
    for c in cfg.corruptions:
        mean = {
            arm: np.array([np.mean(s["per_corruption"][c]["by_severity"][arm]) for s in seeds])
            for arm in ("clean", "robust", "paper")
        }
        rows.append(
            {
                "where": c,
                "clean": t_interval(mean["clean"]).as_dict(),
                "robust": t_interval(mean["robust"]).as_dict(),
                "paper": t_interval(mean["paper"]).as_dict(),
                "recovered": ratio_of_means(
                    mean["paper"] - mean["clean"], mean["robust"] - mean["clean"]
                ).as_dict(),
            }
        )
    return rows


def coefficient_rows(seeds: list[dict], cfg) -> list[dict]:
    """The projection coefficient c per patched tensor: mean over seeds, per corruption."""
    rows = []
    for c in cfg.corruptions:
        names = list(seeds[0]["per_corruption"][c]["coef"])
        for n in names:
            vals = [s["per_corruption"][c]["coef"][n] for s in seeds]
            rows.append({"where": c, "tensor": n, "c": t_interval(vals).as_dict()})
    return rows
