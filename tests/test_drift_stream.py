"""The streaming drift consumer against real Kafka and Redis (and the real serving path)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer

from lifecycle import data as datamod
from lifecycle import model_store
from mlops.onnx_contract import INPUT_NAME, positive_proba
from mlops.schema import MODEL_FEATURES, STORE_FEATURES
from streaming.state_store import StateStore
from tests.harness import Workspace, metric_value, start_consumer, start_server
from tools.services import create_topics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WINDOW_ARGS = ("--slot-seconds", "1", "--window-seconds", "120", "--max-events", "600")
SHIFTED = "transaction_amount"


@dataclass
class Topics:
    predictions: str
    alerts: str
    dlq: str
    group: str

    @property
    def env(self) -> dict[str, str]:
        return {"MLOPS_PREDICTIONS_TOPIC": self.predictions, "MLOPS_ALERTS_TOPIC": self.alerts,
                "MLOPS_DLQ_TOPIC": self.dlq, "MLOPS_DRIFT_EVAL_INTERVAL_S": "0.5"}


@pytest.fixture
def topics(workspace: Workspace) -> Topics:
    suffix = uuid.uuid4().hex[:8]
    t = Topics(f"predictions-{suffix}", f"alerts-{suffix}", f"dlq-{suffix}", f"drift-{suffix}")
    create_topics(workspace.settings.kafka_bootstrap, {t.predictions: 3, t.alerts: 1, t.dlq: 1})
    return t


class TopicReader:
    """Everything that arrived on a topic so far, read by a real consumer."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                      auto_offset_reset="earliest")
        self.messages: list[dict] = []

    def poll(self, seconds: float = 0.5) -> list[dict]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for records in self.consumer.poll(timeout_ms=100).values():
                self.messages.extend(json.loads(r.value) for r in records)
        return self.messages

    def wait_for(self, predicate, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.poll(0.3):
                if predicate(message):
                    return message
        pytest.fail(f"timed out waiting for {what}; got {self.messages}")

    def close(self) -> None:
        self.consumer.close()


def consumed(ws: Workspace, topics: Topics) -> int:
    store = StateStore(redis.Redis(port=ws.settings.redis_port), topics.group, topics.predictions)
    return sum(c.consumed for c in store.load_all([0, 1, 2]).values())


def wait_consumed(ws: Workspace, topics: Topics, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if consumed(ws, topics) >= n:
            return
        time.sleep(0.3)
    pytest.fail(f"consumer reflected {consumed(ws, topics)} of {n} events within {timeout}s")


def sample_rows(ws: Workspace, n: int, seed: int, amount_factor: float = 1.0) -> list[dict]:
    frame = datamod.training_frame(ws.dataset).sample(n, replace=True, random_state=seed)
    frame = frame.assign(transaction_amount=frame["transaction_amount"] * amount_factor)
    return frame.to_dict("records")


def firing(alerts: list[dict], feature: str) -> list[dict]:
    """Alerts that entered the drifted state (escalations warning -> critical are separate messages)."""
    return [a for a in alerts if a["feature"] == feature and a["status"] == "firing" and a["previous_severity"] == "ok"]


def test_serving_traffic_shift_alerts_once_then_resolves(workspace, topics):
    server = start_server(workspace, topics.env)
    consumer = start_consumer(workspace, {**topics.env}, "--group", topics.group, *WINDOW_ARGS)
    alerts = TopicReader(workspace.settings.kafka_bootstrap, topics.alerts)

    def send(rows: list[dict]) -> None:
        for i in range(0, len(rows), 200):
            body = {"requests": [{"customer_id": r["customer_id"], "transaction_amount": float(r["transaction_amount"])}
                                 for r in rows[i:i + 200]]}
            r = httpx.post(f"{server.url}/predict_batch", json=body, timeout=60)
            assert r.status_code == 200, r.text

    try:
        send(sample_rows(workspace, 1200, seed=1))
        wait_consumed(workspace, topics, 1200)
        assert alerts.poll(2.0) == [], "reference-like traffic raised an alert"

        send(sample_rows(workspace, 1200, seed=2, amount_factor=4.0))
        alert = alerts.wait_for(lambda a: a["feature"] == SHIFTED and a["status"] == "firing", 60, "firing alert")
        wait_consumed(workspace, topics, 2400)
        alerts.poll(3.0)
        assert len(firing(alerts.messages, SHIFTED)) == 1, alerts.messages
        unshifted_inputs = set(MODEL_FEATURES) - {SHIFTED}
        assert not [a for a in alerts.messages if a["feature"] in unshifted_inputs], alerts.messages
        assert alert["model_name"] == "fraud_detector" and alert["model_version"] == "v1"
        assert alert["severity"] == "critical" and alert["metric"] == "psi" and alert["value"] > 0.2
        assert alert["threshold"] == 0.2 and alert["sample_size"] >= 500 and alert["previous_severity"] == "ok"
        assert alert["window_start"] < alert["window_end"] and alert["scores"]["ks"] > 0.15

        send(sample_rows(workspace, 1800, seed=3))
        resolved = alerts.wait_for(lambda a: a["feature"] == SHIFTED and a["status"] == "resolved", 60,
                                   "resolved alert")
        assert resolved["severity"] == "ok" and resolved["previous_severity"] in ("warning", "critical")
        assert len(firing(alerts.messages, SHIFTED)) == 1

        text = httpx.get(f"http://127.0.0.1:{consumer.metrics_port}/metrics").text
        assert metric_value(text, "mlops_drift_events_consumed_total") == 4200
        assert metric_value(text, "mlops_drift_score", f'feature="{SHIFTED}",metric="psi"') >= 0
        assert metric_value(text, "mlops_drift_alerts_emitted_total", 'status="firing"') >= 1
        assert "mlops_drift_consumer_lag" in text
    finally:
        alerts.close()
        consumer.stop()
        server.stop()
    assert consumer.process.returncode == 0, consumer.log()[-3000:]


def make_events(ws: Workspace, n: int, seed: int, amount_factor: float = 1.0) -> list[dict]:
    """Prediction events as the service writes them, scored by the stored ONNX model."""
    rows = sample_rows(ws, n, seed, amount_factor)
    x = np.array([[r[f] for f in MODEL_FEATURES] for r in rows], dtype=np.float32)
    session = ort.InferenceSession(str(model_store.load("fraud_detector", "v1").onnx_path))
    scores = positive_proba(session.run(None, {INPUT_NAME: x}))
    return [{"request_id": uuid.uuid4().hex, "model_name": "fraud_detector", "model_version": "v1",
             "customer_id": r["customer_id"], "features": {f: float(r[f]) for f in MODEL_FEATURES},
             "prediction": float(s), "label": int(s >= 0.5), "latency_ms": 1.0}
            for r, s in zip(rows, scores, strict=True)]


def produce(ws: Workspace, topic: str, events: list[dict], chunk: int = 250, pause: float = 0.0) -> None:
    producer = KafkaProducer(bootstrap_servers=ws.settings.kafka_bootstrap, acks="all")
    for i in range(0, len(events), chunk):
        for event in events[i:i + chunk]:
            stamped = {**event, "timestamp": datetime.now(UTC).isoformat()}
            producer.send(topic, key=event["customer_id"].encode(), value=json.dumps(stamped).encode())
        producer.flush()
        time.sleep(pause)
    producer.close()


def wait_assigned(*consumers, timeout: float = 60) -> None:
    for c in consumers:
        if not c.wait_assigned(timeout):
            pytest.fail(f"consumer never got partitions:\n{c.log()[-2000:]}")


def test_killed_consumer_resumes_without_losing_or_double_counting(workspace, topics):
    events = make_events(workspace, 1500, seed=4) + make_events(workspace, 1500, seed=5, amount_factor=4.0)
    first = start_consumer(workspace, topics.env, "--group", topics.group, *WINDOW_ARGS)
    wait_assigned(first)
    produce(workspace, topics.predictions, events[:1750], pause=0.2)
    first.kill()  # SIGKILL mid-stream: no chance to checkpoint or commit
    reflected_at_kill = consumed(workspace, topics)
    produce(workspace, topics.predictions, events[1750:], pause=0.2)
    second = start_consumer(workspace, topics.env, "--group", topics.group, *WINDOW_ARGS)
    alerts = TopicReader(workspace.settings.kafka_bootstrap, topics.alerts)
    try:
        wait_consumed(workspace, topics, len(events), timeout=90)
        time.sleep(3)
        assert consumed(workspace, topics) == len(events), "events counted twice after the restart"
        assert 0 < reflected_at_kill < len(events)
        alerts.wait_for(lambda a: a["feature"] == SHIFTED and a["status"] == "firing", 30, "firing alert")
        alerts.poll(2.0)
        assert len(firing(alerts.messages, SHIFTED)) == 1, alerts.messages
        store = StateStore(redis.Redis(port=workspace.settings.redis_port), topics.group, topics.predictions)
        latest = [a for a in alerts.messages if a["feature"] == SHIFTED][-1]
        assert store.alert_state("fraud_detector", "v1", SHIFTED) == latest["severity"]
        assert [a["severity"] for a in alerts.messages if a["feature"] == SHIFTED] in (["critical"],
                                                                                      ["warning", "critical"])
    finally:
        alerts.close()
        second.stop()


def test_poison_messages_go_to_the_dead_letter_topic(workspace, topics):
    consumer = start_consumer(workspace, topics.env, "--group", topics.group, *WINDOW_ARGS)
    dlq = TopicReader(workspace.settings.kafka_bootstrap, topics.dlq)
    try:
        wait_assigned(consumer)
        good = make_events(workspace, 50, seed=6)
        unknown = {**good[0], "model_version": "v999"}
        missing = {k: v for k, v in good[1].items() if k != "prediction"}
        lacking = {**good[2], "features": {f: 1.0 for f in STORE_FEATURES}}
        producer = KafkaProducer(bootstrap_servers=workspace.settings.kafka_bootstrap, acks="all")
        now = datetime.now(UTC).isoformat()
        for raw in (b"{oops", json.dumps({**unknown, "timestamp": now}).encode(),
                    json.dumps({**missing, "timestamp": now}).encode(),
                    json.dumps({**lacking, "timestamp": now}).encode()):
            producer.send(topics.predictions, raw)
        producer.close()
        produce(workspace, topics.predictions, good)
        wait_consumed(workspace, topics, 50)
        deadline = time.monotonic() + 30
        while len(dlq.poll(0.5)) < 4 and time.monotonic() < deadline:
            pass
        reasons = sorted(m["reason"] for m in dlq.messages)
        assert reasons == ["bad_json", "missing_field", "missing_field", "unknown_model_version"], dlq.messages
        assert all(m["raw"] and m["topic"] == topics.predictions for m in dlq.messages)
        assert consumed(workspace, topics) == 50
        assert consumer.process.poll() is None, "a poison message crashed the consumer"
        text = httpx.get(f"http://127.0.0.1:{consumer.metrics_port}/metrics").text
        assert metric_value(text, "mlops_drift_dead_letters_total") == 4
    finally:
        dlq.close()
        consumer.stop()


def test_two_consumers_share_partitions_and_alert_once(workspace, topics):
    a = start_consumer(workspace, topics.env, "--group", topics.group, *WINDOW_ARGS)
    b = start_consumer(workspace, topics.env, "--group", topics.group, *WINDOW_ARGS)
    alerts = TopicReader(workspace.settings.kafka_bootstrap, topics.alerts)
    try:
        wait_assigned(a, b)
        time.sleep(3)  # let the group settle on its final assignment
        events = make_events(workspace, 1500, seed=7, amount_factor=4.0)
        produce(workspace, topics.predictions, events, pause=0.1)
        wait_consumed(workspace, topics, len(events))
        alerts.wait_for(lambda m: m["feature"] == SHIFTED and m["status"] == "firing", 30, "firing alert")
        alerts.poll(3.0)
        assert len(firing(alerts.messages, SHIFTED)) == 1, alerts.messages
        assert consumed(workspace, topics) == len(events)
        counts = [metric_value(httpx.get(f"http://127.0.0.1:{c.metrics_port}/metrics").text,
                               "mlops_drift_events_consumed_total") for c in (a, b)]
        assert sum(counts) == len(events) and min(counts) > 0, counts  # both consumers did part of the work
    finally:
        alerts.close()
        a.stop()
        b.stop()
