"""Population Stability Index: sum((c - r) * ln(c / r)) over the bins' proportions.

The house metric the alert rules were calibrated on, so it is exactly :func:`mlops.stats.psi` (proportions
floored at ``mlops.stats.EPS`` so an empty bin gives a large finite term). Coarse: with the profile's groups
it is scored on the ~10 mass-balanced groups, as the consumer always has, since its no-drift value grows like
(bins - 1) / n. Usual reading: < 0.1 stable, 0.1-0.2 moderate, > 0.2 significant shift.
"""

from __future__ import annotations

import numpy as np

from mlops import stats
from mlops.stattests.base import Bins, StatTest, register


def _psi(reference: np.ndarray, current: np.ndarray, bins: Bins) -> float:
    return stats.psi(reference, current)


PSI = register(StatTest(
    name="psi", kinds=frozenset({"numeric", "categorical"}), default_threshold=0.2, higher_is_drift=True,
    description="Population Stability Index over the bins (EPS-floored proportions); > 0.2 is a significant shift",
    fn=_psi, coarse=True,
))
