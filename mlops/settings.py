"""One typed settings object for every process of the stack.

Values come from environment variables prefixed ``MLOPS_`` and, underneath them, from the env file that
``mlops-services up`` writes (``.run/services.env`` by default, or the file named by ``MLOPS_ENV_FILE``).
Real environment variables win over the file, so a deployment can override anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "MLOPS_"
DEFAULT_ENV_FILE = Path(".run/services.env")


class SettingsError(ValueError):
    """A setting cannot be used as given (a secret file unreadable or empty, credentials half given)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # Local services (written by `mlops-services up`).
    redis_address: str = Field("127.0.0.1:6379", description="host:port of the Redis online store")
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="comma-separated Kafka bootstrap servers")

    # Credentials and TLS of the backends. A secret comes from its ``*_FILE`` (mounted from a Kubernetes
    # Secret; wins) or from its variable; never logged. Off by default: the local services are loopback-only.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka listener protocol (SASL_SSL: SCRAM or PLAIN credentials over TLS)")
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_password_file: Path | None = None
    kafka_ssl_ca_file: Path | None = Field(None, description="CA bundle that signed the brokers' certificates")
    kafka_ssl_cert_file: Path | None = Field(None, description="client certificate (brokers that require mTLS)")
    kafka_ssl_key_file: Path | None = None
    redis_username: str | None = Field(None, description="Redis ACL user (unset: the default user)")
    redis_password: SecretStr | None = None
    redis_password_file: Path | None = None
    redis_tls: bool = Field(False, description="connect to Redis over TLS")
    redis_ca_file: Path | None = Field(None, description="CA bundle that signed Redis's certificate")
    redis_cert_file: Path | None = Field(None, description="client certificate (a Redis with tls-auth-clients)")
    redis_key_file: Path | None = None
    mlflow_username: str | None = Field(None, description="user of an authenticated `mlflow server`")
    mlflow_password: SecretStr | None = None
    mlflow_password_file: Path | None = None
    mlflow_token: SecretStr | None = Field(None, description="bearer token of an authenticated tracking server")
    mlflow_token_file: Path | None = None
    mlflow_db_password: SecretStr | None = Field(None, description="password of the database in MLOPS_MLFLOW_URI")
    mlflow_db_password_file: Path | None = None

    # Topics.
    predictions_topic: str = "predictions"
    alerts_topic: str = "drift-alerts"
    outcomes_topic: str = Field("prediction-outcomes", description="true labels of past predictions (POST /outcomes)")

    # Model and features.
    model_name: str = "fraud_detector"
    model_version: str | None = Field(None, description="version to serve; latest in the store when unset")
    feature_repo: Path = Path("feature_repo")
    onnx_provider: Literal["auto", "cpu", "cuda"] = "auto"

    # Lifecycle.
    mlflow_uri: str = Field(
        "", description="MLflow tracking + model registry: `http://host:port` of an `mlflow server` (or a database "
        "URI); empty: the embedded SQLite store in mlflow_dir")
    mlflow_dir: Path = Field(Path(".run/mlflow"), description="embedded MLflow store: mlflow.db and artifacts/")
    mlflow_experiment: str = Field("fraud-detector-training", description="MLflow experiment of the training runs")
    ray_address: str | None = Field(
        None, description="a Ray cluster (`ray://host:10001`, or `auto` inside one) on which the training pipeline "
        "runs its point-in-time join and its training (the retraining controller's too); unset: the pipeline "
        "file's `compute:` section, by default this process")
    registry_lock_timeout_s: float = Field(60.0, gt=0, description="longest wait for the registry's promotion lock")
    registry_lock_lease_s: float = Field(
        120.0, gt=0, description="lease of the registry's promotion lock: a holder that overruns it is refused "
        "its next write, and another promoter may take the lock over")
    follow_registry: bool = Field(True, description="serve the registry's Production version and follow changes")
    registry_poll_s: float = Field(1.0, gt=0, description="how often the service checks the registry")
    canary_share: float = Field(0.0, ge=0, le=1, description="share of traffic scored by the Staging version")

    # Serving.
    workers: int = Field(1, ge=1, le=64, description="serving processes (one per core), each with its own batcher")
    adaptive_batching: bool = Field(True, description="merge concurrent requests into one lookup and model call")
    max_batch_size: int = Field(64, ge=1, le=4096, description="most rows per batch")
    max_concurrent_batches: int = Field(2, ge=1, le=64, description="batches in progress at once per worker")
    max_latency_ms: int = Field(
        1000, ge=1, le=60_000,
        description="a request that waited this long for a batch slot is shed with a 503 (retryable)",
    )
    max_queued_rows: int = Field(4096, ge=1, description="rows waiting for a batch beyond which requests get a 503")
    max_request_rows: int = Field(256, ge=1, description="largest batch a client may send in one request")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body (HTTP 413 beyond)")
    grpc_port: int = Field(3001, ge=0, le=65535, description="gRPC port of the serving workers; 0: no gRPC")
    grpc_host: str | None = Field(None, description="gRPC bind address; unset: the HTTP server's own address")
    decision_threshold: float = Field(0.5, gt=0, lt=1, description="fraud label is 1 at or above this score")
    request_timeout_s: float = Field(
        10.0, gt=0, le=600,
        description="BentoML answers a request still running after this long with a 504 (keep it short: it holds "
                    "a timer per request for this long)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    http_fast_path: bool = Field(
        True, description="serve /predict and /predict_batch inside uvicorn's HTTP protocol, past BentoML's ASGI stack "
                          "and uvicorn's ASGI adapter (off: every route through BentoML's full stack)")
    access_log: bool = Field(False, description="BentoML's per-request access log (4xx/5xx are logged anyway)")
    trace_requests: bool = Field(False, description="OpenTelemetry spans for prediction requests")

    # Online store (Feast on Redis).
    online_store_timeout_ms: int = Field(250, ge=10, description="a Redis lookup slower than this fails the request")
    online_store_check_s: float = Field(1.0, gt=0, description="how often reachability and emptiness are checked")

    # Access to the service. A secret: read from the file (mounted from a Kubernetes Secret), or from the
    # variable; never logged, never shown by /info.
    api_token: SecretStr | None = Field(None, description="bearer token the prediction routes require (HTTP and gRPC)")
    api_token_file: Path | None = Field(None, description="file holding the bearer token (wins over MLOPS_API_TOKEN)")
    info_addresses: bool = Field(False, description="/info shows the Redis and Kafka addresses")

    # Prediction log.
    prediction_log: bool = Field(True, description="log every prediction to Kafka (off: benchmarks, shadow tests)")
    publish_queue_size: int = Field(100_000, ge=1, description="events the Kafka client may hold in memory")
    kafka_linger_ms: float | None = Field(None, ge=0, description="how long the producer waits to fill a batch; "
                                                                  "unset: 0 in ack mode, 5 ms in async")
    kafka_compression: Literal["none", "lz4", "zstd", "snappy", "gzip"] = "lz4"
    spool_path: Path = Field(Path(".run/spool/predictions.jsonl"),
                             description="on-disk spool while Kafka is down; each worker adds its index")
    spool_max_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    spool_full_policy: Literal["reject", "drop"] = Field(
        "reject", description="spool full: reject the request with a 503, or serve it and drop (count) the event"
    )
    kafka_retry_interval_s: float = Field(1.0, gt=0, description="how often a down broker is probed")
    log_durability: Literal["ack", "async"] = Field(
        "ack", description="answer after the broker acknowledged the request's events (or the spool fsynced "
                           "them), or as soon as the Kafka client holds them (a worker crash loses those)")
    log_ack_timeout_ms: int = Field(2000, ge=10, description="ack mode: events not confirmed in this time fail "
                                                             "the request with a 503 prediction_log_timeout")

    # Streaming drift consumer.
    dlq_topic: str = "predictions-dlq"
    drift_group_id: str = "drift-detector"
    drift_slot_seconds: float = Field(10.0, gt=0, description="width of one histogram time slot")
    drift_window_seconds: float = Field(300.0, gt=0, description="rolling window length")
    drift_max_events: int | None = Field(None, ge=1, description="cut the window to the newest slots holding this many")
    drift_rules_file: Path | None = Field(None, description="YAML/JSON alert rules; built-in defaults when unset")
    drift_eval_interval_s: float = Field(2.0, gt=0)
    drift_metrics_port: int = Field(9108, ge=0, le=65535, description="Prometheus port of the consumer; 0: off")
    drift_metrics_host: str = Field("127.0.0.1", description="address the consumer's metrics bind (loopback unless "
                                    "set: 0.0.0.0 in a pod)")
    drift_auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    drift_batch_size: int = Field(10_000, ge=1, le=1_000_000,
                                  description="most messages per poll: one decode/bin pass and one checkpoint each")
    drift_backoff_max_s: float = Field(5.0, gt=0, description="longest wait between retries through an outage")
    drift_change_detector: Literal["page_hinkley", "adwin", "off"] = Field(
        "page_hinkley", description="river detector on each feature's drift score (drift_change_point events)")
    drift_change_metric: str = Field("psi", description="the score the change detectors watch (a stat test name)")
    drift_change_min_evaluations: int = Field(30, ge=1, description="evaluations before Page-Hinkley may signal")
    drift_change_threshold: float = Field(1.0, gt=0, description="Page-Hinkley threshold, in units of the "
                                          "metric's drift threshold")
    drift_change_cooldown_s: float | None = Field(None, gt=0, description="one change-point event per feature in "
                                                  "this time for the group; unset: the window length")

    # Outcome join and realised quality (`mlops-drift join`).
    quality_group_id: str = "outcome-join"
    outcomes_dlq_topic: str = "prediction-outcomes-dlq"
    quality_horizon_s: float = Field(7 * 86400.0, gt=0, description="how long a prediction waits for its outcome")
    quality_slot_seconds: int = Field(300, ge=1, description="time slot of the quality windows (prediction time)")
    quality_window_seconds: int = Field(86400, ge=1, description="the live quality window")
    quality_eval_interval_s: float = Field(5.0, gt=0, description="how often the join exports its metrics")
    quality_metrics_port: int = Field(9109, ge=0, le=65535, description="Prometheus port of the join; 0: off")
    quality_drop: float = Field(0.05, gt=0, lt=1, description="performance alert when accuracy or AUC is this much "
                                                              "(relative) below the version's holdout")
    quality_min_labels: int = Field(200, ge=1, description="labelled predictions before realised quality is judged")
    quality_min_predictions: int = Field(500, ge=1, description="predictions before estimated quality is judged")

    # Row-level training/serving skew (`mlops-drift skew`).
    skew_sample: int = Field(500, ge=1, le=100_000, description="newest prediction events compared per check")
    skew_tolerance: float = Field(1e-6, ge=0, description="relative difference counted as a differing value")
    skew_threshold: float = Field(0.01, gt=0, lt=1, description="share of differing rows that is skew (alert)")
    skew_min_rows: int = Field(100, ge=1, description="compared rows before a feature is judged")
    skew_metrics_port: int = Field(9110, ge=0, le=65535, description="Prometheus port of the skew check; 0: off")

    @field_validator("model_version", mode="before")
    @classmethod
    def _empty_version_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def tracking_uri(self) -> str:
        """``mlflow_uri``, or the embedded SQLite store (created on first use)."""
        if self.mlflow_uri:
            return self.mlflow_uri
        return f"sqlite:///{(self.mlflow_dir / 'mlflow.db').resolve()}"

    @property
    def redis_host(self) -> str:
        return self.redis_address.rsplit(":", 1)[0]

    @property
    def redis_port(self) -> int:
        return int(self.redis_address.rsplit(":", 1)[1])

    @property
    def outcome_spool_path(self) -> Path:
        """The outcomes' spool, beside the predictions' (each worker adds its index to both)."""
        return self.spool_path.with_name(f"outcomes{self.spool_path.suffix}")

    @property
    def linger_ms(self) -> float:
        """In ``ack`` mode every answer waits for the batch it is sent in: no linger (even 0.5 ms delayed
        the acknowledgement by milliseconds, librdkafka's timer being coarse; batches still form under load,
        from what arrives while earlier requests are in flight); in ``async`` nothing waits, so a 5 ms linger
        buys larger batches."""
        if self.kafka_linger_ms is not None:
            return self.kafka_linger_ms
        return 0.0 if self.log_durability == "ack" else 5.0

    def secret(self, name: str) -> str | None:
        """The secret ``name`` (``api_token``, ``redis_password``…): its file's content (trailing newline
        dropped), else its variable, else None. An unreadable or empty file is an error, never "no secret"."""
        path: Path | None = getattr(self, f"{name}_file")
        if path is not None:
            variable = f"{ENV_PREFIX}{name.upper()}_FILE"
            try:
                value = path.read_text().strip()
            except OSError as exc:
                raise SettingsError(f"{variable} {path}: {exc.strerror or exc}") from None
            if not value:
                raise SettingsError(f"{variable} {path} is empty")
            return value
        held: SecretStr | None = getattr(self, name)
        return held.get_secret_value() if held is not None else None

    def api_token_value(self) -> str | None:
        """The bearer token, or None when the routes are open."""
        return self.secret("api_token")

    @classmethod
    def load(cls, env_file: Path | None = None) -> Settings:
        """Settings from the environment, over the services env file when it exists."""
        path = env_file or Path(os.environ.get(f"{ENV_PREFIX}ENV_FILE", DEFAULT_ENV_FILE))
        return cls(_env_file=path if path.exists() else None)
