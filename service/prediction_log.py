"""Publishes every prediction to Kafka without ever blocking or failing the request path.

The request path only puts the event on a bounded in-memory queue (``publish`` never waits). One
background thread owns the Kafka producer (acks=all, idempotent, retries). When the broker cannot be
reached, events go to a local :class:`~service.spool.Spool` file instead, and are replayed once the
broker answers again; a full queue also spills straight to the spool. Only a full spool drops events,
and those are counted. Delivery is at-least-once: a replayed event whose first acknowledgement was lost
can arrive twice, so consumers de-duplicate on ``request_id``.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from service import metrics
from service.spool import Spool

log = logging.getLogger(__name__)


class PredictionLog:
    def __init__(
        self,
        bootstrap: str,
        topic: str,
        spool: Spool,
        queue_size: int = 10_000,
        retry_interval_s: float = 2.0,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.spool = spool
        self.retry_interval_s = retry_interval_s
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._producer: KafkaProducer | None = None
        self._broker_up = False
        self._next_attempt = 0.0
        self._next_gauges = 0.0
        self.connected_once = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)

    # -- request path ------------------------------------------------------------------------------

    def publish(self, event: dict[str, Any]) -> None:
        """Hand one event over; never blocks and never raises."""
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self._spill([event])

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> PredictionLog:
        self._thread.start()
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        """Deliver what is queued (within ``timeout_s``); whatever is left goes to the spool."""
        deadline = time.monotonic() + timeout_s
        while self._broker_up and not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(timeout=max(0.1, deadline - time.monotonic()))
        if self._producer is not None:
            try:
                self._producer.flush(timeout=max(0.1, deadline - time.monotonic()))
                self._producer.close(timeout=1)
            except KafkaError:
                pass
        self._spill(self._drain())

    @property
    def broker_up(self) -> bool:
        return self._broker_up

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    # -- background thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:  # the thread must outlive any surprise; events stay queued or spooled
                log.exception("prediction log step failed")
                self._mark_down()
            if time.monotonic() >= self._next_gauges:  # gauges once a second, not once per event
                metrics.KAFKA_QUEUE_DEPTH.set(self._queue.qsize())
                metrics.KAFKA_SPOOL_BYTES.set(self.spool.size())
                self._next_gauges = time.monotonic() + 1.0

    def _step(self) -> None:
        if not self._broker_up:
            self._spill(self._drain())
            if time.monotonic() < self._next_attempt:
                time.sleep(0.1)
                return
            self._connect_and_replay()
            return
        try:
            event = self._queue.get(timeout=0.2)
        except queue.Empty:
            return
        self._send(event)

    def _connect_and_replay(self) -> None:
        try:
            if self._producer is None:
                self._producer = KafkaProducer(
                    bootstrap_servers=self.bootstrap.split(","),
                    acks="all",
                    enable_idempotence=True,
                    linger_ms=5,
                    max_block_ms=2_000,
                    request_timeout_ms=5_000,
                    delivery_timeout_ms=10_000,
                    bootstrap_timeout_ms=5_000,
                    reconnect_backoff_max_ms=1_000,
                    key_serializer=lambda k: k.encode() if k is not None else None,
                    value_serializer=lambda v: json.dumps(v, separators=(",", ":")).encode(),
                )
            self._producer.partitions_for(self.topic)  # raises while the broker is unreachable
        except (KafkaError, OSError) as exc:
            log.warning("Kafka at %s unreachable (%s); spooling prediction events", self.bootstrap, exc)
            self._mark_down()
            return
        events = self.spool.take()
        failed: list[dict[str, Any]] = []
        futures = []
        for event in events:
            try:
                futures.append((event, self._producer.send(self.topic, key=_key(event), value=event)))
            except KafkaError:
                failed.append(event)
        for event, future in futures:
            try:
                future.get(timeout=15)
                metrics.KAFKA_REPLAYED.inc()
                metrics.KAFKA_PUBLISHED.inc()
            except KafkaError:
                failed.append(event)
        self.spool.finish_replay(failed)
        if failed:
            log.warning("replay of %d spooled events left %d undelivered", len(events), len(failed))
            self._mark_down()
            return
        if events:
            log.info("replayed %d spooled prediction events to Kafka", len(events))
        self._broker_up = True
        self.connected_once.set()

    def _send(self, event: dict[str, Any]) -> None:
        assert self._producer is not None
        try:
            future = self._producer.send(self.topic, key=_key(event), value=event)
        except KafkaError:
            metrics.KAFKA_PUBLISH_FAILURES.inc()
            self._spill([event])
            self._mark_down()
            return
        future.add_callback(lambda _: metrics.KAFKA_PUBLISHED.inc())
        future.add_errback(lambda _exc: self._on_delivery_failure(event))

    def _on_delivery_failure(self, event: dict[str, Any]) -> None:
        metrics.KAFKA_PUBLISH_FAILURES.inc()
        self._spill([event])
        self._mark_down()

    def _mark_down(self) -> None:
        self._broker_up = False
        self._next_attempt = time.monotonic() + self.retry_interval_s

    def _drain(self) -> list[dict[str, Any]]:
        events = []
        while True:
            try:
                events.append(self._queue.get_nowait())
            except queue.Empty:
                return events

    def _spill(self, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        dropped = self.spool.append(events)
        metrics.KAFKA_SPOOLED.inc(len(events) - dropped)
        if dropped:
            metrics.KAFKA_DROPPED.inc(dropped)
            log.error("spool full: dropped %d prediction events", dropped)


def _key(event: dict[str, Any]) -> str | None:
    """Partition by entity so one customer's events stay in order."""
    return event.get("customer_id") or event.get("request_id")
