"""The BentoML service: one process per core (``MLOPS_WORKERS``), each a complete prediction path.

Every worker holds its own adaptive batcher, online-store client, ONNX sessions (following the registry),
Kafka producer with its own spool file, and gRPC server (the workers share the HTTP and gRPC ports).
Nothing crosses a process boundary on the request path. The HTTP endpoints are a lean ASGI app mounted
into the service (see ``service.http_api`` for why); BentoML's per-request tracing, access log and traffic
metrics are off by default (``MLOPS_TRACE_REQUESTS``, ``MLOPS_ACCESS_LOG`` turn the first two on) and the
service exports its own metrics on ``/metrics``.

    bentoml serve service.service:FraudDetector
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import bentoml
from bentoml._internal.container import BentoMLContainer

from mlops import connections
from mlops.settings import Settings
from service import bentoml_fixes, contract, fast_http, fast_path, metrics, port_guard, upstream
from service.grpc_api import GrpcServer, PortInUse, http_host
from service.http_api import HttpApi, bearer
from service.model_selector import ModelSelector
from service.online_store import OnlineStore
from service.outcomes_api import OutcomesEndpoint
from service.prediction_log import LogStats, PredictionLog
from service.prediction_service import PredictionService
from service.spool import Spool, SpoolInUse
from service.spool import in_use as spool_in_use

settings = Settings.load()  # read at import: workers and routes are part of the service definition
try:  # the code under the patches is the code they were written for, or one line and no service
    upstream.check()
except upstream.UpstreamChanged as _changed:
    print(f"bentoml serve: {_changed}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None
bentoml_fixes.apply()


def worker_spool_path(s: Settings, index: int, base: Path | None = None) -> Path:
    """A worker's spool: ``base`` (default: the predictions' spool) with the worker's index."""
    base = base or s.spool_path
    return base.with_name(f"{base.stem}-w{index}{base.suffix}")


def _spools_free() -> str | None:
    reasons = (spool_in_use(worker_spool_path(settings, i, base))
               for base in (settings.spool_path, settings.outcome_spool_path) for i in range(1, settings.workers + 1))
    return next((reason for reason in reasons if reason), None)


if bentoml.server_context.worker_index is None:  # `bentoml serve` itself, before it starts any worker
    port_guard.preflight(settings.grpc_host, settings.grpc_port,
                         other_checks=[functools.partial(connections.check, settings), _spools_free])
for _package in ("service", "mlops", "lifecycle"):  # BentoML's logging config leaves the root at WARNING
    logging.getLogger(_package).setLevel(settings.log_level)
log = logging.getLogger(__name__)
PREDICTION_ROUTES = ["/predict", "/predict_batch", "/outcomes", "/info", "/metrics", "/docs.json", "/openapi.json"]


def bentoml_config(s: Settings) -> dict[str, Any]:
    config: dict[str, Any] = {
        "workers": s.workers,
        "traffic": {"timeout": s.request_timeout_s},
        "metrics": {"enabled": False},  # its per-request middleware; our metrics are served on /metrics
        "logging": {"access": {"enabled": s.access_log}},
    }
    if not s.trace_requests:
        config["tracing"] = {"excluded_urls": PREDICTION_ROUTES}
    return config


def worker_index() -> int:
    return int(bentoml.server_context.worker_index or 1)


def adopt_orphan_spools(s: Settings, spool: Spool, base: Path | None = None) -> int:
    """Worker 1 takes over the spools of workers that no longer exist (the server now runs fewer); one still
    held by a live process is left alone. ``base``: which log's spools (default: the predictions')."""
    adopted = 0
    base = base or s.spool_path
    for path in sorted(base.parent.glob(f"{base.stem}-w*{base.suffix}")):
        index = path.stem.rsplit("-w", 1)[-1]
        if not index.isdigit() or int(index) <= s.workers:
            continue
        try:
            orphan = Spool(path, s.spool_max_bytes, fsync=False)
        except SpoolInUse as exc:
            log.warning("not adopting: %s", exc)
            continue
        while orphan.pending_events:
            chunk = orphan.read(10_000)
            spool.append(chunk.events)  # fsynced before the orphan's cursor moves past them
            orphan.advance(chunk.end, len(chunk.events), chunk.garbled)
            adopted += len(chunk.events)
        orphan.close()
        path.unlink(missing_ok=True)
        orphan.cursor_path.unlink(missing_ok=True)
        orphan.lock_path.unlink(missing_ok=True)
    return adopted


class Runtime:
    """What one worker runs; built in the startup hook, inside the worker's event loop."""

    def __init__(self, s: Settings) -> None:
        self.settings = s
        self.index = worker_index()
        self.store = OnlineStore(s)
        self.selector = ModelSelector(s)
        self.prediction_log = self._log(s.predictions_topic, s.spool_path)
        self.outcome_log = self._log(s.outcomes_topic, s.outcome_spool_path, queue_size=10_000)
        self.service = PredictionService(s, self.store, self.selector, self.prediction_log)
        self.grpc: GrpcServer | None = None
        self._exported = LogStats(False, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, {}, 0, 0, 0, False)
        self._tasks: list[asyncio.Task[None]] = []

    def _log(self, topic: str, spool_base: Path, queue_size: int | None = None) -> PredictionLog:
        """A durable Kafka log with this worker's spool of it."""
        s = self.settings
        try:
            spool = Spool(worker_spool_path(s, self.index, spool_base), s.spool_max_bytes)
        except SpoolInUse as exc:
            # Another server runs from this folder: sharing its spool would interleave both servers' events.
            # Stop the whole `bentoml serve` (exit 2) rather than restart this worker forever.
            log.error("%s", exc)
            port_guard.refuse(os.getppid(), str(exc))
            os.kill(os.getppid(), signal.SIGTERM)
            raise
        if self.index == 1:
            adopted = adopt_orphan_spools(s, spool, spool_base)
            if adopted:
                log.info("took over %d spooled %s events of workers that no longer run", adopted, topic)
        return PredictionLog(
            connections.kafka_config(s), topic, spool, queue_size=queue_size or s.publish_queue_size,
            linger_ms=s.linger_ms, compression=s.kafka_compression, full_policy=s.spool_full_policy,
            probe_interval_s=s.kafka_retry_interval_s, durability=s.log_durability,
            ack_timeout_s=s.log_ack_timeout_ms / 1000,
        )

    async def start(self) -> None:
        for kind in ("invalid_request", "unknown_entity", "overloaded", "online_store_unavailable",
                     "online_store_empty", "prediction_log_full", "prediction_log_timeout", "internal"):
            metrics.ERRORS.labels(kind)  # series exist at 0 from the start, so rate() alerts see them
        metrics.KAFKA_DROPPED.labels("spool_full")
        self.prediction_log.start()
        self.outcome_log.start()
        self.store.start()
        await self.store.check()
        if self.settings.grpc_port:
            host = self.settings.grpc_host or http_host()
            try:
                self.grpc = GrpcServer(self.service, asyncio.get_running_loop(), host, self.settings.grpc_port,
                                       self.settings.max_request_rows, authorization=http.authorization,
                                       outcomes=outcomes_endpoint)
            except PortInUse as exc:
                # A server that cannot serve its gRPC port must not run at all: stop the whole `bentoml serve`
                # (this worker's parent, which then exits with status 2) instead of restarting this worker forever.
                log.error("%s", exc)
                os.kill(os.getppid(), signal.SIGTERM)
                raise
        self._tasks.append(asyncio.get_running_loop().create_task(self._export_forever()))
        self._tasks.append(asyncio.get_running_loop().create_task(self._watch_loop_lag()))
        # The imported heap (~300,000 objects: BentoML, Feast, pandas, onnxruntime...) is never garbage; frozen,
        # CPython's full collections stop walking it. Measured: without this, P99 ~170 ms at P50 ~4 ms.
        gc.freeze()
        gc.callbacks.append(_time_collections())
        log.info("worker %d serving %s", self.index, self.selector.current.targets)

    async def stop(self) -> None:
        metrics.flush()
        if self.grpc is not None:
            await asyncio.to_thread(self.grpc.stop)
        for task in self._tasks:
            task.cancel()
        self.selector.stop()
        await asyncio.to_thread(self.prediction_log.close)
        await asyncio.to_thread(self.outcome_log.close)
        await self.store.close()

    async def _watch_loop_lag(self, every_s: float = 0.1) -> None:
        """How late the event loop wakes up: anything that blocks it (a long collection, a slow call) shows here."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(every_s)
            metrics.EVENT_LOOP_LAG.observe(max(0.0, loop.time() - started - every_s))

    def ready(self) -> bool:
        return self.service.not_ready_because() is None

    async def _export_forever(self, every_s: float = 0.25) -> None:
        ticks = 0
        while True:
            try:
                metrics.flush()
                if ticks % 4 == 0:
                    self.export()
            except Exception:  # metrics must never take the worker down
                log.exception("metrics export failed")
            ticks += 1
            await asyncio.sleep(every_s)

    def export(self) -> None:
        """Gauges and counters from the state of the store and the log (once a second, not per request)."""
        metrics.ONLINE_STORE_UP.set(int(self.store.up))
        metrics.ONLINE_STORE_EMPTY.set(int(self.store.empty))
        if self.grpc is not None:
            self.grpc.set_serving(self.ready())
        now, before = self.prediction_log.stats(), self._exported
        metrics.KAFKA_CONNECTED.set(int(now.connected))
        metrics.KAFKA_IN_FLIGHT.set(now.in_flight)
        metrics.KAFKA_QUEUE_DEPTH.set(now.queue_depth)
        metrics.KAFKA_SPOOL_EVENTS.set(now.spool_events)
        metrics.KAFKA_SPOOL_BYTES.set(now.spool_bytes)
        metrics.KAFKA_SPOOL_FAILING.set(int(now.spool_failing))
        counters = {"accepted": metrics.KAFKA_ACCEPTED, "delivered": metrics.KAFKA_DELIVERED,
                    "replayed": metrics.KAFKA_REPLAYED, "spooled": metrics.KAFKA_SPOOLED,
                    "delivery_failures": metrics.KAFKA_PUBLISH_FAILURES, "rejected": metrics.KAFKA_REJECTED,
                    "outages": metrics.KAFKA_OUTAGES, "requeued": metrics.KAFKA_REQUEUED,
                    "spool_skipped": metrics.KAFKA_SPOOL_SKIPPED}
        grown, self._exported = now.increments_since(before, list(counters))
        for field, n in grown.items():
            counters[field].inc(n)
        for reason, n in now.dropped.items():
            if n - before.dropped.get(reason, 0) > 0:
                metrics.KAFKA_DROPPED.labels(reason).inc(n - before.dropped.get(reason, 0))
        outcomes = self.outcome_log.stats()
        metrics.OUTCOME_LOG_SPOOL_EVENTS.set(outcomes.spool_events)
        metrics.OUTCOME_LOG_CONNECTED.set(int(outcomes.connected))

    async def info(self) -> dict[str, Any]:
        """What this worker serves and how it is doing; internal addresses only with MLOPS_INFO_ADDRESSES."""

        def addresses(key: str, value: str) -> dict[str, str]:
            return {key: value} if self.settings.info_addresses else {}

        serving = self.selector.current
        model = serving.production.model
        return {
            "model_name": model.name,
            "model_version": model.version,
            "provider": serving.production.provider,
            "nodes_by_provider": serving.production.placement,
            "features": list(serving.production.features),
            "metrics": model.metadata.get("metrics", {}),
            "canary_version": serving.versions[1],
            "canary_share": serving.canary_share,
            "shadow_version": serving.shadow.model.version if serving.shadow else None,
            "follows_registry": self.selector.registry is not None,
            "worker": self.index,
            "workers": self.settings.workers,
            "pid": os.getpid(),
            "ready": self.ready(),
            "not_ready_because": self.service.not_ready_because(),
            "batching": {"adaptive": self.settings.adaptive_batching, "max_batch_size": self.settings.max_batch_size,
                         "max_concurrent_batches": self.settings.max_concurrent_batches,
                         "max_latency_ms": self.settings.max_latency_ms,
                         "queued_rows": self.service.batcher.queued_rows},
            "online_store": {**addresses("address", self.settings.redis_address), "up": self.store.up,
                             "empty": self.store.empty, "project": self.store.project, "ttl_s": self.store.ttl_s},
            "kafka": {**addresses("bootstrap", self.settings.kafka_bootstrap), "topic": self.settings.predictions_topic,
                      "spool_full_policy": self.settings.spool_full_policy, "durability": self.settings.log_durability,
                      **self.prediction_log.stats().as_dict()},
            "outcomes": {"topic": self.settings.outcomes_topic, **self.outcome_log.stats().as_dict()},
            "grpc": self.grpc.address if self.grpc is not None and self.settings.info_addresses else None,
            "grpc_port": self.settings.grpc_port or None,
            "auth": "bearer" if http.authorization else None,
            "http_fast_path": fast_http.in_use(),
        }


def _time_collections() -> Any:
    """A gc callback timing each collection into ``mlops_gc_pause_seconds`` (buffered: no I/O inside it)."""
    started = [0.0]
    pauses = [metrics.BufferedHistogram(metrics.GC_PAUSE.labels(str(generation))) for generation in range(3)]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses[info["generation"]].observe(time.perf_counter() - started[0])
    return callback


class _Holder:
    runtime: Runtime | None = None


holder = _Holder()


async def _info() -> dict[str, Any]:
    if holder.runtime is None:
        return {"ready": False, "not_ready_because": "starting"}
    return await holder.runtime.info()


def _metrics_text() -> bytes:
    return BentoMLContainer.metrics_client.get().generate_latest()


outcomes_endpoint = OutcomesEndpoint(settings.max_body_bytes, settings.max_request_rows,
                                     bearer(settings.api_token_value()))
http = HttpApi(settings.max_body_bytes, settings.max_request_rows,
               contract.openapi("fraud_detector", "1", settings.max_request_rows), _info, _metrics_text,
               token=settings.api_token_value(), more={"/outcomes": outcomes_endpoint})


@bentoml.service(name="fraud_detector", **bentoml_config(settings))
@bentoml.asgi_app(http.app, path="/")
class FraudDetector:
    """POST /predict and /predict_batch, GET /info, /metrics and /docs.json (OpenAPI), plus BentoML's /livez
    and /readyz; the same predictions over gRPC on MLOPS_GRPC_PORT (service/proto/fraud.proto)."""

    @bentoml.on_startup
    async def _start(self) -> None:
        runtime = Runtime(settings)
        await runtime.start()
        holder.runtime = runtime
        http.service = runtime.service
        outcomes_endpoint.log = runtime.outcome_log

    @bentoml.on_shutdown
    async def _stop(self) -> None:
        runtime, holder.runtime = holder.runtime, None
        http.service = None
        outcomes_endpoint.log = None
        if runtime is not None:
            await runtime.stop()

    async def __is_ready__(self) -> bool:
        return holder.runtime is not None and holder.runtime.ready()


if settings.http_fast_path and not (settings.trace_requests or settings.access_log):  # those need BentoML's stack
    fast_path.install(FraudDetector, http.endpoints)
    fast_http.install(http.endpoints, settings.max_body_bytes)

__all__ = ["FraudDetector"]
