"""Drift statistics shared by the streaming consumer and the batch `drift` tool.

Histogram versions work on counts over the reference profile's bins (bounded memory, streaming); the
exact versions work on raw values (batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats as sps

# Proportions are floored at EPS so an empty bin gives a large, finite PSI term instead of infinity.
EPS = 1e-4


def proportions(counts: Sequence[float] | np.ndarray) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    if total <= 0:
        return np.zeros_like(c)
    return c / total


def psi(reference: Sequence[float] | np.ndarray, current: Sequence[float] | np.ndarray) -> float:
    """Population stability index, sum((c - r) * ln(c / r)), on matching bins of counts."""
    r = np.maximum(proportions(reference), EPS)
    c = np.maximum(proportions(current), EPS)
    return float(np.sum((c - r) * np.log(c / r)))


def ks_from_histograms(reference: Sequence[float] | np.ndarray, current: Sequence[float] | np.ndarray) -> float:
    """Two-sample KS statistic from binned counts: max |CDF_ref - CDF_cur| over the bin edges.

    It is never above the exact statistic and falls short of it by at most the largest probability mass
    one bin holds in either sample (inside a bin the two CDFs can part further than at its edges). With
    the profile's ~40 quantile bins that is about 0.025 for reference-like data; tests/test_drift_stats.py
    measures it against scipy's exact ks_2samp.
    """
    cr = np.cumsum(proportions(reference))
    cc = np.cumsum(proportions(current))
    return float(np.max(np.abs(cr - cc))) if len(cr) else 0.0


def chi_square(reference: Sequence[float] | np.ndarray, current: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Chi-square goodness of fit of current category counts to the reference frequencies: (stat, p).

    With fewer than two categories seen in either sample there is nothing that can differ (and scipy's test,
    with zero degrees of freedom, answers NaN): (0.0, 1.0).
    """
    cur = np.asarray(current, dtype=np.float64)
    n = cur.sum()
    if n <= 0 or np.count_nonzero((cur > 0) | (np.asarray(reference, dtype=np.float64) > 0)) < 2:
        return 0.0, 1.0
    expected = np.maximum(proportions(reference), EPS)
    expected = expected / expected.sum() * n
    stat, p = sps.chisquare(cur, expected)
    return float(stat), float(p)


def ks_exact(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """scipy's exact two-sample KS on raw values: (statistic, p-value)."""
    result = sps.ks_2samp(reference, current)
    return float(result.statistic), float(result.pvalue)


def quantile_edges(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Interior bin edges at the reference quantiles (ties merged); the outer bins are open-ended."""
    qs = np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.unique(qs)


def bin_index(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Bin of each value: 0 for (-inf, e0], i for (e[i-1], e[i]], len(edges) for (e[-1], inf)."""
    return np.searchsorted(edges, values, side="left")


def histogram(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    return np.bincount(bin_index(edges, values), minlength=len(edges) + 1)


def group_bins(counts: np.ndarray, target_groups: int) -> list[int]:
    """Start indices of consecutive bin groups holding about 1/target_groups of the mass each (for PSI)."""
    p = proportions(counts)
    starts, mass = [0], 0.0
    for i, share in enumerate(p[:-1]):
        mass += share
        if mass >= 1.0 / target_groups - 1e-9:
            starts.append(i + 1)
            mass = 0.0
    if len(starts) > 1 and p[starts[-1]:].sum() < 0.5 / target_groups:
        starts.pop()  # fold a thin tail group into its neighbour
    return starts


def regroup(counts: np.ndarray, starts: Sequence[int]) -> np.ndarray:
    return np.add.reduceat(np.asarray(counts, dtype=np.float64), list(starts))
