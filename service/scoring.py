"""Scores a batch of rows: one online-store round trip for all of them, one ONNX call per model version.

The model version of each row is chosen by the registry follower (``ModelSelector``): Production, or the
canary for the share of customers it owns. A batch finishes on the versions it started with, whatever
swaps meanwhile. A candidate that fails to score its rows costs no request: Production answers them, and the
event says which version failed (``failed_version``), which is how the rollout counts errors per arm.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from mlops.schema import ENTITY, REQUEST_FEATURES, STORE_FEATURES
from service import metrics
from service.contract import PredictRequest
from service.model_selector import ModelSelector
from service.online_store import OnlineStore, OnlineStoreUnavailable, Row
from service.onnx_predictor import OnnxPredictor

# Row error codes. Retryable ones make the whole request a 503.
UNKNOWN_ENTITY = "unknown_entity"
STORE_UNAVAILABLE = "online_store_unavailable"
STORE_EMPTY = "online_store_empty"
RETRYABLE = {STORE_UNAVAILABLE, STORE_EMPTY}

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Scored:
    model_name: str
    model_version: str
    prediction: float = 0.0
    features: dict[str, float] | None = None  # the model input as served, for the prediction log
    error: str | None = None
    detail: str | None = None
    model_ms: float | None = None  # the call that scored this row (its version's rows of the batch)
    shadow: tuple[str, float, float] | None = None  # rollout shadow step: candidate's version, score, call ms
    rollout: str | None = None  # the rollout step whose routing scored it
    failed_version: str | None = None  # the candidate that failed this row (Production answered it)


class Scorer:
    def __init__(self, store: OnlineStore, selector: ModelSelector) -> None:
        self.store = store
        self.selector = selector

    async def score(self, rows: list[PredictRequest]) -> list[Scored]:
        serving = self.selector.current
        given = [r.features.given() if r.features is not None else {} for r in rows]
        # A row needs the store when it names a customer and does not bring all store features itself.
        needs_lookup = [r.customer_id is not None and len(g) < len(STORE_FEATURES)
                        for r, g in zip(rows, given, strict=True)]
        looked_up: dict[str, Row | None] = {}
        lookup_error: OnlineStoreUnavailable | None = None
        ids = [r.customer_id for r, need in zip(rows, needs_lookup, strict=True) if need]
        if ids:
            started = time.perf_counter()
            try:
                looked_up = dict(zip(ids, await self.store.fetch(ids), strict=True))  # type: ignore[arg-type]
            except OnlineStoreUnavailable as exc:
                lookup_error = exc
            metrics.FEATURE_LOOKUP_LATENCY.observe(time.perf_counter() - started)
            self._observe_age([row for row in looked_up.values() if row is not None])

        results: list[Scored] = []
        by_predictor: dict[int, tuple[OnnxPredictor, list[int]]] = {}
        for row, stats, need in zip(rows, given, needs_lookup, strict=True):
            predictor = serving.route(row.customer_id)
            scored = Scored(predictor.model.name, predictor.model.version, rollout=serving.rollout)
            results.append(scored)
            if need:
                if lookup_error is not None:
                    scored.error, scored.detail = STORE_UNAVAILABLE, str(lookup_error)
                    continue
                found = looked_up[row.customer_id]  # type: ignore[index]
                if found is None:
                    if self.store.empty:
                        scored.error = STORE_EMPTY
                        scored.detail = "the online store holds no features at all (not materialized?); retry later"
                    else:
                        scored.error = UNKNOWN_ENTITY
                        scored.detail = f"unknown {ENTITY} {row.customer_id!r}: no online features"
                    continue
                stats = {**found.features, **stats}
            scored.features = {**stats, REQUEST_FEATURES[0]: row.transaction_amount}
            by_predictor.setdefault(id(predictor), (predictor, []))[1].append(len(results) - 1)

        for predictor, indices in by_predictor.values():
            try:
                self._predict(predictor, results, indices)
            except Exception as exc:
                if predictor is serving.production:
                    raise
                metrics.CANDIDATE_FAILURES.inc(len(indices))
                log.warning("candidate %s failed to score %d rows (%s: %s); Production answers them",
                            predictor.model.version, len(indices), type(exc).__name__, str(exc)[:200])
                self._predict(serving.production, results, indices)
                for i in indices:
                    results[i].failed_version = predictor.model.version
                    results[i].model_version = serving.production.model.version
            if serving.shadow is not None:
                self._shadow(serving.shadow, results, indices)
        return results

    def _predict(self, predictor: OnnxPredictor, results: list[Scored], indices: list[int]) -> None:
        x = self._matrix(predictor, results, indices)
        started = time.perf_counter()
        proba = predictor.predict(x)
        elapsed = time.perf_counter() - started
        metrics.INFERENCE_LATENCY.observe(elapsed)
        model_ms = round(elapsed * 1000.0, 4)
        for i, p in zip(indices, proba.tolist(), strict=True):
            results[i].prediction = p
            results[i].model_ms = model_ms

    @staticmethod
    def _matrix(predictor: OnnxPredictor, results: list[Scored], indices: list[int]) -> np.ndarray:
        names = predictor.features
        return np.array([[results[i].features[f] for f in names] for i in indices], dtype=np.float32)  # type: ignore[index]

    def _shadow(self, shadow: OnnxPredictor, results: list[Scored], indices: list[int]) -> None:
        """The candidate scores the same rows; its answer is logged, never returned. A failing shadow costs
        the logged comparison, never the request."""
        started = time.perf_counter()
        try:
            proba = shadow.predict(self._matrix(shadow, results, indices))
        except Exception:  # noqa: BLE001 - the candidate must not break Production's answers
            metrics.SHADOW_FAILURES.inc()
            for i in indices:
                results[i].failed_version = shadow.model.version
            return
        model_ms = round((time.perf_counter() - started) * 1000.0, 4)
        version = shadow.model.version
        for i, p in zip(indices, proba.tolist(), strict=True):
            results[i].shadow = (version, p, model_ms)

    def _observe_age(self, found: list[Row]) -> None:
        if not found:
            return
        now = time.time()
        oldest = now - min(row.event_time for row in found)
        metrics.FEATURE_AGE.observe(oldest)
        if self.store.ttl_s is not None and oldest > self.store.ttl_s:
            metrics.STALE_ROWS.inc(sum(1 for row in found if now - row.event_time > self.store.ttl_s))
