"""Row-level training/serving skew (streaming/skew.py, `mlops-drift skew`): logged prediction features against
Feast's offline store at the prediction's time, on the real broker, Redis and the workspace's Feast repo; with
--publish, the check recorded (Redis, metrics) and a skew alert on entering and leaving skew, once each."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from mlops.connections import kafka_config, redis_options
from mlops.schema import STORE_FEATURES
from streaming import metrics, skew
from tests.drift_support import TopicReader, producer
from tests.support import feast_features
from tools.services import create_topics

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def served_events(workspace, n: int, wrong: int) -> list[bytes]:
    """Prediction events as the service writes them for ``n`` customers, the first ``wrong`` of them scored
    with an avg_order_value the offline store never had (a broken online row)."""
    customers = sorted(workspace.dataset.latest_customers()["customer_id"])[:n]
    now = datetime.now(UTC).isoformat()
    events = []
    for i, (customer, stats) in enumerate(zip(customers, feast_features(workspace, customers), strict=True)):
        features = {**stats, "transaction_amount": 50.0}
        if i < wrong:
            features["avg_order_value"] = features["avg_order_value"] * 1.5 + 1
        events.append(json.dumps({"request_id": uuid.uuid4().hex, "timestamp": now, "model_name": "fraud_detector",
                                  "model_version": "v1", "customer_id": customer, "features": features,
                                  "prediction": 0.1, "label": 0}).encode())
    return events


def skew_cli(workspace, topic: str, *args: str, alerts: str = "drift-alerts") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streaming", "skew", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env={**workspace.env, "MLOPS_PREDICTIONS_TOPIC": topic,
                                            "MLOPS_ALERTS_TOPIC": alerts, "MLOPS_SKEW_MIN_ROWS": "50"})


def topic_with(workspace, events: list[bytes], topic: str | None = None) -> str:
    """The events on a 3-partition topic, round robin (the check reads the newest third of --sample of each)."""
    if topic is None:
        topic = f"skew-{uuid.uuid4().hex[:8]}"
        create_topics(workspace.settings.kafka_bootstrap, {topic: 3})
    p = producer(workspace)
    for i, event in enumerate(events):
        p.produce(topic, event, key=uuid.uuid4().hex.encode(), partition=i % 3)
    assert p.flush(30) == 0
    return topic


def test_a_broken_online_row_shows_as_skew_of_that_feature_only_and_clean_rows_as_none(workspace):
    alerts_topic = f"skew-alerts-{uuid.uuid4().hex[:8]}"
    create_topics(workspace.settings.kafka_bootstrap, {alerts_topic: 1})
    alerts = TopicReader(workspace.settings.kafka_bootstrap, alerts_topic)
    topic = topic_with(workspace, served_events(workspace, 60, wrong=10))
    run = skew_cli(workspace, topic, "--sample", "60", "--json", "--publish", alerts=alerts_topic)
    assert run.returncode == 1, run.stderr
    report = json.loads(run.stdout)
    assert report["sampled"] == 60 and report["skewed"] == ["avg_order_value"]
    assert report["versions"] == {"fraud_detector:v1": pytest.approx(10 / 60)}
    by_feature = {f["feature"]: f for f in report["features"]}
    assert set(by_feature) == set(STORE_FEATURES)
    assert by_feature["avg_order_value"]["differing"] == 10 and by_feature["avg_order_value"]["rows"] == 60
    assert all(f["differing"] == 0 and f["missing_offline"] == 0 for name, f in by_feature.items()
               if name != "avg_order_value")
    fired = alerts.wait_for(lambda a: a["type"] == "skew_alert", 30, "the skew alert")
    assert (fired["feature"], fired["status"], fired["severity"], fired["rows"]) == ("avg_order_value", "firing",
                                                                                     "warning", 60)
    assert fired["share"] == pytest.approx(10 / 60) and fired["threshold"] == 0.01

    # Recorded: the latest check in Redis (the report and `quality` read it), the metrics; recording the same
    # check again (another round, another replica) announces nothing new.
    client = redis.Redis(**redis_options(workspace.settings))
    last = skew.latest(client, topic)
    assert last is not None and last.skewed == ["avg_order_value"] and last.sampled == 60
    recorder = skew.SkewRecorder(client, topic, kafka_config(workspace.settings), alerts_topic, 50)
    assert recorder.record(last) == []
    assert metrics.SKEW_SHARE.labels("avg_order_value")._value.get() == pytest.approx(10 / 60)
    assert metrics.SKEW_STATE.labels("avg_order_value")._value.get() == 1

    # Served features equal to the offline store's, newer: no skew (the table), and the alert resolves, once.
    # Each customer twice at one time (as a batch logs them): Feast answers such a pair once, every row counts.
    topic_with(workspace, served_events(workspace, 30, wrong=0) * 2, topic)
    run = skew_cli(workspace, topic, "--sample", "60", "--publish", alerts=alerts_topic)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "skewed (share > 0.01): none" in run.stdout
    resolved = alerts.wait_for(lambda a: a["status"] == "resolved", 30, "the resolved skew alert")
    assert (resolved["feature"], resolved["previous_severity"]) == ("avg_order_value", "warning")
    time.sleep(1)
    assert len([a for a in alerts.poll(0.5) if a["type"] == "skew_alert"]) == 2
    alerts.close()
    run = skew_cli(workspace, topic_with(workspace, []))
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "no prediction events" in run.stderr


def test_a_share_hovering_at_the_threshold_does_not_flap():
    f = skew.FeatureSkew("x", 200, 3, 0.015, 1.0, 0)
    assert skew.skew_state("ok", f, 0.01, 100) == "warning"
    assert skew.skew_state("ok", skew.FeatureSkew("x", 99, 50, 0.5, 1.0, 0), 0.01, 100) is None, "too few rows"
    for share in (0.009, 0.006, 0.0051):  # below the threshold, above half of it: stays
        assert skew.skew_state("warning", skew.FeatureSkew("x", 200, 1, share, 1.0, 0), 0.01, 100) is None
    assert skew.skew_state("warning", skew.FeatureSkew("x", 200, 1, 0.005, 1.0, 0), 0.01, 100) == "ok"
