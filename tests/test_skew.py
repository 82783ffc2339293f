"""Row-level training/serving skew (streaming/skew.py, `mlops-drift skew`): logged prediction features against
Feast's offline store at the prediction's time, on the real broker and the workspace's Feast repo."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mlops.schema import STORE_FEATURES
from tests.drift_support import producer
from tests.harness import feast_features
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


def skew_cli(workspace, topic: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streaming", "skew", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env={**workspace.env, "MLOPS_PREDICTIONS_TOPIC": topic})


def topic_with(workspace, events: list[bytes]) -> str:
    topic = f"skew-{uuid.uuid4().hex[:8]}"
    create_topics(workspace.settings.kafka_bootstrap, {topic: 3})
    p = producer(workspace)
    for event in events:
        p.produce(topic, event, key=uuid.uuid4().hex.encode())
    assert p.flush(30) == 0
    return topic


def test_a_broken_online_row_shows_as_skew_of_that_feature_only_and_clean_rows_as_none(workspace):
    topic = topic_with(workspace, served_events(workspace, 60, wrong=10))
    run = skew_cli(workspace, topic, "--sample", "200", "--json")
    assert run.returncode == 1, run.stderr
    report = json.loads(run.stdout)
    assert report["sampled"] == 60 and report["skewed"] == ["avg_order_value"]
    by_feature = {f["feature"]: f for f in report["features"]}
    assert set(by_feature) == set(STORE_FEATURES)
    assert by_feature["avg_order_value"]["differing"] == 10 and by_feature["avg_order_value"]["rows"] == 60
    assert all(f["differing"] == 0 and f["missing_offline"] == 0 for name, f in by_feature.items()
               if name != "avg_order_value")
    # Served features equal to the offline store's: no skew (the table), and a topic with no events: exit 2.
    run = skew_cli(workspace, topic_with(workspace, served_events(workspace, 40, wrong=0)))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "skewed (share > 0.01): none" in run.stdout
    run = skew_cli(workspace, topic_with(workspace, []))
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "no prediction events" in run.stderr
