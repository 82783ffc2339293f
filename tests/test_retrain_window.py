"""The retrain's labelled window read from the real broker: predictions logged in the range joined with the
outcomes that arrived, by request_id — one row per request however often the log or the outcome repeated,
the newest outcome winning, unreadable events and unlabelled predictions left out, nothing outside the range."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from confluent_kafka import Producer

from lifecycle.retrain.controller import Controller
from lifecycle.retrain.policy import RetrainPolicy
from lifecycle.retrain.record import DecisionLog
from lifecycle.retrain.window import labelled_window, split
from mlops import events, outcomes
from mlops.connections import kafka_config
from mlops.schema import LABEL, MODEL_FEATURES, TIMESTAMP
from tests.test_retrain import alert, pipeline_file, weak_production
from tools.services import create_topics

pytestmark = [pytest.mark.integration]


def test_the_labelled_window_is_read_exactly_from_the_topics(workspace):
    settings = workspace.settings
    predictions, labels = f"win-pred-{uuid.uuid4().hex[:8]}", f"win-out-{uuid.uuid4().hex[:8]}"
    create_topics(settings.kafka_bootstrap, {predictions: 3, labels: 2})
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    features = {"total_purchases": 3.0, "avg_order_value": 40.0, "days_since_last_order": 2.0,
                "lifetime_value": 120.0}

    def predict(i: int, copies: int = 1) -> None:
        event = events.PredictionEvent(request_id=f"r{i}", timestamp=datetime.now(UTC), model_name="m",
                                       model_version="v1", customer_id=f"C{i}", prediction=0.25,
                                       features={**features, "transaction_amount": float(i)})
        for _ in range(copies):
            producer.produce(predictions, events.encode(event), key=f"C{i}".encode())

    def outcome(i: int, label: int) -> None:
        event = outcomes.OutcomeEvent(request_id=f"r{i}", label=label, timestamp=datetime.now(UTC))
        producer.produce(labels, outcomes.encode(event), key=f"r{i}".encode())

    for i in range(10):  # before the window
        predict(i)
        outcome(i, 1)
    assert producer.flush(30) == 0
    time.sleep(1.5)
    since = datetime.now(UTC)
    for i in range(10, 50):
        predict(i, copies=2 if i == 11 else 1)  # r11 logged twice (at-least-once)
    for i in range(10, 40):  # r40..r49 never get a label
        outcome(i, i % 2)
    outcome(12, 1)  # r12's label corrected: the newest wins
    producer.produce(predictions, b"{not json", key=b"x")
    producer.produce(labels, b"{not json", key=b"y")
    assert producer.flush(30) == 0
    time.sleep(1.5)
    until = datetime.now(UTC)
    for i in range(50, 60):  # after the window
        predict(i)
        outcome(i, 1)
    assert producer.flush(30) == 0

    window = labelled_window(kafka_config(settings), predictions, labels, since, until)
    assert sorted(window["request_id"]) == sorted(f"r{i}" for i in range(10, 40))
    labels_by_id = dict(zip(window["request_id"], window[LABEL], strict=True))
    assert labels_by_id["r12"] == 1 and labels_by_id["r13"] == 1 and labels_by_id["r14"] == 0
    assert list(window.columns) == ["request_id", TIMESTAMP, *MODEL_FEATURES, LABEL, "served_version",
                                    "served_prediction"]
    assert window[TIMESTAMP].is_monotonic_increasing and not window[list(MODEL_FEATURES)].isna().any().any()
    assert window.set_index("request_id").loc["r25", "transaction_amount"] == 25.0
    older, newest = split(window, 0.5)
    assert (len(older), len(newest)) == (15, 15) and older[TIMESTAMP].max() <= newest[TIMESTAMP].min()


def test_the_controller_acts_once_on_each_alert_of_the_topic_across_restarts(workspace, tmp_path):
    """Alerts on the real broker, the consumer loop twice: each alert decided once, the retrain handed to a
    rollout, the second run (a restart) deciding nothing again — the offsets were committed after the record."""
    name = "retrain_loop"
    registry = weak_production(tmp_path, name)
    topics = {kind: f"retrain-{kind}-{uuid.uuid4().hex[:8]}" for kind in ("alerts", "predictions", "outcomes")}
    create_topics(workspace.settings.kafka_bootstrap, {t: 1 for t in topics.values()})
    settings = workspace.settings.model_copy(update={f"{k}_topic": t for k, t in topics.items()})
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for body in (alert(model=name), alert(status="resolved", model=name), b"{not json",
                 alert("performance_alert", model=name), alert(model="another")):
        producer.produce(topics["alerts"], body if isinstance(body, bytes) else json.dumps(body).encode())
    assert producer.flush(30) == 0

    def run_once(seconds: float) -> int:
        controller = Controller(settings, registry, pipeline_file(tmp_path, name), RetrainPolicy(cooldown_s=0), name)
        return controller.run(max_seconds=seconds, poll_s=0.5)

    assert run_once(20) == 4  # four readable alerts, of which two trigger
    decided = DecisionLog(registry).decisions(name)
    assert [(d.tags["alert_id"].rsplit(":", 1)[0], d.tags["action"], d.tags["outcome"]) for d in decided] == [
        (f"{topics['alerts']}:0:3", "skip", "skip"), (f"{topics['alerts']}:0:0", "retrain", "rollout_started")]
    assert registry.rollout(name).id == decided[1].tags["rollout_id"]
    assert run_once(10) == 0  # a restart: nothing read again, nothing decided again
    assert len(DecisionLog(registry).decisions(name)) == 2
    # the topic deleted and made again: its first alert has offset 0 again, and is a new alert, not a duplicate
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    for future in admin.delete_topics([topics["alerts"]], operation_timeout=30).values():
        future.result()
    deadline = time.monotonic() + 60
    while topics["alerts"] in admin.list_topics(timeout=10).topics and time.monotonic() < deadline:
        time.sleep(0.5)
    create_topics(settings.kafka_bootstrap, {topics["alerts"]: 1})
    producer.produce(topics["alerts"], json.dumps(alert(model=name)).encode())
    assert producer.flush(30) == 0
    assert run_once(30) == 1
    newest = DecisionLog(registry).decisions(name)[0]
    assert newest.tags["alert_id"].startswith(f"{topics['alerts']}:0:0:") and newest.tags["alert_id"] != \
        decided[1].tags["alert_id"]
    assert (newest.tags["action"], newest.tags["rail"]) == ("skip", "rollout_active")  # decided, not "duplicate"


def test_a_controller_killed_mid_retrain_leaves_no_stuck_claim_and_no_second_retrain(workspace, tmp_path):
    """`mlops-retrain` SIGKILLed while its candidate trains: the claim stops beating; the next controller
    reads the same alert again (its offset was never committed), closes the claim and its training run as
    interrupted, and retrains once — one rollout, one new version."""
    name = "retrain_kill"
    registry = weak_production(tmp_path, name)
    backend = registry.backend
    slow = copy.deepcopy(pipeline_file(tmp_path, name).raw)
    next(s for s in slow["stages"] if s["name"] == "train")["params"] = {"n_estimators": 3000, "max_depth": 3}
    slow["retraining"] = {"cooldown": 0}
    (tmp_path / "slow.yaml").write_text(yaml.safe_dump(slow))
    fast = {**slow, "stages": copy.deepcopy(pipeline_file(tmp_path, name).raw["stages"])}
    (tmp_path / "fast.yaml").write_text(yaml.safe_dump(fast))
    topics = {kind: f"retrain-{kind}-{uuid.uuid4().hex[:8]}" for kind in ("alerts", "predictions", "outcomes")}
    create_topics(workspace.settings.kafka_bootstrap, {t: 1 for t in topics.values()})
    producer = Producer({"bootstrap.servers": workspace.settings.kafka_bootstrap})
    producer.produce(topics["alerts"], json.dumps(alert(model=name)).encode())
    assert producer.flush(30) == 0
    env = {**workspace.env, "MLOPS_MLFLOW_URI": backend.uri,
           **{f"MLOPS_{kind.upper()}_TOPIC": topic for kind, topic in topics.items()}}
    root = Path(__file__).resolve().parents[1]

    def controller(pipeline: str, seconds: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "lifecycle.retrain", "--pipeline", str(tmp_path / pipeline),
                                 "--model", name, "--lease-s", "3", "--metrics-port", "0", "--max-seconds",
                                 str(seconds)], cwd=root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)

    first = controller("slow.yaml", 300)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the claim is on record and the pipeline is training
        assert first.poll() is None, first.stdout.read().decode()[-3000:]
        running = [d for d in DecisionLog(registry).decisions(name) if d.status == "RUNNING"]
        if running and registry.client.search_runs([backend.experiment_id()],
                                                   filter_string=f"tags.retrain_decision = '{running[0].run_id}'"):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the retrain never started")
    time.sleep(1.0)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    time.sleep(3.5)  # past the lease: the claim is stale
    second = controller("fast.yaml", 120)  # (the dead member's partition moves after its 10 s session)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and second.poll() is None and \
            not any(d.tags.get("outcome") == "rollout_started" for d in DecisionLog(registry).decisions(name)):
        time.sleep(0.5)
    time.sleep(1.0)  # its offset commit, then a graceful stop
    second.send_signal(signal.SIGTERM)
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 0, out.decode()[-3000:]
    decided = DecisionLog(registry).decisions(name)
    assert [(d.tags["action"], d.tags["outcome"]) for d in decided] == [("retrain", "rollout_started"),
                                                                         ("retrain", "interrupted")]
    assert decided[0].tags["alert_id"] == decided[1].tags["alert_id"]
    assert decided[0].tags["alert_id"].startswith(f"{topics['alerts']}:0:0:")
    killed = registry.client.search_runs([backend.experiment_id()],
                                         filter_string=f"tags.retrain_decision = '{decided[1].run_id}'")
    assert [r.info.status for r in killed] == ["KILLED"]
    assert registry.rollout(name).candidate == decided[0].tags["candidate"]
    assert len(registry.list(name)) == 2  # Production and the one candidate
