"""The shape every drift statistic shares: it scores two vectors of counts over the same bins.

Counts, not raw values, because that is all the streaming consumer keeps (histograms over the reference
profile's bins) and the batch tool can produce the same thing by binning raw values with the same edges: both
then compute the same number for the same data. Modelled on Evidently's ``stattests`` (a test declares the
feature kinds it applies to and a default threshold) and river's one-method detectors (one ``score`` call).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from mlops import stats
from mlops.profile import ColumnProfile, NumericProfile

Kind = Literal["numeric", "categorical"]
KINDS: frozenset[str] = frozenset({"numeric", "categorical"})
Counts = Sequence[float] | np.ndarray


@dataclass(frozen=True, eq=False)
class Bins:
    """What the counts are counted over.

    numeric: ``edges`` are the interior edges (the outer bins are open-ended, as in :mod:`mlops.profile`), so
    there are ``len(edges) + 1`` bins. ``groups`` optionally lists the start indices of consecutive bin groups
    (the profile's ``psi_starts``): the per-bin divergences (``StatTest.coarse``) are computed on those groups,
    because their no-drift value grows with the number of bins; the cumulative ones (KS, Wasserstein) keep
    the fine bins. categorical: no edges; the bins are the categories (plus the profile's "unseen" bin).
    """

    kind: Kind
    edges: np.ndarray | None = None
    groups: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown feature kind {self.kind!r}; known: {', '.join(sorted(KINDS))}")
        if self.kind == "categorical":
            if self.edges is not None or self.groups is not None:
                raise ValueError("categorical bins take no edges or groups")
            return
        if self.edges is None:
            raise ValueError("numeric bins need their interior edges")
        edges = np.asarray(self.edges, dtype=np.float64)
        if edges.ndim != 1 or not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
            raise ValueError("numeric edges must be a 1-D, finite, strictly increasing array")
        object.__setattr__(self, "edges", edges)
        if self.groups is not None:
            groups = tuple(int(g) for g in self.groups)
            if not groups or groups[0] != 0 or np.any(np.diff(groups) <= 0) or groups[-1] >= len(edges) + 1:
                raise ValueError(f"groups must be increasing bin indices starting at 0, got {self.groups}")
            object.__setattr__(self, "groups", groups)

    @classmethod
    def numeric(cls, edges: Counts, groups: Sequence[int] | None = None) -> Bins:
        return cls("numeric", np.asarray(edges, dtype=np.float64), None if groups is None else tuple(groups))

    @classmethod
    def categorical(cls) -> Bins:
        return cls("categorical")

    @property
    def n_bins(self) -> int | None:
        """Number of bins for numeric bins; None for categorical (any number of categories)."""
        return None if self.edges is None else len(self.edges) + 1

    def coarsen(self, reference: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray, Bins]:
        """The counts summed over ``groups`` and the matching coarser bins (unchanged without groups).

        The group starting at bin ``s`` begins right after edge ``s - 1``, so the coarse interior edges are
        ``edges[s - 1]`` for every start but the first.
        """
        if self.groups is None or self.edges is None:
            return reference, current, self
        starts = list(self.groups)
        coarse = Bins("numeric", self.edges[[s - 1 for s in starts[1:]]])
        return stats.regroup(reference, starts), stats.regroup(current, starts), coarse


def profile_bins(profile: ColumnProfile, grouped: bool = True) -> tuple[np.ndarray, Bins]:
    """The reference counts and bins of one profiled column, as both the stream and batch should score them.

    Categorical counts get the profile's "unseen" bin (always 0 in the reference). ``grouped`` passes the
    profile's PSI groups along so PSI equals what the consumer has always computed.
    """
    if isinstance(profile, NumericProfile):
        return (np.asarray(profile.counts, dtype=np.float64),
                Bins.numeric(profile.edges, profile.psi_starts if grouped else None))
    return np.asarray(profile.counts_with_unseen(), dtype=np.float64), Bins.categorical()


ScoreFn = Callable[[np.ndarray, np.ndarray, Bins], float]


@dataclass(frozen=True)
class StatTest:
    """One drift statistic: what it applies to, how to compute it, and when its value means drift.

    ``fn`` receives validated float arrays (non-negative, finite, same length, both totals > 0) already
    coarsened to ``bins.groups`` when ``coarse``; ``score`` is the entry point.
    """

    name: str
    kinds: frozenset[str]
    default_threshold: float
    higher_is_drift: bool
    description: str
    fn: ScoreFn = field(repr=False, compare=False)
    coarse: bool = False  # score on the bins' groups: the statistic's no-drift value grows with the bin count

    def __post_init__(self) -> None:
        if not self.kinds or not self.kinds <= KINDS:
            raise ValueError(f"{self.name}: kinds must be a non-empty subset of {sorted(KINDS)}")
        if not np.isfinite(self.default_threshold):
            raise ValueError(f"{self.name}: default_threshold must be finite")

    def applies_to(self, kind: str) -> bool:
        return kind in self.kinds

    def score(self, reference: Counts, current: Counts, bins: Bins) -> float:
        """The statistic for the current counts against the reference counts over ``bins``.

        Raises ValueError when the test does not apply to the bins' kind, the counts do not match the bins
        or each other, or either side is empty (nothing to compare: callers gate on a minimum sample size).
        """
        if not self.applies_to(bins.kind):
            raise ValueError(f"stat test {self.name!r} applies to {'/'.join(sorted(self.kinds))} features, "
                             f"not {bins.kind}")
        ref, cur = _counts(reference, "reference"), _counts(current, "current")
        if len(ref) != len(cur):
            raise ValueError(f"reference has {len(ref)} bins, current {len(cur)}")
        if bins.n_bins is not None and len(ref) != bins.n_bins:
            raise ValueError(f"{len(ref)} counts for {bins.n_bins} bins ({bins.n_bins - 1} interior edges)")
        if self.coarse:
            ref, cur, bins = bins.coarsen(ref, cur)
        return float(self.fn(ref, cur, bins))

    def drifted(self, value: float, threshold: float | None = None) -> bool:
        """Whether ``value`` crosses the threshold (strictly, like the alert rules); NaN is never drift."""
        limit = self.default_threshold if threshold is None else float(threshold)
        if not np.isfinite(limit):
            raise ValueError(f"threshold must be a finite number, got {threshold}")
        return bool(value > limit) if self.higher_is_drift else bool(value < limit)


def _counts(values: Counts, side: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or len(arr) == 0:
        raise ValueError(f"{side} counts must be a non-empty 1-D array")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{side} counts must be finite and non-negative")
    if arr.sum() <= 0:
        raise ValueError(f"{side} counts are all zero: nothing to compare")
    return arr


REGISTRY: dict[str, StatTest] = {}


def register(test: StatTest) -> StatTest:
    """Add a test to the registry under its name (one module per test registers itself on import)."""
    if test.name in REGISTRY:
        raise ValueError(f"stat test {test.name!r} is already registered")
    REGISTRY[test.name] = test
    return test
