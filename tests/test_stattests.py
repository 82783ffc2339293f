"""The drift stat-test registry (mlops.stattests): every test against an independent reference implementation
(scipy or the closed form) on random fixtures, plus zero on identical inputs, drift on a clear shift, the
registry's lookup, automatic choice and kind checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from scipy.spatial.distance import jensenshannon

from mlops import stats, stattests
from mlops.profile import CategoricalProfile, NumericProfile
from mlops.stattests import Bins, chi_square_test
from mlops.stattests.wasserstein import positions

SEEDS = (0, 1, 2, 3, 4, 5)
TOL = 1e-9
NUMERIC = ("psi", "ks", "wasserstein", "jensen_shannon", "kl", "hellinger")


def numeric_fixture(seed: int) -> tuple[np.ndarray, np.ndarray, Bins]:
    """Reference and (somewhat shifted) current counts over 40 quantile bins of the reference."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(0, 1, 3000)
    cur = rng.normal(rng.uniform(-0.5, 0.5), rng.uniform(0.7, 1.5), int(rng.integers(200, 2000)))
    edges = stats.quantile_edges(ref, 40)
    return stats.histogram(edges, ref).astype(float), stats.histogram(edges, cur).astype(float), Bins.numeric(edges)


def categorical_fixture(seed: int) -> tuple[np.ndarray, np.ndarray, Bins]:
    """Category counts, with the profile-style "unseen" bin that the current sample sometimes fills."""
    rng = np.random.default_rng(100 + seed)
    k = int(rng.integers(3, 12))
    ref = np.append(rng.integers(1, 500, k), 0).astype(float)
    cur = np.append(rng.integers(0, 200, k), rng.integers(0, 2) * rng.integers(1, 30)).astype(float)
    return ref, cur, Bins.categorical()


def fixtures() -> list[tuple[np.ndarray, np.ndarray, Bins]]:
    return [numeric_fixture(s) for s in SEEDS] + [categorical_fixture(s) for s in SEEDS]


@pytest.mark.parametrize("ref,cur,bins", fixtures())
def test_psi_is_mlops_stats_psi(ref, cur, bins):
    assert stattests.get("psi").score(ref, cur, bins) == pytest.approx(stats.psi(ref, cur), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_ks_is_mlops_stats_ks_from_histograms(seed):
    ref, cur, bins = numeric_fixture(seed)
    assert stattests.get("ks").score(ref, cur, bins) == pytest.approx(stats.ks_from_histograms(ref, cur), abs=1e-12)


@pytest.mark.parametrize("ref,cur,bins", fixtures())
def test_jensen_shannon_matches_scipy(ref, cur, bins):
    expected = jensenshannon(ref / ref.sum(), cur / cur.sum(), base=2)
    assert stattests.get("jensen_shannon").score(ref, cur, bins) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("ref,cur,bins", fixtures())
def test_kl_matches_scipy_entropy_on_floored_proportions(ref, cur, bins):
    def floored(counts: np.ndarray) -> np.ndarray:
        p = np.maximum(counts / counts.sum(), 1e-4)
        return p / p.sum()

    expected = sps.entropy(floored(cur), floored(ref))
    assert stattests.get("kl").score(ref, cur, bins) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("ref,cur,bins", fixtures())
def test_hellinger_matches_closed_form(ref, cur, bins):
    p, q = ref / ref.sum(), cur / cur.sum()
    expected = math.sqrt(1 - float(np.sum(np.sqrt(p * q))))
    assert stattests.get("hellinger").score(ref, cur, bins) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_wasserstein_matches_scipy(seed):
    ref, cur, bins = numeric_fixture(seed)
    edges = bins.edges
    x = np.concatenate([[edges[0]], (edges[:-1] + edges[1:]) / 2, [edges[-1]]])  # built independently
    r = ref / ref.sum()
    std = math.sqrt(float(np.sum(r * (x - np.sum(r * x)) ** 2)))
    expected = sps.wasserstein_distance(x, x, u_weights=ref, v_weights=cur) / std
    assert np.array_equal(positions(edges), x)
    assert stattests.get("wasserstein").score(ref, cur, bins) == pytest.approx(expected, abs=TOL)


def test_wasserstein_is_unit_free():
    ref, cur, bins = numeric_fixture(7)
    scaled = Bins.numeric(bins.edges * 1000 + 5)
    test = stattests.get("wasserstein")
    assert test.score(ref, cur, scaled) == pytest.approx(test.score(ref, cur, bins), rel=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_chi_square_matches_scipy_and_cramers_v_formula(seed):
    ref, cur, bins = categorical_fixture(seed)
    chi2, p, v = chi_square_test(ref, cur)
    seen = (ref > 0) | (cur > 0)  # bins empty in both samples are left out
    r, c = ref[seen], cur[seen]
    expected_freq = np.maximum(r / r.sum(), 1e-4)
    expected = sps.chisquare(c, expected_freq / expected_freq.sum() * c.sum())
    assert chi2 == pytest.approx(expected.statistic, rel=TOL, abs=TOL)
    assert p == pytest.approx(expected.pvalue, rel=TOL, abs=TOL)
    assert v == pytest.approx(math.sqrt(expected.statistic / (c.sum() * (len(c) - 1))), rel=TOL, abs=TOL)
    assert stattests.get("cramers_v").score(ref, cur, bins) == v


def test_chi_square_agrees_with_mlops_stats_when_no_bin_is_empty_in_both():
    ref, cur = np.array([500.0, 300, 200]), np.array([40.0, 35, 25])
    chi2, p, _ = chi_square_test(ref, cur)
    assert (chi2, p) == pytest.approx(stats.chi_square(ref, cur), rel=1e-12)


def test_chi_square_degenerate_is_no_drift():
    assert chi_square_test([10, 0, 0], [5, 0, 0]) == (0.0, 1.0, 0.0)


@pytest.mark.parametrize("ref,cur,bins", fixtures())
def test_identical_inputs_score_zero_and_do_not_drift(ref, cur, bins):
    for test in stattests.for_kind(bins.kind):
        value = test.score(ref, ref * 3, bins)  # same proportions, different n
        assert value == pytest.approx(0.0, abs=1e-12), test.name
        assert not test.drifted(value), test.name


def test_clear_shift_is_drifted_for_every_numeric_test():
    rng = np.random.default_rng(42)
    ref, cur = rng.normal(0, 1, 5000), rng.normal(1, 1, 5000)
    edges = stats.quantile_edges(ref, 40)
    counts_ref, counts_cur = stats.histogram(edges, ref), stats.histogram(edges, cur)
    numeric = stattests.for_kind("numeric")
    assert {t.name for t in numeric} == set(NUMERIC)
    for bins in (Bins.numeric(edges), Bins.numeric(edges, stats.group_bins(counts_ref, 10))):
        for test in numeric:
            value = test.score(counts_ref, counts_cur, bins)
            assert test.drifted(value), (test.name, value)


def test_same_distribution_is_not_drifted_on_large_samples():
    rng = np.random.default_rng(43)
    ref, cur = rng.normal(0, 1, 20000), rng.normal(0, 1, 20000)
    profile = NumericProfile.build(ref)
    reference, bins = stattests.profile_bins(profile)
    scores = stattests.score_all(NUMERIC, reference, stats.histogram(profile.edges, cur), bins)
    assert not any(stattests.get(name).drifted(value) for name, value in scores.items()), scores


def test_groups_reproduce_the_consumers_psi():
    rng = np.random.default_rng(5)
    profile = NumericProfile.build(rng.normal(0, 1, 4000))
    cur = stats.histogram(profile.edges, rng.normal(0.2, 1.1, 800))
    reference, bins = stattests.profile_bins(profile)
    expected = stats.psi(stats.regroup(profile.counts, profile.psi_starts), stats.regroup(cur, profile.psi_starts))
    assert stattests.get("psi").score(reference, cur, bins) == pytest.approx(expected, abs=1e-12)
    # cumulative tests keep the fine bins
    assert stattests.get("ks").score(reference, cur, bins) == stats.ks_from_histograms(profile.counts, cur)


def test_coarsen_edges_bound_the_groups():
    edges = np.arange(1.0, 10.0)  # 10 bins
    bins = Bins.numeric(edges, [0, 3, 7])
    ref, cur, coarse = bins.coarsen(np.arange(10.0), np.ones(10))
    assert list(coarse.edges) == [3.0, 7.0] and list(ref) == [3, 18, 24] and list(cur) == [3, 4, 3]


def test_categorical_profile_bins_have_the_unseen_bin():
    profile = CategoricalProfile.build(np.array(["a", "b", "b", "c"]))
    reference, bins = stattests.profile_bins(profile)
    assert list(reference) == [1, 2, 1, 0] and bins.kind == "categorical"
    assert stattests.get("cramers_v").score(reference, [1, 2, 1, 0], bins) == pytest.approx(0.0, abs=1e-12)


def test_get_unknown_names_the_known_ones():
    with pytest.raises(ValueError) as err:
        stattests.get("anderson")
    message = str(err.value)
    assert "anderson" in message
    for name in ("cramers_v", "hellinger", "jensen_shannon", "kl", "ks", "psi", "wasserstein"):
        assert name in message


@pytest.mark.parametrize("kind", ["numeric", "categorical"])
@pytest.mark.parametrize("n_reference", [0, 50, 1000, 1001, 100_000])
def test_choose_returns_only_applicable_registered_tests(kind, n_reference):
    names = stattests.choose(kind, n_reference)
    assert names and len(set(names)) == len(names) and "psi" in names
    assert all(stattests.get(name).applies_to(kind) for name in names)


def test_choose_rule():
    assert stattests.choose("numeric", 1000) == ["psi", "ks", "wasserstein"]
    assert stattests.choose("numeric", 1001) == ["psi", "ks", "wasserstein", "jensen_shannon"]
    assert stattests.choose("categorical", 10) == ["psi", "cramers_v", "jensen_shannon"]
    with pytest.raises(ValueError, match="unknown feature kind"):
        stattests.choose("text", 10)


def test_numeric_only_tests_refuse_categorical_bins():
    ref, cur, bins = categorical_fixture(0)
    for name in ("wasserstein", "ks"):
        with pytest.raises(ValueError, match="numeric"):
            stattests.get(name).score(ref, cur, bins)
    with pytest.raises(ValueError, match="categorical"):
        stattests.get("cramers_v").score(*numeric_fixture(0))
    with pytest.raises(ValueError, match="wasserstein"):
        stattests.score_all(["psi", "wasserstein"], ref, cur, bins)


def test_score_rejects_mismatched_or_empty_counts():
    ref, cur, bins = numeric_fixture(0)
    psi = stattests.get("psi")
    with pytest.raises(ValueError, match="bins"):
        psi.score(ref[:-1], cur[:-1], bins)  # one count short of the edges
    with pytest.raises(ValueError, match="reference has"):
        psi.score(ref, cur[:-1], bins)
    with pytest.raises(ValueError, match="all zero"):
        psi.score(ref, np.zeros_like(cur), bins)
    with pytest.raises(ValueError, match="non-negative"):
        psi.score(ref, -cur, bins)
    with pytest.raises(ValueError, match="strictly increasing"):
        Bins.numeric([1.0, 1.0, 2.0])


def test_drifted_direction_and_threshold():
    psi = stattests.get("psi")
    assert psi.drifted(0.25) and not psi.drifted(0.2) and psi.drifted(0.15, threshold=0.1)
    assert not psi.drifted(float("nan"))
    pvalue = stattests.StatTest("p", frozenset({"categorical"}), 0.05, False, "a p-value", lambda r, c, b: 1.0)
    assert pvalue.drifted(0.01) and not pvalue.drifted(0.5)


def test_registry_metadata():
    assert set(stattests.REGISTRY) == {"psi", "ks", "cramers_v", "jensen_shannon", "kl", "wasserstein", "hellinger"}
    defaults = {name: t.default_threshold for name, t in stattests.REGISTRY.items()}
    assert defaults == {"psi": 0.2, "ks": 0.15, "cramers_v": 0.1, "jensen_shannon": 0.1, "kl": 0.1,
                        "wasserstein": 0.1, "hellinger": 0.1}
    for test in stattests.REGISTRY.values():
        assert test.higher_is_drift and test.description and "\n" not in test.description
    with pytest.raises(ValueError, match="already registered"):
        stattests.register(stattests.get("psi"))


def test_rules_read_the_registry_tests_and_override_the_choice_per_column():
    from streaming.rules import RulesError, RuleSet

    rules = RuleSet.from_dict({"rules": [{"metric": "wasserstein", "threshold": 0.3, "severity": "warning"}],
                               "tests": {"transaction_amount": ["wasserstein", "hellinger"]}})
    assert rules.judge("transaction_amount", {"wasserstein": 0.5}, "ok").severity == "warning"
    assert rules.tests == {"transaction_amount": ("wasserstein", "hellinger")}
    profile = NumericProfile.build(np.random.default_rng(0).normal(size=2000))
    scores = stattests.score_column(profile, profile.counts, rules.tests["transaction_amount"])
    assert set(scores) == {"psi", "ks", "wasserstein", "hellinger"}  # the override, beside what rules always read
    with pytest.raises(RulesError, match="unknown stat test 'nope'; known: cramers_v"):
        RuleSet.from_dict({"tests": {"x": ["nope"]}})
