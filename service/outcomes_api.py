"""POST /outcomes: true labels of past predictions, validated and published to the outcomes topic.

All rows or none: a bad row refuses the whole request with a 400 naming every bad row (see
:func:`service.contract.decode_outcomes`). Accepted rows go to Kafka through a log of their own with the
prediction log's durability (:class:`service.prediction_log.PredictionLog`: spooled to disk while the broker
is away, replayed when it is back; in ``ack`` mode the answer waits for the broker's acknowledgement or the
spool's fsync). A retryable 503 when that log cannot keep them. Resending a request is safe: the quality
consumer counts one outcome per ``request_id``.
"""

from __future__ import annotations

import time

import msgspec

from mlops import outcomes
from service import metrics
from service.contract import (
    ErrorBody,
    OutcomesAccepted,
    OutcomesInvalid,
    OutcomesRefused,
    RequestError,
    decode_outcomes,
)
from service.http_api import EXTRA_HEADERS, HttpError, Receive, Scope, Send, error_log, read_json_body, respond
from service.prediction_log import LogRefused, PredictionLog

_encoder = msgspec.json.Encoder()


class OutcomesEndpoint:
    def __init__(self, max_body_bytes: int, max_rows: int, authorization: bytes | None = None) -> None:
        self.max_body_bytes = max_body_bytes
        self.max_rows = max_rows
        self.authorization = authorization
        self.log: PredictionLog | None = None  # set by the worker once it has started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        try:
            raw = await read_json_body(scope, receive, self.max_body_bytes, self.authorization)
            status, body = 200, _encoder.encode(OutcomesAccepted(await self._publish(raw)))
        except OutcomesInvalid as exc:
            metrics.ERRORS.labels("invalid_request").inc()
            error_log.record(400, "/outcomes", "invalid_request", str(exc))
            status, body = 400, _encoder.encode(OutcomesRefused("invalid_request", str(exc), exc.rows))
        except RequestError as exc:
            status, body = _error(HttpError(400, "invalid_request", str(exc)))
        except LogRefused as exc:
            status, body = _error(HttpError(503, exc.code.replace("prediction_log", "outcome_log"), str(exc)))
        except HttpError as exc:
            status, body = _error(exc)
        await respond(send, status, body, EXTRA_HEADERS.get(status))
        metrics.REQUEST_LATENCY.labels("outcomes").observe(time.perf_counter() - started)
        metrics.REQUESTS.labels("outcomes", str(status)).inc()

    async def _publish(self, raw: bytes) -> int:
        return await self.publish(decode_outcomes(raw, self.max_rows))

    async def publish(self, events: list[outcomes.OutcomeEvent]) -> int:
        """Hand validated outcomes to the log (HTTP and gRPC): raises ``HttpError`` (503) or ``LogRefused``."""
        log = self.log
        if log is None:
            raise HttpError(503, "starting", "the server is still starting; retry later")
        confirm = log.confirmation()
        if not log.publish_all([(e.request_id.encode(), outcomes.encode(e)) for e in events], confirm):
            raise HttpError(503, "outcome_log_full", "the outcome log cannot keep more events; retry later")
        if confirm is not None:
            await confirm.seal()
        metrics.OUTCOMES.inc(len(events))
        return len(events)


def _error(exc: HttpError) -> tuple[int, bytes]:
    metrics.ERRORS.labels(exc.code).inc()
    error_log.record(exc.status, "/outcomes", exc.code, exc.detail)
    return exc.status, _encoder.encode(ErrorBody(exc.code, exc.detail))
