"""The gRPC front door (mlops.fraud.v1.FraudDetector) plus the standard grpc.health.v1 service.

Served from each serving worker: gRPC's threads hand each call to the worker's event loop, where it joins
the same adaptive batches, validation (the same msgspec types, so the same messages) and prediction log
as HTTP. The health service says SERVING exactly when /readyz would say ready, and NOT_SERVING while the
worker drains on shutdown.

All workers of one server share the port (SO_REUSEPORT, the kernel spreads connections);
``service.port_guard`` makes sure no *other* process can join it. A request that is not a valid protobuf
message is INVALID_ARGUMENT (gRPC's own deserialisation would answer INTERNAL).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import msgspec
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service import port_guard
from service.contract import (
    OutcomesInvalid,
    Prediction,
    PredictRequest,
    RequestError,
    RowError,
    check,
    check_batch,
    decode_outcomes,
)
from service.http_api import HttpError
from service.outcomes_api import OutcomesEndpoint
from service.prediction_log import LogRefused
from service.prediction_service import PredictionService, Unavailable
from service.proto import fraud_pb2
from service.scoring import UNKNOWN_ENTITY

log = logging.getLogger(__name__)
SERVICE_NAME = "mlops.fraud.v1.FraudDetector"
TIMEOUT_S = 30.0
_json = msgspec.json.Encoder()


PortInUse = port_guard.PortInUse


class Malformed:
    """What a request that is not a valid protobuf message deserialises to: the method answers INVALID_ARGUMENT."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except (DecodeError, ValueError, UnicodeDecodeError) as exc:  # a string field must be valid UTF-8
            return Malformed(f"malformed protobuf message: {exc or type(exc).__name__}")
    return deserialize


def to_request(message: fraud_pb2.PredictRequest) -> PredictRequest:
    body: dict[str, Any] = {}
    if message.features:
        body["features"] = dict(message.features)
    for field in ("customer_id", "transaction_amount", "request_id"):
        if message.HasField(field):
            body[field] = getattr(message, field)
    for name, value in [("transaction_amount", body.get("transaction_amount", 0.0)),
                        *((f"features.{k}", v) for k, v in body.get("features", {}).items())]:
        if math.isnan(value):
            raise RequestError(f"{name} is not a number (NaN)")
    try:
        request = msgspec.convert(body, PredictRequest)
    except msgspec.ValidationError as exc:
        raise RequestError(str(exc)) from None
    check(request)
    return request


def to_message(prediction: Prediction) -> fraud_pb2.Prediction:
    message = fraud_pb2.Prediction(request_id=prediction.request_id, prediction=prediction.prediction,
                                   label=prediction.label, model_name=prediction.model_name,
                                   model_version=prediction.model_version, latency_ms=prediction.latency_ms)
    if prediction.customer_id is not None:
        message.customer_id = prediction.customer_id
    return message


class FraudDetectorServicer:
    def __init__(self, service: PredictionService, loop: asyncio.AbstractEventLoop, max_rows: int,
                 authorization: bytes | None = None, outcomes: OutcomesEndpoint | None = None) -> None:
        self.service = service
        self.outcomes = outcomes
        self.loop = loop
        self.max_rows = max_rows
        self.authorization = authorization  # the `authorization` metadata every call must carry, when set

    def _check_token(self, context) -> None:
        if self.authorization is None:
            return
        given = next((value for key, value in context.invocation_metadata() if key == "authorization"), "")
        if not hmac.compare_digest(given.encode() if isinstance(given, str) else given, self.authorization):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token "
                                                           "(metadata authorization: Bearer <token>)")

    def _run(self, requests: list[PredictRequest], context) -> list[Prediction | RowError]:
        future = asyncio.run_coroutine_threadsafe(self.service.predict(requests, time.perf_counter()), self.loop)
        try:
            return future.result(timeout=TIMEOUT_S)
        except Unavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc.code}: {exc.detail}")
        except TimeoutError:
            future.cancel()
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {TIMEOUT_S:.0f}s")
        raise AssertionError("unreachable")

    def Predict(self, request, context):  # noqa: N802 (gRPC method name)
        self._check_token(context)
        if isinstance(request, Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        try:
            parsed = to_request(request)
        except RequestError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        (answer,) = self._run([parsed], context)
        if isinstance(answer, RowError):
            code = grpc.StatusCode.NOT_FOUND if answer.error == UNKNOWN_ENTITY else grpc.StatusCode.UNAVAILABLE
            context.abort(code, answer.detail)
        return to_message(answer)

    def PredictBatch(self, request, context):  # noqa: N802
        self._check_token(context)
        if isinstance(request, Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        parsed = []
        for i, message in enumerate(request.requests):
            try:
                parsed.append(to_request(message))
            except RequestError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"requests[{i}]: {exc}")
        try:
            check_batch(parsed, self.max_rows)
        except RequestError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        results = []
        for answer in self._run(parsed, context):
            if isinstance(answer, Prediction):
                results.append(fraud_pb2.BatchResult(prediction=to_message(answer),
                                                     customer_id=answer.customer_id or ""))
            else:
                results.append(fraud_pb2.BatchResult(error=answer.detail, error_code=answer.error,
                                                     customer_id=answer.customer_id or ""))
        return fraud_pb2.PredictBatchResponse(results=results)

    def Outcomes(self, request, context):  # noqa: N802
        """The same checks as POST /outcomes (the rows go through its decoder as JSON), the same log."""
        self._check_token(context)
        if isinstance(request, Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        if self.outcomes is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server takes no outcomes")
        rows = [{"request_id": o.request_id, **({"label": o.label} if o.HasField("label") else {}),
                 **({"timestamp": o.timestamp} if o.HasField("timestamp") else {}),
                 **({"outcome_value": o.outcome_value} if o.HasField("outcome_value") else {})}
                for o in request.outcomes]
        try:
            events = decode_outcomes(_json.encode({"outcomes": rows}), self.max_rows)
        except OutcomesInvalid as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "; ".join([str(exc), *(f"outcomes[{r.index}]: {r.detail}" for r in exc.rows[1:])]))
        except RequestError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        future = asyncio.run_coroutine_threadsafe(self.outcomes.publish(events), self.loop)
        try:
            accepted = future.result(timeout=TIMEOUT_S)
        except (HttpError, LogRefused) as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except TimeoutError:
            future.cancel()
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {TIMEOUT_S:.0f}s")
        return fraud_pb2.OutcomesResponse(accepted=accepted)


def http_host(default: str = "127.0.0.1") -> str:
    """The address the HTTP server listens on: BentoML hands its workers the bound socket as ``--fd N``."""
    try:
        fd = int(sys.argv[sys.argv.index("--fd") + 1])
        with socket.socket(fileno=os.dup(fd)) as sock:
            return str(sock.getsockname()[0])
    except (ValueError, IndexError, OSError):
        return default


def add_servicer(servicer: FraudDetectorServicer, server: grpc.Server) -> None:
    """The generated registration, with deserialisers that turn a malformed message into INVALID_ARGUMENT."""
    handlers = {
        "Predict": grpc.unary_unary_rpc_method_handler(
            servicer.Predict, request_deserializer=tolerant(fraud_pb2.PredictRequest.FromString),
            response_serializer=fraud_pb2.Prediction.SerializeToString),
        "PredictBatch": grpc.unary_unary_rpc_method_handler(
            servicer.PredictBatch, request_deserializer=tolerant(fraud_pb2.PredictBatchRequest.FromString),
            response_serializer=fraud_pb2.PredictBatchResponse.SerializeToString),
        "Outcomes": grpc.unary_unary_rpc_method_handler(
            servicer.Outcomes, request_deserializer=tolerant(fraud_pb2.OutcomesRequest.FromString),
            response_serializer=fraud_pb2.OutcomesResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class GrpcServer:
    def __init__(self, service: PredictionService, loop: asyncio.AbstractEventLoop, host: str, port: int,
                 max_rows: int, workers: int = 16, authorization: bytes | None = None,
                 outcomes: OutcomesEndpoint | None = None) -> None:
        owner = os.getppid()  # the BentoML arbiter: the server this worker belongs to
        port_guard.claim(host, port, owner)
        self.health = health.HealthServicer()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
                                  options=[("grpc.so_reuseport", 1)])
        add_servicer(FraudDetectorServicer(service, loop, max_rows, authorization, outcomes), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        try:
            bound = self.server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:  # grpcio raises where it used to return 0
            bound, why = 0, str(exc)
        else:
            why = "another process holds it"
        if bound == 0:
            reason = f"gRPC could not bind {host}:{port} ({why})"
            port_guard.refuse(owner, reason)
            raise PortInUse(reason)
        self.address = f"{host}:{port}"
        self.set_serving(False)
        self.server.start()
        log.info("gRPC listening on %s", self.address)

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set("", status)
        self.health.set(SERVICE_NAME, status)

    def stop(self, grace_s: float = 5.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace=grace_s).wait()
