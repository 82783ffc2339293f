"""confluent-kafka (librdkafka) settings and helpers for the drift consumer: configs, backoff, statistics.

Why librdkafka: on this repo's benchmark (bench/kafka_clients.py, docs/benchmarks.md) it consumes and
produces several times more events per CPU second than kafka-python, and it reconnects by itself with
backoff through a broker outage of any length instead of raising from ``commit()``.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Mapping
from typing import Any

import msgspec

from mlops.connections import bootstrap_config, durable_producer_config

log = logging.getLogger(__name__)


class RepeatFilter(logging.Filter):
    """Lets one of a kind through per ``every_s``: through a broker outage librdkafka reports each failed
    reconnect (several a second, per connection), which would bury everything else in the log."""

    def __init__(self, every_s: float = 30.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        kind = re.sub(r"\d+", "#", record.getMessage())
        now = time.monotonic()
        if now - self._last.get(kind, -1e9) < self.every_s:
            return False
        if len(self._last) > 1000:
            self._last.clear()
        self._last[kind] = now
        return True


librdkafka_log = logging.getLogger("librdkafka")
librdkafka_log.addFilter(RepeatFilter())


def consumer_config(connection: str | Mapping[str, Any], group_id: str, auto_offset_reset: str,
                    **callbacks: Any) -> dict[str, Any]:
    return {
        **bootstrap_config(connection),
        "group.id": group_id,
        "enable.auto.commit": False,  # offsets are committed only after the Redis checkpoint holds them
        "enable.auto.offset.store": False,
        "auto.offset.reset": auto_offset_reset,
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 2_000,
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 2_000,
        "statistics.interval.ms": 1_000,
        # librdkafka backs a partition's fetching off for this long once its local queue is full (default 1 s):
        # with a consumer that is the bottleneck, that idles it; a short backoff keeps the queue flowing.
        "fetch.queue.backoff.ms": 10,
        "logger": librdkafka_log,
        **callbacks,
    }


def producer_config(connection: str | Mapping[str, Any], **callbacks: Any) -> dict[str, Any]:
    """Alerts and dead letters: the stack's durable producer (``durable_producer_config``: a message waits out
    a broker outage of any length instead of failing)."""
    return {
        **durable_producer_config(connection),
        "linger.ms": 5,
        "reconnect.backoff.max.ms": 2_000,
        "logger": librdkafka_log,
        **callbacks,
    }


class Backoff:
    """Exponential backoff with jitter: ``ready()`` says whether to try now, ``failed()``/``succeeded()`` move it."""

    def __init__(self, first_s: float = 0.1, max_s: float = 5.0) -> None:
        self.first_s, self.max_s = first_s, max_s
        self.delay = 0.0
        self.next_at = 0.0
        self.failures = 0

    def ready(self) -> bool:
        return time.monotonic() >= self.next_at

    def failed(self) -> float:
        self.failures += 1
        self.delay = min(self.max_s, self.first_s if self.delay == 0 else self.delay * 2)
        wait = self.delay * random.uniform(0.8, 1.2)
        self.next_at = time.monotonic() + wait
        return wait

    def succeeded(self) -> None:
        self.delay, self.next_at, self.failures = 0.0, 0.0, 0


class _Broker(msgspec.Struct):
    nodeid: int = -1
    state: str = ""


class _Partition(msgspec.Struct):
    hi_offset: int = -1


class _Topic(msgspec.Struct):
    partitions: dict[str, _Partition] = {}


class _Stats(msgspec.Struct):
    brokers: dict[str, _Broker] = {}
    topics: dict[str, _Topic] = {}


_stats_decoder = msgspec.json.Decoder(_Stats)


def read_stats(raw: str, topic: str) -> tuple[bool, dict[int, int]]:
    """From librdkafka's statistics JSON: whether a real broker connection is up, and the partitions' high
    watermarks (for the lag gauge) — no extra request to the broker."""
    stats = _stats_decoder.decode(raw)
    connected = any(b.nodeid >= 0 and b.state == "UP" for b in stats.brokers.values())
    parts = stats.topics.get(topic, _Topic()).partitions
    return connected, {int(p): v.hi_offset for p, v in parts.items() if int(p) >= 0 and v.hi_offset >= 0}
