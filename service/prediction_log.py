"""Every answered prediction reaches Kafka at least once, keyed by its ``request_id``, without the request
path ever blocking on the broker.

**The contract.** Each event carries the request's ``request_id``; every consumer of the log de-duplicates on
it (the drift consumer within its window), so each answered prediction is counted once end to end. When the
answer may be sent is the durability mode (``MLOPS_LOG_DURABILITY``):

- ``ack`` (the default): a request is answered only once every event of it is acknowledged by the broker
  (``acks=all``: on every in-sync replica) or, while the broker is down, written and fsynced to the spool.
  An answered prediction survives the worker's SIGKILL; a request whose events are not confirmed within
  ``MLOPS_LOG_ACK_TIMEOUT_MS`` gets a retryable 503 ``prediction_log_timeout`` (its events may still
  arrive: retry with the same ``request_id``).
- ``async``: answered once handed to the Kafka client. A SIGKILL loses what the client still holds (the
  events of the last ``linger`` plus a broker round trip) and the hand-off to the spool.

The producer is librdkafka's (confluent-kafka): idempotent, ``acks=all``, and it never gives up on a
message (``message.timeout.ms=0``), so a broker that dies and comes back gets each message it was handed
once — the broker drops retried duplicates by producer id and sequence number. What the producer holds
lives in memory, so while the broker is known to be down new events go to an on-disk :class:`Spool`
instead, and are replayed in bulk once it answers again. An event therefore always sits in one place:
handed to the client (``in_flight``, until the broker acknowledges it), waiting to be written to the spool
(``queue_depth``), in the spool (``spool_events``), delivered, or — only when the spool is full and the
policy is ``drop`` — dropped and counted by reason. With the default policy ``reject`` a full spool makes
the request fail with a retryable 503 instead of being answered and forgotten. A request's events are taken
all or none. Where an event can reach the topic twice — taken back from the client into the spool at an
outage's start in ``ack`` mode, or at shutdown, or a replay chunk interrupted by a crash — it is counted in
``requeued``; consumers de-duplicate it.

One background thread serves the producer's callbacks, writes and replays the spool, and probes the
broker while it is down; nothing it does can block a request.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from confluent_kafka import KafkaError, KafkaException, Producer

from mlops.connections import durable_producer_config
from service.spool import Spool, SpoolChunk, SpoolWriteFailed

log = logging.getLogger(__name__)
FullPolicy = Literal["reject", "drop"]
Durability = Literal["ack", "async"]
SPOOL_RETRY_S = 1.0  # after the disk refused a spool write, how soon to try again
REPLAY_ADVANCE_S = 0.5  # how often the spool cursor follows a replay chunk's acknowledgements
# Delivery errors that retrying cannot fix: counted as dropped with the error's name, never spooled again.
PERMANENT = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.INVALID_RECORD,
             KafkaError._MSG_TIMED_OUT}
PURGED = {KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT}
CONFIRM_TIMEOUT_S = 0.5  # a metadata round trip longer than this, after a connection error, is an outage


@dataclass(frozen=True)
class LogStats:
    """One consistent reading, shared by /info and the metrics."""

    connected: bool
    accepted: int
    delivered: int
    in_flight: int
    queue_depth: int
    spool_events: int
    spool_bytes: int
    spooled: int
    replayed: int
    delivery_failures: int
    rejected: int
    dropped: dict[str, int]
    outages: int = 0  # times the broker was declared unreachable
    requeued: int = 0  # events taken back from the client into the spool: these may reach the topic twice
    spool_skipped: int = 0  # torn or garbled spool lines passed over
    spool_failing: bool = False  # the disk refuses spool writes (full, I/O error): events wait in memory

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "dropped": dict(self.dropped)}

    def increments_since(self, before: LogStats, fields: Sequence[str]) -> tuple[dict[str, int], LogStats]:
        """What each counter ``field`` grew by since ``before``, and the high-water readings to compare the next
        one with. `delivered` is derived from the client's queue length, which can run one event behind a
        delivery report being served, so a reading may dip below the last one: a counter only moves up."""
        grown = {f: getattr(self, f) - getattr(before, f) for f in fields}
        high = {f: max(getattr(self, f), getattr(before, f)) for f in fields}
        return {f: n for f, n in grown.items() if n > 0}, dataclasses.replace(self, **high)


def producer_config(connection: str | Mapping[str, Any], queue_size: int, linger_ms: float,
                    compression: str) -> dict[str, Any]:
    """``connection``: the bootstrap servers, or ``mlops.connections.kafka_config`` (credentials and TLS)."""
    return {
        **durable_producer_config(connection),
        "linger.ms": linger_ms,
        "socket.nagle.disable": True,  # small produce requests go out at once (ack mode waits on them)
        "compression.type": compression,
        "queue.buffering.max.messages": queue_size,
        "reconnect.backoff.max.ms": 1000,
        "socket.connection.setup.timeout.ms": 5000,
        "log_level": 2,  # librdkafka logs every failed reconnect as an error; this module reports outages once
    }


def live_config(base: dict[str, Any]) -> dict[str, Any]:
    """No delivery report for a delivered message: a Python callback per event, run in another thread,
    cost the serving process a quarter of its throughput and its P99 (GIL hand-offs). Failures still
    report, and acknowledgements are counted from the client's queue length."""
    return {**base, "delivery.report.only.error": True}


class LogRefused(RuntimeError):
    """The log cannot confirm a request's events: ``code`` is the error code the request is answered with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Confirmation:
    """The events of one batch of answers, in ``ack`` mode: ``future`` completes when the broker acknowledged
    every one of them, or the spool holds (fsynced) the ones it could not take; it fails with
    :class:`LogRefused` when one was dropped, or after the timeout. ``handed`` is counted by the event loop's
    thread only, ``confirmed`` by the log's background thread only (no counter written by two threads); the
    future is completed on the event loop, by whichever side sees the last of them."""

    __slots__ = ("handed", "confirmed", "sealed", "future", "loop", "_timer", "_log")

    def __init__(self, log: PredictionLog, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self._log = log
        self.loop = loop
        self.handed = 0
        self.confirmed = 0
        self.sealed = False
        self.future: asyncio.Future[None] = loop.create_future()
        self._timer = loop.call_later(timeout_s, self._expire, timeout_s)

    def seal(self) -> asyncio.Future[None]:
        """Every event was handed over (the event loop): the future completes once all are confirmed."""
        self.sealed = True
        if self.confirmed == self.handed:
            self._finish(None)
        return self.future

    def done(self) -> None:
        """One event confirmed (the background thread)."""
        self.confirmed += 1
        if self.sealed and self.confirmed == self.handed:
            self._tell(None)

    def failed(self, reason: str) -> None:
        self._tell(LogRefused("prediction_log_full", reason))

    def _tell(self, error: LogRefused | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self._finish, error)
        except RuntimeError:  # the loop is closed (a worker shutting down): nobody waits for the answer
            pass

    def __call__(self, err: KafkaError | None, msg: Any) -> None:
        """librdkafka's delivery report for one of the events."""
        if err is None:
            self.done()
        else:
            self._log._delivery_failed(err, msg.value(), self)

    def _finish(self, error: LogRefused | None) -> None:
        if self.future.done():
            return
        self._timer.cancel()
        if error is None:
            self.future.set_result(None)
        else:
            self.future.set_exception(error)

    def _expire(self, timeout_s: float) -> None:
        if not self.future.done():
            self.future.set_exception(LogRefused(
                "prediction_log_timeout", f"the prediction log did not confirm the events within "
                f"{timeout_s * 1000:.0f} ms; retry later with the same request_id"))


class PredictionLog:
    def __init__(self, connection: str | Mapping[str, Any], topic: str, spool: Spool, *, queue_size: int = 100_000,
                 linger_ms: float = 5.0, compression: str = "lz4", full_policy: FullPolicy = "reject",
                 probe_interval_s: float = 1.0, stall_s: float = 10.0, replay_chunk: int = 5_000,
                 durability: Durability = "async", ack_timeout_s: float = 2.0) -> None:
        self._config = producer_config(connection, queue_size, linger_ms, compression)
        self.bootstrap: str = self._config["bootstrap.servers"]
        self.topic = topic
        self.spool = spool
        self.full_policy = full_policy
        self.probe_interval_s = probe_interval_s
        self.stall_s = stall_s
        # A chunk larger than the client's queue could never be handed over whole (the replay would wait on
        # itself): a chunk is at most half the queue.
        self.replay_chunk = max(1, min(replay_chunk, queue_size // 2))
        self.queue_size = queue_size
        self.durability = durability
        self.ack_timeout_s = ack_timeout_s
        self._config["error_cb"] = self._on_error
        self._producer = self._live_producer()
        self._retiring: list[tuple[Producer, float]] = []  # replaced producers, purged again until quiet
        self._replayer: Producer | None = None  # a producer of its own, with a report per message, for replay
        self._to_spool: collections.deque[tuple[bytes, Confirmation | None]] = collections.deque()
        self._to_spool_bytes = 0
        self._lock = threading.Lock()  # guards the counters below and the to-spool byte count
        self._broker_up = False  # until the first probe or acknowledgement says otherwise
        self._connected_once = threading.Event()
        self._last_ack = time.monotonic()
        self._held_since: float | None = None  # since when the client holds unacknowledged events
        self._acked_seen = 0
        self._outages = 0
        self._next_probe = 0.0
        self._next_ack_check = 0.0
        self._produced = 0  # written by the event loop's thread only (the hot path takes no lock)
        self._accepted = self._failed = self._replay_acked = self._spooled = self._replayed = 0
        self._failures = self._rejected = self._replay_in_flight = self._requeued = 0
        self._dropped: collections.Counter[str] = collections.Counter()
        self._replay: _Replay | None = None
        self._fatal = False
        self._purge_held = False  # ack mode, broker declared down: take what the client holds into the spool
        self._spool_failing = False
        self._spool_retry_at = 0.0
        self._suspect: str | None = None  # a connection failed: is the cluster gone? (the thread asks)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)

    def _live_producer(self) -> Producer:
        if self.durability == "ack":  # a report per event: the request waits for it
            return Producer(self._config)
        return Producer({**live_config(self._config), "on_delivery": self._on_delivery})

    # -- request path ------------------------------------------------------------------------------

    def confirmation(self) -> Confirmation | None:
        """In ``ack`` mode, what the caller waits on before answering the events it then publishes."""
        if self.durability != "ack":
            return None
        return Confirmation(self, asyncio.get_running_loop(), self.ack_timeout_s)

    def publish(self, key: bytes | None, value: bytes) -> bool:
        """Take one event. Never blocks. False only when the event cannot be kept (spool full, policy reject)."""
        return self.publish_all(((key, value),))

    def publish_all(self, events: Sequence[tuple[bytes | None, bytes]], confirm: Confirmation | None = None
                    ) -> bool:
        """Take one request's events, all or none. Never blocks. False when they cannot all be kept (spool
        full, policy reject): then none was taken. With ``confirm``, each event taken counts towards it."""
        if self.full_policy == "reject" and not self._broker_up:
            size = sum(len(value) + 1 for _, value in events)
            with self._lock:
                if self._to_spool_bytes + size > self.spool.room() or self._spool_failing:
                    self._rejected += len(events)
                    return False
        if confirm is not None:
            confirm.handed += len(events)
        producer = self._producer
        topic = self.topic
        for i, (key, value) in enumerate(events):
            if self._broker_up:
                try:
                    if confirm is None:
                        producer.produce(topic, value, key)
                    else:
                        producer.produce(topic, value, key, on_delivery=confirm)
                    self._produced += 1
                    continue
                except BufferError:  # the client's memory queue is full: the broker is slow or gone
                    pass
                except KafkaException as exc:  # fatal producer state; the spool keeps the event meanwhile
                    log.error("Kafka producer refused an event: %s", exc)
            self._hand_to_spool(events[i:], confirm)
            break
        return True

    def _hand_to_spool(self, events: Sequence[tuple[bytes | None, bytes]], confirm: Confirmation | None) -> None:
        with self._lock:
            for _, value in events:
                if self._to_spool_bytes + len(value) + 1 > self.spool.room() and self.full_policy == "drop":
                    self._dropped["spool_full"] += 1
                    if confirm is not None:
                        confirm.failed("the spool is full: the event was dropped")
                else:  # policy reject: room was checked for the whole request (a race can only overfill a bit)
                    self._to_spool.append((value, confirm))
                    self._to_spool_bytes += len(value) + 1
                self._accepted += 1

    # -- state -------------------------------------------------------------------------------------

    def start(self) -> PredictionLog:
        self._thread.start()
        return self

    def wait_connected(self, timeout: float) -> bool:
        return self._connected_once.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._broker_up

    @property
    def accepting(self) -> bool:
        """False when a new event could not be kept (the broker is down and the spool is full or its disk
        refuses writes, policy reject): readiness says so."""
        if self.full_policy == "drop" or self._broker_up:
            return True
        return not self._spool_failing and self.spool.room() > 64 * 1024

    def stats(self) -> LogStats:
        # The client's queue length also counts reports and errors waiting to be served: serve them first, so
        # what is left are events (poll is thread-safe; the callbacks take the lock, so not inside it). Not in
        # ack mode: there the reports count confirmations, which only the background thread may do (a poll
        # here, on the event loop, could run a report beside it); ``in_flight`` may then be 50 ms behind.
        if self.durability != "ack":
            self._producer.poll(0)
        with self._lock:
            held = len(self._producer)
            return LogStats(
                connected=self._broker_up, accepted=self._produced + self._accepted,
                delivered=self._acked() + self._replay_acked, in_flight=held + self._replay_in_flight,
                queue_depth=len(self._to_spool), spool_events=self.spool.pending_events,
                spool_bytes=self.spool.pending_bytes, spooled=self._spooled, replayed=self._replayed,
                delivery_failures=self._failures, rejected=self._rejected, dropped=self._dropped.copy(),
                outages=self._outages, requeued=self._requeued, spool_skipped=self.spool.skipped,
                spool_failing=self._spool_failing,
            )

    def _acked(self) -> int:
        """Live events the broker acknowledged: handed over, minus what the client still holds or failed."""
        return max(0, self._produced - self._failed - len(self._producer))

    def close(self, timeout_s: float = 10.0) -> None:
        """Deliver what the client holds within ``timeout_s``; what is left (never sent) goes to the spool."""
        self._stop.set()
        self._thread.join(timeout=5)
        wait = max(0.0, timeout_s) if self._broker_up else min(timeout_s, 1.0)
        if self._replayer is not None:
            self._replayer.flush(wait)
            self._replayer.purge(in_queue=True, in_flight=True, blocking=False)
            self._replayer.flush(0)
        self._producer.flush(wait)
        if len(self._producer):
            # Purge what the client still holds; the callbacks route each purged event to the spool. An event
            # in flight to a broker that went away may have been written: spooling it can repeat it (counted
            # in ``requeued``; consumers de-duplicate on request_id).
            self._broker_up = False
            self._take_back(self._producer)
        for old, _ in self._retiring:
            self._take_back(old)
        self._finish_replay()
        for _ in range(3):  # a disk that refuses writes gets a few tries; what is left is lost with the process
            if self._write_spool(retry_now=True):
                break
            time.sleep(0.2)
        self.spool.close()

    # -- producer callbacks (run in the background thread, inside poll/flush) ------------------------

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        """``async`` mode: only failures are reported for live events (see ``live_config``)."""
        if err is not None:
            self._delivery_failed(err, msg.value(), None)

    def _delivery_failed(self, err: KafkaError, value: bytes, confirm: Confirmation | None) -> None:
        code = err.code()
        with self._lock:
            self._failed += 1
            if code in PERMANENT:
                self._dropped[err.name().lower().lstrip("_")] += 1
            else:
                self._failures += 1 if code not in PURGED else 0
                self._requeued += 1 if code in PURGED else 0
                self._to_spool.append((value, confirm))
                self._to_spool_bytes += len(value) + 1
        if code in PERMANENT:
            log.error("Kafka rejected a prediction event for good (%s); counted as dropped", err)
            if confirm is not None:
                confirm.failed(f"Kafka rejected the event: {err}")
        elif code not in PURGED:
            self._mark_down(f"delivery failed: {err}")

    def _on_error(self, err: KafkaError) -> None:
        """A connection error is a suspicion, not yet an outage: another broker may serve, and librdkafka
        reports "all brokers down" again and again during an outage, so such reports queued before the
        broker came back arrive after it did. The background thread asks the cluster for metadata (at most
        ``CONFIRM_TIMEOUT_S``) before declaring an outage — never here: this may run inside ``stats()`` on
        the event loop."""
        if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE):
            self._suspect = str(err)
        elif err.fatal():
            log.error("Kafka producer fatal error, recreating it: %s", err)
            self._fatal = True
            self._mark_down(str(err))
        else:
            log.warning("Kafka producer: %s", err)

    def _mark_down(self, why: str) -> None:
        """Only a probe (a metadata round trip, ``probe_interval_s`` later at the soonest) brings it back up:
        acknowledgements still arriving at an outage's start for events sent before it prove nothing. In
        ``ack`` mode what the client holds is taken into the spool (the requests waiting on it are answered
        once it is fsynced there, not when the broker returns)."""
        if self._broker_up:
            log.warning("Kafka at %s unreachable (%s): spooling prediction events", self.bootstrap, why)
            self._outages += 1
            self._purge_held = self.durability == "ack"
        self._broker_up = False
        self._next_probe = time.monotonic() + self.probe_interval_s

    def _mark_up(self) -> None:
        if not self._broker_up:
            log.info("Kafka at %s reachable: logging predictions to %r", self.bootstrap, self.topic)
        self._last_ack = time.monotonic()
        self._broker_up = True
        self._connected_once.set()

    # -- background thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._producer.poll(0.05 if not self._to_spool else 0)
                if self._replayer is not None:
                    self._replayer.poll(0)
                if self._fatal:
                    self._recreate_producer()
                if self._purge_held:
                    self._purge_held = False
                    self._take_back(self._producer)
                self._settle_retiring()
                self._write_spool()
                self._check_acks()
                if self._suspect is not None:
                    why, self._suspect = self._suspect, None
                    if self._broker_up and not self._answers(CONFIRM_TIMEOUT_S):
                        self._mark_down(why)
                if self._broker_up:
                    self._replay_step()
                elif time.monotonic() >= self._next_probe:
                    self._probe()
            except Exception:  # the thread must outlive any surprise; events stay held or spooled
                log.exception("prediction log step failed")
                time.sleep(0.5)

    def _take_back(self, producer: Producer) -> None:
        """Purge what ``producer`` holds; its callbacks route each event to the spool (``requeued``)."""
        producer.purge(in_queue=True, in_flight=True, blocking=False)
        producer.poll(0)
        producer.flush(0)

    def _write_spool(self, retry_now: bool = False) -> bool:
        """Append what waits for the spool. A disk that refuses the write keeps every event waiting in memory
        (readiness flips, new requests are refused while the broker is down) and is tried again after
        ``SPOOL_RETRY_S``. False when events still wait."""
        if not self._to_spool:
            return True
        if self._spool_failing and not retry_now and time.monotonic() < self._spool_retry_at:
            return False
        with self._lock:
            batch = list(self._to_spool)
            self._to_spool.clear()
        try:
            kept = self.spool.append([value for value, _ in batch])
        except SpoolWriteFailed as exc:
            with self._lock:
                self._to_spool.extendleft(reversed(batch))
            if not self._spool_failing:
                log.error("%s: %d prediction events wait in memory; new requests are refused while Kafka is "
                          "down", exc, len(batch))
            self._spool_failing = True
            self._spool_retry_at = time.monotonic() + SPOOL_RETRY_S
            return False
        if self._spool_failing:
            log.info("spool writable again")
            self._spool_failing = False
        with self._lock:
            self._to_spool_bytes -= sum(len(value) + 1 for value, _ in batch)
            self._spooled += kept
            if kept < len(batch):
                self._dropped["spool_full"] += len(batch) - kept
        for i, (_, confirm) in enumerate(batch):
            if confirm is not None:
                if i < kept:
                    confirm.done()
                else:
                    confirm.failed("the spool is full: the event was dropped")
        if kept < len(batch):
            log.error("spool full (%d bytes): dropped %d prediction events", self.spool.max_bytes, len(batch) - kept)
        return True

    def _recreate_producer(self) -> None:
        """After a fatal error (e.g. the idempotent producer's sequence broke) only a new producer can send.
        The new one is swapped in first, then the old one is purged into the spool by its callbacks; it is
        purged again until it stays empty for a second, so an event the event loop handed to it in the
        instant of the swap is not left behind."""
        self._broker_up = False
        old = self._producer
        self._producer = self._live_producer()
        self._take_back(old)
        self._retiring.append((old, time.monotonic()))
        if self._replayer is not None:
            self._replayer.purge(in_queue=True, in_flight=True, blocking=False)
            self._replayer.flush(1.0)
            self._replayer = None
        self._finish_replay()
        self._fatal = False

    def _settle_retiring(self) -> None:
        if not self._retiring:
            return
        now = time.monotonic()
        keep = []
        for old, since in self._retiring:
            if len(old):
                self._take_back(old)
                keep.append((old, now))
            elif now - since < 1.0:
                keep.append((old, since))
        self._retiring = keep  # quiet for a second: every event it was handed failed into the spool

    def _answers(self, timeout_s: float = 1.0) -> bool:
        """A metadata round trip to the cluster succeeds."""
        try:
            self._producer.list_topics(self.topic, timeout=timeout_s)
        except KafkaException:
            return False
        return True

    def _probe(self) -> None:
        if self._answers():
            self._mark_up()
        else:
            self._next_probe = time.monotonic() + self.probe_interval_s

    def _check_acks(self) -> None:
        """Twice a second: has the broker stopped answering while it still accepts connections? That is
        events held, none acknowledged, for ``stall_s`` — counted from the later of the last acknowledgement
        and the moment the client began holding events, so a quiet spell with nothing to send never counts
        as silence. Then new events go to the spool."""
        now = time.monotonic()
        if now < self._next_ack_check:
            return
        self._next_ack_check = now + 0.5
        acked = self._acked()
        if acked > self._acked_seen:
            self._acked_seen = acked
            self._last_ack = now
        if not len(self._producer):
            self._held_since = None
            return
        if self._held_since is None:
            self._held_since = now
        if self._broker_up and now - max(self._last_ack, self._held_since) > self.stall_s:
            self._mark_down(f"no acknowledgement for {self.stall_s:.0f}s")

    def _replay_step(self) -> None:
        """Hand the next chunk of the spool to the client; advance the cursor past the acknowledged prefix
        twice a second while it is in flight (a crash repeats at most half a second of replay), and once all
        of it is acknowledged."""
        replay = self._replay
        if replay is not None:
            if replay.pending:
                if time.monotonic() - replay.advanced_at >= REPLAY_ADVANCE_S:
                    self._advance_replay(replay)
                return
            self._finish_replay()
        if not self.spool.pending_events:
            return
        chunk = self.spool.read(self.replay_chunk)
        if not chunk.events:
            if chunk.end > self.spool.cursor:  # only garbled lines: pass over them
                self.spool.advance(chunk.end, 0, chunk.garbled)
            return
        if self._replayer is None:
            self._replayer = Producer(self._config)
        replay = _Replay(self, chunk)
        for i, value in enumerate(chunk.events):
            while True:
                try:
                    self._replayer.produce(self.topic, value, _key_of(value),
                                           on_delivery=functools.partial(replay.on_delivery, i))
                    with self._lock:
                        self._replay_in_flight += 1
                    break
                except BufferError:  # cannot happen with a chunk under the queue size; never spin regardless
                    if self._stop.is_set() or not self._broker_up:
                        replay.truncate(i)
                        break
                    self._replayer.poll(0.05)
            if len(replay.events) <= i:
                break
        self._replay = replay

    def _advance_replay(self, replay: _Replay) -> None:
        done = replay.acknowledged_prefix()
        replay.advanced_at = time.monotonic()
        if done <= replay.advanced:
            return
        events = done - replay.advanced
        end, garbled = replay.chunk.ends[done - 1], replay.chunk.garbled_before[done - 1]
        if done == len(replay.events) and len(replay.events) == len(replay.chunk.events):
            end, garbled = replay.chunk.end, replay.chunk.garbled  # garbled lines after the last event too
        self.spool.advance(end, events, garbled - replay.garbled_advanced)
        replay.advanced, replay.garbled_advanced = done, garbled
        with self._lock:
            self._replayed += events

    def _finish_replay(self) -> None:
        """Advance the spool past the acknowledged prefix of the chunk; the rest is replayed later."""
        replay, self._replay = self._replay, None
        if replay is None:
            return
        self._advance_replay(replay)
        if replay.advanced == len(replay.chunk.events) and not self.spool.pending_events:
            log.info("spool replayed: every spooled prediction event is in Kafka")


class _Key(msgspec.Struct):
    customer_id: str | None = None
    request_id: str | None = None


_key_decoder = msgspec.json.Decoder(_Key)


def _key_of(value: bytes) -> bytes | None:
    """The partition key a spooled event had (its customer, else its request id), so replay puts it on the
    partition it would have had live — one customer on one partition, a repeat beside its original."""
    try:
        decoded = _key_decoder.decode(value)
    except msgspec.MsgspecError:
        return None
    key = decoded.customer_id or decoded.request_id
    return key.encode() if key else None


class _Replay:
    """One chunk of the spool handed to the client, with which of its events the broker acknowledged."""

    def __init__(self, owner: PredictionLog, chunk: SpoolChunk) -> None:
        self.owner = owner
        self.chunk = chunk
        self.events = list(chunk.events)
        self.acked = [False] * len(self.events)
        self.pending = len(self.events)
        self.advanced = 0  # events before this index are behind the spool's cursor
        self.garbled_advanced = 0
        self.advanced_at = time.monotonic()

    def truncate(self, n: int) -> None:
        """Only the first ``n`` events were handed over."""
        self.pending -= len(self.events) - n
        del self.events[n:]
        del self.acked[n:]

    def on_delivery(self, index: int, err: KafkaError | None, _msg: Any) -> None:
        self.pending -= 1
        owner = self.owner
        with owner._lock:
            owner._replay_in_flight -= 1
            owner._replay_acked += err is None
        if err is None:
            self.acked[index] = True
            owner._last_ack = time.monotonic()
        elif err.code() not in PURGED:
            owner._mark_down(f"replay delivery failed: {err}")

    def acknowledged_prefix(self) -> int:
        for i, ok in enumerate(self.acked):
            if not ok:
                return i
        return len(self.acked)
