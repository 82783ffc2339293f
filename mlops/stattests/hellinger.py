"""Hellinger distance between the binned distributions, in [0, 1].

H = sqrt(1 - sum(sqrt(p * q))), computed as sqrt(sum((sqrt(p) - sqrt(q))^2) / 2) (the same value) because
that form has no cancellation near 0: identical inputs give exactly 0. Symmetric, bounded and finite with
empty bins. Per-bin (coarse), so with the profile's groups it is scored on them.
"""

from __future__ import annotations

import math

import numpy as np

from mlops import stats
from mlops.stattests.base import Bins, StatTest, register


def hellinger_distance(reference: np.ndarray, current: np.ndarray) -> float:
    p, q = stats.proportions(reference), stats.proportions(current)
    return min(math.sqrt(float(np.sum((np.sqrt(p) - np.sqrt(q)) ** 2)) / 2), 1.0)


def _hellinger(reference: np.ndarray, current: np.ndarray, bins: Bins) -> float:
    return hellinger_distance(reference, current)


HELLINGER = register(StatTest(
    name="hellinger", kinds=frozenset({"numeric", "categorical"}), default_threshold=0.1, higher_is_drift=True,
    description="Hellinger distance (in [0, 1]) between the binned distributions",
    fn=_hellinger, coarse=True,
))
