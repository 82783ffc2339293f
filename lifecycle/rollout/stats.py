"""Tests a rollout may run at every look without inflating its error rate (anytime-valid), and the split check.

Why not the textbook tests: a rollout looks at its data every few seconds and acts on the first significant
result. A fixed-horizon test (a t-test, Mann-Whitney's p-value, chi-square) read that way rejects a true null far
more often than its alpha (Kayenta's peeking problem). These tests keep their alpha however often they are
read, because each is a nonnegative supermartingale under the null (Ville's inequality: it crosses 1/alpha with
probability at most alpha, ever):

* :func:`mixture_test` — the mixture sequential probability ratio test (mSPRT) of Johari, Koomen, Pekelis and
  Walsh ("Always valid inference", 2017/2022) on an asymptotically normal difference ``d`` with variance ``v``:
  a normal mixture N(0, tau^2) over the effect gives the likelihood ratio
  ``sqrt(v / (v + tau^2)) * exp(tau^2 d^2 / (2 v (v + tau^2)))``, whose inversion is a confidence sequence
  (the set of effects the data do not reject). Used on rate differences (errors, accuracy), mean differences
  (scores) and on Mann-Whitney's AUC (:func:`rank_test`, the latency check).
* :func:`sample_ratio_mismatch` — Lindon and Malek's ("Anytime-valid inference for multinomial count data",
  2022) Dirichlet-multinomial Bayes factor against the planned split, computed with SciPy's
  ``dirichlet_multinomial`` and ``multinomial`` distributions.

Normality is asymptotic (the central limit theorem on counts of hundreds), so the false-alarm rate is also
measured by simulation: ``tests/test_rollout_stats.py`` runs 1,000 A/A rollouts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Evidence:
    """One anytime-valid comparison: the estimate (candidate minus baseline), its confidence sequence at level
    ``alpha`` and the always-valid p-value (reject when below alpha)."""

    estimate: float
    lower: float
    upper: float
    p_value: float
    n: tuple[int, int]  # observations behind it: candidate, baseline

    def rejects(self, alpha: float) -> bool:
        return self.p_value < alpha

    def to_dict(self) -> dict[str, float | list[int]]:
        return {"estimate": self.estimate, "lower": self.lower, "upper": self.upper, "p_value": self.p_value,
                "n": list(self.n)}


def mixture_log_lr(diff: float, var: float, tau: float) -> float:
    """log of the mSPRT's mixture likelihood ratio for H0: effect 0."""
    if not var > 0 or not math.isfinite(var):
        return 0.0
    t2 = tau * tau
    return 0.5 * math.log(var / (var + t2)) + diff * diff * t2 / (2 * var * (var + t2))


def mixture_test(diff: float, var: float, alpha: float, tau: float, n: tuple[int, int]) -> Evidence:
    """The mSPRT and its confidence sequence for a difference ``diff`` with variance ``var``; ``tau`` is the
    mixture's scale, the size of effect the test is most sensitive to."""
    if not 0 < alpha < 1 or not tau > 0:
        raise ValueError("alpha in (0, 1) and tau > 0 are required")
    if not var > 0 or not math.isfinite(var):
        return Evidence(diff, -math.inf, math.inf, 1.0, n)
    t2 = tau * tau
    half = math.sqrt(var * (var + t2) / t2 * (2 * math.log(1 / alpha) + math.log((var + t2) / var)))
    p = min(1.0, math.exp(-mixture_log_lr(diff, var, tau)))
    return Evidence(diff, diff - half, diff + half, p, n)


def rate_difference(x1: int, n1: int, x0: int, n0: int, alpha: float, tau: float) -> Evidence:
    """Candidate's rate ``x1/n1`` minus the baseline's ``x0/n0``. The variance uses rates shrunk by half a count
    each way, so an arm with no events yet still carries its sampling uncertainty."""
    if n1 <= 0 or n0 <= 0:
        return Evidence(math.nan, -math.inf, math.inf, 1.0, (max(n1, 0), max(n0, 0)))
    p1, p0 = x1 / n1, x0 / n0
    s1, s0 = (x1 + 0.5) / (n1 + 1), (x0 + 0.5) / (n0 + 1)
    return mixture_test(p1 - p0, s1 * (1 - s1) / n1 + s0 * (1 - s0) / n0, alpha, tau, (n1, n0))


def mean_difference(candidate: Sequence[float] | np.ndarray, baseline: Sequence[float] | np.ndarray,
                    alpha: float, tau: float) -> Evidence:
    a, b = np.asarray(candidate, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        return Evidence(math.nan, -math.inf, math.inf, 1.0, (len(a), len(b)))
    var = a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)
    return mixture_test(float(a.mean() - b.mean()), float(var), alpha, tau, (len(a), len(b)))


def paired_difference(candidate: Sequence[float] | np.ndarray, baseline: Sequence[float] | np.ndarray,
                      alpha: float, tau: float) -> Evidence:
    """Both scored the same rows (the shadow step): the mean of the per-row differences."""
    d = np.asarray(candidate, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    if len(d) < 2:
        return Evidence(math.nan, -math.inf, math.inf, 1.0, (len(d), len(d)))
    return mixture_test(float(d.mean()), float(d.var(ddof=1) / len(d)), alpha, tau, (len(d), len(d)))


def rank_test(candidate: Sequence[float] | np.ndarray, baseline: Sequence[float] | np.ndarray,
              alpha: float, tau: float = 0.1) -> Evidence:
    """Mann-Whitney's AUC, P(candidate > baseline) + P(tie) / 2, minus 0.5: positive when the candidate's values
    (latencies) tend to be larger. U from the ranks of both samples together (SciPy's ``rankdata``, ties
    averaged: the same U as ``mannwhitneyu``, without its per-call overhead); null variance
    (n1 + n0 + 1) / (12 n1 n0)."""
    a, b = np.asarray(candidate, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        return Evidence(math.nan, -math.inf, math.inf, 1.0, (len(a), len(b)))
    ranks = stats.rankdata(np.concatenate([a, b]))
    u = float(ranks[:len(a)].sum()) - len(a) * (len(a) + 1) / 2
    auc = u / (len(a) * len(b))
    var = (len(a) + len(b) + 1) / (12 * len(a) * len(b))
    return mixture_test(auc - 0.5, var, alpha, tau, (len(a), len(b)))


def sample_ratio_mismatch(counts: Sequence[int], shares: Sequence[float], concentration: float = 100.0) -> float:
    """Always-valid p-value that the observed split ``counts`` came from the planned ``shares`` (Lindon and
    Malek's Dirichlet-multinomial test; prior Dirichlet(concentration * shares)). A small value means the split
    is broken (a routing bug, a replica on an old step, a logging gap): the comparison is not to be trusted."""
    k = np.asarray(counts, dtype=np.int64)
    theta = np.asarray(shares, dtype=np.float64)
    if len(k) != len(theta) or len(k) < 2 or (k < 0).any() or not np.isclose(theta.sum(), 1) or (theta <= 0).any():
        raise ValueError("counts and shares: one per arm, at least two, shares positive and summing to 1")
    n = int(k.sum())
    if n == 0:
        return 1.0
    log_bf = (stats.dirichlet_multinomial.logpmf(k, concentration * theta, n)
              - stats.multinomial.logpmf(k, n, theta))
    return float(min(1.0, math.exp(-log_bf))) if log_bf > -700 else 1.0
