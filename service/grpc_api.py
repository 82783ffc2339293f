"""The gRPC front door (mlops.fraud.v1.FraudDetector), served from the API worker itself.

It shares everything with HTTP: validation (the same pydantic models), adaptive batching, the Kafka
prediction log and the metrics. gRPC's worker threads hand each call to the API server's event loop and
wait for the answer; no extra network hop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from bentoml.exceptions import NotFound, ServiceUnavailable
from pydantic import ValidationError

from service.proto import fraud_pb2, fraud_pb2_grpc
from service.schemas import Prediction, PredictRequest

log = logging.getLogger(__name__)
Score = Callable[[list[PredictRequest], str, bool], Awaitable[list[Any]]]
TIMEOUT_S = 30.0


def to_request(message: fraud_pb2.PredictRequest) -> PredictRequest:
    body: dict[str, Any] = {"features": dict(message.features) or None}
    for field in ("customer_id", "transaction_amount", "request_id"):
        if message.HasField(field):
            body[field] = getattr(message, field)
    return PredictRequest.model_validate(body)


def to_message(prediction: Prediction) -> fraud_pb2.Prediction:
    return fraud_pb2.Prediction(**prediction.model_dump(exclude_none=True))


def one_line(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}" for e in exc.errors())


class FraudDetectorServicer(fraud_pb2_grpc.FraudDetectorServicer):
    def __init__(self, score: Score, loop: asyncio.AbstractEventLoop, max_rows: int) -> None:
        self.score = score
        self.loop = loop
        self.max_rows = max_rows

    def _run(self, requests: list[PredictRequest], endpoint: str, single: bool, context) -> list[Any]:
        future = asyncio.run_coroutine_threadsafe(self.score(requests, endpoint, single), self.loop)
        try:
            return future.result(timeout=TIMEOUT_S)
        except NotFound as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except ServiceUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except TimeoutError:
            future.cancel()
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {TIMEOUT_S:.0f}s")
        raise AssertionError("unreachable")

    def Predict(self, request, context):  # noqa: N802 (gRPC method name)
        try:
            parsed = to_request(request)
        except ValidationError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, one_line(exc))
        (prediction,) = self._run([parsed], "grpc_predict", True, context)
        return to_message(prediction)

    def PredictBatch(self, request, context):  # noqa: N802
        if not 1 <= len(request.requests) <= self.max_rows:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"requests: give 1 to {self.max_rows} rows, got {len(request.requests)}")
        parsed = []
        for i, message in enumerate(request.requests):
            try:
                parsed.append(to_request(message))
            except ValidationError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"requests[{i}]: {one_line(exc)}")
        results = []
        for answer in self._run(parsed, "grpc_predict_batch", False, context):
            if isinstance(answer, Prediction):
                results.append(fraud_pb2.BatchResult(prediction=to_message(answer),
                                                     customer_id=answer.customer_id or ""))
            else:
                results.append(fraud_pb2.BatchResult(error=answer["error"], customer_id=answer["customer_id"]))
        return fraud_pb2.PredictBatchResponse(results=results)


def start(servicer: FraudDetectorServicer, host: str, port: int, workers: int = 16) -> grpc.Server:
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
                         options=[("grpc.so_reuseport", 1)])
    fraud_pb2_grpc.add_FraudDetectorServicer_to_server(servicer, server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise RuntimeError(f"gRPC could not bind {host}:{port}")
    server.start()
    log.info("gRPC listening on %s:%d", host, port)
    return server
