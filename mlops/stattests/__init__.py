"""Drift statistical tests, one module each, in one registry shared by the streaming consumer and the batch tool.

Every test scores binned counts (see :mod:`mlops.stattests.base`), so the stream, which only keeps counts over
the reference profile's bins, and the batch tool, which bins raw values with the same edges, get the same number.

Automatic choice (:func:`choose`), by feature kind and reference size:

* numeric: ``psi``, ``ks``, ``wasserstein``, plus ``jensen_shannon`` when ``n_reference > 1000``.
  PSI is the metric today's alert rules are calibrated on. KS (does the shape differ anywhere) and Wasserstein
  (how far, in reference standard deviations, the mass moved; KS saturates at 1) are cumulative over the bins,
  so their no-drift value does not grow with the number of bins and they stay sound on small references.
  Jensen-Shannon is per bin: its no-drift value grows like (bins - 1) * (1/n_reference + 1/n_current), and with
  <= 1000 reference rows the reference's own sampling noise takes a visible share of its 0.1 threshold. 1000
  is also where Evidently switches from tests to distances.
* categorical: ``psi``, ``cramers_v`` (chi-square's effect size), ``jensen_shannon`` at any size. Cramér's V
  is normalised by the number of categories (comparable across cardinalities) and does not grow with the
  sample as chi-square's statistic and p-value do (``chi2``/``chi2_pvalue`` stay reported beside it);
  Jensen-Shannon is symmetric, bounded in [0, 1] and finite on new categories. The bins are the categories,
  usually few, so the per-bin noise stays low even on small references.

``kl`` and ``hellinger`` are registered for explicit use but not chosen automatically: KL is asymmetric and
unbounded (hard to threshold across features) and Hellinger ranks shifts much like Jensen-Shannon.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from mlops import stats
from mlops.profile import ColumnProfile, NumericProfile
from mlops.stattests import chi_square, hellinger, jensen_shannon, kl, ks, psi, wasserstein  # noqa: F401 (register)
from mlops.stattests.base import KINDS, REGISTRY, Bins, Counts, Kind, StatTest, profile_bins, register
from mlops.stattests.chi_square import chi_square_test

__all__ = ["KINDS", "REGISTRY", "Bins", "Kind", "StatTest", "chi_square_test", "choose", "for_kind", "get",
           "profile_bins", "register", "score_all", "score_column"]

LARGE_REFERENCE = 1000  # rows above which jensen_shannon joins the numeric choice


def get(name: str) -> StatTest:
    """The registered test called ``name``; ValueError naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown stat test {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown feature kind {kind!r}; known: {', '.join(sorted(KINDS))}")


def for_kind(kind: str) -> list[StatTest]:
    """Every registered test that applies to ``kind``, by name."""
    _check_kind(kind)
    return [REGISTRY[name] for name in sorted(REGISTRY) if REGISTRY[name].applies_to(kind)]


def choose(kind: str, n_reference: int) -> list[str]:
    """The tests to run by default on a feature of this kind with this many reference rows (rule above)."""
    _check_kind(kind)
    if n_reference < 0:
        raise ValueError(f"n_reference must be >= 0, got {n_reference}")
    if kind == "numeric":
        names = ["psi", "ks", "wasserstein"] + (["jensen_shannon"] if n_reference > LARGE_REFERENCE else [])
    else:
        names = ["psi", "cramers_v", "jensen_shannon"]
    return [name for name in names if get(name).applies_to(kind)]


def score_all(names: Iterable[str], reference: Counts, current: Counts, bins: Bins) -> dict[str, float]:
    """Each named test's score; ValueError for an unknown name or a test that does not apply to the bins."""
    tests = [get(name) for name in names]
    return {test.name: test.score(reference, current, bins) for test in tests}


def score_column(profile: ColumnProfile, counts: Sequence[float] | np.ndarray,
                 names: Iterable[str] | None = None) -> dict[str, float]:
    """Every score of one column: current ``counts`` over the profile's bins against the reference's. The one
    function the streaming consumer, the live report and the batch `drift` tool score with, so the same data
    gets the same numbers on either path.

    Always ``psi`` and, numeric, ``ks`` (histogram) or, categorical, ``chi2`` and ``chi2_pvalue`` (what the
    alert rules have always read); then ``names`` (default: :func:`choose` for the column's kind and reference
    size). A window with no counts scores only the first ones."""
    reference, bins = profile_bins(profile)
    current = np.asarray(counts, dtype=np.float64)
    if isinstance(profile, NumericProfile):
        scores = {"psi": stats.psi(stats.regroup(profile.counts, profile.psi_starts),
                                   stats.regroup(current, profile.psi_starts)),
                  "ks": stats.ks_from_histograms(profile.counts, current)}
    else:
        chi2, p, _ = chi_square_test(reference, current) if current.sum() > 0 else (0.0, 1.0, 0.0)
        scores = {"psi": stats.psi(reference, current), "chi2": chi2, "chi2_pvalue": p}
    if current.sum() > 0 and reference.sum() > 0:
        wanted = list(names) if names is not None else choose(bins.kind, int(reference.sum()))
        scores.update(score_all([n for n in wanted if n not in scores], reference, current, bins))
    return scores
