"""Interval statistics over fine-tune seeds (no torch: plain numpy and scipy's t quantile).

Every number judged by a verdict is a paired per-seed quantity (the same seed's clean,
robust and patched models) summarised as its mean with a 95% Student-t interval, or a ratio
of two means with a percentile bootstrap over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _st

__all__ = ["Interval", "t_interval", "ratio_of_means", "BOOTSTRAP_DRAWS"]

#: Seed resamples of :func:`ratio_of_means` (fixed, so a run's intervals are reproducible).
BOOTSTRAP_DRAWS = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate with a 95% interval ``[lo, hi]`` and the per-seed values."""

    mean: float
    lo: float
    hi: float
    values: tuple[float, ...]
    method: str

    def as_dict(self) -> dict:
        return asdict(self)


def _finite(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError("need a non-empty list of per-seed values")
    return v


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean ± Student-t half-width (n - 1 degrees of freedom); one value gives an
    unbounded interval, so nothing can be concluded from a single seed."""
    v = _finite(values)
    mean = float(v.mean())
    if len(v) < 2:
        return Interval(mean, -math.inf, math.inf, tuple(map(float, v)), "t")
    half = float(_st.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return Interval(mean, mean - half, mean + half, tuple(map(float, v)), "t")


def ratio_of_means(
    num: Sequence[float], den: Sequence[float], *, seed: int = 0, level: float = 0.95
) -> Interval:
    """``mean(num) / mean(den)`` with a percentile bootstrap over seeds (pairs resampled
    together). Resamples whose denominator mean is not positive are dropped; an interval
    from fewer than half of the draws is unbounded (the ratio is not defined enough).

    The interval is also unbounded when the denominator's own t interval reaches 0: a
    ratio whose denominator cannot be told from 0 has no bounded confidence interval
    (Fieller's theorem), and a bootstrap there reports huge or tiny ratios as if they were
    measured. This rule was added after the first ``--quick`` run, where Gaussian noise cost
    the clean model nothing (robust gain 0.03 points) and a share of 10 "held"; it can only
    turn a verdict inconclusive, never make a claim hold."""
    n, d = _finite(num), _finite(den)
    if len(n) != len(d):
        raise ValueError(f"{len(n)} numerators but {len(d)} denominators")
    point = float(n.mean() / d.mean()) if d.mean() > 0 else math.nan
    per_seed = tuple(float(a / b) if b > 0 else math.nan for a, b in zip(n, d))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(n), size=(BOOTSTRAP_DRAWS, len(n)))
    dm = d[idx].mean(axis=1)
    ok = dm > 0
    if ok.sum() < BOOTSTRAP_DRAWS / 2 or len(n) < 2 or t_interval(d, level).lo <= 0:
        return Interval(point, -math.inf, math.inf, per_seed, "bootstrap")
    ratios = n[idx].mean(axis=1)[ok] / dm[ok]
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return Interval(point, float(lo), float(hi), per_seed, "bootstrap")
