"""One serving worker's prediction path, shared by HTTP and gRPC: batch, score, answer, log.

Requests are validated before they get here (``service.contract``). Rows go through the adaptive batcher;
each answered row becomes a prediction event on the Kafka log (``service.prediction_log``); a request's
events are handed over all or none, and in the ``ack`` durability mode the batch's answers are sent once
the log confirmed its events (the batch's slot is free meanwhile). Failures the client can retry —
overload, online store down or empty, a prediction log that can keep no more or did not confirm in time —
raise :class:`Unavailable` (HTTP 503 / gRPC UNAVAILABLE) instead of an answer, so a retried request is
never half-served.
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
from service.batching import AdaptiveBatcher, Later, Overloaded, Pending
from service.contract import Prediction, PredictRequest, RowError
from service.model_selector import ModelSelector
from service.online_store import OnlineStore
from service.prediction_log import LogRefused, PredictionLog
from service.scoring import RETRYABLE, STORE_EMPTY, STORE_UNAVAILABLE, Scorer

OVERLOADED = "overloaded"
LOG_FULL = "prediction_log_full"
REQUEST_FEATURE_LIST = list(REQUEST_FEATURES)


class Unavailable(RuntimeError):
    """A retryable failure of the whole request (HTTP 503 / gRPC UNAVAILABLE)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


Answer = list[Prediction | RowError]


class PredictionService:
    def __init__(self, settings: Settings, store: OnlineStore, selector: ModelSelector,
                 prediction_log: PredictionLog) -> None:
        self.settings = settings
        self.store = store
        self.selector = selector
        self.prediction_log = prediction_log
        self.scorer = Scorer(store, selector)
        batched = settings.adaptive_batching
        self.batcher: AdaptiveBatcher[PredictRequest, Answer | Unavailable] = AdaptiveBatcher(
            self._answer_batch,
            max_batch_size=settings.max_batch_size if batched else 1,
            max_concurrent=settings.max_concurrent_batches if batched else settings.max_queued_rows,
            max_wait_s=settings.max_latency_ms / 1000,
            max_queued=settings.max_queued_rows,
            on_batch=metrics.BATCH_SIZE.observe,
        )

    async def predict(self, requests: list[PredictRequest], started: float) -> Answer:
        """One answer per request row, in order: a Prediction, or a RowError for an unknown customer. All the
        rows are answered and logged, or none (:class:`Unavailable`, retryable)."""
        future = self.submit(requests, started)
        try:
            await future
        except Overloaded:
            pass  # result() says so
        return self.result(future)

    def submit(self, requests: list[PredictRequest], started: float) -> asyncio.Future[Answer | Unavailable]:
        """Queue the request for a batch; :meth:`result` of the future is its answer. Raises
        :class:`Unavailable` at once when it cannot be taken."""
        if self.settings.prediction_log and not self.prediction_log.accepting:
            raise Unavailable(LOG_FULL, "the prediction log cannot keep more events (Kafka down, spool full); "
                                        "retry later")
        try:
            return self.batcher.submit_nowait(requests, started)
        except Overloaded as exc:
            raise Unavailable(OVERLOADED, f"server overloaded: {exc}") from None

    @staticmethod
    def result(future: asyncio.Future[Answer | Unavailable]) -> Answer:
        try:
            answer = future.result()
        except Overloaded as exc:
            raise Unavailable(OVERLOADED, f"server overloaded: {exc}") from None
        if isinstance(answer, Unavailable):
            raise answer
        return answer

    async def _answer_batch(self, batch: list[Pending[PredictRequest, Answer | Unavailable]]
                            ) -> list[Answer | Unavailable] | Later[Answer | Unavailable]:
        """Score the batch's rows at once, then answer and log request by request: a request with a row that
        cannot be served now (store down or emptied) is refused whole, before any of its rows is logged, and
        one whose events the log cannot all keep is refused with none of them logged."""
        rows = batch[0].rows if len(batch) == 1 else [row for pending in batch for row in pending.rows]
        scored = await self.scorer.score(list(rows))
        now = time.perf_counter()
        timestamp = datetime.now(UTC)
        log_on = self.settings.prediction_log
        threshold = self.settings.decision_threshold
        prediction_log = self.prediction_log
        confirm = prediction_log.confirmation() if log_on else None
        served: dict[tuple[str, str], int] = {}
        answers: list[Answer | Unavailable] = []
        start = 0
        for pending in batch:
            part = scored[start:start + len(pending.rows)]
            start += len(pending.rows)
            refused = next((s for s in part if s.error in RETRYABLE), None)
            if refused is not None:
                answers.append(Unavailable(refused.error, refused.detail or refused.error))  # type: ignore[arg-type]
                continue
            latency_ms = round((now - pending.tag) * 1000.0, 3)  # type: ignore[operator]
            answer: Answer = []
            to_log: list[tuple[bytes | None, bytes]] = []
            for request, result in zip(pending.rows, part, strict=True):
                if result.error is not None:
                    answer.append(RowError(result.error, result.detail or "", request.customer_id))
                    continue
                label = int(result.prediction >= threshold)
                prediction = Prediction(request.request_id or os.urandom(16).hex(), request.customer_id,
                                        result.prediction, label, result.model_name, result.model_version,
                                        latency_ms)
                if log_on:
                    event = events.PredictionEvent(
                        request_id=prediction.request_id, timestamp=timestamp, model_name=result.model_name,
                        model_version=result.model_version, customer_id=request.customer_id,
                        features={name: result.features[name] for name in MODEL_FEATURES},  # type: ignore[index]
                        request_features=REQUEST_FEATURE_LIST, prediction=result.prediction, label=label,
                        latency_ms=latency_ms, model_ms=result.model_ms,
                        shadow=events.ShadowScore(model_version=result.shadow[0], prediction=result.shadow[1],
                                                  model_ms=result.shadow[2]) if result.shadow else None,
                        rollout=result.rollout, failed_version=result.failed_version,
                    )
                    # No customer: keyed by the request id, so a repeat lands on the original's partition (the
                    # drift consumer de-duplicates per partition).
                    key = (request.customer_id or prediction.request_id).encode()
                    to_log.append((key, events.encode(event)))
                answer.append(prediction)
            if to_log and not prediction_log.publish_all(to_log, confirm):
                answers.append(Unavailable(LOG_FULL, "the prediction log cannot keep more events; retry later"))
                continue
            for item in answer:
                if isinstance(item, Prediction):
                    version = (item.model_name, item.model_version)
                    served[version] = served.get(version, 0) + 1
            answers.append(answer)
        if confirm is None:
            _count(served)
            return answers
        ready = confirm.seal()
        ready.add_done_callback(lambda f: None if f.cancelled() or f.exception() else _count(served))
        return Later(answers, ready, _log_refused)

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


def _count(served: dict[tuple[str, str], int]) -> None:
    for (name, version), n in served.items():
        metrics.PREDICTIONS.labels(name, version).inc(n)


def _log_refused(answer: Answer | Unavailable, error: BaseException) -> Answer | Unavailable:
    """A request the log did not confirm: refused (retryable) instead of answered."""
    if isinstance(answer, Unavailable):
        return answer
    if isinstance(error, LogRefused):
        return Unavailable(error.code, str(error))
    return Unavailable(LOG_FULL, f"the prediction log failed: {error}")
