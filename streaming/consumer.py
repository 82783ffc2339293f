"""The streaming drift consumer: a Kafka consumer group on `predictions` that publishes drift alerts.

It runs on the stack's consumer runtime (:mod:`streaming.runtime`: ownership, checkpoint-then-commit,
dead letters, outages, re-seeding a Redis that lost its data). Per poll (up to ``batch_size`` messages) the
events are decoded and binned in batches (:mod:`streaming.absorb`) into their partition's time-slotted
histograms, saved with the offsets in one atomic script (:mod:`streaming.state_store`) before the commit.
Each ``request_id`` is counted once per partition within the window (the log delivers at least once): the
ids counted per slot are checkpointed with the slot (:mod:`streaming.dedupe`). Every ``eval_interval_s`` the
topic-wide windows (all partitions' checkpoints summed) are scored (PSI, KS, chi-square) and judged by the
rules; state changes become alerts on the alerts topic.

A Redis that lost its data (``FLUSHALL``, restarted empty) is not a takeover: the owner keys are gone rather
than someone else's. The consumer puts back from memory first the alert states it knew (set-if-absent, so no
evaluation re-announces an alert already sent), then every owned partition's whole checkpoint, and goes on
reading from where it was. A real takeover stops reading the partition until the group revokes it;
meanwhile ``mlops_drift_fenced_partitions``, ``mlops_drift_paused`` and the lag say so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis

from mlops import stattests
from streaming import metrics
from streaming.absorb import Absorber
from streaming.change_points import ChangePointConfig, ChangePoints
from streaming.events import PoisonEvent
from streaming.model_files import ProfileCache
from streaming.rules import SEVERITY_RANK, RuleSet
from streaming.runtime import Part, PartitionedConsumer, RuntimeConfig, RuntimeMetrics, SaveResult
from streaming.state_store import PartitionCheckpoint, StateStore
from streaming.window import Key, SlotHistograms, Window, WindowSpec, merged_windows

log = logging.getLogger(__name__)
RUNTIME_METRICS = RuntimeMetrics(
    broker_connected=metrics.BROKER_CONNECTED, store_up=metrics.CHECKPOINT_STORE_UP,
    checkpoint_failures=metrics.CHECKPOINT_FAILURES, commit_failures=metrics.COMMIT_FAILURES,
    paused=metrics.PAUSED, assigned=metrics.ASSIGNED, fenced=metrics.FENCED, rebalances=metrics.REBALANCES,
    store_resets=metrics.STORE_RESETS, dead_letters=metrics.DEAD_LETTERS,
    lag_set=lambda part, lag: metrics.LAG.labels(str(part[1])).set(lag),
    lag_remove=lambda part: metrics.LAG.remove(str(part[1])),
)


@dataclass
class ConsumerConfig:
    bootstrap: str | Mapping[str, Any] = field(repr=False)  # the servers, or mlops.connections.kafka_config
    topic: str = "predictions"
    alerts_topic: str = "drift-alerts"
    dlq_topic: str = "predictions-dlq"
    group_id: str = "drift-detector"
    window: WindowSpec = field(default_factory=WindowSpec)
    eval_interval_s: float = 2.0
    auto_offset_reset: str = "earliest"
    batch_size: int = 10_000  # messages per poll: one decode/bin pass and one checkpoint each
    poll_timeout_s: float = 0.5
    backoff_max_s: float = 5.0
    decision_threshold: float = 0.5
    change_points: ChangePointConfig = field(default_factory=ChangePointConfig)

    def runtime(self) -> RuntimeConfig:
        return RuntimeConfig(self.bootstrap, [self.topic], self.group_id, self.dlq_topic, self.eval_interval_s,
                             self.auto_offset_reset, self.batch_size, self.poll_timeout_s, self.backoff_max_s)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


class DriftConsumer(PartitionedConsumer):
    """The drift application on the consumer runtime (:mod:`streaming.runtime`): per partition, time-slotted
    histograms (:mod:`streaming.absorb`); every ``eval_interval_s`` the topic-wide windows scored and judged."""

    def __init__(self, config: ConsumerConfig, rules: RuleSet, store: StateStore, profiles: ProfileCache) -> None:
        self.config = config
        self.rules = rules
        self.store = store
        self.profiles = profiles
        self.absorber = Absorber(profiles.get, config.window, config.decision_threshold)
        self.alert_memory: dict[Key, str] = {}  # last alert state seen or set: re-seeds the store after a flush
        self.change_points = ChangePoints(config.change_points)
        super().__init__(config.runtime(), RUNTIME_METRICS)

    # -- the runtime's hooks ----------------------------------------------------------------------

    def claim(self, part: Part) -> PartitionCheckpoint:
        epoch, ckpt = self.store.claim(part[1])
        if ckpt is None:  # first time for this group: Kafka's committed offset (or auto_offset_reset) decides
            ckpt = PartitionCheckpoint(offset=None, consumed=0, dead_lettered=0, windows=SlotHistograms(),
                                       epoch=epoch)
        return ckpt

    def save(self, todo: dict[Part, PartitionCheckpoint], reseed: set[Part] | frozenset[Part] = frozenset()
             ) -> SaveResult:
        topic = self.config.topic
        saved = self.store.save({p: c for (_, p), c in todo.items()}, reseed={p for _, p in reseed})
        return SaveResult([(topic, p) for p in saved.fenced], [(topic, p) for p in saved.lost])

    def ping(self) -> None:
        self.store.ping()

    def absorb(self, raws: list[bytes | None], parts: list[Part], offsets: list[int], now: float
               ) -> list[tuple[int, PoisonEvent]]:
        states = {p: c for (_, p), c in self.partitions.items()}
        return self.absorber.absorb(raws, [p for _, p in parts], states, now)

    def absorbed(self, part: Part, state: PartitionCheckpoint, now: float) -> None:
        state.windows.expire(self.config.window.first_slot(now))

    def reseed(self, saved: SaveResult) -> SaveResult:
        """Put back what only this consumer knows, from memory: the alert states first, so no evaluation sees
        windows without the state they had reached (it would announce their alerts again), then every owned
        partition's whole checkpoint, atomically. Reading goes on from the in-memory offsets: nothing re-read."""
        restored = self.store.alerts.restore(self.alert_memory)
        for p, ckpt in self.partitions.items():
            if ckpt.offset is not None and p not in saved.fenced:
                ckpt.windows.mark_all_dirty()
        log.warning("re-seeding %s alert states from memory", restored)
        return super().reseed(saved)

    # -- judging ----------------------------------------------------------------------------------

    def evaluate(self) -> list[dict[str, Any]]:
        """Score the topic-wide windows, publish alerts for state changes; returns the alerts sent."""
        metrics.STATE_CELLS.set(sum(s.windows.cells() for s in self.partitions.values()))
        try:
            return self._evaluate()
        except redis.RedisError as exc:
            metrics.CHECKPOINT_STORE_UP.set(0)
            log.debug("evaluation skipped, Redis unavailable: %s", exc)
            return []

    def _evaluate(self) -> list[dict[str, Any]]:
        checkpoints = self.store.load_all()
        lost = [p for p, c in self.partitions.items()
                if c.offset is not None and p[1] not in checkpoints and p not in self.unsaved]
        if lost:  # saved before, gone now: Redis lost its data. Re-seed first; judge on the next evaluation.
            self.unsaved.update(lost)
            self.checkpoint_now()
            return []
        now = time.time()
        windows = merged_windows([c.windows for c in checkpoints.values()], self.config.window, now)
        sent = []
        for (name, version, column), window in sorted(windows.items()):
            profile = self.profiles.get(name, version)
            if profile is None or column not in profile.columns:
                continue
            scores = stattests.score_column(profile.columns[column], window.counts, self.rules.tests.get(column))
            for metric, value in scores.items():
                metrics.DRIFT_SCORE.labels(name, version, column, metric).set(value)
            metrics.WINDOW_SAMPLES.labels(name, version, column).set(window.n)
            if window.n < self.rules.min_samples:
                continue
            self._change_point((name, version, column), scores, window, now)
            if (name, version, column) in self.alerts_in_flight:
                continue
            current = self._alert_state((name, version, column))
            verdict = self.rules.judge(column, scores, current)  # type: ignore[arg-type]
            metrics.DRIFT_STATE.labels(name, version, column).set(SEVERITY_RANK[verdict.severity])
            if verdict.severity == current:
                continue
            previous = self.store.alerts.transition((name, version, column), verdict.severity)
            self.alert_memory[(name, version, column)] = verdict.severity
            if previous is None:  # another consumer of the group already made this change
                continue
            alert = {
                "type": "drift_alert",
                "status": "resolved" if verdict.severity == "ok" else "firing",
                "model_name": name, "model_version": version, "feature": column,
                "metric": verdict.rule.metric if verdict.rule else None,
                "value": verdict.value if verdict.rule else max(scores.values()),
                "threshold": verdict.rule.threshold if verdict.rule else None,
                "severity": verdict.severity, "previous_severity": previous,
                "scores": scores, "sample_size": window.n,
                "window_start": _iso(window.first_slot * self.config.window.slot_seconds),
                "window_end": _iso((window.last_slot + 1) * self.config.window.slot_seconds),
                "timestamp": _iso(now), "consumer_group": self.config.group_id,
            }
            if verdict.rule is None:  # resolved: report the rule of the state being left
                alert["metric"], alert["value"], alert["threshold"] = self._resolved_context(column, scores, previous)
            self.publish_alert(self.config.alerts_topic, (name, version, column), alert, previous, _sent)
            sent.append(alert)
        return sent

    def _change_point(self, key: Key, scores: dict[str, float], window: Window, now: float) -> None:
        """Feed the score to the feature's change detector; a change becomes one ``drift_change_point`` event
        per ``cooldown_s`` for the whole group (:mod:`streaming.change_points`)."""
        scaled = self.change_points.update(key, scores)
        if scaled is None:
            return
        name, version, column = key
        config = self.config.change_points
        metrics.CHANGE_POINTS.labels(name, version, column).inc()
        if not self.store.alerts.claim_once(("change", *key), config.cooldown_s):
            return  # another consumer of the group announced it
        event = {
            "type": "drift_change_point", "status": "info", "severity": "info",
            "model_name": name, "model_version": version, "feature": column,
            "detector": config.detector, "metric": config.metric, "value": scores[config.metric],
            "scaled_value": scaled, "sample_size": window.n,
            "window_start": _iso(window.first_slot * self.config.window.slot_seconds),
            "window_end": _iso((window.last_slot + 1) * self.config.window.slot_seconds),
            "timestamp": _iso(now), "consumer_group": self.config.group_id,
        }

        def done(ok: bool) -> None:
            if ok:
                metrics.CHANGE_POINT_EVENTS.labels(name, version, column).inc()
                log.info("drift change point: %s", event)

        self.publish_event(self.config.alerts_topic, ("change", *key), event, done)

    def _alert_state(self, key: Key) -> str:
        """The stored state; one this consumer knew but the store lost (a flush) is put back first, set-if-absent,
        so the alert it stands for is not announced a second time."""
        stored = self.store.alerts.stored(key)
        if stored is None and self.alert_memory.get(key, "ok") != "ok":
            self.store.alerts.restore({key: self.alert_memory[key]})
            stored = self.store.alerts.stored(key)
            log.warning("alert state of %s was lost from Redis; put back %s", ":".join(key), stored)
        self.alert_memory[key] = stored or "ok"
        return self.alert_memory[key]

    def revert_alert(self, key: tuple[str, ...], previous: str) -> None:
        self.alert_memory[key] = previous  # type: ignore[index]
        try:
            self.store.alerts.revert(key, previous)
        except redis.RedisError:
            log.error("could not revert the alert state of %s", ":".join(key))

    def _resolved_context(self, column: str, scores: dict[str, float], previous: str) -> tuple:
        for rule in self.rules.rules:
            if rule.severity == previous and rule.applies_to(column) and rule.metric in scores:
                return rule.metric, scores[rule.metric], rule.threshold
        return None, None, None


def _sent(alert: dict[str, Any]) -> None:
    metrics.ALERTS.labels(alert["severity"], alert["status"]).inc()
    log.info("drift alert: %s", alert)
