"""Reads events back from a Kafka topic by id: used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import json
import time
from typing import Any

from kafka import KafkaConsumer, TopicPartition


def read_events(bootstrap: str, topic: str, wanted: set[str], timeout: float = 60, settle: float = 2.0,
                key: str = "request_id") -> list[dict[str, Any]]:
    """Every event on ``topic`` whose ``key`` is in ``wanted``, from the start of the topic.

    Waits until each wanted id was seen, then ``settle`` seconds more so that duplicates would show.
    """
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             value_deserializer=_loads)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        complete_at: float | None = None
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                found.extend(r.value for r in records if isinstance(r.value, dict) and r.value.get(key) in wanted)
            if complete_at is None and {e[key] for e in found} >= wanted:
                complete_at = time.monotonic()
            if complete_at is not None and time.monotonic() - complete_at >= settle:
                break
        return found
    finally:
        consumer.close()


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
