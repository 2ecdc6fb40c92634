"""dualdiff.study.stats: Student-t intervals against scipy.stats, paired differences, and the
verdict rule's three outcomes."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sst

from dualdiff.study.stats import (CONTRADICTED, INCONCLUSIVE, SUPPORTED, VERDICT_RULE, Interval,
                                  paired_differences, paired_interval, t_interval, verdict)


@pytest.mark.parametrize("n", [2, 3, 5, 17])
@pytest.mark.parametrize("level", [0.95, 0.9])
def test_t_interval_matches_scipy(n, level):
    x = np.random.default_rng(n).normal(1.5, 2.0, n)
    iv = t_interval(x, level)
    lo, hi = sst.t.interval(level, n - 1, loc=x.mean(), scale=sst.sem(x))
    assert iv.n == n and iv.mean == pytest.approx(x.mean())
    assert iv.low == pytest.approx(lo, rel=1e-10) and iv.high == pytest.approx(hi, rel=1e-10)
    assert iv.sd == pytest.approx(x.std(ddof=1))


def test_paired_interval_matches_scipy_ttest_rel():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, 6)
    b = a + rng.normal(0.3, 0.2, 6)
    ci = sst.ttest_rel(a, b).confidence_interval(0.95)
    iv = paired_interval(dict(enumerate(a)), dict(enumerate(b)))
    assert iv.low == pytest.approx(ci.low, rel=1e-10)
    assert iv.high == pytest.approx(ci.high, rel=1e-10)
    # the interval excludes 0 exactly when the paired t-test rejects at 5 %
    assert iv.excludes_zero() == (sst.ttest_rel(a, b).pvalue < 0.05)


def test_small_samples_have_no_interval():
    one = t_interval([2.0])
    assert one.n == 1 and one.mean == 2.0 and math.isnan(one.low) and math.isnan(one.high)
    assert one.to_dict()["low"] is None
    empty = t_interval([])
    assert empty.n == 0 and math.isnan(empty.mean)
    with pytest.raises(ValueError):
        t_interval([1.0, float("nan")])


def test_paired_differences_use_only_seeds_finite_in_both():
    a = {0: 1.0, 1: 2.0, 2: None, 3: 5.0, 4: float("nan")}
    b = {0: 0.5, 1: 1.0, 2: 1.0, 4: 1.0, 5: 3.0}
    assert paired_differences(a, b) == {0: 0.5, 1: 1.0}


def _iv(low: float, high: float, n: int = 5) -> Interval:
    return Interval((low + high) / 2, low, high, n, 1.0)


@pytest.mark.parametrize("low, high, direction, expected", [
    (-0.3, -0.1, "lower", SUPPORTED),
    (0.1, 0.3, "lower", CONTRADICTED),
    (-0.1, 0.2, "lower", INCONCLUSIVE),
    (0.1, 0.3, "higher", SUPPORTED),
    (-0.3, -0.1, "higher", CONTRADICTED),
    (-0.2, 0.0, "lower", INCONCLUSIVE),   # touching 0 does not exclude it
    (-0.2, 0.2, "higher", INCONCLUSIVE),
])
def test_verdict_rule(low, high, direction, expected):
    assert verdict(_iv(low, high), direction) == expected


def test_verdict_inconclusive_when_incomplete_or_too_few():
    assert verdict(_iv(-0.3, -0.1), "lower", complete=False) == INCONCLUSIVE
    assert verdict(t_interval([-1.0]), "lower") == INCONCLUSIVE
    with pytest.raises(ValueError):
        verdict(_iv(-0.3, -0.1), "smaller")  # type: ignore[arg-type]


def test_verdict_on_real_paired_data():
    seeds = range(5)
    base = {s: 1.0 + 0.1 * s for s in seeds}
    better = {s: base[s] - 0.2 + 0.01 * (s % 2) for s in seeds}
    noisy = {s: base[s] + (0.3 if s % 2 else -0.3) for s in seeds}
    assert verdict(paired_interval(better, base), "lower") == SUPPORTED
    assert verdict(paired_interval(base, better), "lower") == CONTRADICTED
    assert verdict(paired_interval(noisy, base), "lower") == INCONCLUSIVE


def test_rule_text_states_the_rule():
    for words in ("95 %", "supported", "contradicted", "inconclusive at this scale",
                  "paired differences", "Student-t"):
        assert words in VERDICT_RULE
