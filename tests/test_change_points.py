"""Change points on the drift score stream (streaming/change_points.py): river's detectors, fed scaled scores."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis
from river import drift

from streaming.alert_state import AlertStates
from streaming.change_points import ChangePointConfig, ChangePoints
from tests.test_drift_cli_errors import assert_one_line, mlops_drift

KEY = ("fraud_detector", "v1", "transaction_amount")


def psi_stream(levels: list[tuple[float, int]], noise: float = 0.005, seed: int = 0) -> list[float]:
    """PSI values as a consumer sees them: a level per phase, with evaluation-to-evaluation noise."""
    rng = np.random.default_rng(seed)
    return [max(0.0, level + rng.normal(0, noise)) for level, n in levels for _ in range(n)]


def detections(points: ChangePoints, values: list[float]) -> list[int]:
    return [i for i, v in enumerate(values) if points.update(KEY, {"psi": v}) is not None]


def test_page_hinkley_is_rivers_own_on_scores_scaled_by_the_metric_threshold():
    values = psi_stream([(0.02, 60), (0.3, 20)])
    ours = detections(ChangePoints(ChangePointConfig()), values)
    reference = drift.PageHinkley(min_instances=30, delta=0.05, threshold=1.0, mode="up")
    theirs = []
    for i, v in enumerate(values):
        reference.update(v / 0.2)  # psi's default threshold
        if reference.drift_detected:
            theirs.append(i)
    assert ours == theirs and ours and 60 <= ours[0] <= 65, (ours, theirs)


def test_a_level_change_below_the_alert_threshold_is_a_change_point():
    """0.02 -> 0.12 never crosses PSI's 0.2 warning, so no threshold rule fires; the detector finds it."""
    values = psi_stream([(0.02, 100), (0.12, 30)])
    found = detections(ChangePoints(ChangePointConfig()), values)
    assert max(values) < 0.2 and found and 100 <= found[0] <= 110, found


@pytest.mark.parametrize("seed", range(5))
def test_a_steady_score_is_never_a_change_point(seed):
    values = psi_stream([(0.03, 2000)], noise=0.01, seed=seed)
    assert detections(ChangePoints(ChangePointConfig()), values) == []


def test_a_falling_score_is_no_change_point_for_page_hinkley():
    """A recovery is what the resolved alerts say; mode "up" watches for rises only."""
    assert detections(ChangePoints(ChangePointConfig()), psi_stream([(0.4, 60), (0.02, 60)])) == []


def test_adwin_finds_a_step_either_way():
    up = detections(ChangePoints(ChangePointConfig(detector="adwin")), psi_stream([(0.02, 200), (0.3, 100)]))
    down = detections(ChangePoints(ChangePointConfig(detector="adwin")), psi_stream([(0.3, 200), (0.02, 100)]))
    assert up and 200 <= up[0] < 264, up  # ADWIN checks every 32 updates (its clock)
    assert down and 200 <= down[0] < 264, down


def test_off_and_missing_or_nan_scores_feed_nothing():
    off = ChangePoints(ChangePointConfig(detector="off"))
    assert detections(off, psi_stream([(0.02, 60), (0.5, 60)])) == [] and not off.detectors
    points = ChangePoints(ChangePointConfig(min_instances=1))
    assert points.update(KEY, {"ks": 0.9}) is None and points.update(KEY, {"psi": float("nan")}) is None
    assert not points.detectors


def test_each_feature_has_its_own_detector():
    points = ChangePoints(ChangePointConfig(min_instances=5))
    other = ("fraud_detector", "v1", "avg_order_value")
    found = []
    for v in psi_stream([(0.02, 40), (0.4, 10)]):
        if points.update(KEY, {"psi": v}) is not None:
            found.append("shifted")
        if points.update(other, {"psi": 0.02}) is not None:
            found.append("steady")
    assert found and set(found) == {"shifted"}, found


@pytest.mark.parametrize("kwargs, message", [
    ({"detector": "cusum"}, "unknown change detector"),
    ({"metric": "nope"}, "unknown stat test"),
    ({"threshold": 0}, "threshold > 0"),
    ({"cooldown_s": 0}, "cooldown_s"),
])
def test_bad_configuration_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ChangePointConfig(**kwargs)


@pytest.mark.parametrize("env, message", [
    ({"MLOPS_DRIFT_CHANGE_METRIC": "nope"}, "unknown stat test"),
    ({"MLOPS_DRIFT_CHANGE_DETECTOR": "cusum"}, "MLOPS_DRIFT_CHANGE_DETECTOR"),
])
def test_a_bad_change_setting_stops_the_consumer_with_one_line(env, message):
    assert_one_line(mlops_drift("consume", "--max-seconds", "5", env=env), message)


@pytest.mark.integration
def test_one_claim_per_cooldown_on_the_real_redis(workspace):
    states = AlertStates(redis.Redis(port=workspace.settings.redis_port), f"test-{time.time_ns()}")
    key = ("change", *KEY)
    assert states.claim_once(key, 0.5) is True
    assert states.claim_once(key, 0.5) is False  # a second consumer that detected the same change
    assert states.claim_once(("change", "fraud_detector", "v1", "prediction"), 0.5) is True
    time.sleep(0.7)
    assert states.claim_once(key, 0.5) is True
