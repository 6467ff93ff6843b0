"""Seed statistics against hand-computed values and SciPy's paired t-test (an independent route to the interval)."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from clipup_jax.evaluate.stats import mean_interval, paired_interval, summarize


def test_three_seeds_by_hand():
    s = summarize([0.40, 0.43, 0.46])
    assert s.n == 3 and s.mean == pytest.approx(0.43) and s.std == pytest.approx(0.03)
    # differences 1, 2, 3: mean 2, std 1, t(0.975, 2 dof) = 4.302653: half width 4.302653 / sqrt(3) = 2.484138
    ci = paired_interval([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert (ci.mean, ci.n) == (2.0, 3)
    assert (ci.low, ci.high) == (pytest.approx(2 - 2.484138), pytest.approx(2 + 2.484138))
    assert not ci.excludes_zero()
    assert paired_interval([1.5, 1.6, 1.7], [1.0, 1.0, 1.1]).excludes_zero()


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_interval_equals_scipy_paired_t_test(n):
    rng = np.random.default_rng(n)
    a, b = rng.normal(0.5, 0.05, n), rng.normal(0.45, 0.05, n)
    for confidence in (0.9, 0.95, 0.99):
        want = scipy_stats.ttest_rel(a, b).confidence_interval(confidence)
        got = paired_interval(a.tolist(), b.tolist(), confidence)
        assert got.mean == pytest.approx(float(np.mean(a - b)))
        assert (got.low, got.high) == (pytest.approx(want.low), pytest.approx(want.high))


def test_one_seed_has_no_interval_and_bad_input_is_named():
    ci = paired_interval([0.5], [0.4])
    assert ci.mean == pytest.approx(0.1) and math.isnan(ci.low) and math.isnan(ci.high) and not ci.excludes_zero()
    assert summarize([0.3]).std == 0.0
    with pytest.raises(ValueError, match="R@1: 2 treatment values but 3 control"):
        paired_interval([1, 2], [1, 2, 3], what="R@1")
    with pytest.raises(ValueError, match="R@1: no values"):
        summarize([], "R@1")
    with pytest.raises(ValueError, match="non-finite"):
        paired_interval([1.0, float("nan")], [1.0, 1.0])
    with pytest.raises(ValueError, match="confidence 1.5"):
        paired_interval([1.0, 2.0], [1.0, 1.0], confidence=1.5)


def test_mean_interval_equals_scipy_t_interval():
    values = [0.41, 0.45, 0.39, 0.47]
    want = scipy_stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=scipy_stats.sem(values))
    got = mean_interval(values)
    assert (got.low, got.high) == (pytest.approx(want[0]), pytest.approx(want[1])) and got.n == 4
