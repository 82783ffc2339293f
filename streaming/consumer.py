"""The streaming drift consumer: a Kafka consumer group on `predictions` that publishes drift alerts.

Per poll (up to ``batch_size`` messages): the events are decoded and binned in batches
(:mod:`streaming.absorb`) into their partition's time-slotted histograms; then the touched partitions'
changed slots and offsets are checkpointed to Redis in one atomic script, and only then are the offsets
committed to Kafka. Each ``request_id`` is counted once per partition within the window (the log delivers at
least once): the ids counted per slot are checkpointed with the slot (:mod:`streaming.dedupe`). Every
``eval_interval_s`` the topic-wide windows (all partitions' checkpoints summed)
are scored (PSI, KS, chi-square) and judged by the rules; state changes become alerts on the alerts topic.
Poison events go to the dead-letter topic, acknowledged before any checkpoint moves past them.

Outages never end the process. Through a broker outage librdkafka reconnects with backoff; polls come back
empty and commits fail (counted, retried with the next ones) until the broker answers, then the group
rejoins and every partition resumes from its Redis checkpoint. Through a Redis outage the consumer stops
advancing: it pauses its partitions, commits nothing past the last saved checkpoint and retries the save
with backoff; partitions it is given meanwhile wait, paused, until their checkpoint can be read.

A Redis that lost its data (``FLUSHALL``, restarted empty) is not a takeover: the owner keys are gone rather
than someone else's (see :mod:`streaming.state_store`). The consumer then puts back what only it holds, from
memory: first the alert states it knew (set-if-absent, so no evaluation re-announces an alert already sent),
then every owned partition's whole checkpoint; and it goes on reading from where it was (nothing re-read,
nothing counted twice). A real takeover stops reading the partition until the group revokes it; meanwhile
``mlops_drift_fenced_partitions``, ``mlops_drift_paused`` and the lag say so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import numpy as np
import redis
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from streaming import metrics, stats
from streaming.absorb import Absorber
from streaming.events import PoisonEvent
from streaming.kafka_io import Backoff, consumer_config, producer_config, read_stats
from streaming.profile import ColumnProfile, NumericProfile, ReferenceProfile
from streaming.rules import SEVERITY_RANK, RuleSet
from streaming.state_store import PartitionCheckpoint, SaveResult, StateStore
from streaming.window import Key, SlotHistograms, WindowSpec, merged_windows

log = logging.getLogger(__name__)
_json = msgspec.json.Encoder()
FENCED_WARN_S = 30.0  # a takeover is followed by a revocation within a rebalance; longer than this is a stall
HIGH_QUERY_S = 5.0  # how often the high watermarks of partitions not being fetched are asked for


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
        self.absorber = Absorber(profiles.get, config.window, config.decision_threshold)
        self.partitions: dict[int, PartitionCheckpoint] = {}  # owned, checkpoint loaded: these are read
        self.pending: set[int] = set()  # owned, checkpoint not loaded yet (Redis down): paused
        self.unsaved: set[int] = set()  # partitions whose windows are ahead of their Redis checkpoint
        self.fenced: dict[int, tuple[int | None, float]] = {}  # claimed by another, not revoked: (offset, since)
        self.alert_memory: dict[Key, str] = {}  # last alert state seen or set: re-seeds the store after a flush
        self.paused = False
        self.save_backoff = Backoff(max_s=config.backoff_max_s)
        self.load_backoff = Backoff(max_s=config.backoff_max_s)
        self._dead_letters: list[bytes] = []  # not yet handed to the producer (its queue was full)
        self._dead_letters_in_flight = 0
        self._alerts_in_flight: dict[tuple[str, str, str], str] = {}  # key -> state to restore if undelivered
        self._high: dict[int, int] = {}
        self._next_high_query = 0.0
        self._stop = threading.Event()
        self._next_eval = 0.0
        self._last_error_log = 0.0
        self.consumer = Consumer(consumer_config(config.bootstrap, config.group_id, config.auto_offset_reset,
                                                 error_cb=self._on_error, stats_cb=self._on_stats,
                                                 on_commit=self._on_commit))
        self.producer = Producer(producer_config(config.bootstrap, error_cb=self._on_error))
        self.consumer.subscribe([config.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)
        metrics.CHECKPOINT_STORE_UP.set(1)
        self._report_paused()

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
        """Last checkpoint and commit when they can be made; undelivered alerts are handed back (their state
        reverted) so the next consumer announces them. Saved even when nothing changed, so a store that lost
        its data is re-seeded before the next consumer loads it."""
        self.unsaved.update(p for p, c in self.partitions.items() if c.offset is not None)
        if self.unsaved:
            self.save_backoff.succeeded()
            self._checkpoint(final=True)
        try:
            self.consumer.close()
        except KafkaException as exc:
            log.warning("consumer close: %s", exc)
        if self.producer.flush(10):
            for (name, version, column), previous in list(self._alerts_in_flight.items()):
                self._revert(name, version, column, previous)
            log.warning("closing with undelivered messages; their alerts will be re-announced")

    # -- one poll ---------------------------------------------------------------------------------

    def step(self) -> None:
        if self.pending and self.load_backoff.ready():
            self._load_pending()
        messages = self.consumer.consume(self.config.batch_size, self.config.poll_timeout_s)
        self.producer.poll(0)
        if messages:
            self._absorb(messages)
        if (self.unsaved or self._dead_letters or self.paused) and self.save_backoff.ready():
            self._checkpoint()
        if time.monotonic() >= self._next_eval:
            self.evaluate()
            self._next_eval = time.monotonic() + self.config.eval_interval_s
            self._warn_fenced()

    def _absorb(self, messages: list) -> None:
        raws: list[bytes | None] = []
        parts: list[int] = []
        offsets: list[int] = []
        last: dict[int, int] = {}
        for m in messages:
            if m.error() is not None:
                self._on_error(m.error())
                continue
            p = m.partition()
            if p not in self.partitions:  # pending (read from its checkpoint later), revoked or taken over
                continue
            raws.append(m.value())
            parts.append(p)
            offsets.append(offset := m.offset())
            last[p] = offset
        if not raws:
            return
        metrics.BROKER_CONNECTED.set(1)
        now = time.time()
        for i, poison in self.absorber.absorb(raws, parts, self.partitions, now):
            self._dead_letter(parts[i], offsets[i], raws[i], poison)
        first_slot = self.config.window.first_slot(now)
        for p, offset in last.items():
            state = self.partitions[p]
            state.offset = offset + 1
            state.windows.expire(first_slot)
            self.unsaved.add(p)

    def _dead_letter(self, partition: int, offset: int, raw: bytes | None, exc: PoisonEvent) -> None:
        metrics.DEAD_LETTERS.labels(exc.reason).inc()
        self.partitions[partition].dead_lettered += 1
        body = {"reason": exc.reason, "error": str(exc), "topic": self.config.topic, "partition": partition,
                "offset": offset, "raw": raw.decode("utf-8", errors="replace") if raw is not None else None,
                "timestamp": _iso(time.time())}
        self._dead_letters.append(_json.encode(body))
        self._send_dead_letters()

    def _send_dead_letters(self) -> None:
        while self._dead_letters:
            try:
                self.producer.produce(self.config.dlq_topic, self._dead_letters[0], on_delivery=self._on_dead_letter)
            except BufferError:  # the producer's queue is full (broker away): keep it, try again later
                self.producer.poll(0.1)
                return
            self._dead_letters.pop(0)
            self._dead_letters_in_flight += 1

    def _on_dead_letter(self, err, _msg) -> None:
        self._dead_letters_in_flight -= 1
        if err is not None:  # permanent (no delivery timeout is set), e.g. larger than the topic allows
            log.error("dead letter not delivered, dropped: %s", err)

    # -- checkpoints ------------------------------------------------------------------------------

    def _checkpoint(self, final: bool = False) -> bool:
        """Save the unsaved partitions to Redis, then commit their offsets; on failure pause and back off."""
        self._send_dead_letters()
        if self._dead_letters or self._dead_letters_in_flight:
            self.producer.flush(10 if final else 1)
            if self._dead_letters or self._dead_letters_in_flight:
                return self._checkpoint_failed("dead letters are not acknowledged yet")
        todo = {p: self.partitions[p] for p in self.unsaved if p in self.partitions}
        try:
            if todo:
                saved = self.store.save(todo)
                if saved.lost:
                    saved = self._reseed(saved)
            else:  # paused with nothing to save: probe
                self.store.ping()
                saved = SaveResult()
        except redis.RedisError as exc:
            metrics.CHECKPOINT_STORE_UP.set(0)
            return self._checkpoint_failed(f"Redis: {exc}")
        metrics.CHECKPOINT_STORE_UP.set(1)
        for p in saved.fenced:
            self._fence(p)
        offsets = [TopicPartition(self.config.topic, p, todo[p].offset) for p in todo
                   if p not in saved.fenced and todo[p].offset is not None]
        self.unsaved.clear()
        self.save_backoff.succeeded()
        if offsets:
            self._commit(offsets, final)
        if self.paused:
            self._set_paused(False)
        return True

    def _reseed(self, saved: SaveResult) -> SaveResult:
        """Redis lost this consumer's checkpoints (flushed, or restarted empty; not a takeover: no other owner is
        there). Put back what only this consumer knows, from memory: the alert states first, so no evaluation
        sees windows without the state they had reached (it would announce their alerts again), then every owned
        partition's whole checkpoint, atomically. Reading goes on from the in-memory offsets: nothing re-read."""
        metrics.STORE_RESETS.inc()
        restored = self.store.restore_alerts(self.alert_memory)
        owned = {p: c for p, c in self.partitions.items() if c.offset is not None and p not in saved.fenced}
        for ckpt in owned.values():
            ckpt.windows.mark_all_dirty()
        again = self.store.save(owned, reseed=set(owned))
        log.warning("Redis had lost the checkpoints of partitions %s (flushed or restarted empty): re-seeded %s "
                    "partitions and %s alert states from memory", saved.lost, len(owned), restored)
        return SaveResult(sorted(set(saved.fenced) | set(again.fenced)), again.lost)

    def _fence(self, partition: int) -> None:
        """Another consumer claimed the partition: stop reading it (its unsaved state is dropped, the new owner
        resumes from the checkpoint) until the group revokes it from us; the metrics show it as not read."""
        log.warning("partition %s was taken over by another consumer; dropping its unsaved state", partition)
        state = self.partitions.pop(partition, None)
        self.fenced[partition] = (state.offset if state is not None else None, time.monotonic())
        try:
            self.consumer.pause([TopicPartition(self.config.topic, partition)])
        except KafkaException:
            pass
        self._report_paused()

    def _warn_fenced(self) -> None:
        stuck = sorted(p for p, (_, since) in self.fenced.items() if time.monotonic() - since > FENCED_WARN_S)
        if stuck and time.monotonic() - self._last_error_log > FENCED_WARN_S:
            log.error("partitions %s are still assigned to this consumer but owned by another one in Redis; not "
                      "reading them (is another consumer using group %s on this Redis?)", stuck,
                      self.config.group_id)
            self._last_error_log = time.monotonic()

    def _checkpoint_failed(self, why: str) -> bool:
        metrics.CHECKPOINT_FAILURES.inc()
        wait = self.save_backoff.failed()
        if self.save_backoff.failures == 1 or time.monotonic() - self._last_error_log > 30:
            log.warning("checkpoint not saved (%s); not advancing, retrying in %.1fs", why, wait)
            self._last_error_log = time.monotonic()
        if not self.paused:
            self._set_paused(True)
        return False

    def _commit(self, offsets: list[TopicPartition], sync: bool = False) -> None:
        try:
            self.consumer.commit(offsets=offsets, asynchronous=not sync)
        except KafkaException as exc:  # the Redis checkpoint holds these offsets: a later commit catches up
            metrics.COMMIT_FAILURES.inc()
            log.debug("commit failed: %s", exc)

    def _on_commit(self, err, partitions) -> None:
        if err is not None:
            metrics.COMMIT_FAILURES.inc()
            log.debug("commit failed: %s", err)

    def _set_paused(self, paused: bool) -> None:
        owned = [TopicPartition(self.config.topic, p) for p in self.partitions]
        try:
            if owned:
                (self.consumer.pause if paused else self.consumer.resume)(owned)
        except KafkaException as exc:
            log.warning("could not %s partitions: %s", "pause" if paused else "resume", exc)
            return
        self.paused = paused
        self._report_paused()

    def _report_paused(self) -> None:
        metrics.PAUSED.set(int(self.paused or bool(self.pending) or bool(self.fenced)))
        metrics.FENCED.set(len(self.fenced))
        metrics.ASSIGNED.set(len(self.partitions) + len(self.pending))

    # -- rebalancing ------------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, assigned: list[TopicPartition]) -> None:
        metrics.REBALANCES.labels("assign").inc()
        for tp in assigned:
            tp.offset = self._claim(tp.partition)
        consumer.assign(assigned)
        waiting = [tp for tp in assigned if tp.partition in self.pending]
        if waiting:
            consumer.pause(waiting)
        if self.paused:
            self._set_paused(True)
        self._report_paused()
        log.info("assigned partitions %s%s", sorted(tp.partition for tp in assigned),
                 f" (waiting for Redis: {sorted(self.pending)})" if self.pending else "")

    def _claim(self, partition: int) -> int:
        """Loads a partition's checkpoint (fencing out its previous owner); returns the offset to read from."""
        try:
            epoch, ckpt = self.store.claim(partition)
        except redis.RedisError as exc:
            metrics.CHECKPOINT_STORE_UP.set(0)
            log.warning("cannot load the checkpoint of partition %s (%s); it waits, paused", partition, exc)
            self.pending.add(partition)
            return -1001  # OFFSET_INVALID: where the group left it; nothing is read before the checkpoint
        metrics.CHECKPOINT_STORE_UP.set(1)
        self.pending.discard(partition)
        self.fenced.pop(partition, None)
        if ckpt is None:  # first time for this group: Kafka's committed offset (or auto_offset_reset) decides
            ckpt = PartitionCheckpoint(offset=None, consumed=0, dead_lettered=0, windows=SlotHistograms(),
                                       epoch=epoch)
        self.partitions[partition] = ckpt
        return ckpt.offset if ckpt.offset is not None else -1001

    def _load_pending(self) -> None:
        for p in sorted(self.pending):
            offset = self._claim(p)
            if p in self.pending:
                self.load_backoff.failed()
                return
            tp = TopicPartition(self.config.topic, p, offset)
            try:
                if offset < 0:
                    tp.offset = self._committed_or_reset(p)
                self.consumer.seek(tp)
                if not self.paused:
                    self.consumer.resume([TopicPartition(self.config.topic, p)])
            except KafkaException as exc:
                log.warning("could not resume partition %s (%s); retrying", p, exc)
                self.partitions.pop(p, None)
                self.pending.add(p)
                self.load_backoff.failed()
                return
            log.info("partition %s resumed from its checkpoint at offset %s", p, tp.offset)
        self.load_backoff.succeeded()
        self._report_paused()

    def _committed_or_reset(self, partition: int) -> int:
        committed = self.consumer.committed([TopicPartition(self.config.topic, partition)], timeout=10)[0]
        if committed.offset >= 0:
            return committed.offset
        return OFFSET_BEGINNING if self.config.auto_offset_reset == "earliest" else OFFSET_END

    def _on_revoke(self, consumer: Consumer, revoked: list[TopicPartition]) -> None:
        self._leave(revoked, commit=True)

    def _on_lost(self, consumer: Consumer, lost: list[TopicPartition]) -> None:
        self._leave(lost, commit=False)

    def _leave(self, gone_tps: list[TopicPartition], commit: bool) -> None:
        """Checkpoint partitions on their way out (refused by Redis if another consumer already took one)."""
        metrics.REBALANCES.labels("revoke" if commit else "lost").inc()
        gone = [tp.partition for tp in gone_tps]
        # Saved even when nothing changed: a store that lost its data is noticed (and re-seeded) before the next
        # owner loads the checkpoint.
        leaving = [p for p in gone if p in self.partitions and self.partitions[p].offset is not None]
        if leaving:
            self.unsaved.update(leaving)
            self.save_backoff.succeeded()
            self._checkpoint(final=True)
        for p in gone:
            self.partitions.pop(p, None)
            self.pending.discard(p)
            self.unsaved.discard(p)
            self.fenced.pop(p, None)
            metrics.LAG.remove(str(p))  # its new owner reports it
        self._report_paused()
        log.info("revoked partitions %s%s", sorted(gone), "" if commit else " (lost)")

    # -- broker state -----------------------------------------------------------------------------

    def _on_error(self, err: KafkaError) -> None:
        if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            metrics.BROKER_CONNECTED.set(0)
        if time.monotonic() - self._last_error_log > 10:
            log.warning("kafka: %s (retrying)", err)
            self._last_error_log = time.monotonic()

    def _on_stats(self, raw: str) -> None:
        try:
            connected, high = read_stats(raw, self.config.topic)
        except (msgspec.DecodeError, ValueError):
            return
        metrics.BROKER_CONNECTED.set(int(connected))
        for p, offset in high.items():  # never back: a paused partition's statistics keep an old watermark
            self._high[p] = max(offset, self._high.get(p, -1))

    # -- judging ----------------------------------------------------------------------------------

    def evaluate(self) -> list[dict[str, Any]]:
        """Score the topic-wide windows, publish alerts for state changes; returns the alerts sent."""
        self._report_lag()
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
                if c.offset is not None and p not in checkpoints and p not in self.unsaved]
        if lost:  # saved before, gone now: Redis lost its data. Re-seed first; judge on the next evaluation.
            self.unsaved.update(lost)
            self.save_backoff.succeeded()
            self._checkpoint()
            return []
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
            if window.n < self.rules.min_samples or (name, version, column) in self._alerts_in_flight:
                continue
            current = self._alert_state((name, version, column))
            verdict = self.rules.judge(column, scores, current)  # type: ignore[arg-type]
            metrics.DRIFT_STATE.labels(name, version, column).set(SEVERITY_RANK[verdict.severity])
            if verdict.severity == current:
                continue
            previous = self.store.transition(name, version, column, verdict.severity)
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
            self._publish_alert(alert, previous)
            sent.append(alert)
        return sent

    def _alert_state(self, key: Key) -> str:
        """The stored state; one this consumer knew but the store lost (a flush) is put back first, set-if-absent,
        so the alert it stands for is not announced a second time."""
        stored = self.store.stored_alert_state(*key)
        if stored is None and self.alert_memory.get(key, "ok") != "ok":
            self.store.restore_alerts({key: self.alert_memory[key]})
            stored = self.store.stored_alert_state(*key)
            log.warning("alert state of %s was lost from Redis; put back %s", ":".join(key), stored)
        self.alert_memory[key] = stored or "ok"
        return self.alert_memory[key]

    def _publish_alert(self, alert: dict[str, Any], previous: str) -> None:
        """Non-blocking: a broker outage holds the alert in the producer (no delivery timeout) until it is
        back; only a permanent failure reverts the state, so the next evaluation announces it again."""
        key = (alert["model_name"], alert["model_version"], alert["feature"])

        def delivered(err, _msg) -> None:
            self._alerts_in_flight.pop(key, None)
            if err is not None:
                log.error("could not publish drift alert (%s); will retry", err)
                self._revert(*key, previous)
                return
            metrics.ALERTS.labels(alert["severity"], alert["status"]).inc()
            log.info("drift alert: %s", alert)

        self._alerts_in_flight[key] = previous
        try:
            self.producer.produce(self.config.alerts_topic, _json.encode(alert), key=":".join(key).encode(),
                                  on_delivery=delivered)
        except BufferError:
            self._alerts_in_flight.pop(key, None)
            self._revert(*key, previous)

    def _revert(self, name: str, version: str, column: str, previous: str) -> None:
        self.alert_memory[(name, version, column)] = previous
        try:
            self.store.revert(name, version, column, previous)
        except redis.RedisError:
            log.error("could not revert the alert state of %s:%s:%s", name, version, column)

    def _resolved_context(self, column: str, scores: dict[str, float], previous: str) -> tuple:
        for rule in self.rules.rules:
            if rule.severity == previous and rule.applies_to(column) and rule.metric in scores:
                return rule.metric, scores[rule.metric], rule.threshold
        return None, None, None

    def _report_lag(self) -> None:
        """Owned partitions, and fenced ones (not read: their lag grows until the group revokes them)."""
        offsets = {p: state.offset for p, state in self.partitions.items()}
        offsets.update({p: offset for p, (offset, _) in self.fenced.items()})
        self._refresh_high(list(offsets) if self.paused else list(self.fenced))
        for p, offset in offsets.items():
            if p in self._high and offset is not None:
                metrics.LAG.labels(str(p)).set(max(0, self._high[p] - offset))

    def _refresh_high(self, partitions: list[int]) -> None:
        """librdkafka's statistics learn the high watermark from fetches, and a paused partition is not fetched:
        ask the broker (every few seconds, while it answers), so a stalled partition's lag keeps growing."""
        if not partitions or time.monotonic() < self._next_high_query:
            return
        self._next_high_query = time.monotonic() + HIGH_QUERY_S
        for p in partitions:
            try:
                _, high = self.consumer.get_watermark_offsets(TopicPartition(self.config.topic, p), timeout=0.5,
                                                              cached=False)
            except KafkaException:
                return  # the broker is away: keep the last known values
            if high >= 0:
                self._high[p] = max(high, self._high.get(p, 0))


def load_profile_from_store(name: str, version: str) -> ReferenceProfile | None:
    from lifecycle import model_store
    from streaming.profile import PROFILE_FILE

    try:
        stored = model_store.load(name, version)
    except model_store.ModelStoreError:
        return None
    path = stored.path / PROFILE_FILE
    return ReferenceProfile.from_bytes(path.read_bytes()) if path.exists() else None
