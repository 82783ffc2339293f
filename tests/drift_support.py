"""What the drift consumer tests share: per-test topics, scored events, a producer, a topic reader, checkpoints."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import onnxruntime as ort
import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from lifecycle import data as datamod
from lifecycle import model_store
from mlops.onnx_contract import INPUT_NAME, positive_proba
from mlops.schema import MODEL_FEATURES
from streaming.state_store import PartitionCheckpoint, StateStore
from tests.support import Workspace
from tools.services import create_topics

WINDOW_ARGS = ("--slot-seconds", "1", "--window-seconds", "120", "--max-events", "600")
SHIFTED = "transaction_amount"
PARTITIONS = 3


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


def new_topics(ws: Workspace) -> Topics:
    suffix = uuid.uuid4().hex[:8]
    t = Topics(f"predictions-{suffix}", f"alerts-{suffix}", f"dlq-{suffix}", f"drift-{suffix}")
    create_topics(ws.settings.kafka_bootstrap, {t.predictions: PARTITIONS, t.alerts: 1, t.dlq: 1})
    return t


class TopicReader:
    """Everything that arrived on a topic so far (all partitions from the beginning), read by a real consumer."""

    def __init__(self, bootstrap: str, topic: str, partitions: int = 1) -> None:
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex[:8]}",
                                  "enable.auto.commit": False})
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        self.messages: list[dict] = []
        self.by_partition: dict[int, list[dict]] = {p: [] for p in range(partitions)}

    def poll(self, seconds: float = 0.5) -> list[dict]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for m in self.consumer.consume(1000, 0.1):
                if m.error() is None:
                    body = json.loads(m.value())
                    self.messages.append(body)
                    self.by_partition[m.partition()].append(body)
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


def store(ws: Workspace, topics: Topics) -> StateStore:
    return StateStore(redis.Redis(port=ws.settings.redis_port), topics.group, topics.predictions)


def checkpoints(ws: Workspace, topics: Topics) -> dict[int, PartitionCheckpoint]:
    return store(ws, topics).load_all(list(range(PARTITIONS)))


def consumed(ws: Workspace, topics: Topics) -> int:
    return sum(c.consumed for c in checkpoints(ws, topics).values())


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


def producer(ws: Workspace) -> Producer:
    """Idempotent, acks=all, no delivery timeout: an event waits out a broker outage and lands exactly once."""
    return Producer({"bootstrap.servers": ws.settings.kafka_bootstrap, "acks": "all", "enable.idempotence": True,
                     "linger.ms": 5, "message.timeout.ms": 0, "logger": logging.getLogger("test-producer")})


def stamped(event: dict) -> bytes:
    return json.dumps({**event, "timestamp": datetime.now(UTC).isoformat()}).encode()


def produce(ws: Workspace, topic: str, events: list[dict], chunk: int = 250, pause: float = 0.0) -> None:
    p = producer(ws)
    for i in range(0, len(events), chunk):
        for event in events[i:i + chunk]:
            p.produce(topic, stamped(event), key=event["customer_id"].encode())
        assert p.flush(60) == 0
        time.sleep(pause)


class Feeder:
    """Produces events at a steady rate in the background (new request id each), through any outage; knows
    which request ids the broker acknowledged."""

    def __init__(self, ws: Workspace, topic: str, events: list[dict], rate: float) -> None:
        self.producer = producer(ws)
        self.topic, self.events, self.rate = topic, events, rate
        self.sent: list[str] = []
        self.delivered: list[str] = []
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Feeder:
        self._thread.start()
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.stop()
        else:  # the test failed already: do not wait out a broker that may be down
            self.stop(timeout=5, check=False)

    def _on_delivery(self, err, msg) -> None:
        (self.failed if err is not None else self.delivered).append(json.loads(msg.value())["request_id"])

    def _run(self) -> None:
        i = 0
        started = time.monotonic()
        while not self._stop.is_set():
            event = {**self.events[i % len(self.events)], "request_id": uuid.uuid4().hex}
            self.producer.produce(self.topic, stamped(event), key=event["customer_id"].encode(),
                                  on_delivery=self._on_delivery)
            self.sent.append(event["request_id"])
            i += 1
            self.producer.poll(0)
            time.sleep(max(0.0, started + i / self.rate - time.monotonic()))

    def stop(self, timeout: float = 120, check: bool = True) -> None:
        """Stops producing and waits until every event sent was acknowledged (or failed)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        left = self.producer.flush(timeout)
        assert left == 0 or not check, f"{left} events still unacknowledged after {timeout}s"


def wait_assigned(*consumers, timeout: float = 60) -> None:
    for c in consumers:
        if not c.wait_assigned(timeout):
            pytest.fail(f"consumer never got partitions:\n{c.log()[-2000:]}")
