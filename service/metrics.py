"""Prometheus metrics of the serving path, exposed on the service's ``/metrics``.

Declared through ``bentoml.metrics`` so they aggregate across BentoML's worker processes.
"""

from __future__ import annotations

import bentoml

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

REQUEST_LATENCY = bentoml.metrics.Histogram(
    name="mlops_request_latency_seconds",
    documentation="End-to-end latency of prediction requests inside the API server",
    labelnames=["endpoint"],
    buckets=LATENCY_BUCKETS,
)
FEATURE_LOOKUP_LATENCY = bentoml.metrics.Histogram(
    name="mlops_feature_lookup_latency_seconds",
    documentation="Latency of one Feast online lookup (one call per adaptive batch)",
    buckets=LATENCY_BUCKETS,
)
INFERENCE_LATENCY = bentoml.metrics.Histogram(
    name="mlops_inference_latency_seconds",
    documentation="Latency of one ONNX Runtime call (one call per adaptive batch)",
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = bentoml.metrics.Histogram(
    name="mlops_batch_size",
    documentation="Rows per adaptive batch reaching the model",
    buckets=BATCH_BUCKETS,
)
PREDICTIONS = bentoml.metrics.Counter(
    name="mlops_predictions_total",
    documentation="Predictions served, by model version",
    labelnames=["model_name", "model_version"],
)
ERRORS = bentoml.metrics.Counter(
    name="mlops_errors_total",
    documentation="Failed predictions by kind (unknown_entity, overloaded, model_connection_retry)",
    labelnames=["kind"],
)
MODEL_INFO = bentoml.metrics.Gauge(
    name="mlops_model_info",
    documentation="1 for the model version and ONNX Runtime provider being served",
    labelnames=["model_name", "model_version", "provider"],
    multiprocess_mode="livemax",
)
KAFKA_PUBLISHED = bentoml.metrics.Counter(
    name="mlops_kafka_published_total",
    documentation="Prediction events acknowledged by Kafka (acks=all)",
)
KAFKA_PUBLISH_FAILURES = bentoml.metrics.Counter(
    name="mlops_kafka_publish_failures_total",
    documentation="Prediction events Kafka did not take at the first try (they are spooled, not lost)",
)
KAFKA_SPOOLED = bentoml.metrics.Counter(
    name="mlops_kafka_spooled_total",
    documentation="Prediction events written to the local spool while Kafka was unreachable",
)
KAFKA_REPLAYED = bentoml.metrics.Counter(
    name="mlops_kafka_replayed_total",
    documentation="Spooled prediction events delivered after Kafka came back",
)
KAFKA_DROPPED = bentoml.metrics.Counter(
    name="mlops_kafka_dropped_total",
    documentation="Prediction events lost because the spool was full (spool_max_bytes)",
)
KAFKA_QUEUE_DEPTH = bentoml.metrics.Gauge(
    name="mlops_kafka_queue_depth",
    documentation="Prediction events waiting in memory for the background producer",
    multiprocess_mode="livesum",
)
KAFKA_SPOOL_BYTES = bentoml.metrics.Gauge(
    name="mlops_kafka_spool_bytes",
    documentation="Bytes of prediction events waiting in the local spool",
    multiprocess_mode="livesum",
)
MODEL_SWAPS = bentoml.metrics.Counter(
    name="mlops_model_swaps_total",
    documentation="Times the served model version changed (promotion, rollback, canary change)",
)
MODEL_RELOAD_FAILURES = bentoml.metrics.Counter(
    name="mlops_model_reload_failures_total",
    documentation="Failed attempts to follow the registry (the current version keeps serving)",
)
