"""The HTTP front door: /predict, /predict_batch, /info, /metrics and the OpenAPI document.

Raw ASGI endpoints mounted into the BentoML service (``bentoml.asgi_app``). Measured on this project's
2-core box, a BentoML ``@bentoml.api`` route costs ~0.23 ms of CPU per request before the handler runs
(input model, serde, output model, response headers, background tasks) where a mounted ASGI endpoint costs
~0.09 ms; at a few thousand requests per second per core that difference is the whole budget. BentoML
still runs the process: ``bentoml serve``/``build``/``containerize``, workers, lifecycle hooks, /livez and
/readyz.

Every failure has one JSON body, ``{"error": code, "detail": message}``: 400 invalid_request, 404
unknown_entity, 413 body_too_large, 415 unsupported_media_type, 503 (retryable) overloaded,
online_store_unavailable, online_store_empty, prediction_log_full; 500 internal only for a bug. Routing
failures (404 not_found, 405 method_not_allowed) use the same body, and a path with a trailing slash is not
redirected. Errors are logged one line per error code at most every ``LOG_EVERY_S`` seconds per worker, with
how many that line stands for, never a traceback (an outage of thousands of 503s writes a few lines).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route

from service import metrics
from service.contract import (
    ErrorBody,
    Prediction,
    PredictRequest,
    RequestError,
    RowError,
    decode_batch,
    decode_request,
)
from service.prediction_service import PredictionService, Unavailable
from service.scoring import UNKNOWN_ENTITY

log = logging.getLogger(__name__)
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
JSON_HEADERS = [(b"content-type", b"application/json")]
_encoder = msgspec.json.Encoder()
LOG_EVERY_S = 10.0


class ErrorLog:
    """One log line per error code per ``every_s``: the first at once, then a count of those it stood for."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def record(self, status: int, path: str, code: str, detail: str) -> None:
        now = time.monotonic()
        if now - self._last.get(code, -self.every_s) < self.every_s:
            self._held[code] = self._held.get(code, 0) + 1
            return
        self._last[code] = now
        held = self._held.pop(code, 0)
        more = f" (and {held} more {code} in the last {self.every_s:.0f}s)" if held else ""
        log.log(logging.WARNING if status >= 500 else logging.INFO, "%d %s %s: %s%s", status, path, code, detail,
                more)


error_log = ErrorLog()


class HttpError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


async def respond(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def check_headers(headers: list[tuple[bytes, bytes]], limit: int, authorization: bytes | None = None) -> None:
    """401 unless the ``authorization`` header is the one expected (when one is); 415 unless the body is
    JSON; 413 when it says it is larger than ``limit``."""
    content_type = b""
    length = None
    given = b""
    for name, value in headers:
        if name == b"content-type":
            content_type = value
        elif name == b"content-length":
            length = value
        elif name == b"authorization":
            given = value
    if authorization is not None and not hmac.compare_digest(given, authorization):
        raise HttpError(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)")
    media_type = content_type.split(b";", 1)[0].strip().lower()
    if media_type != b"application/json":
        shown = media_type.decode("latin-1") or "none"
        raise HttpError(415, "unsupported_media_type", f"content type must be application/json, got {shown}")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HttpError(413, "body_too_large", f"request body over {limit} bytes")


async def read_json_body(scope: Scope, receive: Receive, limit: int, authorization: bytes | None = None) -> bytes:
    check_headers(scope["headers"], limit, authorization)
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HttpError(400, "invalid_request", "client disconnected before sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HttpError(413, "body_too_large", f"request body over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def bearer(token: str | None) -> bytes | None:
    """The Authorization header a route requires, None when it requires none."""
    return b"Bearer " + token.encode() if token else None


Reply = Callable[[int, bytes], None]
EXTRA_HEADERS = {503: [(b"retry-after", b"1")], 401: [(b"www-authenticate", b"Bearer")]}


class PredictEndpoint:
    """POST /predict (one request, one Prediction) or /predict_batch (``{"requests": [...]}``, a list).

    Served two ways with the same checks, answers and metrics: as an ASGI app (``__call__``), and from
    ``service.fast_http``'s protocol, which hands over the parsed request and takes the answer back through
    a callback (``start``), with no ASGI task, scope or send/receive round trips per request."""

    def __init__(self, api: HttpApi, batch: bool) -> None:
        self.api = api
        self.batch = batch
        self.endpoint = "predict_batch" if batch else "predict"
        self.path = "/" + self.endpoint
        self.latency = metrics.BufferedHistogram(metrics.REQUEST_LATENCY.labels(self.endpoint))
        self.ok = metrics.BufferedCounter(metrics.REQUESTS.labels(self.endpoint, "200"))

    # -- ASGI -----------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        try:
            raw = await read_json_body(scope, receive, self.api.max_body_bytes, self.api.authorization)
            answers = await self._submit(raw, started)
            status, body = self._answer(answers)
        except Exception as exc:  # noqa: BLE001 (every failure becomes the error body)
            status, body = self._failure(exc)
        await respond(send, status, body, EXTRA_HEADERS.get(status))
        self._count(status, started)

    # -- the fast protocol ------------------------------------------------------------------------------

    def start(self, headers: list[tuple[bytes, bytes]], body: bytes | None, started: float, reply: Reply) -> None:
        """Answer through ``reply(status, body)``, now or when the batch is done; ``body`` None: it was over
        the size limit (the protocol stopped buffering it)."""
        try:
            check_headers(headers, self.api.max_body_bytes, self.api.authorization)
            if body is None:
                raise HttpError(413, "body_too_large", f"request body over {self.api.max_body_bytes} bytes")
            future = self._submit_nowait(body, started)
        except Exception as exc:  # noqa: BLE001
            self._reply(reply, *self._failure(exc), started)
            return
        future.add_done_callback(lambda done: self._finish(done, started, reply))

    def _finish(self, future: asyncio.Future, started: float, reply: Reply) -> None:
        try:
            status, body = self._answer(PredictionService.result(future))
        except Exception as exc:  # noqa: BLE001
            status, body = self._failure(exc)
        self._reply(reply, status, body, started)

    def _reply(self, reply: Reply, status: int, body: bytes, started: float) -> None:
        reply(status, body)
        self._count(status, started)

    # -- shared ---------------------------------------------------------------------------------------

    def _service(self) -> PredictionService:
        service = self.api.service
        if service is None:
            raise HttpError(503, "starting", "the server is still starting; retry later")
        return service

    def _decode(self, raw: bytes) -> list[PredictRequest]:
        try:
            return decode_batch(raw, self.api.max_request_rows) if self.batch else [decode_request(raw)]
        except RequestError as exc:
            raise HttpError(400, "invalid_request", str(exc)) from None

    async def _submit(self, raw: bytes, started: float) -> list[Prediction | RowError]:
        return await self._service().predict(self._decode(raw), started)

    def _submit_nowait(self, raw: bytes, started: float) -> asyncio.Future:
        return self._service().submit(self._decode(raw), started)

    def _answer(self, answers: list[Prediction | RowError]) -> tuple[int, bytes]:
        if self.batch:
            return 200, _encoder.encode(answers)
        answer = answers[0]
        if isinstance(answer, RowError):
            status = 404 if answer.error == UNKNOWN_ENTITY else 503
            raise HttpError(status, answer.error, answer.detail)
        return 200, _encoder.encode(answer)

    def _failure(self, exc: Exception) -> tuple[int, bytes]:
        if isinstance(exc, Unavailable):
            exc = HttpError(503, exc.code, exc.detail)
        if isinstance(exc, HttpError):
            metrics.ERRORS.labels(exc.code).inc()
            error_log.record(exc.status, self.path, exc.code, exc.detail)
            return exc.status, _encoder.encode(ErrorBody(exc.code, exc.detail))
        log.error("500 %s", self.path, exc_info=exc)  # a bug: the client gets a clean 500, the log the traceback
        metrics.ERRORS.labels("internal").inc()
        return 500, _encoder.encode(ErrorBody("internal", "unexpected server error; see the server log"))

    def _count(self, status: int, started: float) -> None:
        self.latency.observe(time.perf_counter() - started)
        (self.ok if status == 200 else metrics.REQUESTS.labels(self.endpoint, str(status))).inc()


ROUTING_ERRORS = {404: "not_found", 405: "method_not_allowed"}
BENTOML_UI = ("/assets/", "/static_content/")  # routes BentoML adds after the mounted app: its UI at "/"
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"]


class Fallback(Route):
    """Whatever no route of the server matched. BentoML's own router answers those with a plain-text 404, or
    a 307 to the path without its trailing slash; mounted last, this route answers them in the error body
    instead (BentoML's routes, and ours, are matched before it)."""

    def __init__(self, routes: list[Route]) -> None:
        super().__init__("/{path:path}", not_found, methods=ALL_METHODS)
        self.taken = {route.path for route in routes}  # a wrong method there is a 405, from the route itself

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path = scope.get("path", "")
        if scope.get("type") != "http" or path == "/" or path in self.taken or path.startswith(BENTOML_UI):
            return Match.NONE, {}
        return super().matches(scope)


async def not_found(request: Request) -> Response:
    raise HTTPException(404)


async def routing_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no such route, wrong method) in the one error body."""
    assert isinstance(exc, HTTPException)
    code = ROUTING_ERRORS.get(exc.status_code, "invalid_request")
    if exc.status_code == 404:
        detail = f"no route {request.method} {request.url.path}; see /docs.json"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    else:
        detail = str(exc.detail)
    error_log.record(exc.status_code, request.url.path, code, detail)
    return Response(_encoder.encode(ErrorBody(code, detail)), exc.status_code, headers=exc.headers,
                    media_type="application/json")


class HttpApi:
    """The mounted app; ``service`` is set by the BentoML service once this worker has started."""

    def __init__(self, max_body_bytes: int, max_request_rows: int, openapi: dict[str, Any],
                 info: Callable[[], Awaitable[dict[str, Any]]], metrics_text: Callable[[], bytes],
                 token: str | None = None, more: dict[str, Callable[..., Awaitable[None]]] | None = None) -> None:
        """``more``: further POST routes, raw ASGI apps (e.g. /outcomes)."""
        self.service: PredictionService | None = None
        self.authorization = bearer(token)  # what the prediction routes require
        self.max_body_bytes = max_body_bytes
        self.max_request_rows = max_request_rows
        self._openapi = _encoder.encode(openapi)
        self._info = info
        self._metrics_text = metrics_text
        self.endpoints = {"/predict": PredictEndpoint(self, batch=False),
                          "/predict_batch": PredictEndpoint(self, batch=True)}
        routes = [
            *(Route(path, endpoint, methods=["POST"]) for path, endpoint in {**self.endpoints, **(more or {})}.items()),
            Route("/info", self.info, methods=["GET"]),
            Route("/info/", self.info, methods=["GET"]),
            Route("/docs.json", self.openapi, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]
        self.app = Starlette(routes=[*routes, Fallback(routes)], exception_handlers={HTTPException: routing_error})

    async def info(self, request: Request) -> Response:
        return Response(_encoder.encode(await self._info()), media_type="application/json")

    async def openapi(self, request: Request) -> Response:
        return Response(self._openapi, media_type="application/json")

    async def metrics(self, request: Request) -> Response:
        return Response(self._metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")
