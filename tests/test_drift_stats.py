"""PSI, KS and chi-square against hand-computed and scipy values; windows, memory bounds, rules, events."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from mlops import stats
from mlops.profile import NumericProfile, ReferenceProfile, build_profile
from streaming.events import PoisonEvent, parse
from streaming.rules import Rule, RulesError, RuleSet
from streaming.window import SlotHistograms, WindowSpec, merged_windows


def test_psi_hand_computed():
    expected = 0.4 * math.log(0.9 / 0.5) + (-0.4) * math.log(0.1 / 0.5)
    assert stats.psi([50, 50], [90, 10]) == pytest.approx(expected, rel=1e-9)
    assert stats.psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0, abs=1e-12)


def test_psi_empty_bin_is_large_but_finite():
    value = stats.psi([50, 50, 0], [40, 40, 20])
    assert math.isfinite(value) and value > 0.5


def test_chi_square_matches_scipy():
    ref, cur = np.array([500, 300, 200]), np.array([40, 35, 25])
    stat, p = stats.chi_square(ref, cur)
    expected = sps.chisquare(cur, ref / ref.sum() * cur.sum())
    assert stat == pytest.approx(expected.statistic) and p == pytest.approx(expected.pvalue)


def test_ks_exact_is_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 500), rng.normal(0.3, 1, 400)
    assert stats.ks_exact(a, b) == pytest.approx(tuple(sps.ks_2samp(a, b))[:2])


@pytest.mark.parametrize("shift", [0.0, 0.1, 0.3, 0.6, 1.5])
def test_histogram_ks_approximates_exact_ks(shift):
    """The binned KS never exceeds the exact one and is within 0.03 of it with the profile's 40 bins."""
    rng = np.random.default_rng(2)
    reference = rng.lognormal(3, 0.6, 20_000)
    current = rng.lognormal(3 + shift, 0.6, 1_000)
    profile = NumericProfile.build(reference)
    approx = stats.ks_from_histograms(profile.counts, stats.histogram(profile.edges, current))
    exact = sps.ks_2samp(reference, current).statistic
    assert approx <= exact + 1e-12
    assert exact - approx <= 0.03, (exact, approx)


def test_bins_are_open_ended_and_cover_everything():
    edges = np.array([1.0, 2.0, 3.0])
    assert stats.bin_index(edges, np.array([-1e9, 1.0, 1.5, 3.0, 3.1, 1e9])).tolist() == [0, 0, 1, 2, 3, 3]


def test_psi_groups_balance_reference_mass():
    profile = NumericProfile.build(np.random.default_rng(3).normal(size=10_000))
    grouped = stats.proportions(stats.regroup(profile.counts, profile.psi_starts))
    assert 8 <= len(grouped) <= 10
    assert grouped.min() > 0.07


def test_profile_round_trips_and_includes_prediction_and_label():
    rng = np.random.default_rng(4)
    profile = build_profile("m", "v1", {"x": rng.normal(size=500), "kind": rng.choice(["a", "b"], 500)},
                            rng.random(500))
    again = ReferenceProfile.from_bytes(profile.to_bytes())
    assert set(again.columns) == {"x", "kind", "prediction", "label"}
    assert again.columns["kind"].kind == "categorical" and again.columns["label"].categories == ["0", "1"]
    assert np.array_equal(again.columns["x"].edges, profile.columns["x"].edges)


def test_window_evicts_old_slots_and_caps_events():
    spec = WindowSpec(slot_seconds=1, window_seconds=5, max_events=None)
    h = SlotHistograms()
    key = ("m", "v1", "x")
    for slot in range(100, 110):
        h.add(key, slot, np.array([0, 1, 1]), 3)
    window = merged_windows([h], spec, now=109.5)[key]
    assert (window.first_slot, window.last_slot, window.n) == (105, 109, 15)
    capped = merged_windows([h], WindowSpec(1, 5, max_events=6), now=109.5)[key]
    assert (capped.first_slot, capped.n) == (108, 6)
    h.expire(spec.first_slot(109.5))
    assert sorted(h.slots[key]) == [105, 106, 107, 108, 109]


def test_partitions_sum_into_one_window():
    a, b = SlotHistograms(), SlotHistograms()
    key = ("m", "v1", "x")
    a.add(key, 10, np.array([0, 0]), 2)
    b.add(key, 10, np.array([1]), 2)
    assert merged_windows([a, b], WindowSpec(1, 5), now=10.2)[key].counts.tolist() == [2, 1]


def test_memory_is_bounded_whatever_the_traffic():
    spec = WindowSpec(slot_seconds=1, window_seconds=10)
    h = SlotHistograms()
    rng = np.random.default_rng(5)
    for second in range(1_000):  # 1000 s of traffic at 200 events/s
        h.add(("m", "v1", "x"), second, rng.integers(0, 41, 200), 41)
        h.expire(spec.first_slot(second))
    assert h.cells() <= spec.n_slots * 41
    assert sum(len(h.slot_blob(s)) for s in h.slot_numbers()) < 10_000


def test_rules_escalate_hold_in_hysteresis_band_and_resolve():
    rules = RuleSet.default()
    assert rules.judge("x", {"psi": 0.05, "ks": 0.05}, "ok").severity == "ok"
    assert rules.judge("x", {"psi": 0.15, "ks": 0.05}, "ok").severity == "warning"
    verdict = rules.judge("x", {"psi": 0.25, "ks": 0.3}, "ok")
    assert verdict.severity == "critical" and verdict.rule.metric == "psi" and verdict.value == 0.25
    assert rules.judge("x", {"psi": 0.18, "ks": 0.05}, "critical").severity == "critical"  # 0.18 > 0.2*0.8
    assert rules.judge("x", {"psi": 0.12, "ks": 0.05}, "critical").severity == "warning"
    assert rules.judge("x", {"psi": 0.05, "ks": 0.05}, "warning").severity == "ok"
    assert rules.judge("x", {"ks": 0.16}, "ok").severity == "warning"


def test_rules_file(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("min_samples: 50\nrules:\n  - {metric: chi2_pvalue, op: '<', threshold: 0.001, "
                    "severity: critical, columns: [label]}\n")
    rules = RuleSet.load(path)
    assert rules.min_samples == 50
    assert rules.rules == [Rule("chi2_pvalue", 0.001, "critical", "<", ("label",))]
    assert rules.judge("label", {"chi2_pvalue": 1e-6}, "ok").severity == "critical"
    assert rules.judge("x", {"chi2_pvalue": 1e-6}, "ok").severity == "ok"
    path.write_text("rules:\n  - {metric: entropy, threshold: 1, severity: critical}\n")
    with pytest.raises(RulesError, match="invalid rule"):
        RuleSet.load(path)
    with pytest.raises(RulesError, match="cannot read"):
        RuleSet.load(tmp_path / "missing.yaml")


GOOD = {"request_id": "r1", "model_name": "m", "model_version": "v1", "timestamp": "2026-11-23T07:00:00+00:00",
        "features": {"x": 1.0}, "prediction": 0.3, "label": 0}


@pytest.mark.parametrize(("raw", "reason"), [
    (b"{not json", "bad_json"),
    (b"[1, 2]", "bad_json"),
    (None, "bad_json"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "features"}).encode(), "missing_field"),
    (json.dumps({**GOOD, "prediction": "high"}).encode(), "bad_field"),
    (json.dumps({**GOOD, "features": {"x": None}}).encode(), "bad_field"),
    (json.dumps({**GOOD, "timestamp": "yesterday"}).encode(), "bad_field"),
    (json.dumps({**GOOD, "label": 7}).encode(), "bad_field"),
    (json.dumps({**GOOD, "features": {"x": True}}).encode(), "bad_field"),
    (json.dumps({**GOOD, "schema_version": 99}).encode(), "unsupported_schema_version"),
    (b"", "bad_json"),
])
def test_poison_events_have_reasons(raw, reason):
    with pytest.raises(PoisonEvent) as info:
        parse(raw)
    assert info.value.reason == reason


def test_good_event_parses_and_version_defaults_to_1():
    event = parse(json.dumps(GOOD).encode())
    assert event.features == {"x": 1.0} and event.prediction == 0.3 and event.label == 0
    assert event.schema_version == 1 and event.timestamp.timestamp() == 1795417200.0


def _wire(ts: float, x: float, label: int | None = 0, version: str = "v1", **extra) -> bytes:
    from datetime import UTC, datetime

    from mlops.events import PredictionEvent, encode

    event = PredictionEvent(request_id=f"r{ts}-{x}", timestamp=datetime.fromtimestamp(ts, UTC), model_name="m",
                            model_version=version, features={"x": x, **extra}, prediction=x / 100, label=label)
    return encode(event)


def test_absorb_bins_a_batch_like_one_event_at_a_time_and_poison_spares_its_neighbours():
    from streaming.absorb import Absorber
    from streaming.state_store import PartitionCheckpoint

    rng = np.random.default_rng(6)
    profile = build_profile("m", "v1", {"x": rng.normal(50, 10, 5_000)}, rng.random(5_000))
    spec = WindowSpec(slot_seconds=10, window_seconds=100)
    now = 1_000_000.0
    values = rng.normal(50, 15, 400)
    times = now - rng.uniform(0, 30, 400)  # four slots
    raws: list[bytes | None] = [_wire(float(t), float(v), label=None if k % 7 == 0 else int(v > 50))
                                for k, (t, v) in enumerate(zip(times, values, strict=True))]
    parts = [k % 2 for k in range(400)]
    bad = {3: (b"{oops", "bad_json"), 50: (None, "bad_json"), 51: (_wire(now, 1.0, version="v9"),
           "unknown_model_version"), 52: (b'{"request_id": "r"}', "missing_field"),
           53: (_wire(now, 1.0).replace(b'"x":1.0', b'"y":1.0'), "missing_field"), 399: (b"[]", "bad_json")}
    for k, (raw, _) in bad.items():
        raws[k] = raw
    states = {p: PartitionCheckpoint(0, 0, 0, SlotHistograms()) for p in (0, 1)}
    poison = Absorber(lambda name, version: profile if version == "v1" else None, spec).absorb(
        raws, parts, states, now)
    assert sorted((k, e.reason) for k, e in poison) == sorted((k, reason) for k, (_, reason) in bad.items())
    good = [k for k in range(400) if k not in bad]
    for p in (0, 1):
        mine = [k for k in good if parts[k] == p]
        assert states[p].consumed == len(mine)
        for slot, counts in states[p].windows.slots[("m", "v1", "x")].items():
            in_slot = [k for k in mine if spec.slot_of(times[k]) == slot]
            assert counts.tolist() == stats.histogram(profile.columns["x"].edges, values[in_slot]).tolist()
        labels = sum(states[p].windows.slots[("m", "v1", "label")].values())
        expected = [int(values[k] / 100 >= 0.5) if k % 7 == 0 else int(values[k] > 50) for k in mine]
        assert labels.tolist() == [expected.count(0), expected.count(1), 0]
        assert states[p].windows.dirty == set(states[p].windows.slot_numbers())


def test_checkpoint_slot_blobs_round_trip():
    h = SlotHistograms()
    h.add(("m", "v1", "x"), 5, np.array([0, 2, 2]), 4)
    h.add(("m", "v1", "label"), 5, np.array([1]), 3)
    h.add(("m", "v1", "x"), 6, np.array([3]), 4)
    again = SlotHistograms.from_blobs({s: h.slot_blob(s) for s in h.slot_numbers()})
    assert {k: {s: c.tolist() for s, c in v.items()} for k, v in again.slots.items()} == \
        {k: {s: c.tolist() for s, c in v.items()} for k, v in h.slots.items()}
