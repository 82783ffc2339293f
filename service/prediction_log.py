"""Every accepted prediction reaches Kafka exactly once, without the request path ever waiting on it.

The producer is librdkafka's (confluent-kafka): idempotent, ``acks=all``, and it never gives up on a
message (``message.timeout.ms=0``), so a broker that dies and comes back gets each message it was handed
once — the broker drops retried duplicates by producer id and sequence number. What the producer holds
lives in memory, so while the broker is known to be down new events go to an on-disk :class:`Spool`
instead, and are replayed in bulk once it answers again. An event therefore always sits in exactly one
place: handed to the client (``in_flight``, until the broker acknowledges it), waiting to be written to
the spool (``queue_depth``), in the spool (``spool_events``), delivered, or — only when the spool is full
and the policy is ``drop`` — dropped and counted by reason. With the default policy ``reject`` a full
spool makes :meth:`PredictionLog.publish` refuse the event, so the request fails with a retryable 503
instead of being answered and forgotten.

One background thread serves the producer's callbacks, writes and replays the spool, and probes the
broker while it is down; nothing it does can block or fail a request.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from confluent_kafka import KafkaError, KafkaException, Producer

from service.spool import Spool

log = logging.getLogger(__name__)
FullPolicy = Literal["reject", "drop"]
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

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "dropped": dict(self.dropped)}


def producer_config(bootstrap: str, queue_size: int, linger_ms: float, compression: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,  # implies acks=all, bounded in-flight requests, no reordering
        "acks": "all",
        "message.timeout.ms": 0,  # never expire: a message is delivered, or still held, or purged on close
        "linger.ms": linger_ms,
        "compression.type": compression,
        "queue.buffering.max.messages": queue_size,
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 1000,
        "socket.connection.setup.timeout.ms": 5000,
        "log_level": 2,  # librdkafka logs every failed reconnect as an error; this module reports outages once
    }


def live_config(base: dict[str, Any]) -> dict[str, Any]:
    """No delivery report for a delivered message: a Python callback per event, run in another thread,
    cost the serving process a quarter of its throughput and its P99 (GIL hand-offs). Failures still
    report, and acknowledgements are counted from the client's queue length."""
    return {**base, "delivery.report.only.error": True}


class PredictionLog:
    def __init__(self, bootstrap: str, topic: str, spool: Spool, *, queue_size: int = 100_000,
                 linger_ms: float = 5.0, compression: str = "lz4", full_policy: FullPolicy = "reject",
                 probe_interval_s: float = 1.0, stall_s: float = 10.0, replay_chunk: int = 5_000) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.spool = spool
        self.full_policy = full_policy
        self.probe_interval_s = probe_interval_s
        self.stall_s = stall_s
        self.replay_chunk = replay_chunk
        self.queue_size = queue_size
        self._config = {**producer_config(bootstrap, queue_size, linger_ms, compression), "error_cb": self._on_error}
        self._producer = Producer({**live_config(self._config), "on_delivery": self._on_delivery})
        self._replayer: Producer | None = None  # a producer of its own, with a report per message, for replay
        self._to_spool: collections.deque[bytes] = collections.deque()
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
        self._accepted = self._produced = self._failed = self._replay_acked = self._spooled = self._replayed = 0
        self._failures = self._rejected = self._replay_in_flight = 0
        self._dropped: collections.Counter[str] = collections.Counter()
        self._replay: _Replay | None = None
        self._fatal = False
        self._suspect: str | None = None  # a connection failed: is the cluster gone? (the thread asks)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)

    # -- request path ------------------------------------------------------------------------------

    def publish(self, key: bytes | None, value: bytes) -> bool:
        """Take one event. Never blocks. False only when the event cannot be kept (spool full, policy reject)."""
        if self._broker_up:
            try:
                self._producer.produce(self.topic, value, key)
                self._produced += 1  # only the event loop's thread publishes: no lock on the hot path
                return True
            except BufferError:  # the client's memory queue is full: the broker is slow or gone
                pass
            except KafkaException as exc:  # fatal producer state; the spool keeps the event meanwhile
                log.error("Kafka producer refused an event: %s", exc)
        return self._hand_to_spool(value)

    def _hand_to_spool(self, value: bytes) -> bool:
        with self._lock:
            if self._to_spool_bytes + len(value) + 1 > self.spool.room():
                if self.full_policy == "reject":
                    self._rejected += 1
                    return False
                self._dropped["spool_full"] += 1
                self._accepted += 1
                return True
            self._to_spool.append(value)
            self._to_spool_bytes += len(value) + 1
            self._accepted += 1
        return True

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
        """False when a new event could not be kept (spool full and policy reject): readiness says so."""
        return self.full_policy == "drop" or self._broker_up or self.spool.room() > 64 * 1024

    def stats(self) -> LogStats:
        # The client's queue length also counts reports and errors waiting to be served: serve them first, so
        # what is left are events (poll is thread-safe; the callbacks take the lock, so not inside it).
        self._producer.poll(0)
        with self._lock:
            held = len(self._producer)
            return LogStats(
                connected=self._broker_up, accepted=self._produced + self._accepted,
                delivered=self._acked() + self._replay_acked, in_flight=held + self._replay_in_flight,
                queue_depth=len(self._to_spool), spool_events=self.spool.pending_events,
                spool_bytes=self.spool.pending_bytes, spooled=self._spooled, replayed=self._replayed,
                delivery_failures=self._failures, rejected=self._rejected, dropped=self._dropped.copy(),
                outages=self._outages,
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
            # in flight to a broker that went away may have been written: spooling it is the one case where
            # a restart can repeat an event (consumers de-duplicate on request_id).
            self._broker_up = False
            self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            self._producer.poll(0)
            self._producer.flush(0)
        self._finish_replay()
        self._write_spool()
        self.spool.close()

    # -- producer callbacks (run in the background thread, inside poll/flush) ------------------------

    def _on_delivery(self, err: KafkaError | None, msg) -> None:
        """Only failures are reported for live events (see ``live_config``)."""
        if err is None:
            return
        code = err.code()
        with self._lock:
            self._failed += 1
            if code in PERMANENT:
                self._dropped[err.name().lower().lstrip("_")] += 1
            else:
                self._failures += 1 if code not in PURGED else 0
                self._to_spool.append(msg.value())
                self._to_spool_bytes += len(msg.value()) + 1
        if code in PERMANENT:
            log.error("Kafka rejected a prediction event for good (%s); counted as dropped", err)
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
        acknowledgements still arriving at an outage's start for events sent before it prove nothing."""
        if self._broker_up:
            log.warning("Kafka at %s unreachable (%s): spooling prediction events", self.bootstrap, why)
            self._outages += 1
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
                self._producer.poll(0.05)
                if self._replayer is not None:
                    self._replayer.poll(0)
                if self._fatal:
                    self._recreate_producer()
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

    def _write_spool(self) -> None:
        if not self._to_spool:
            return
        batch = []
        while self._to_spool:
            batch.append(self._to_spool.popleft())
        kept = self.spool.append(batch)
        with self._lock:
            self._to_spool_bytes -= sum(len(v) + 1 for v in batch)
            self._spooled += kept
            if kept < len(batch):
                self._dropped["spool_full"] += len(batch) - kept
        if kept < len(batch):
            log.error("spool full (%d bytes): dropped %d prediction events", self.spool.max_bytes, len(batch) - kept)

    def _recreate_producer(self) -> None:
        """After a fatal error (e.g. the idempotent producer's sequence broke) only a new producer can send.
        What the old one held is purged into the spool by its callbacks and replayed by the new one."""
        old = self._producer
        old.purge(in_queue=True, in_flight=True, blocking=False)
        old.flush(1.0)
        if self._replayer is not None:
            self._replayer.purge(in_queue=True, in_flight=True, blocking=False)
            self._replayer.flush(1.0)
            self._replayer = None
        self._finish_replay()
        with self._lock:  # the old producer's events are accounted for (failed into the spool): start afresh
            self._produced -= self._failed
            self._failed = 0
        self._producer = Producer({**live_config(self._config), "on_delivery": self._on_delivery})
        self._fatal = False

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
        """Hand the next chunk of the spool to the client; advance the cursor once all of it is acknowledged."""
        if self._replay is not None:
            if self._replay.pending:
                return
            self._finish_replay()
        if not self.spool.pending_events:
            return
        events, end = self.spool.read(self.replay_chunk)
        if not events:
            return
        if self._replayer is None:
            self._replayer = Producer(self._config)
        replay = _Replay(self, events, end)
        for i, value in enumerate(events):
            while True:
                try:
                    self._replayer.produce(self.topic, value, _key_of(value),
                                           on_delivery=functools.partial(replay.on_delivery, i))
                    with self._lock:
                        self._replay_in_flight += 1
                    break
                except BufferError:
                    self._replayer.poll(0.05)
        self._replay = replay

    def _finish_replay(self) -> None:
        """Advance the spool past the acknowledged prefix of the chunk; the rest is replayed later."""
        replay, self._replay = self._replay, None
        if replay is None:
            return
        done = replay.acknowledged_prefix()
        if done:
            self.spool.advance(replay.offsets[done - 1], done)
            with self._lock:
                self._replayed += done
        if done == len(replay.events) and not self.spool.pending_events:
            log.info("spool replayed: every spooled prediction event is in Kafka")


class _Key(msgspec.Struct):
    customer_id: str | None = None


_key_decoder = msgspec.json.Decoder(_Key)


def _key_of(value: bytes) -> bytes | None:
    """The partition key a spooled event had (its customer), so replay keeps one customer on one partition."""
    try:
        customer = _key_decoder.decode(value).customer_id
    except msgspec.MsgspecError:
        return None
    return customer.encode() if customer else None


class _Replay:
    """One chunk of the spool handed to the client, with which of its events the broker acknowledged."""

    def __init__(self, owner: PredictionLog, events: list[bytes], end: int) -> None:
        self.owner = owner
        self.events = events
        start = end - sum(len(e) + 1 for e in events)
        self.offsets = list(itertools.accumulate((len(e) + 1 for e in events), initial=start))[1:]  # end of each
        self.acked = [False] * len(events)
        self.pending = len(events)

    def on_delivery(self, index: int, err: KafkaError | None, _msg) -> None:
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
