"""The streaming drift consumer: a Kafka consumer group on `predictions` that publishes drift alerts.

Per poll: events are binned into the reference profile of the model version they name and added to
their partition's time-slotted histograms; then the partitions' windows and offsets are checkpointed to
Redis in one transaction, and only then are the offsets committed to Kafka. Every ``eval_interval_s`` the
topic-wide windows (all partitions' checkpoints summed) are scored (PSI, KS, chi-square) and judged by the
rules; state changes become alerts on the alerts topic. Poison events go to the dead-letter topic.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.errors import KafkaError

from streaming import metrics, stats
from streaming.events import PoisonEvent, PredictionEvent, parse
from streaming.profile import ColumnProfile, NumericProfile, ReferenceProfile
from streaming.rules import SEVERITY_RANK, RuleSet
from streaming.state_store import PartitionCheckpoint, StateStore
from streaming.window import SlotHistograms, WindowSpec, merged_windows

log = logging.getLogger(__name__)


@dataclass
class ConsumerConfig:
    bootstrap: str
    topic: str = "predictions"
    alerts_topic: str = "drift-alerts"
    dlq_topic: str = "predictions-dlq"
    group_id: str = "drift-detector"
    window: WindowSpec = field(default_factory=WindowSpec)
    eval_interval_s: float = 2.0
    auto_offset_reset: str = "earliest"
    max_poll_records: int = 2000


class ProfileCache:
    """Reference profiles by (model name, version); unknown versions are re-checked every 30 s."""

    def __init__(self, loader, retry_s: float = 30.0) -> None:
        self._loader = loader
        self._retry_s = retry_s
        self._known: dict[tuple[str, str], ReferenceProfile] = {}
        self._missing: dict[tuple[str, str], float] = {}

    def get(self, name: str, version: str) -> ReferenceProfile | None:
        key = (name, version)
        if key in self._known:
            return self._known[key]
        if time.monotonic() - self._missing.get(key, -1e9) < self._retry_s:
            return None
        profile = self._loader(name, version)
        if profile is None:
            self._missing[key] = time.monotonic()
        else:
            self._known[key] = profile
        return profile


def column_scores(profile: ColumnProfile, counts: np.ndarray) -> dict[str, float]:
    if isinstance(profile, NumericProfile):
        return {
            "psi": stats.psi(stats.regroup(profile.counts, profile.psi_starts),
                             stats.regroup(counts, profile.psi_starts)),
            "ks": stats.ks_from_histograms(profile.counts, counts),
        }
    chi2, p = stats.chi_square(profile.counts_with_unseen(), counts)
    return {"psi": stats.psi(profile.counts_with_unseen(), counts), "chi2": chi2, "chi2_pvalue": p}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


class DriftConsumer:
    def __init__(self, config: ConsumerConfig, rules: RuleSet, store: StateStore, profiles: ProfileCache) -> None:
        self.config = config
        self.rules = rules
        self.store = store
        self.profiles = profiles
        self.partitions: dict[int, PartitionCheckpoint] = {}
        self._stop = threading.Event()
        self._next_eval = 0.0
        self.consumer = KafkaConsumer(
            bootstrap_servers=config.bootstrap.split(","),
            group_id=config.group_id,
            enable_auto_commit=False,
            auto_offset_reset=config.auto_offset_reset,
            max_poll_records=config.max_poll_records,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=2_000,
        )
        self.producer = KafkaProducer(bootstrap_servers=config.bootstrap.split(","), acks="all", linger_ms=5)
        self.consumer.subscribe([config.topic], listener=_Rebalance(self))

    # -- lifecycle --------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def run(self, max_seconds: float | None = None) -> None:
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        try:
            while not self._stop.is_set() and (deadline is None or time.monotonic() < deadline):
                self.step()
        finally:
            self.close()

    def close(self) -> None:
        try:
            self._checkpoint(list(self.partitions))
        except Exception:
            log.exception("final checkpoint failed; the last checkpoint stands (events will be re-read)")
        self.consumer.close(autocommit=False)
        self.producer.flush(timeout=10)
        self.producer.close(timeout=5)

    # -- one poll ---------------------------------------------------------------------------------

    def step(self) -> None:
        polled = self.consumer.poll(timeout_ms=500)
        touched = []
        for tp, records in polled.items():
            if tp.partition not in self.partitions:  # revoked between poll and here
                continue
            self._absorb(tp.partition, records)
            touched.append(tp.partition)
        if touched:
            self._checkpoint(touched)
            self.consumer.commit({TopicPartition(self.config.topic, p): OffsetAndMetadata(self.partitions[p].offset,
                                                                                          "", -1) for p in touched})
        if time.monotonic() >= self._next_eval:
            self.evaluate()
            self._next_eval = time.monotonic() + self.config.eval_interval_s

    def _absorb(self, partition: int, records: list) -> None:
        state = self.partitions[partition]
        groups: dict[tuple[str, str], list[PredictionEvent]] = defaultdict(list)
        for record in records:
            try:
                event = parse(record.value)
                profile = self.profiles.get(event.model_name, event.model_version)
                if profile is None:
                    raise PoisonEvent("unknown_model_version",
                                      f"no reference profile for {event.model_name}:{event.model_version}")
                missing = [c for c in profile.columns if c not in ("prediction", "label") and c not in event.features]
                if missing:
                    raise PoisonEvent("missing_field", f"features lack {missing}")
                groups[(event.model_name, event.model_version)].append(event)
            except PoisonEvent as exc:
                self._dead_letter(record, exc)
                state.dead_lettered += 1
        first_slot = self.config.window.first_slot(time.time())
        for (name, version), events in groups.items():
            profile = self.profiles.get(name, version)
            assert profile is not None
            slots = np.array([self.config.window.slot_of(e.timestamp) for e in events])
            live = slots >= first_slot
            metrics.LATE_EVENTS.inc(int((~live).sum()))
            for column, col in profile.columns.items():
                bins = self._bins(col, [e for e, keep in zip(events, live, strict=True) if keep], column)
                for slot in np.unique(slots[live]):
                    state.windows.add((name, version, column), int(slot), bins[slots[live] == slot], col.n_bins)
            state.consumed += len(events)
            metrics.EVENTS_CONSUMED.inc(len(events))
        state.offset = records[-1].offset + 1
        state.windows.expire(first_slot)

    @staticmethod
    def _bins(col: ColumnProfile, events: list[PredictionEvent], column: str) -> np.ndarray:
        if isinstance(col, NumericProfile):
            return stats.bin_index(col.edges, np.array([e.value(column) for e in events], dtype=np.float64))
        return np.array([col.index(e.value(column) if column != "label" or e.label is not None
                                   else int(e.prediction >= 0.5)) for e in events], dtype=np.int64)

    def _dead_letter(self, record, exc: PoisonEvent) -> None:
        metrics.DEAD_LETTERS.labels(exc.reason).inc()
        raw = record.value.decode("utf-8", errors="replace") if record.value is not None else None
        body = {"reason": exc.reason, "error": str(exc), "topic": record.topic, "partition": record.partition,
                "offset": record.offset, "raw": raw, "timestamp": _iso(time.time())}
        self.producer.send(self.config.dlq_topic, json.dumps(body).encode())

    def _checkpoint(self, partitions: list[int]) -> None:
        self.producer.flush(timeout=30)  # dead letters are durable before their offsets move past them
        self.store.save({p: self.partitions[p] for p in partitions
                         if p in self.partitions and self.partitions[p].offset is not None})
        metrics.STATE_CELLS.set(sum(s.windows.cells() for s in self.partitions.values()))

    # -- judging ----------------------------------------------------------------------------------

    def evaluate(self) -> list[dict[str, Any]]:
        """Score the topic-wide windows, publish alerts for state changes; returns the alerts sent."""
        partitions = sorted(self.consumer.partitions_for_topic(self.config.topic) or [])
        checkpoints = self.store.load_all(partitions)
        now = time.time()
        windows = merged_windows([c.windows for c in checkpoints.values()], self.config.window, now)
        sent = []
        for (name, version, column), window in sorted(windows.items()):
            profile = self.profiles.get(name, version)
            if profile is None or column not in profile.columns:
                continue
            scores = column_scores(profile.columns[column], window.counts)
            for metric, value in scores.items():
                metrics.DRIFT_SCORE.labels(name, version, column, metric).set(value)
            metrics.WINDOW_SAMPLES.labels(name, version, column).set(window.n)
            if window.n < self.rules.min_samples:
                continue
            current = self.store.alert_state(name, version, column)
            verdict = self.rules.judge(column, scores, current)  # type: ignore[arg-type]
            metrics.DRIFT_STATE.labels(name, version, column).set(SEVERITY_RANK[verdict.severity])
            if verdict.severity == current:
                continue
            previous = self.store.transition(name, version, column, verdict.severity)
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
            try:
                self.producer.send(self.config.alerts_topic, key=f"{name}:{version}:{column}".encode(),
                                   value=json.dumps(alert).encode()).get(timeout=30)
            except KafkaError:
                self.store.revert(name, version, column, previous)  # retried at the next evaluation
                log.exception("could not publish drift alert; will retry")
                continue
            metrics.ALERTS.labels(verdict.severity, alert["status"]).inc()
            log.info("drift alert: %s", alert)
            sent.append(alert)
        self._report_lag()
        return sent

    def _resolved_context(self, column: str, scores: dict[str, float], previous: str) -> tuple:
        for rule in self.rules.rules:
            if rule.severity == previous and rule.applies_to(column) and rule.metric in scores:
                return rule.metric, scores[rule.metric], rule.threshold
        return None, None, None

    def _report_lag(self) -> None:
        owned = [TopicPartition(self.config.topic, p) for p in self.partitions]
        if not owned:
            return
        try:
            ends = self.consumer.end_offsets(owned)
        except KafkaError:
            return
        for tp, end in ends.items():
            if tp.partition in self.partitions and self.partitions[tp.partition].offset is not None:
                metrics.LAG.labels(str(tp.partition)).set(max(0, end - self.partitions[tp.partition].offset))


class _Rebalance(ConsumerRebalanceListener):
    """Checkpoint partitions on their way out; resume assigned ones from their checkpoint."""

    def __init__(self, owner: DriftConsumer) -> None:
        self.owner = owner

    def on_partitions_revoked(self, revoked) -> None:
        gone = [tp.partition for tp in revoked if tp.partition in self.owner.partitions]
        try:
            self.owner._checkpoint(gone)
        finally:
            for p in gone:
                self.owner.partitions.pop(p, None)

    def on_partitions_assigned(self, assigned) -> None:
        for tp in assigned:
            ckpt = self.owner.store.load(tp.partition)
            if ckpt is not None:
                self.owner.consumer.seek(tp, ckpt.offset)
            else:  # first time for this group: Kafka's committed offset (or auto_offset_reset) decides
                ckpt = PartitionCheckpoint(offset=None, consumed=0, dead_lettered=0, windows=SlotHistograms())
            self.owner.partitions[tp.partition] = ckpt
        log.info("assigned partitions %s", sorted(tp.partition for tp in assigned))


def load_profile_from_store(name: str, version: str) -> ReferenceProfile | None:
    from lifecycle import model_store
    from streaming.profile import PROFILE_FILE

    try:
        stored = model_store.load(name, version)
    except model_store.ModelStoreError:
        return None
    path = stored.path / PROFILE_FILE
    return ReferenceProfile.from_bytes(path.read_bytes()) if path.exists() else None


