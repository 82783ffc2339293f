"""Jensen-Shannon distance, base 2: sqrt of the JS divergence between the two binned distributions.

Symmetric, finite even when one side has empty bins (no floor needed), and bounded in [0, 1], so one threshold
reads the same for every feature. Per-bin (coarse): its no-drift value grows like (bins - 1) / n, so with the
profile's groups it is scored on them.
"""

from __future__ import annotations

import math

import numpy as np

from mlops import stats
from mlops.stattests.base import Bins, StatTest, register


def _kl_to_mixture(p: np.ndarray, m: np.ndarray) -> float:
    mask = p > 0  # 0 * log 0 = 0; m > 0 wherever p > 0
    return float(np.sum(p[mask] * np.log2(p[mask] / m[mask])))


def jensen_shannon_distance(reference: np.ndarray, current: np.ndarray) -> float:
    p, q = stats.proportions(reference), stats.proportions(current)
    m = (p + q) / 2
    divergence = (_kl_to_mixture(p, m) + _kl_to_mixture(q, m)) / 2
    return math.sqrt(min(max(divergence, 0.0), 1.0))


def _js(reference: np.ndarray, current: np.ndarray, bins: Bins) -> float:
    return jensen_shannon_distance(reference, current)


JENSEN_SHANNON = register(StatTest(
    name="jensen_shannon", kinds=frozenset({"numeric", "categorical"}), default_threshold=0.1, higher_is_drift=True,
    description="Jensen-Shannon distance (base 2, in [0, 1]) between the binned distributions",
    fn=_js, coarse=True,
))
