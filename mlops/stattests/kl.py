"""Kullback-Leibler divergence KL(current || reference), in nats.

How surprising the current data is under the reference: sum(c * ln(c / r)). Both proportions are floored at
``FLOOR`` and renormalised, so a bin empty in the reference gives a large finite value instead of infinity.
Asymmetric and unbounded; per-bin (coarse), so with the profile's groups it is scored on them.
"""

from __future__ import annotations

import numpy as np

from mlops import stats
from mlops.stattests.base import Bins, StatTest, register

FLOOR = stats.EPS  # 1e-4, the same floor as PSI


def floored(counts: np.ndarray) -> np.ndarray:
    """Proportions floored at FLOOR, then renormalised to sum to 1."""
    p = np.maximum(stats.proportions(counts), FLOOR)
    return p / p.sum()


def kl_divergence(reference: np.ndarray, current: np.ndarray) -> float:
    r, c = floored(reference), floored(current)
    return float(np.sum(c * np.log(c / r)))


def _kl(reference: np.ndarray, current: np.ndarray, bins: Bins) -> float:
    return kl_divergence(reference, current)


KL = register(StatTest(
    name="kl", kinds=frozenset({"numeric", "categorical"}), default_threshold=0.1, higher_is_drift=True,
    description="Kullback-Leibler divergence KL(current || reference) in nats, proportions floored at 1e-4",
    fn=_kl, coarse=True,
))
