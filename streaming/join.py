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
from datetime import UTC, datetime
from typing import Any

import msgspec
import numpy as np
import redis

from mlops import outcomes
from mlops.calibration import Calibration
from streaming import metrics, quality
from streaming.events import PoisonEvent, decode_batch, poison_from
from streaming.join_store import JoinCheckpoint, JoinSettings, JoinStore
from streaming.model_files import ProfileCache
from streaming.runtime import Part, PartitionedConsumer, RuntimeConfig, RuntimeMetrics, SaveResult

log = logging.getLogger(__name__)
BASELINE_METRICS = ("accuracy", "auc", "precision", "recall", "f1", "brier")
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
    alerts_topic: str = "drift-alerts"
    drop: float = 0.05  # a performance alert when accuracy or AUC is this much (relative) below the holdout's
    min_labels: int = 200  # realised quality judged from this many labelled predictions in the window
    min_predictions: int = 500  # estimated quality judged from this many predictions
    join: JoinSettings = field(default_factory=JoinSettings)
    eval_interval_s: float = 5.0
    batch_size: int = 10_000
    poll_timeout_s: float = 0.5

    def runtime(self) -> RuntimeConfig:
        return RuntimeConfig(self.bootstrap, [self.predictions_topic, self.outcomes_topic], self.group_id,
                             self.dlq_topic, self.eval_interval_s, batch_size=self.batch_size,
                             poll_timeout_s=self.poll_timeout_s)


class JoinConsumer(PartitionedConsumer):
    def __init__(self, config: JoinConfig, store: JoinStore,
                 calibrations: ProfileCache[Calibration] | None = None,
                 baselines: ProfileCache[dict[str, float]] | None = None) -> None:
        self.config = config
        self.store = store
        self.calibrations = calibrations or ProfileCache(lambda name, version: None)
        self.baselines = baselines or ProfileCache(lambda name, version: None)
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
            calibrated = self._calibrated(events)
            for event, j, p_cal in zip(events, positions, calibrated, strict=True):
                i = predictions[j]
                self.partitions[parts[i]].items.append(
                    [offsets[i], "P", event.request_id, f"{event.model_name}:{event.model_version}",
                     event.prediction, event.timestamp.timestamp(), p_cal])
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

    def _calibrated(self, events: list) -> list[float | None]:
        """Each prediction's calibrated probability (None for a version without a calibration: no estimate)."""
        out: list[float | None] = [None] * len(events)
        by_version: dict[tuple[str, str], list[int]] = {}
        for k, event in enumerate(events):
            by_version.setdefault((event.model_name, event.model_version), []).append(k)
        for (name, version), where in by_version.items():
            calibration = self.calibrations.get(name, version)
            if calibration is None:
                continue
            for k, p in zip(where, calibration.apply(np.array([events[k].prediction for k in where])).tolist(),
                            strict=True):
                out[k] = p
        return out

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
        for key, kinds in self.last.items():
            name, version = key.split(":", 1)
            baseline = self.baselines.get(name, version) or {}
            for metric, value in baseline.items():
                if metric in BASELINE_METRICS:
                    metrics.QUALITY_BASELINE.labels(name, version, metric).set(value)
            try:
                self._judge(name, version, kinds, baseline)
            except redis.RedisError as exc:
                log.debug("judging skipped, Redis unavailable: %s", exc)
            for kind, values in kinds.items():
                for metric, value in values.items():
                    if value is not None:
                        metrics.QUALITY.labels(name, version, kind, metric).set(value)
        for kind, n in counts.items():
            metrics.JOIN_TOTALS.labels(kind).set(n)
        return self.last


    def _judge(self, name: str, version: str, kinds: dict[str, dict[str, Any]], baseline: dict[str, float]) -> None:
        """Performance alerts on the alerts topic: accuracy or AUC, realised (critical) or estimated (warning),
        more than ``drop`` below the version's holdout; resolved once back within half of it."""
        c = self.config
        for kind, metric in JUDGED:
            values = kinds[kind]
            sample = values["labelled"] if kind == "realised" else values["predictions"]
            key = (name, version, kind, metric)
            if sample < (c.min_labels if kind == "realised" else c.min_predictions) or key in self.alerts_in_flight:
                continue
            severity = "critical" if kind == "realised" else "warning"
            current = self.store.alerts.get(key)
            new = judge(current, values.get(metric), baseline.get(metric), c.drop, severity)
            if new is None:
                continue
            previous = self.store.alerts.transition(key, new)
            if previous is None:  # another consumer of the group made this change
                continue
            alert = {"type": "performance_alert", "status": "resolved" if new == "ok" else "firing",
                     "model_name": name, "model_version": version, "kind": kind, "metric": metric,
                     "value": values[metric], "baseline": baseline[metric],
                     "threshold": baseline[metric] * (1 - c.drop),
                     "severity": new, "previous_severity": previous, "sample_size": sample,
                     "window_seconds": c.join.slot_s * c.join.window_slots,
                     "timestamp": datetime.now(UTC).isoformat(), "consumer_group": c.group_id}
            self.publish_alert(c.alerts_topic, key, alert, previous, _sent)

    def revert_alert(self, key: tuple[str, ...], previous: str) -> None:
        try:
            self.store.alerts.revert(key, previous)
        except redis.RedisError:
            log.error("could not revert the alert state of %s", ":".join(key))


JUDGED = (("realised", "accuracy"), ("realised", "auc"), ("estimated", "accuracy"), ("estimated", "auc"))


def judge(current: str, value: float | None, baseline: float | None, drop: float, severity: str) -> str | None:
    """The new alert state, or None when it stays: enter below ``baseline * (1 - drop)``, leave only above
    ``baseline * (1 - drop / 2)`` (a value hovering at the threshold does not flap)."""
    if value is None or not baseline:
        return None
    if current == "ok" and value < baseline * (1 - drop):
        return severity
    if current != "ok" and value > baseline * (1 - drop / 2):
        return "ok"
    return None


def _sent(alert: dict[str, Any]) -> None:
    metrics.PERFORMANCE_ALERTS.labels(alert["severity"], alert["status"]).inc()
    log.info("performance alert: %s", alert)


def window_metrics(slots: dict[tuple[str, int], dict[str, float]], bins: int) -> dict[str, dict[str, Any]]:
    """Per "name:version": ``realised`` (joined pairs) and ``estimated`` (CBPE, every prediction) metrics."""
    by_version: dict[str, list[dict[str, float]]] = {}
    for (version, _), sums in slots.items():
        by_version.setdefault(version, []).append(sums)
    out = {}
    for version, parts in sorted(by_version.items()):
        sums = quality.merge(parts)
        out[version] = {"realised": quality.realised(sums, bins), "estimated": quality.estimated(sums, bins)}
    return out
