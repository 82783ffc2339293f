"""The rollout's tests against references (numerical integration, SciPy, scikit-learn, the textbook power
formula) and their error rates under continuous monitoring, by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, special, stats
from sklearn.metrics import roc_auc_score

from lifecycle.rollout import power
from lifecycle.rollout import stats as rstats


@pytest.mark.parametrize("diff, var, tau", [(0.0, 1e-4, 0.01), (0.02, 1e-4, 0.01), (-0.05, 4e-4, 0.05),
                                            (0.3, 0.01, 0.1)])
def test_the_mixture_ratio_is_the_integral_it_stands_for(diff, var, tau):
    sd = math.sqrt(var)
    numerator, _ = integrate.quad(lambda t: stats.norm.pdf(diff, t, sd) * stats.norm.pdf(t, 0, tau),
                                  -10 * tau - abs(diff), 10 * tau + abs(diff), points=[0, diff], limit=200)
    expected = numerator / stats.norm.pdf(diff, 0, sd)
    assert math.exp(rstats.mixture_log_lr(diff, var, tau)) == pytest.approx(expected, rel=1e-6)


def test_the_confidence_sequence_is_where_the_ratio_reaches_one_over_alpha():
    e = rstats.mixture_test(0.03, 1e-4, 0.05, 0.02, (1, 1))
    for edge in (e.lower, e.upper):  # testing H0: effect = edge with the same data
        assert math.exp(rstats.mixture_log_lr(0.03 - edge, 1e-4, 0.02)) == pytest.approx(1 / 0.05, rel=1e-9)
    assert (e.p_value < 0.05) == (e.lower > 0 or e.upper < 0)


def test_the_rank_test_is_mann_whitneys_u_as_an_auc():
    rng = np.random.default_rng(1)
    a, b = rng.lognormal(0.1, 0.5, 400), rng.lognormal(0.0, 0.5, 900)
    e = rstats.rank_test(a, b, 0.05)
    labels = np.r_[np.ones(len(a)), np.zeros(len(b))]
    assert e.estimate + 0.5 == pytest.approx(roc_auc_score(labels, np.r_[a, b]), abs=1e-12)
    u = stats.mannwhitneyu(a, b).statistic
    assert e.estimate + 0.5 == pytest.approx(u / (len(a) * len(b)), abs=1e-12)
    ties = rstats.rank_test([1, 2, 2, 3], [2, 2, 1, 1], 0.05)  # ties averaged, as Mann-Whitney's U does
    assert ties.estimate + 0.5 == pytest.approx(stats.mannwhitneyu([1, 2, 2, 3], [2, 2, 1, 1]).statistic / 16)


def test_sample_ratio_mismatch_is_lindon_and_maleks_closed_form():
    counts, shares, k = np.array([130, 2370]), np.array([0.05, 0.95]), 100.0
    alpha0 = k * shares
    # Bayes factor: Dirichlet-multinomial marginal over the multinomial at the null, by hand.
    log_bf = (special.gammaln(alpha0.sum()) - special.gammaln(alpha0.sum() + counts.sum())
              + np.sum(special.gammaln(alpha0 + counts) - special.gammaln(alpha0))
              - np.sum(counts * np.log(shares)))
    assert rstats.sample_ratio_mismatch(counts, shares, k) == pytest.approx(min(1, math.exp(-log_bf)), rel=1e-9)
    assert rstats.sample_ratio_mismatch([125, 2375], shares) > 0.5  # exactly the plan
    assert rstats.sample_ratio_mismatch([250, 2250], shares) < 1e-6  # twice the planned share


def test_bad_split_arguments_are_refused():
    with pytest.raises(ValueError):
        rstats.sample_ratio_mismatch([1, 2], [0.5, 0.6])
    with pytest.raises(ValueError):
        rstats.sample_ratio_mismatch([1], [1.0])


def test_peeking_at_the_msprt_keeps_its_alpha_where_a_z_test_does_not():
    """1,000 A/A sequences of a 2 % rate, looked at every 100 observations per arm for 5,000: the mSPRT
    rejects at most alpha of them; the fixed-horizon z-test read at every look rejects several times more."""
    rng = np.random.default_rng(7)
    runs, looks, step, alpha = 1000, 50, 100, 0.05
    a = rng.binomial(step, 0.02, size=(runs, looks)).cumsum(axis=1)
    b = rng.binomial(step, 0.02, size=(runs, looks)).cumsum(axis=1)
    msprt = ztest = 0
    for r in range(runs):
        hit_m = hit_z = False
        for j in range(looks):
            n = step * (j + 1)
            e = rstats.rate_difference(int(a[r, j]), n, int(b[r, j]), n, alpha, tau=0.01)
            hit_m = hit_m or e.rejects(alpha)
            pooled = (a[r, j] + b[r, j]) / (2 * n)
            se = math.sqrt(max(pooled * (1 - pooled), 1e-12) * 2 / n)
            hit_z = hit_z or abs(a[r, j] - b[r, j]) / n / se > stats.norm.ppf(1 - alpha / 2)
        msprt += hit_m
        ztest += hit_z
    assert msprt / runs <= alpha, msprt
    assert ztest / runs > 2 * alpha, ztest  # what the anytime-valid test protects against


def test_the_fixed_horizon_plan_is_the_textbook_formula():
    p = power.plan(0.02, 0.1, relative=True, alpha=0.05, power=0.8, share=0.5, daily_traffic=100_000)
    h = abs(2 * math.asin(math.sqrt(0.022)) - 2 * math.asin(math.sqrt(0.02)))
    # Var(2 asin(sqrt(p_hat))) = 1/n per arm, so the difference of two arms of n has variance 2/n.
    textbook = 2 * ((stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) / h) ** 2
    assert 80_000 < textbook < 81_000  # what every A/B calculator gives for 2 % -> 2.2 %
    assert p.fixed_per_arm == math.ceil(textbook)
    assert p.fixed_days == pytest.approx(p.fixed_per_arm / 50_000)
    assert p.fixed_per_arm < p.sequential_per_arm < 4 * p.fixed_per_arm  # the price of looking all the time


def test_an_unequal_split_needs_a_larger_baseline_arm():
    p = power.plan(0.9, -0.05, share=0.05)
    assert p.fixed_baseline == math.ceil(p.fixed_per_arm * 19)


def test_the_sequential_plan_has_its_power_by_simulation():
    """At the sequential sample, an effect of exactly the minimum one is found in at least the planned share."""
    p = power.plan(0.10, 0.05, alpha=0.05, power=0.8, share=0.5)
    rng = np.random.default_rng(3)
    n = p.sequential_per_arm
    found = 0
    for _ in range(400):
        x1, x0 = rng.binomial(n, 0.15), rng.binomial(n, 0.10)
        found += rstats.rate_difference(int(x1), n, int(x0), n, 0.05, tau=0.05).rejects(0.05)
    assert found / 400 >= 0.75, found


@pytest.mark.parametrize("kwargs", [{"baseline_rate": 0}, {"baseline_rate": 0.5, "mde": 0.6}, {"mde": 0},
                                    {"alpha": 1}, {"power": 0}, {"share": 1}, {"daily_traffic": 0}])
def test_impossible_plans_are_refused(kwargs):
    with pytest.raises(ValueError):
        power.plan(**{"baseline_rate": 0.1, "mde": 0.01, **kwargs})
