"""Reads events back from a Kafka topic by id: used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from mlops.connections import bootstrap_config


def read_events(bootstrap: str | Mapping[str, Any], topic: str, wanted: set[str], timeout: float = 60,
                settle: float = 2.0, key: str = "request_id", message_key_as: str | None = None
                ) -> list[dict[str, Any]]:
    """Every event on ``topic`` whose ``key`` is in ``wanted``, from the start of the topic.

    ``message_key_as``: also put each message's Kafka key (decoded, or None) into its event under this name.

    Waits until each wanted id was seen, then ``settle`` seconds more so that duplicates would show.
    ``bootstrap``: the servers, or ``mlops.connections.kafka_config`` (credentials and TLS).
    """
    consumer = Consumer({**bootstrap_config(bootstrap), "group.id": f"reader-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "log_level": 2})
    try:
        metadata = consumer.list_topics(topic, timeout=30).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(metadata.partitions)])
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        complete_at: float | None = None
        while time.monotonic() < deadline:
            for message in consumer.consume(num_messages=10_000, timeout=0.2):
                if message.error() is None:
                    value = _loads(message.value())
                    if isinstance(value, dict) and value.get(key) in wanted:
                        if message_key_as:
                            raw_key = message.key()
                            value[message_key_as] = raw_key.decode() if raw_key is not None else None
                        found.append(value)
            if complete_at is None and {e[key] for e in found} >= wanted:
                complete_at = time.monotonic()
            if complete_at is not None and time.monotonic() - complete_at >= settle:
                break
        return found
    finally:
        consumer.close()


def _loads(raw: bytes | None) -> Any:
    try:
        return json.loads(raw) if raw is not None else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def tail(bootstrap: str | Mapping[str, Any], topic: str) -> Consumer:
    """A consumer on every partition of ``topic`` from its current end: what arrives from now on."""
    consumer = Consumer({**bootstrap_config(bootstrap), "group.id": f"tail-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "log_level": 2})
    partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
    ends = [consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in partitions]
    consumer.assign([TopicPartition(topic, p, end) for p, end in zip(partitions, ends, strict=True)])
    return consumer


def new_events(consumer: Consumer, timeout: float = 0.5) -> list[dict[str, Any]]:
    """What a :func:`tail` consumer has received since it was last asked (JSON objects only)."""
    found = [_loads(m.value()) for m in consumer.consume(1000, timeout=timeout) if m.error() is None]
    return [value for value in found if isinstance(value, dict)]
