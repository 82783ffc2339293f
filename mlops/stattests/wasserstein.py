"""Wasserstein-1 (earth mover's) distance between the binned distributions, in reference standard deviations.

How far the mass moved, not only whether the shape changed: KS saturates at 1 once the samples separate,
this keeps growing with the shift. Each bin's mass is placed at one representative position: interior bins at
their midpoint, the two open-ended outer bins at their inner edge (the only finite point they have, so tail
moves beyond the outermost edges are not seen beyond that edge). The distance is divided by the reference's
standard deviation over the same positions, so it is unit-free: 0.1 means a tenth of a standard deviation.
Numeric only (needs ordered, located bins); cumulative, so it keeps the fine bins.

Sampling noise: on N(0, 1) with no drift, 500-event windows against the profile's 40 bins exceed the default
0.1 about 4% of the time with a 10,000-row reference (12% with 1,000 rows); 1,000-event windows 0.5-2%.
"""

from __future__ import annotations

import numpy as np

from mlops import stats
from mlops.stattests.base import Bins, StatTest, register


def positions(edges: np.ndarray) -> np.ndarray:
    """Representative position of each of the len(edges) + 1 bins (non-decreasing)."""
    edges = np.asarray(edges, dtype=np.float64)
    if len(edges) == 0:
        return np.zeros(1)
    return np.concatenate([edges[:1], (edges[:-1] + edges[1:]) / 2, edges[-1:]])


def wasserstein_normalised(reference: np.ndarray, current: np.ndarray, edges: np.ndarray) -> float:
    """W1 over the bin positions divided by the reference's std there.

    A reference with zero spread over the positions (all its mass in one bin) falls back to the span of the
    positions as the scale; with a single position nothing can move and the distance is 0.
    """
    x = positions(edges)
    r, c = stats.proportions(reference), stats.proportions(current)
    gaps = np.diff(x)
    distance = float(np.sum(np.abs(np.cumsum(r)[:-1] - np.cumsum(c)[:-1]) * gaps))
    mean = float(np.sum(r * x))
    scale = float(np.sqrt(np.sum(r * (x - mean) ** 2)))
    if scale <= 0:
        scale = float(x[-1] - x[0])
    return distance / scale if scale > 0 else 0.0


def _wasserstein(reference: np.ndarray, current: np.ndarray, bins: Bins) -> float:
    if bins.edges is None:  # unreachable through StatTest.score, which checked the kind
        raise ValueError("wasserstein needs numeric bins with edges")
    return wasserstein_normalised(reference, current, bins.edges)


WASSERSTEIN = register(StatTest(
    name="wasserstein", kinds=frozenset({"numeric"}), default_threshold=0.1, higher_is_drift=True,
    description="Wasserstein-1 distance over bin positions, in reference standard deviations",
    fn=_wasserstein,
))
