"""Chi-square goodness of fit of the current counts to the reference frequencies, scored as Cramér's V.

The chi-square statistic grows with the sample size (any tiny shift becomes "significant" on a big window),
so the score is the effect size V = sqrt(chi2 / (n * (k - 1))), which does not: 0 for identical proportions,
about 0.1 small, 0.3 medium. It is not capped at 1 for goodness of fit: a category rare or absent in the
reference (floored at ``mlops.stats.EPS``) can push it above. :func:`chi_square_test` also gives the statistic
and p-value for callers that want a test.

Bins empty in both samples (the profile's "unseen" bin, usually) are left out: they carry no evidence, and
kept they would add about n * EPS to chi2 and a degree of freedom, so identical samples would not score 0.
That is the one difference from :func:`mlops.stats.chi_square`, which keeps them.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from mlops import stats
from mlops.stattests.base import Bins, Counts, StatTest, register


def chi_square_test(reference: Counts, current: Counts) -> tuple[float, float, float]:
    """(chi2, p-value, Cramér's V) of current counts against the reference frequencies.

    With fewer than two bins seen in either sample there is nothing that can differ: (0.0, 1.0, 0.0).
    """
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    if ref.shape != cur.shape:
        raise ValueError(f"reference has {len(ref)} bins, current {len(cur)}")
    seen = (ref > 0) | (cur > 0)
    ref, cur = ref[seen], cur[seen]
    n, k = float(cur.sum()), len(cur)
    if n <= 0 or ref.sum() <= 0 or k < 2:
        return 0.0, 1.0, 0.0
    expected = np.maximum(stats.proportions(ref), stats.EPS)
    expected = expected / expected.sum() * n
    result = sps.chisquare(cur, expected)
    chi2 = float(result.statistic)
    return chi2, float(result.pvalue), math.sqrt(max(chi2, 0.0) / (n * (k - 1)))


def _cramers_v(reference: np.ndarray, current: np.ndarray, bins: Bins) -> float:
    return chi_square_test(reference, current)[2]


CHI_SQUARE = register(StatTest(
    name="cramers_v", kinds=frozenset({"categorical"}), default_threshold=0.1, higher_is_drift=True,
    description="Cramér's V of the chi-square goodness of fit to the reference frequencies (effect size, not n-bound)",
    fn=_cramers_v,
))
