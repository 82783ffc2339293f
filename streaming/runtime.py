"""The consumer runtime every stream consumer of the stack runs on (drift, the outcome join): a Kafka consumer
group whose state lives in Redis, checkpointed before the offset is committed.

One poll: up to ``batch_size`` messages go to the application (:meth:`PartitionedConsumer.absorb`), which
folds them into the state of the partitions they came from; then the touched partitions' state and offsets
are saved to Redis atomically (:meth:`save`), and only then are the offsets committed to Kafka. A restarted
or rebalanced consumer resumes every partition from its Redis checkpoint: a ``kill -9`` anywhere loses
nothing and counts nothing twice. Poison messages go to the dead-letter topic, acknowledged before any
checkpoint moves past them. Every ``eval_interval_s`` the application judges its state (:meth:`evaluate`).

Ownership is fenced: claiming a partition takes a new owner epoch in Redis, and a save from a consumer that
lost the partition without noticing (a zombie) is refused. Outages never end the process. Through a broker
outage librdkafka reconnects with backoff; polls come back empty and commits fail (counted, retried with the
next ones) until the broker answers, then the group rejoins and every partition resumes from its Redis
checkpoint. Through a Redis outage the consumer stops advancing: it pauses its partitions, commits nothing past
the last saved checkpoint and retries the save with backoff; partitions it is given meanwhile wait, paused,
until their checkpoint can be read. A Redis that lost its data (flushed, restarted empty) is re-seeded from
memory by the owner (:meth:`reseed`): nothing re-read, nothing counted twice.

A partition is ``(topic, partition)``: one consumer may read several topics (the join reads predictions and
outcomes). Applications subclass :class:`PartitionedConsumer` and give the five hooks below; the runtime's
health metrics come in a :class:`RuntimeMetrics` bundle, so each consumer reports under its own names.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec
import redis
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from streaming.events import PoisonEvent
from streaming.kafka_io import Backoff, consumer_config, producer_config, read_stats

log = logging.getLogger(__name__)
_json = msgspec.json.Encoder()
FENCED_WARN_S = 30.0  # a takeover is followed by a revocation within a rebalance; longer than this is a stall
HIGH_QUERY_S = 5.0  # how often the high watermarks of partitions not being fetched are asked for
OFFSET_INVALID = -1001  # where the group left it: nothing is read before the checkpoint is loaded
Part = tuple[str, int]  # (topic, partition)


class Checkpoint(Protocol):
    offset: int | None  # next offset to read (None: not known yet for a brand-new group)
    dead_lettered: int


@dataclass
class SaveResult:
    fenced: list[Part] = field(default_factory=list)  # taken over by another consumer: nothing written
    lost: list[Part] = field(default_factory=list)  # the store lost them (flushed): nothing written, re-seed them


@dataclass
class RuntimeConfig:
    bootstrap: str | Mapping[str, Any] = field(repr=False)  # the servers, or mlops.connections.kafka_config
    topics: list[str]
    group_id: str
    dlq_topic: str
    eval_interval_s: float = 2.0
    auto_offset_reset: str = "earliest"
    batch_size: int = 10_000  # messages per poll: one absorb pass and one checkpoint each
    poll_timeout_s: float = 0.5
    backoff_max_s: float = 5.0


@dataclass
class RuntimeMetrics:
    """The runtime's health metrics, under the names of the consumer that runs it."""

    broker_connected: Any  # Gauge
    store_up: Any  # Gauge
    checkpoint_failures: Any  # Counter
    commit_failures: Any  # Counter
    paused: Any  # Gauge
    assigned: Any  # Gauge
    fenced: Any  # Gauge
    rebalances: Any  # Counter, label kind
    store_resets: Any  # Counter
    dead_letters: Any  # Counter, label reason
    lag_set: Callable[[Part, int], None]
    lag_remove: Callable[[Part], None]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


class PartitionedConsumer:
    """The runtime. Subclasses give: :meth:`claim` and :meth:`save` (the Redis store), :meth:`absorb` (one
    poll's messages into the partitions' state), :meth:`evaluate` (periodic judging) and, where the state has
    more than the checkpoints, :meth:`reseed` and :meth:`on_close`."""

    def __init__(self, config: RuntimeConfig, runtime_metrics: RuntimeMetrics) -> None:
        self.rc = config
        self.m = runtime_metrics
        self.partitions: dict[Part, Any] = {}  # owned, checkpoint loaded: these are read
        self.pending: set[Part] = set()  # owned, checkpoint not loaded yet (Redis down): paused
        self.unsaved: set[Part] = set()  # partitions whose state is ahead of their Redis checkpoint
        self.fenced: dict[Part, tuple[int | None, float]] = {}  # claimed by another, not revoked: (offset, since)
        self.paused = False
        self.save_backoff = Backoff(max_s=config.backoff_max_s)
        self.load_backoff = Backoff(max_s=config.backoff_max_s)
        self.alerts_in_flight: dict[tuple[str, ...], str] = {}  # alert key -> state to restore if undelivered
        self._dead_letters: list[bytes] = []  # not yet handed to the producer (its queue was full)
        self._dead_letters_in_flight = 0
        self._high: dict[Part, int] = {}
        self._next_high_query = 0.0
        self._stop = threading.Event()
        self._next_eval = 0.0
        self._last_error_log = 0.0
        self.consumer = Consumer(consumer_config(config.bootstrap, config.group_id, config.auto_offset_reset,
                                                 error_cb=self._on_error, stats_cb=self._on_stats,
                                                 on_commit=self._on_commit))
        self.producer = Producer(producer_config(config.bootstrap, error_cb=self._on_error))
        self.consumer.subscribe(list(config.topics), on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)
        self.m.store_up.set(1)
        self._report_paused()

    # -- the application's hooks --------------------------------------------------------------------

    def claim(self, part: Part) -> Any:
        """Take the partition over in the store (a new owner epoch) and return its checkpoint, or a fresh one
        with ``offset`` None the first time. Raises ``redis.RedisError``."""
        raise NotImplementedError

    def save(self, todo: dict[Part, Any], reseed: set[Part] | frozenset[Part] = frozenset()) -> SaveResult:
        """Write these partitions' changed state and offsets atomically; partitions in ``reseed`` whose owner
        key is gone are rewritten whole with this consumer as owner. Raises ``redis.RedisError``."""
        raise NotImplementedError

    def ping(self) -> None:
        """Raises ``redis.RedisError`` while the store is unreachable."""
        raise NotImplementedError

    def absorb(self, raws: list[bytes | None], parts: list[Part], offsets: list[int], now: float
               ) -> list[tuple[int, PoisonEvent]]:
        """Fold one poll's messages into ``self.partitions[parts[i]]``; return ``(position, poison)`` for the
        messages that cannot be used. Called with messages of owned partitions only."""
        raise NotImplementedError

    def evaluate(self) -> Any:
        """Judge the state, every ``eval_interval_s``."""
        return None

    def absorbed(self, part: Part, state: Any, now: float) -> None:
        """A partition moved forward in this poll (e.g. expire its old time slots)."""

    def reseed(self, saved: SaveResult) -> SaveResult:
        """Redis lost these partitions' checkpoints (flushed, restarted empty; not a takeover): put back what only
        this consumer holds. The default rewrites every owned partition's whole checkpoint atomically."""
        owned = {p: c for p, c in self.partitions.items() if c.offset is not None and p not in saved.fenced}
        again = self.save(owned, reseed=set(owned))
        log.warning("Redis had lost the checkpoints of partitions %s (flushed or restarted empty): re-seeded %s "
                    "partitions from memory", saved.lost, len(owned))
        return SaveResult(sorted(set(saved.fenced) | set(again.fenced)), again.lost)

    def revert_alert(self, key: tuple[str, ...], previous: str) -> None:
        """An alert was not delivered: put its state back to ``previous`` so the next evaluation sends it again."""

    def on_close(self, delivered: bool) -> None:
        """After the last checkpoint; ``delivered`` False when messages were still undelivered (their alerts'
        states are put back, so the next consumer announces them)."""
        if not delivered:
            for key, previous in list(self.alerts_in_flight.items()):
                self.revert_alert(key, previous)
            log.warning("closing with undelivered messages; their alerts will be re-announced")

    # -- alerts -----------------------------------------------------------------------------------

    def publish_alert(self, topic: str, key: tuple[str, ...], alert: dict[str, Any], previous: str,
                      sent: Callable[[dict[str, Any]], None]) -> None:
        """Non-blocking: a broker outage holds the alert in the producer (no delivery timeout) until it is back;
        only a permanent failure reverts the state (:meth:`revert_alert`), so the next evaluation announces it
        again. ``sent`` is called once the broker has it. While in flight, ``key`` is in ``alerts_in_flight``
        (evaluations leave it alone)."""

        def delivered(ok: bool) -> None:
            self.alerts_in_flight.pop(key, None)
            if not ok:
                self.revert_alert(key, previous)
                return
            sent(alert)

        self.alerts_in_flight[key] = previous
        self.publish_event(topic, key, alert, delivered)

    def publish_event(self, topic: str, key: tuple[str, ...], event: dict[str, Any],
                      done: Callable[[bool], None]) -> None:
        """Produce ``event`` (JSON, keyed by ``key`` joined by ``:``) without blocking; ``done(True)`` once the
        broker has it, ``done(False)`` on a permanent failure or a full producer queue."""

        def delivered(err, _msg) -> None:
            if err is not None:
                log.error("could not publish %s (%s); will retry", event.get("type", "event"), err)
            done(err is None)

        try:
            self.producer.produce(topic, _json.encode(event), key=":".join(key).encode(), on_delivery=delivered)
        except BufferError:
            done(False)

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
        """Last checkpoint and commit when they can be made. Saved even when nothing changed, so a store that
        lost its data is re-seeded before the next consumer loads it."""
        self.unsaved.update(p for p, c in self.partitions.items() if c.offset is not None)
        if self.unsaved:
            self.save_backoff.succeeded()
            self._checkpoint(final=True)
        try:
            self.consumer.close()
        except KafkaException as exc:
            log.warning("consumer close: %s", exc)
        self.on_close(self.producer.flush(10) == 0)

    # -- one poll ---------------------------------------------------------------------------------

    def step(self) -> None:
        if self.pending and self.load_backoff.ready():
            self._load_pending()
        messages = self.consumer.consume(self.rc.batch_size, self.rc.poll_timeout_s)
        self.producer.poll(0)
        if messages:
            self._absorb(messages)
        if (self.unsaved or self._dead_letters or self.paused) and self.save_backoff.ready():
            self._checkpoint()
        if time.monotonic() >= self._next_eval:
            self._report_lag()
            self.evaluate()
            self._next_eval = time.monotonic() + self.rc.eval_interval_s
            self._warn_fenced()

    def _absorb(self, messages: list) -> None:
        raws: list[bytes | None] = []
        parts: list[Part] = []
        offsets: list[int] = []
        last: dict[Part, int] = {}
        for m in messages:
            if m.error() is not None:
                self._on_error(m.error())
                continue
            p = (m.topic(), m.partition())
            if p not in self.partitions:  # pending (read from its checkpoint later), revoked or taken over
                continue
            raws.append(m.value())
            parts.append(p)
            offsets.append(offset := m.offset())
            last[p] = offset
        if not raws:
            return
        self.m.broker_connected.set(1)
        now = time.time()
        for i, poison in self.absorb(raws, parts, offsets, now):
            self._dead_letter(parts[i], offsets[i], raws[i], poison)
        for p, offset in last.items():
            state = self.partitions[p]
            state.offset = offset + 1
            self.absorbed(p, state, now)
            self.unsaved.add(p)

    def _dead_letter(self, part: Part, offset: int, raw: bytes | None, exc: PoisonEvent) -> None:
        self.m.dead_letters.labels(exc.reason).inc()
        self.partitions[part].dead_lettered += 1
        body = {"reason": exc.reason, "error": str(exc), "topic": part[0], "partition": part[1],
                "offset": offset, "raw": raw.decode("utf-8", errors="replace") if raw is not None else None,
                "timestamp": _iso(time.time())}
        self._dead_letters.append(_json.encode(body))
        self._send_dead_letters()

    def _send_dead_letters(self) -> None:
        while self._dead_letters:
            try:
                self.producer.produce(self.rc.dlq_topic, self._dead_letters[0], on_delivery=self._on_dead_letter)
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

    def checkpoint_now(self) -> bool:
        """Save what is unsaved (e.g. before judging on the store's view)."""
        self.save_backoff.succeeded()
        return self._checkpoint()

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
                saved = self.save(todo)
                if saved.lost:
                    self.m.store_resets.inc()
                    saved = self.reseed(saved)
            else:  # paused with nothing to save: probe
                self.ping()
                saved = SaveResult()
        except redis.RedisError as exc:
            self.m.store_up.set(0)
            return self._checkpoint_failed(f"Redis: {exc}")
        self.m.store_up.set(1)
        for p in saved.fenced:
            self._fence(p)
        offsets = [TopicPartition(p[0], p[1], todo[p].offset) for p in todo
                   if p not in saved.fenced and todo[p].offset is not None]
        self.unsaved.clear()
        self.save_backoff.succeeded()
        if offsets:
            self._commit(offsets, final)
        if self.paused:
            self._set_paused(False)
        return True

    def _fence(self, part: Part) -> None:
        """Another consumer claimed the partition: stop reading it (its unsaved state is dropped, the new owner
        resumes from the checkpoint) until the group revokes it from us; the metrics show it as not read."""
        log.warning("partition %s was taken over by another consumer; dropping its unsaved state", _name(part))
        state = self.partitions.pop(part, None)
        self.fenced[part] = (state.offset if state is not None else None, time.monotonic())
        try:
            self.consumer.pause([TopicPartition(*part)])
        except KafkaException:
            pass
        self._report_paused()

    def _warn_fenced(self) -> None:
        stuck = sorted(p for p, (_, since) in self.fenced.items() if time.monotonic() - since > FENCED_WARN_S)
        if stuck and time.monotonic() - self._last_error_log > FENCED_WARN_S:
            log.error("partitions %s are still assigned to this consumer but owned by another one in Redis; not "
                      "reading them (is another consumer using group %s on this Redis?)",
                      [_name(p) for p in stuck], self.rc.group_id)
            self._last_error_log = time.monotonic()

    def _checkpoint_failed(self, why: str) -> bool:
        self.m.checkpoint_failures.inc()
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
            self.m.commit_failures.inc()
            log.debug("commit failed: %s", exc)

    def _on_commit(self, err, partitions) -> None:
        if err is not None:
            self.m.commit_failures.inc()
            log.debug("commit failed: %s", err)

    def _set_paused(self, paused: bool) -> None:
        owned = [TopicPartition(*p) for p in self.partitions]
        try:
            if owned:
                (self.consumer.pause if paused else self.consumer.resume)(owned)
        except KafkaException as exc:
            log.warning("could not %s partitions: %s", "pause" if paused else "resume", exc)
            return
        self.paused = paused
        self._report_paused()

    def _report_paused(self) -> None:
        self.m.paused.set(int(self.paused or bool(self.pending) or bool(self.fenced)))
        self.m.fenced.set(len(self.fenced))
        self.m.assigned.set(len(self.partitions) + len(self.pending))

    # -- rebalancing ------------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, assigned: list[TopicPartition]) -> None:
        self.m.rebalances.labels("assign").inc()
        for tp in assigned:
            tp.offset = self._claim((tp.topic, tp.partition))
        consumer.assign(assigned)
        waiting = [tp for tp in assigned if (tp.topic, tp.partition) in self.pending]
        if waiting:
            consumer.pause(waiting)
        if self.paused:
            self._set_paused(True)
        self._report_paused()
        log.info("assigned partitions %s%s", sorted(_name((tp.topic, tp.partition)) for tp in assigned),
                 f" (waiting for Redis: {sorted(_name(p) for p in self.pending)})" if self.pending else "")

    def _claim(self, part: Part) -> int:
        """Loads a partition's checkpoint (fencing out its previous owner); returns the offset to read from."""
        try:
            ckpt = self.claim(part)
        except redis.RedisError as exc:
            self.m.store_up.set(0)
            log.warning("cannot load the checkpoint of partition %s (%s); it waits, paused", _name(part), exc)
            self.pending.add(part)
            return OFFSET_INVALID
        self.m.store_up.set(1)
        self.pending.discard(part)
        self.fenced.pop(part, None)
        self.partitions[part] = ckpt
        return ckpt.offset if ckpt.offset is not None else OFFSET_INVALID

    def _load_pending(self) -> None:
        for p in sorted(self.pending):
            offset = self._claim(p)
            if p in self.pending:
                self.load_backoff.failed()
                return
            tp = TopicPartition(p[0], p[1], offset)
            try:
                if offset < 0:
                    tp.offset = self._committed_or_reset(p)
                self.consumer.seek(tp)
                if not self.paused:
                    self.consumer.resume([TopicPartition(*p)])
            except KafkaException as exc:
                log.warning("could not resume partition %s (%s); retrying", _name(p), exc)
                self.partitions.pop(p, None)
                self.pending.add(p)
                self.load_backoff.failed()
                return
            log.info("partition %s resumed from its checkpoint at offset %s", _name(p), tp.offset)
        self.load_backoff.succeeded()
        self._report_paused()

    def _committed_or_reset(self, part: Part) -> int:
        committed = self.consumer.committed([TopicPartition(*part)], timeout=10)[0]
        if committed.offset >= 0:
            return committed.offset
        return OFFSET_BEGINNING if self.rc.auto_offset_reset == "earliest" else OFFSET_END

    def _on_revoke(self, consumer: Consumer, revoked: list[TopicPartition]) -> None:
        self._leave(revoked, commit=True)

    def _on_lost(self, consumer: Consumer, lost: list[TopicPartition]) -> None:
        self._leave(lost, commit=False)

    def _leave(self, gone_tps: list[TopicPartition], commit: bool) -> None:
        """Checkpoint partitions on their way out (refused by Redis if another consumer already took one)."""
        self.m.rebalances.labels("revoke" if commit else "lost").inc()
        gone = [(tp.topic, tp.partition) for tp in gone_tps]
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
            self.m.lag_remove(p)  # its new owner reports it
        self._report_paused()
        log.info("revoked partitions %s%s", sorted(_name(p) for p in gone), "" if commit else " (lost)")

    # -- broker state -----------------------------------------------------------------------------

    def _on_error(self, err: KafkaError) -> None:
        if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self.m.broker_connected.set(0)
        if time.monotonic() - self._last_error_log > 10:
            log.warning("kafka: %s (retrying)", err)
            self._last_error_log = time.monotonic()

    def _on_stats(self, raw: str) -> None:
        for topic in self.rc.topics:
            try:
                connected, high = read_stats(raw, topic)
            except (msgspec.DecodeError, ValueError):
                return
            self.m.broker_connected.set(int(connected))
            for p, offset in high.items():  # never back: a paused partition's statistics keep an old watermark
                self._high[(topic, p)] = max(offset, self._high.get((topic, p), -1))

    def _report_lag(self) -> None:
        """Owned partitions, and fenced ones (not read: their lag grows until the group revokes them)."""
        offsets = {p: state.offset for p, state in self.partitions.items()}
        offsets.update({p: offset for p, (offset, _) in self.fenced.items()})
        self._refresh_high(list(offsets) if self.paused else list(self.fenced))
        for p, offset in offsets.items():
            if p in self._high and offset is not None:
                self.m.lag_set(p, max(0, self._high[p] - offset))

    def _refresh_high(self, parts: list[Part]) -> None:
        """librdkafka's statistics learn the high watermark from fetches, and a paused partition is not fetched:
        ask the broker (every few seconds, while it answers), so a stalled partition's lag keeps growing."""
        if not parts or time.monotonic() < self._next_high_query:
            return
        self._next_high_query = time.monotonic() + HIGH_QUERY_S
        for p in parts:
            try:
                _, high = self.consumer.get_watermark_offsets(TopicPartition(*p), timeout=0.5, cached=False)
            except KafkaException:
                return  # the broker is away: keep the last known values
            if high >= 0:
                self._high[p] = max(high, self._high.get(p, 0))


def _name(part: Part) -> str:
    return f"{part[0]}[{part[1]}]"
