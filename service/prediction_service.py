"""One serving worker's prediction path, shared by HTTP and gRPC: batch, score, answer, log.

Requests are validated before they get here (``service.contract``). Rows go through the adaptive batcher;
each answered row becomes a prediction event on the Kafka log (``service.prediction_log``), which takes
it without waiting. Failures the client can retry — overload, online store down or empty, a prediction
log that can keep no more — raise :class:`Unavailable` (HTTP 503 / gRPC UNAVAILABLE) before any answer
is given, so a retried request is never half-served.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime

from mlops import events
from mlops.schema import MODEL_FEATURES, REQUEST_FEATURES
from mlops.settings import Settings
from service import metrics
from service.batching import AdaptiveBatcher, Overloaded
from service.contract import Prediction, PredictRequest, RowError
from service.model_selector import ModelSelector
from service.online_store import OnlineStore
from service.prediction_log import PredictionLog
from service.scoring import RETRYABLE, STORE_EMPTY, STORE_UNAVAILABLE, Scored, Scorer

OVERLOADED = "overloaded"
LOG_FULL = "prediction_log_full"


class Unavailable(RuntimeError):
    """A retryable failure of the whole request (HTTP 503 / gRPC UNAVAILABLE)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class PredictionService:
    def __init__(self, settings: Settings, store: OnlineStore, selector: ModelSelector,
                 prediction_log: PredictionLog) -> None:
        self.settings = settings
        self.store = store
        self.selector = selector
        self.prediction_log = prediction_log
        self.scorer = Scorer(store, selector)
        batched = settings.adaptive_batching
        self.batcher: AdaptiveBatcher[PredictRequest, Scored] = AdaptiveBatcher(
            self.scorer.score,
            max_batch_size=settings.max_batch_size if batched else 1,
            max_concurrent=settings.max_concurrent_batches if batched else settings.max_queued_rows,
            max_wait_s=settings.max_latency_ms / 1000,
            max_queued=settings.max_queued_rows,
            on_batch=metrics.BATCH_SIZE.observe,
        )

    async def predict(self, requests: list[PredictRequest], started: float) -> list[Prediction | RowError]:
        """One answer per request, in order: a Prediction, or a RowError for an unknown customer."""
        log_on = self.settings.prediction_log
        if log_on and not self.prediction_log.accepting:
            raise Unavailable(LOG_FULL, "the prediction log cannot keep more events (Kafka down, spool full); "
                                        "retry later")
        step = self.batcher.max_batch_size if self.settings.adaptive_batching else len(requests)
        try:
            if len(requests) <= step:
                scored = await self.batcher.submit(requests)
            else:
                chunks = [requests[i:i + step] for i in range(0, len(requests), step)]
                scored = [s for part in await asyncio.gather(*map(self.batcher.submit, chunks)) for s in part]
        except Overloaded as exc:
            raise Unavailable(OVERLOADED, f"server overloaded: {exc}") from None
        for result in scored:
            if result.error in RETRYABLE:
                raise Unavailable(result.error, result.detail or result.error)
        latency_ms = round((time.perf_counter() - started) * 1000.0, 3)
        timestamp = datetime.now(UTC)
        answers: list[Prediction | RowError] = []
        served: dict[tuple[str, str], int] = {}
        for request, result in zip(requests, scored, strict=True):
            if result.error is not None:
                answers.append(RowError(result.error, result.detail or "", request.customer_id))
                continue
            prediction = Prediction(
                request_id=request.request_id or os.urandom(16).hex(),
                customer_id=request.customer_id,
                prediction=result.prediction,
                label=int(result.prediction >= self.settings.decision_threshold),
                model_name=result.model_name,
                model_version=result.model_version,
                latency_ms=latency_ms,
            )
            event = events.PredictionEvent(
                request_id=prediction.request_id, timestamp=timestamp, model_name=prediction.model_name,
                model_version=prediction.model_version, customer_id=prediction.customer_id,
                features={name: result.features[name] for name in MODEL_FEATURES},  # type: ignore[index]
                request_features=list(REQUEST_FEATURES), prediction=prediction.prediction, label=prediction.label,
                latency_ms=latency_ms,
            )
            key = prediction.customer_id.encode() if prediction.customer_id else None
            if log_on and not self.prediction_log.publish(key, events.encode(event)):
                raise Unavailable(LOG_FULL, "the prediction log cannot keep more events; retry later")
            served[(prediction.model_name, prediction.model_version)] = \
                served.get((prediction.model_name, prediction.model_version), 0) + 1
            answers.append(prediction)
        for (name, version), n in served.items():
            metrics.PREDICTIONS.labels(name, version).inc(n)
        return answers

    # -- readiness ---------------------------------------------------------------------------------------

    def not_ready_because(self) -> str | None:
        """Why this worker should get no traffic now, or None when it should."""
        if not self.store.up:
            return STORE_UNAVAILABLE
        if self.store.empty:
            return STORE_EMPTY
        if self.settings.prediction_log and not self.prediction_log.accepting:
            return LOG_FULL
        return None
