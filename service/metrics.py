"""Prometheus metrics of the serving path, exposed on the service's ``/metrics``.

Declared through ``bentoml.metrics`` so they aggregate across the serving workers (Prometheus multiprocess
mode). Hot-path metrics are observed per batch where they can be (batch size, lookup and inference time,
predictions), per request only where the request is the unit (latency, status), and those through
in-process buffers added to the shared metrics four times a second (:class:`BufferedHistogram`).
"""

from __future__ import annotations

import bisect
from typing import Any

import bentoml

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
                   2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
AGE_BUCKETS = (60, 600, 3600, 6 * 3600, 12 * 3600, 86400, 2 * 86400, 7 * 86400)

REQUESTS = bentoml.metrics.Counter(
    name="mlops_requests_total",
    documentation="Prediction requests answered, by endpoint (predict, predict_batch, grpc_*) and status code",
    labelnames=["endpoint", "code"],
)
REQUEST_LATENCY = bentoml.metrics.Histogram(
    name="mlops_request_latency_seconds",
    documentation="Latency of prediction requests inside the server, body read to answer written",
    labelnames=["endpoint"],
    buckets=LATENCY_BUCKETS,
)
FEATURE_LOOKUP_LATENCY = bentoml.metrics.Histogram(
    name="mlops_feature_lookup_latency_seconds",
    documentation="One online-store round trip (one per adaptive batch)",
    buckets=LATENCY_BUCKETS,
)
INFERENCE_LATENCY = bentoml.metrics.Histogram(
    name="mlops_inference_latency_seconds",
    documentation="One ONNX Runtime call (one per adaptive batch and model version)",
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = bentoml.metrics.Histogram(
    name="mlops_batch_size",
    documentation="Rows per adaptive batch reaching the model",
    buckets=BATCH_BUCKETS,
)
FEATURE_AGE = bentoml.metrics.Histogram(
    name="mlops_feature_age_seconds",
    documentation="Age of the oldest online feature row in each batch (now minus its event time)",
    buckets=AGE_BUCKETS,
)
STALE_ROWS = bentoml.metrics.Counter(
    name="mlops_stale_feature_rows_total",
    documentation="Online feature rows served that were older than the feature view's TTL",
)
ONLINE_STORE_UP = bentoml.metrics.Gauge(
    name="mlops_online_store_up",
    documentation="1 when the online store (Redis) answers, 0 when it cannot be reached (lowest worker)",
    multiprocess_mode="livemin",
)
ONLINE_STORE_EMPTY = bentoml.metrics.Gauge(
    name="mlops_online_store_empty",
    documentation="1 when the online store holds no rows of the Feast project (not materialized, or lost)",
    multiprocess_mode="livemax",
)
PREDICTIONS = bentoml.metrics.Counter(
    name="mlops_predictions_total",
    documentation="Predictions served, by model version",
    labelnames=["model_name", "model_version"],
)
OUTCOMES = bentoml.metrics.Counter(
    name="mlops_outcomes_accepted_total",
    documentation="Outcomes (true labels of past predictions) accepted by POST /outcomes and gRPC Outcomes",
)
OUTCOME_LOG_SPOOL_EVENTS = bentoml.metrics.Gauge(
    name="mlops_outcome_log_spool_events",
    documentation="Outcomes waiting in the local spool for the broker",
    multiprocess_mode="livesum",
)
OUTCOME_LOG_CONNECTED = bentoml.metrics.Gauge(
    name="mlops_outcome_log_connected",
    documentation="1 while the outcome log reaches the broker (lowest worker)",
    multiprocess_mode="livemin",
)
ERRORS = bentoml.metrics.Counter(
    name="mlops_errors_total",
    documentation="Failed predictions by kind (invalid_request, unknown_entity, overloaded, online_store_unavailable, "
                  "online_store_empty, prediction_log_full, internal)",
    labelnames=["kind"],
)
EVENT_LOOP_LAG = bentoml.metrics.Histogram(
    name="mlops_event_loop_lag_seconds",
    documentation="How late each worker's event loop woke from a 100 ms sleep (stalls: long GC, blocking calls)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
GC_PAUSE = bentoml.metrics.Histogram(
    name="mlops_gc_pause_seconds",
    documentation="CPython garbage collections in the serving workers, by generation (each stops the event loop)",
    labelnames=["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
)
MODEL_INFO = bentoml.metrics.Gauge(
    name="mlops_model_info",
    documentation="1 for the model version and ONNX Runtime provider being served",
    labelnames=["model_name", "model_version", "provider"],
    multiprocess_mode="livemax",
)
MODEL_SWAPS = bentoml.metrics.Counter(
    name="mlops_model_swaps_total",
    documentation="Times the served model version changed (promotion, rollback, canary change)",
)
MODEL_RELOAD_FAILURES = bentoml.metrics.Counter(
    name="mlops_model_reload_failures_total",
    documentation="Failed attempts to follow the registry (the current version keeps serving)",
)
ROLLOUT_SHARE = bentoml.metrics.Gauge(
    name="mlops_rollout_candidate_share",
    documentation="The rollout candidate's share of traffic this worker applies (0 in shadow and without one)",
    labelnames=["model_name", "candidate"],
    multiprocess_mode="livemax",
)
CANDIDATE_FAILURES = bentoml.metrics.Counter(
    name="mlops_candidate_failures_total",
    documentation="Rows the rollout candidate failed to score in a traffic step (Production answered them)",
)
SHADOW_FAILURES = bentoml.metrics.Counter(
    name="mlops_shadow_failures_total",
    documentation="Batches the shadow candidate failed to score (Production answered them anyway)",
)

# The prediction log: where every accepted event is (see service/prediction_log.py).
KAFKA_CONNECTED = bentoml.metrics.Gauge(
    name="mlops_kafka_connected",
    documentation="1 when the broker acknowledges prediction events, 0 while they are spooled (lowest worker)",
    multiprocess_mode="livemin",
)
KAFKA_ACCEPTED = bentoml.metrics.Counter(
    name="mlops_kafka_accepted_total",
    documentation="Prediction events taken by the prediction log (handed to Kafka or the spool)",
)
KAFKA_DELIVERED = bentoml.metrics.Counter(
    name="mlops_kafka_delivered_total",
    documentation="Prediction events acknowledged by Kafka (acks=all), live and replayed",
)
KAFKA_REPLAYED = bentoml.metrics.Counter(
    name="mlops_kafka_replayed_total",
    documentation="Spooled prediction events delivered after Kafka came back",
)
KAFKA_SPOOLED = bentoml.metrics.Counter(
    name="mlops_kafka_spooled_total",
    documentation="Prediction events written to the local spool while Kafka was unreachable",
)
KAFKA_PUBLISH_FAILURES = bentoml.metrics.Counter(
    name="mlops_kafka_publish_failures_total",
    documentation="Deliveries Kafka refused (the events went to the spool, not lost)",
)
KAFKA_OUTAGES = bentoml.metrics.Counter(
    name="mlops_kafka_outages_total",
    documentation="Times the prediction log declared Kafka unreachable and began spooling",
)
KAFKA_REQUEUED = bentoml.metrics.Counter(
    name="mlops_kafka_requeued_total",
    documentation="Prediction events taken back from the Kafka client into the spool (these may reach the topic "
                  "twice; consumers de-duplicate on request_id)",
)
KAFKA_SPOOL_SKIPPED = bentoml.metrics.Counter(
    name="mlops_kafka_spool_skipped_total",
    documentation="Torn or garbled spool lines passed over instead of replayed",
)
KAFKA_SPOOL_FAILING = bentoml.metrics.Gauge(
    name="mlops_kafka_spool_failing",
    documentation="1 while the disk refuses spool writes (full, I/O error): events wait in memory (highest worker)",
    multiprocess_mode="livemax",
)
KAFKA_REJECTED = bentoml.metrics.Counter(
    name="mlops_kafka_rejected_total",
    documentation="Prediction events refused because the spool was full (policy reject: the request got a 503)",
)
KAFKA_DROPPED = bentoml.metrics.Counter(
    name="mlops_kafka_dropped_total",
    documentation="Prediction events lost, by reason (spool_full under policy drop, or a permanent Kafka error)",
    labelnames=["reason"],
)
KAFKA_IN_FLIGHT = bentoml.metrics.Gauge(
    name="mlops_kafka_in_flight",
    documentation="Prediction events handed to the Kafka client and not yet acknowledged",
    multiprocess_mode="livesum",
)
KAFKA_QUEUE_DEPTH = bentoml.metrics.Gauge(
    name="mlops_kafka_queue_depth",
    documentation="Prediction events waiting to be written to the spool",
    multiprocess_mode="livesum",
)
KAFKA_SPOOL_EVENTS = bentoml.metrics.Gauge(
    name="mlops_kafka_spool_events",
    documentation="Prediction events waiting in the local spool",
    multiprocess_mode="livesum",
)
KAFKA_SPOOL_BYTES = bentoml.metrics.Gauge(
    name="mlops_kafka_spool_bytes",
    documentation="Bytes of prediction events waiting in the local spool",
    multiprocess_mode="livesum",
)


class BufferedHistogram:
    """A histogram child observed in process and added to the shared one in bulk by :func:`flush`.

    In multiprocess mode every ``observe`` is two locked writes to a memory-mapped file (~3 µs measured); per
    request, that was a few percent of a worker's CPU. Here an observation is a bisect and two additions, and
    :func:`flush` (every quarter second, from the worker's export loop) adds each bucket's count at once.
    Prometheus reads the same buckets, count and sum either way, at most a flush interval later.
    """

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds: list[float] = list(getattr(child, "_upper_bounds", []))
        self.bulk = bool(self.bounds) and hasattr(child, "_buckets") and hasattr(child, "_sum")
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self.values: list[float] = []  # only where this prometheus_client offers no bulk update
        _BUFFERS.append(self)

    def observe(self, value: float) -> None:
        if self.bulk:
            self.counts[bisect.bisect_left(self.bounds, value)] += 1
            self.total += value
        else:
            self.values.append(value)

    def flush(self) -> None:
        if self.bulk:
            counts, self.counts = self.counts, [0] * len(self.bounds)
            total, self.total = self.total, 0.0
            for i, n in enumerate(counts):
                if n:
                    self.child._buckets[i].inc(n)
            if any(counts):
                self.child._sum.inc(total)
        else:
            values, self.values = self.values, []
            for value in values:
                self.child.observe(value)


class BufferedCounter:
    """A counter child incremented in process, added to the shared one by :func:`flush`."""

    def __init__(self, child: Any) -> None:
        self.child = child
        self.n = 0
        _BUFFERS.append(self)

    def inc(self, n: int = 1) -> None:
        self.n += n

    def flush(self) -> None:
        n, self.n = self.n, 0
        if n:
            self.child.inc(n)


_BUFFERS: list[BufferedHistogram | BufferedCounter] = []


def flush() -> None:
    """Add what the buffered metrics of this worker observed since the last flush to the shared metrics."""
    for buffer in _BUFFERS:
        buffer.flush()
