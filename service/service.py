"""The BentoML services: an API server in front of an adaptively batched model service.

``FraudDetector`` (the entry point, HTTP and gRPC) validates requests, hands rows to ``FraudModel`` and
publishes each prediction to Kafka. ``FraudModel.score`` is batchable: BentoML merges concurrent calls into
one batch, so one Feast lookup and one ONNX Runtime call serve many requests. Which model version answers
is decided by the registry (``service.model_selector``), switched without dropping a request.

    bentoml serve service.service:FraudDetector
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import aiohttp
import bentoml
import numpy as np
from bentoml.exceptions import NotFound, ServiceUnavailable
from bentoml.validators import ContentType
from fastapi import FastAPI
from pydantic import Field

from mlops.schema import ENTITY, MODEL_FEATURES, REQUEST_FEATURES
from mlops.settings import Settings
from service import grpc_api, metrics
from service.feature_lookup import FeatureLookup, open_store
from service.model_selector import ModelSelector
from service.onnx_predictor import OnnxPredictor
from service.prediction_log import PredictionLog
from service.schemas import Prediction, PredictRequest, ScoreResult, ScoreRow
from service.spool import Spool

log = logging.getLogger(__name__)
# A declared content type spares BentoML from rebuilding the list type's JSON schema for every
# response it writes (it did so to find the media type: a third of the model service's CPU).
T = TypeVar("T")
JsonList = Annotated[list[T], ContentType("application/json")]
settings = Settings.load()  # read at import: batching limits are part of the API definition


# BentoML's client to a dependency recycles its HTTP session every `max_requests` calls and closes the
# old one with requests still in flight on it (they fail with "Server disconnected"); never recycle.
NO_SESSION_RECYCLING = {"max_requests": 2**31 - 1, "max_age": 10.0 * 365 * 24 * 3600}


@bentoml.service(name="fraud_model", workers=1, traffic={"timeout": 30}, runner_connection=NO_SESSION_RECYCLING)
class FraudModel:
    """Feature lookup + ONNX inference for whole batches."""

    def __init__(self) -> None:
        self.selector = ModelSelector(settings)
        self.lookup = FeatureLookup(open_store(settings))
        self._store_reached = False
        log.info("serving %s (canary %s)", *self.selector.current.versions)

    @bentoml.on_shutdown
    def _stop_following(self) -> None:
        self.selector.stop()

    def __is_ready__(self) -> bool:
        if not self._store_reached:
            try:
                self._store_reached = self.lookup.ping()
            except Exception as exc:  # any failure to reach Redis means "not ready yet"
                log.warning("online store not reachable yet: %s", exc)
        return self._store_reached

    @(bentoml.api(batchable=True, max_batch_size=settings.max_batch_size, max_latency_ms=settings.max_latency_ms)
      if settings.adaptive_batching else bentoml.api)
    def score(self, rows: list[ScoreRow]) -> JsonList[ScoreResult]:
        serving = self.selector.current  # this batch finishes on these sessions, whatever swaps meanwhile
        metrics.BATCH_SIZE.observe(len(rows))
        ids = [r.customer_id for r in rows if r.customer_id is not None]
        started = time.perf_counter()
        looked_up = iter(self.lookup.fetch(ids))
        metrics.FEATURE_LOOKUP_LATENCY.observe(time.perf_counter() - started)

        results: list[ScoreResult] = []
        by_predictor: dict[int, tuple[OnnxPredictor, list[int]]] = {}
        for row in rows:
            predictor = serving.route(row.customer_id)
            model = predictor.model
            stats = next(looked_up) if row.customer_id is not None else {}
            if stats is None:
                results.append(ScoreResult(model_name=model.name, model_version=model.version,
                                           error=f"unknown {ENTITY} {row.customer_id!r}: no online features"))
                continue
            vector = {**stats, **(row.features or {}), "transaction_amount": row.transaction_amount}
            by_predictor.setdefault(id(predictor), (predictor, []))[1].append(len(results))
            results.append(ScoreResult(features=vector, model_name=model.name, model_version=model.version))
        for predictor, indices in by_predictor.values():
            x = np.array([[results[i].features[f] for f in predictor.features] for i in indices],  # type: ignore[index]
                         dtype=np.float32)
            started = time.perf_counter()
            proba = predictor.predict(x)
            metrics.INFERENCE_LATENCY.observe(time.perf_counter() - started)
            for i, p in zip(indices, proba.tolist(), strict=True):
                results[i].prediction = p
        return results

    @bentoml.api
    def info(self) -> dict[str, Any]:
        serving = self.selector.current
        model = serving.production.model
        return {
            "model_name": model.name,
            "model_version": model.version,
            "provider": serving.production.provider,
            "features": list(serving.production.features),
            "metrics": model.metadata.get("metrics", {}),
            "canary_version": serving.versions[1],
            "canary_share": serving.canary_share,
            "follows_registry": self.selector.registry is not None,
            "adaptive_batching": settings.adaptive_batching,
            "max_batch_size": settings.max_batch_size,
            "max_latency_ms": settings.max_latency_ms,
        }


ops_app = FastAPI(title="fraud_detector ops")
BatchRequests = Annotated[list[PredictRequest], Field(min_length=1, max_length=settings.max_request_rows)]


@bentoml.service(name="fraud_detector", traffic={"timeout": 30, "max_concurrency": 1024})
@bentoml.asgi_app(ops_app, path="/info")
class FraudDetector:
    """Public API: /predict, /predict_batch, GET /info, plus BentoML's /livez, /readyz and /metrics; the same
    predictions over gRPC on MLOPS_GRPC_PORT (service/proto/fraud.proto)."""

    model = bentoml.depends(FraudModel)

    def __init__(self) -> None:
        spool = Spool(settings.spool_path, settings.spool_max_bytes)
        self.prediction_log = PredictionLog(
            settings.kafka_bootstrap, settings.predictions_topic, spool,
            queue_size=settings.publish_queue_size, retry_interval_s=settings.kafka_retry_interval_s,
        ).start()

        self.grpc_server = None

    @bentoml.on_startup
    async def _start_grpc(self) -> None:
        if settings.grpc_port:
            servicer = grpc_api.FraudDetectorServicer(self._score_requests, asyncio.get_running_loop(),
                                                      settings.max_request_rows)
            self.grpc_server = grpc_api.start(servicer, settings.grpc_host, settings.grpc_port)

    @bentoml.on_shutdown
    def _flush_prediction_log(self) -> None:
        if self.grpc_server is not None:
            self.grpc_server.stop(grace=5).wait()
        self.prediction_log.close()

    def __is_ready__(self) -> bool:
        # The model service's own readiness (model loaded, Redis reached) is checked by BentoML.
        return self.prediction_log.connected_once.is_set()

    @ops_app.get("/")
    async def info(self) -> dict[str, Any]:
        details = await self.model.to_async.info()
        return {
            **details,
            "kafka": {"bootstrap": settings.kafka_bootstrap, "topic": settings.predictions_topic,
                      "connected": self.prediction_log.broker_up,
                      "queue_depth": self.prediction_log.queue_depth,
                      "spool_bytes": self.prediction_log.spool.size()},
        }

    @bentoml.api(route="/predict", input_spec=PredictRequest)
    async def predict(self, **fields: Any) -> Prediction:
        started = time.perf_counter()
        request = PredictRequest(**fields)
        (prediction,) = await self._score([request], started, endpoint="predict", single=True)
        return prediction

    @bentoml.api(route="/predict_batch")
    async def predict_batch(self, requests: BatchRequests) -> JsonList[Prediction | dict[str, str]]:
        """Per-row results in request order; a row whose entity is unknown gets ``{"error": ...}``."""
        return await self._score(requests, time.perf_counter(), endpoint="predict_batch", single=False)

    async def _score_requests(self, requests: list[PredictRequest], endpoint: str, single: bool) -> list:
        return await self._score(requests, time.perf_counter(), endpoint, single)

    async def _score(self, requests: list[PredictRequest], started: float, endpoint: str, single: bool) -> list:
        rows = [ScoreRow(customer_id=r.customer_id, transaction_amount=r.transaction_amount, features=r.features)
                for r in requests]
        results: list[ScoreResult] = []
        step = settings.max_batch_size
        try:
            for i in range(0, len(rows), step):
                results.extend(await self._call_model(rows[i:i + step]))
        except ServiceUnavailable as exc:  # batch queue would exceed max_latency_ms: shed load, retryable
            metrics.ERRORS.labels("overloaded").inc()
            raise ServiceUnavailable(f"model service overloaded, retry later ({exc})") from exc
        latency_ms = (time.perf_counter() - started) * 1000.0
        answers: list[Prediction | dict[str, str]] = []
        for request, result in zip(requests, results, strict=True):
            if result.error is not None:
                metrics.ERRORS.labels("unknown_entity").inc()
                if single:
                    raise NotFound(result.error)
                answers.append({"error": result.error, "customer_id": request.customer_id or ""})
                continue
            answers.append(self._answer(request, result, latency_ms))
        metrics.REQUEST_LATENCY.labels(endpoint).observe(time.perf_counter() - started)
        return answers

    async def _call_model(self, rows: list[ScoreRow], attempts: int = 3) -> list[ScoreResult]:
        """``score`` has no side effects, so a call lost to a connection the model service's keep-alive
        timer closed under our feet is simply sent again."""
        for attempt in range(1, attempts + 1):
            try:
                return await self.model.to_async.score(rows)
            except aiohttp.ClientConnectionError:
                if attempt == attempts:
                    raise
                metrics.ERRORS.labels("model_connection_retry").inc()
        raise AssertionError("unreachable")

    def _answer(self, request: PredictRequest, result: ScoreResult, latency_ms: float) -> Prediction:
        assert result.prediction is not None and result.features is not None
        prediction = Prediction(
            request_id=request.request_id or uuid.uuid4().hex,
            customer_id=request.customer_id,
            prediction=result.prediction,
            label=int(result.prediction >= settings.decision_threshold),
            model_name=result.model_name,
            model_version=result.model_version,
            latency_ms=round(latency_ms, 3),
        )
        metrics.PREDICTIONS.labels(result.model_name, result.model_version).inc()
        self.prediction_log.publish({
            "request_id": prediction.request_id,
            "timestamp": datetime.now(UTC).isoformat(),
            "model_name": prediction.model_name,
            "model_version": prediction.model_version,
            ENTITY: request.customer_id,
            "features": {name: result.features[name] for name in MODEL_FEATURES},
            "request_features": list(REQUEST_FEATURES),
            "prediction": prediction.prediction,
            "label": prediction.label,
            "latency_ms": prediction.latency_ms,
        })
        return prediction


__all__ = ["FraudDetector", "FraudModel"]
