"""The prediction routes straight from uvicorn to the endpoint, past BentoML's per-request ASGI stack.

BentoML hands uvicorn one Starlette app with its middlewares (server errors, request context,
OpenTelemetry, timeout, exceptions), its router, and our app mounted behind them. Every request on the hot
routes went through all of it: measured here with py-spy, about a third of a worker's CPU per prediction
was those layers and their ``send`` wrappers. This module wraps the app BentoML builds for a worker
(``Service.to_asgi``, the method its worker calls) in a dispatcher that sends ``POST /predict`` and
``POST /predict_batch`` to our endpoint directly and everything else — lifespan, ``/livez``, ``/readyz``,
``/metrics``, ``/info``, the docs and UI — to BentoML's app unchanged. `bentoml serve`, `build` and
`containerize` are untouched: the dispatcher only exists inside a serving worker.

What the skipped layers did, the endpoint does itself on these routes: every exception becomes the error
body (a 500 only for a bug); the time a request can take is bounded by the batcher (a row that waited
``MLOPS_MAX_LATENCY_MS`` for a batch is shed with a 503) and the online store's timeout, so BentoML's
``traffic.timeout`` (a 504) is not needed there; request context and tracing are BentoML's, for
``@bentoml.api`` routes, which these are not. With ``MLOPS_TRACE_REQUESTS`` or ``MLOPS_ACCESS_LOG`` on, the
dispatcher is not installed and every request takes BentoML's full stack (spans and access-log lines).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)
Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


class FastPath:
    """An ASGI app: the hot routes to their endpoints, the rest to ``fallback``."""

    def __init__(self, fallback: ASGIApp, routes: dict[str, ASGIApp]) -> None:
        self.fallback = fallback
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.routes.get(scope["path"])
            if endpoint is not None:
                return await endpoint(scope, receive, send)
        return await self.fallback(scope, receive, send)


def install(service: Any, routes: dict[str, ASGIApp]) -> bool:
    """Wrap what ``service.to_asgi`` builds (in the worker) in a :class:`FastPath`. False, and BentoML's own
    stack serves every route, if this BentoML has no such method."""
    cls = type(service)
    original = getattr(cls, "to_asgi", None)
    if original is None or getattr(original, "__wrapped_by_fast_path__", False):
        return original is not None

    def to_asgi(self: Any, *args: Any, **kwargs: Any) -> ASGIApp:
        app = original(self, *args, **kwargs)
        if self is not service:
            return app
        log.debug("prediction routes on the fast path: %s", sorted(routes))
        return FastPath(app, routes)

    to_asgi.__wrapped_by_fast_path__ = True  # type: ignore[attr-defined]
    to_asgi.__doc__ = original.__doc__
    cls.to_asgi = to_asgi
    return True
