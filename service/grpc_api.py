"""The gRPC front door (mlops.fraud.v1.FraudDetector) plus the standard grpc.health.v1 service.

Served from each serving worker: gRPC's threads hand each call to the worker's event loop, where it joins
the same adaptive batches, validation (the same msgspec types, so the same messages) and prediction log
as HTTP. The health service says SERVING exactly when /readyz would say ready, and NOT_SERVING while the
worker drains on shutdown.

All workers of one server share the port (SO_REUSEPORT, the kernel spreads connections), so a port lock
makes sure no *other* server can join it: the first server to bind records its id (the BentoML arbiter's
pid) in a lock file, and a second server finds it alive and refuses to start, instead of silently
splitting the traffic.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import math
import os
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import msgspec
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.contract import Prediction, PredictRequest, RequestError, RowError, check
from service.prediction_service import PredictionService, Unavailable
from service.proto import fraud_pb2, fraud_pb2_grpc
from service.scoring import UNKNOWN_ENTITY

log = logging.getLogger(__name__)
SERVICE_NAME = "mlops.fraud.v1.FraudDetector"
TIMEOUT_S = 30.0


class PortInUse(RuntimeError):
    """Another server (not a worker of this one) holds the gRPC port."""


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


class FraudDetectorServicer(fraud_pb2_grpc.FraudDetectorServicer):
    def __init__(self, service: PredictionService, loop: asyncio.AbstractEventLoop, max_rows: int) -> None:
        self.service = service
        self.loop = loop
        self.max_rows = max_rows

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
        if not 1 <= len(request.requests) <= self.max_rows:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"requests: give 1 to {self.max_rows} rows, got {len(request.requests)}")
        parsed = []
        for i, message in enumerate(request.requests):
            try:
                parsed.append(to_request(message))
            except RequestError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"requests[{i}]: {exc}")
        results = []
        for answer in self._run(parsed, context):
            if isinstance(answer, Prediction):
                results.append(fraud_pb2.BatchResult(prediction=to_message(answer),
                                                     customer_id=answer.customer_id or ""))
            else:
                results.append(fraud_pb2.BatchResult(error=answer.detail, error_code=answer.error,
                                                     customer_id=answer.customer_id or ""))
        return fraud_pb2.PredictBatchResponse(results=results)


def http_host(default: str = "127.0.0.1") -> str:
    """The address the HTTP server listens on: BentoML hands its workers the bound socket as ``--fd N``."""
    try:
        fd = int(sys.argv[sys.argv.index("--fd") + 1])
        with socket.socket(fileno=os.dup(fd)) as sock:
            return str(sock.getsockname()[0])
    except (ValueError, IndexError, OSError):
        return default


def claim_port(host: str, port: int, owner: int) -> None:
    """Record ``owner`` (this server's id) as the holder of host:port, or raise if another live server is."""
    path = Path(tempfile.gettempdir()) / "mlops-grpc-ports" / f"{host}_{port}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        holder = f.read().strip()
        if holder.isdigit() and int(holder) != owner and _alive(int(holder)):
            raise PortInUse(f"gRPC port {host}:{port} is already served by another server (pid {holder}); "
                            "set MLOPS_GRPC_PORT to a free port, or 0 to turn gRPC off")
        f.seek(0)
        f.truncate()
        f.write(str(owner))


def _alive(pid: int) -> bool:
    """A live BentoML server process (a recycled pid of something else does not count)."""
    try:
        return b"bentoml" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class GrpcServer:
    def __init__(self, service: PredictionService, loop: asyncio.AbstractEventLoop, host: str, port: int,
                 max_rows: int, workers: int = 16) -> None:
        claim_port(host, port, owner=os.getppid())
        self.health = health.HealthServicer()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
                                  options=[("grpc.so_reuseport", 1)])
        fraud_pb2_grpc.add_FraudDetectorServicer_to_server(FraudDetectorServicer(service, loop, max_rows), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.server.add_insecure_port(f"{host}:{port}") == 0:
            raise PortInUse(f"gRPC could not bind {host}:{port}")
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
