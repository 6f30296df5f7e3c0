"""The claims and their thresholds, fixed in code before any run (pre-registered).

A verdict reads a claim's 95% interval ``[lo, hi]`` against its threshold: for ``≥``
claims it *holds* when ``lo ≥ threshold``, *fails* when ``hi < threshold``, else it is
*inconclusive*; ``≤`` claims mirror it. ``source`` says whose threshold it is: the
paper's where the paper states one, else ours (labelled as ours in every report).
"""

from __future__ import annotations

from dataclasses import dataclass

from .stats import Interval

__all__ = ["Claim", "CLAIMS", "NULL_CONTROL", "verdict", "judge"]

HOLDS, FAILS, INCONCLUSIVE = "holds", "fails", "inconclusive"


@dataclass(frozen=True)
class Claim:
    """One pre-registered sub-claim: which statistic, compared how, with what threshold."""

    id: str
    text: str
    statistic: str
    op: str  # "≥" or "≤"
    threshold: float
    unit: str
    source: str  # "paper" or "ours"


CLAIMS: tuple[Claim, ...] = (
    Claim("1", "corruption costs the clean model accuracy", "gap", "≥", 20.0, "points", "ours"),
    Claim("2a", "patch recovers the robust gain", "recovered", "≥", 0.70, "share", "ours"),
    Claim("2b", "patched beats BN re-estimation alone", "vs_bn_only", "≥", 5.0, "points", "ours"),
    Claim("2c", "patch costs little clean accuracy", "clean_lost", "≤", 2.0, "points", "ours"),
    Claim(
        "3",
        "shallow patch keeps the full patch's gain",
        "shallow_share",
        "≥",
        0.80,
        "share",
        "ours",
    ),
    Claim(
        "4",
        "a signature is closest to its own corruption's",
        "cos_margin",
        "≥",
        0.0,
        "cosine",
        "ours",
    ),
    Claim(
        "5a", "signature transfers from task A to task B", "transfer", "≥", 0.50, "share", "ours"
    ),
    Claim(
        "5b",
        "two signatures summed, (α/n)² each, keep each one's gain",
        "sum_kept",
        "≥",
        0.70,
        "share",
        "ours",
    ),
    Claim(
        "6a",
        "4-bit per-tensor linear signature keeps the gain",
        "quant_kept",
        "≥",
        0.95,
        "share",
        "ours",
    ),
    Claim("6b", "signature smaller than the fp32 model", "times_smaller", "≥", 13.0, "×", "paper"),
)

#: The null control: a random-direction patch with the signature's per-tensor norms must
#: not gain: it passes when its gain interval's lower bound is at most 0.
NULL_CONTROL = Claim(
    "N",
    "random-direction patch (same per-tensor norm) gains nothing",
    "null_gain",
    "≤",
    0.0,
    "points",
    "ours",
)


def verdict(lo: float, hi: float, op: str, threshold: float) -> str:
    """*holds*, *fails* or *inconclusive* for an interval against a threshold."""
    if op == "≥":
        return HOLDS if lo >= threshold else FAILS if hi < threshold else INCONCLUSIVE
    if op == "≤":
        return HOLDS if hi <= threshold else FAILS if lo > threshold else INCONCLUSIVE
    raise ValueError(f"unknown comparison {op!r}; expected '≥' or '≤'")


def null_verdict(interval: Interval) -> str:
    """The null control passes (*holds*) when its gain interval reaches 0 or lies below."""
    return HOLDS if interval.lo <= 0.0 else FAILS


def _shown(claim: Claim) -> str:
    if claim.unit == "share":
        return f"{100 * claim.threshold:g}%"
    return f"{claim.threshold:g} {claim.unit}"


def judge(claim: Claim, interval: Interval) -> dict:
    """The claim's row: its interval, threshold and verdict."""
    return {
        "id": claim.id,
        "claim": claim.text,
        "statistic": claim.statistic,
        "threshold": f"{claim.op} {_shown(claim)} ({claim.source})",
        "interval": interval.as_dict(),
        "verdict": verdict(interval.lo, interval.hi, claim.op, claim.threshold),
    }
