"""Seed statistics for comparing training arms: mean, spread, and a paired confidence interval.

Arms that share a seed share its data order, init and noise, so their difference on one seed removes the part of
the seed-to-seed variation they have in common. The interval on the mean paired difference is Student's t
interval (n - 1 degrees of freedom): what a reader of an ML paper expects from "95 % CI over n seeds", exact for
normally distributed differences and conservative against the normal approximation at small n.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from scipy import stats as _scipy_stats

CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (n - 1; 0 for one value) and count of one metric over seeds."""

    mean: float
    std: float
    n: int


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean (of values, or of paired differences) and its two-sided t interval; the bounds are nan below two."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float = CONFIDENCE

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def _finite(values: Sequence[float], what: str) -> list[float]:
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"{what}: no values")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what}: non-finite value in {values}")
    return values


def summarize(values: Sequence[float], what: str = "values") -> Summary:
    values = _finite(values, what)
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Summary(mean, std, n)


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE, what: str = "values") -> Interval:
    """t interval on the mean of `values` (one per seed)."""
    if not 0 < confidence < 1:
        raise ValueError(f"{what}: confidence {confidence} must be in (0, 1)")
    s = summarize(values, what)
    if s.n < 2:
        return Interval(s.mean, math.nan, math.nan, s.n, confidence)
    half = float(_scipy_stats.t.ppf(0.5 + confidence / 2, s.n - 1)) * s.std / math.sqrt(s.n)
    return Interval(s.mean, s.mean - half, s.mean + half, s.n, confidence)


def paired_interval(treatment: Sequence[float], control: Sequence[float], confidence: float = CONFIDENCE,
                    what: str = "difference") -> Interval:
    """t interval on mean(treatment - control), the two lists paired by position (one entry per seed)."""
    if len(treatment) != len(control):
        raise ValueError(f"{what}: {len(treatment)} treatment values but {len(control)} control values to pair")
    diffs = [a - b for a, b in zip(_finite(treatment, what), _finite(control, what))]
    return mean_interval(diffs, confidence, what)
