"""The outcome join: a consumer group on `predictions` and `prediction-outcomes` that joins each outcome to
its prediction by ``request_id`` and keeps realised quality per model version (:mod:`streaming.quality`).

It runs on the stack's consumer runtime (:mod:`streaming.runtime`): one poll's events are decoded here and
applied to the shared join state in Redis by one script together with the offsets (:mod:`streaming.join_store`),
before the commit. Outcomes may come before their prediction, long after it (up to the horizon), twice, or
never; a repeat of either side is recognised and never counted twice; a ``kill -9`` anywhere loses nothing and
counts nothing twice. Unusable events go to the dead-letter topic with the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis

from mlops import outcomes
from streaming import metrics, quality
from streaming.events import PoisonEvent, decode_batch, poison_from
from streaming.join_store import JoinCheckpoint, JoinSettings, JoinStore
from streaming.runtime import Part, PartitionedConsumer, RuntimeConfig, RuntimeMetrics, SaveResult

log = logging.getLogger(__name__)
RUNTIME_METRICS = RuntimeMetrics(
    broker_connected=metrics.JOIN_BROKER_CONNECTED, store_up=metrics.JOIN_STORE_UP,
    checkpoint_failures=metrics.JOIN_CHECKPOINT_FAILURES, commit_failures=metrics.JOIN_COMMIT_FAILURES,
    paused=metrics.JOIN_PAUSED, assigned=metrics.JOIN_ASSIGNED, fenced=metrics.JOIN_FENCED,
    rebalances=metrics.JOIN_REBALANCES, store_resets=metrics.JOIN_STORE_RESETS, dead_letters=metrics.JOIN_DEAD_LETTERS,
    lag_set=lambda part, lag: metrics.JOIN_LAG.labels(part[0], str(part[1])).set(lag),
    lag_remove=lambda part: metrics.JOIN_LAG.remove(part[0], str(part[1])),
)


@dataclass
class JoinConfig:
    bootstrap: str | Mapping[str, Any] = field(repr=False)
    predictions_topic: str = "predictions"
    outcomes_topic: str = "prediction-outcomes"
    dlq_topic: str = "prediction-outcomes-dlq"
    group_id: str = "outcome-join"
    join: JoinSettings = field(default_factory=JoinSettings)
    eval_interval_s: float = 5.0
    batch_size: int = 10_000
    poll_timeout_s: float = 0.5

    def runtime(self) -> RuntimeConfig:
        return RuntimeConfig(self.bootstrap, [self.predictions_topic, self.outcomes_topic], self.group_id,
                             self.dlq_topic, self.eval_interval_s, batch_size=self.batch_size,
                             poll_timeout_s=self.poll_timeout_s)


class JoinConsumer(PartitionedConsumer):
    def __init__(self, config: JoinConfig, store: JoinStore) -> None:
        self.config = config
        self.store = store
        self.last: dict[str, dict[str, Any]] = {}  # the latest realised metrics per "name:version"
        super().__init__(config.runtime(), RUNTIME_METRICS)

    # -- the runtime's hooks ----------------------------------------------------------------------

    def claim(self, part: Part) -> JoinCheckpoint:
        return self.store.claim(part)

    def save(self, todo: dict[Part, JoinCheckpoint], reseed: set[Part] | frozenset[Part] = frozenset()
             ) -> SaveResult:
        return self.store.save(todo, reseed)

    def ping(self) -> None:
        self.store.ping()

    def absorb(self, raws: list[bytes | None], parts: list[Part], offsets: list[int], now: float
               ) -> list[tuple[int, PoisonEvent]]:
        predictions = [i for i, p in enumerate(parts) if p[0] == self.config.predictions_topic]
        poison: list[tuple[int, PoisonEvent]] = []
        if predictions:
            events, positions, bad = decode_batch([raws[i] for i in predictions])
            for event, j in zip(events, positions, strict=True):
                i = predictions[j]
                self.partitions[parts[i]].items.append(
                    [offsets[i], "P", event.request_id, f"{event.model_name}:{event.model_version}",
                     event.prediction, event.timestamp.timestamp()])
            poison += [(predictions[j], exc) for j, exc in bad]
            metrics.JOIN_READ.labels("prediction").inc(len(events))
        n_outcomes = 0
        for i, p in enumerate(parts):
            if p[0] == self.config.predictions_topic:
                continue
            raw = raws[i]
            try:
                if not raw:
                    raise ValueError("empty message")
                event = outcomes.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                poison.append((i, poison_from(exc)))
                continue
            if not 1 <= event.schema_version <= outcomes.SCHEMA_VERSION:
                poison.append((i, PoisonEvent("unsupported_schema_version", f"schema_version {event.schema_version}")))
                continue
            self.partitions[p].items.append([offsets[i], "O", event.request_id, event.label,
                                             event.timestamp.timestamp(), event.outcome_value])
            n_outcomes += 1
        metrics.JOIN_READ.labels("outcome").inc(n_outcomes)
        return poison

    # -- judging ----------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, dict[str, Any]]:
        """Realised quality per model version over the time window, into the metrics."""
        s = self.config.join
        first_slot = int(time.time() // s.slot_s) - s.window_slots + 1
        try:
            slots = self.store.slots(first_slot)
            counts = self.store.counts()
        except redis.RedisError as exc:
            log.debug("evaluation skipped, Redis unavailable: %s", exc)
            return self.last
        self.last = window_metrics(slots, s.bins)
        for key, values in self.last.items():
            name, version = key.split(":", 1)
            for metric, value in values.items():
                if value is not None:
                    metrics.QUALITY.labels(name, version, metric).set(value)
        for kind, n in counts.items():
            metrics.JOIN_TOTALS.labels(kind).set(n)
        return self.last


def window_metrics(slots: dict[tuple[str, int], dict[str, float]], bins: int) -> dict[str, dict[str, Any]]:
    """Realised metrics per "name:version" from its slots' sums."""
    by_version: dict[str, list[dict[str, float]]] = {}
    for (version, _), sums in slots.items():
        by_version.setdefault(version, []).append(sums)
    return {version: quality.realised(quality.merge(sums), bins) for version, sums in sorted(by_version.items())}
