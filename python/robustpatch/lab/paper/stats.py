"""Interval statistics over fine-tune seeds (no torch: plain numpy and scipy's t quantile).

Every number judged by a verdict is a paired per-seed quantity (the same seed's clean,
robust and patched models) summarised as its mean with a 95% Student-t interval, or a ratio
of two means with a 95% Fieller interval (Student t, the same degrees of freedom).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _st

__all__ = ["Interval", "t_interval", "ratio_of_means"]


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


def _fieller_bounds(n: np.ndarray, d: np.ndarray, t: float) -> tuple[float, float]:
    """The Fieller set ``{r : (n̄ − r·d̄)² ≤ t²·var(n̄ − r·d̄)}`` for paired seeds, where
    ``var(n̄ − r·d̄) = (s_nn − 2r·s_nd + r²·s_dd)/k`` (sample (co)variances, ``k`` seeds).
    It is the quadratic ``A r² − 2B r + C ≤ 0``; the caller ensures ``A > 0`` (the
    denominator's own t interval excludes 0), where the set is a bounded interval."""
    k = len(n)
    cov = np.cov(n, d, ddof=1) / k
    a, b = float(n.mean()), float(d.mean())
    qa = b * b - t * t * cov[1, 1]
    qb = a * b - t * t * cov[0, 1]
    qc = a * a - t * t * cov[0, 0]
    # r = a/b always lies in the set, so the discriminant is >= 0 up to rounding.
    half = math.sqrt(max(qb * qb - qa * qc, 0.0))
    return (qb - half) / qa, (qb + half) / qa


def ratio_of_means(num: Sequence[float], den: Sequence[float], *, level: float = 0.95) -> Interval:
    """``mean(num) / mean(den)`` with a Fieller interval for the ratio of paired means
    (Student t, ``n − 1`` degrees of freedom): exact under normal per-seed pairs, so a 95%
    interval covers the true ratio about 95% of the time even with 3 seeds. (A percentile
    bootstrap over 3 or 5 seeds covered it only 74-84% of the time: 3 seeds have only 10
    distinct resamples.)

    The interval is unbounded when fewer than 2 seeds are given or when the denominator's
    own t interval reaches 0: a ratio whose denominator cannot be told from 0 has no
    bounded confidence interval (Fieller's theorem: the set is then the whole line or two
    half-lines; the whole line is reported). This rule was added after the first
    ``--quick`` run, where Gaussian noise cost the clean model nothing (robust gain 0.03
    points) and a share of 10 "held"; it can only turn a verdict inconclusive, never make
    a claim hold. A denominator whose mean is not positive leaves the ratio undefined."""
    n, d = _finite(num), _finite(den)
    if len(n) != len(d):
        raise ValueError(f"{len(n)} numerators but {len(d)} denominators")
    point = float(n.mean() / d.mean()) if d.mean() > 0 else math.nan
    per_seed = tuple(float(a / b) if b > 0 else math.nan for a, b in zip(n, d))
    if len(n) < 2 or d.mean() <= 0 or t_interval(d, level).lo <= 0:
        return Interval(point, -math.inf, math.inf, per_seed, "fieller")
    lo, hi = _fieller_bounds(n, d, float(_st.t.ppf(0.5 + level / 2, len(n) - 1)))
    return Interval(point, lo, hi, per_seed, "fieller")
