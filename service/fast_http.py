"""The prediction routes served inside uvicorn's HTTP protocol, before any ASGI machinery.

With BentoML's ASGI stack out of the way (``service.fast_path``), what was left per request around our own
work was uvicorn's ASGI adapter: a scope dict, a task, an ``asyncio.Event``, ``receive`` and two ``send``
coroutines and two socket writes. Measured in process, our request path (decode, batch, lookup, model, log,
encode) costs less CPU than the hand-written batching peer's; the ASGI adapter around it cost as much again.
This protocol is uvicorn's own httptools protocol (same parser, keep-alive, flow control, graceful shutdown,
error handling) with one change: a ``POST`` to a registered route is answered from the parser's callbacks —
the body buffered as it arrives, handed to the endpoint when complete, the answer written in one
``transport.write`` from the batch's completion callback. Everything else — other routes, other methods,
``Expect: 100-continue``, upgrades — takes uvicorn's ASGI path unchanged, into BentoML's app.

HTTP/1.1 pipelining stays in order: a request that arrives while a fast answer is pending is parsed into an
ordinary ASGI cycle and queued behind it (uvicorn's own pipeline queue), and started once the answer is out.

Installed by :func:`install` in the serving worker (uvicorn resolves its ``http="auto"`` protocol from
``uvicorn.config.HTTP_PROTOCOLS`` when BentoML's worker starts the server), only when uvicorn's httptools
protocol is what "auto" would have chosen; ``MLOPS_HTTP_FAST_PATH=false`` keeps the ASGI path for everything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, ClassVar

log = logging.getLogger(__name__)
Start = Callable[[list[tuple[bytes, bytes]], "bytes | None", float, Callable[[int, bytes], None]], None]

try:  # uvicorn's httptools protocol: the base of ours (absent without httptools: then nothing is installed)
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
except ImportError:  # pragma: no cover
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

JSON = b"content-type: application/json\r\n"
RETRY = b"retry-after: 1\r\n"
CLOSE = b"connection: close\r\n"
AUTHENTICATE = b"www-authenticate: Bearer\r\n"


class _Pending:
    """``self.cycle`` while a fast answer is pending: uvicorn's code reads these attributes of a cycle (to
    queue a pipelined request behind it, on shutdown, on a lost connection)."""

    __slots__ = ("response_complete", "keep_alive", "disconnected")

    def __init__(self, keep_alive: bool) -> None:
        self.response_complete = False
        self.keep_alive = keep_alive
        self.disconnected = False

    @property
    def message_event(self) -> _Pending:
        return self

    def set(self) -> None:  # message_event.set() on a lost connection: nothing waits on it
        pass


if HttpToolsProtocol is not None:

    class FastProtocol(HttpToolsProtocol):  # type: ignore[misc,valid-type]
        routes: ClassVar[dict[bytes, Start]] = {}
        max_body_bytes: ClassVar[int] = 1 << 20
        in_use: ClassVar[bool] = False  # a connection was served by this protocol (reported in /info)

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            FastProtocol.in_use = True
            super().connection_made(transport)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._fast: Start | None = None
            self._body: list[bytes] = []
            self._size = 0

        def on_headers_complete(self) -> None:
            route = self.routes.get(self.url.split(b"?", 1)[0]) if self.parser.get_method() == b"POST" else None
            if (route is None or self.expect_100_continue or self.parser.should_upgrade()
                    or not (self.cycle is None or self.cycle.response_complete)):
                return super().on_headers_complete()
            self._fast = route

        def on_body(self, body: bytes) -> None:
            if self._fast is None:
                return super().on_body(body)
            self._size += len(body)
            if self._size <= self.max_body_bytes:
                self._body.append(body)
            else:
                self._body.clear()  # over the limit: not kept (answered 413 when the message ends)

        def on_message_complete(self) -> None:
            route = self._fast
            if route is None:
                return super().on_message_complete()
            self._fast = None
            keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
            pending = self.cycle = _Pending(keep_alive)  # type: ignore[assignment]
            body = None if self._size > self.max_body_bytes else (
                self._body[0] if len(self._body) == 1 else b"".join(self._body))
            route(self.headers, body, time.perf_counter(), lambda status, answer: self._answer(pending, status, answer))

        def _answer(self, pending: _Pending, status: int, body: bytes) -> None:
            if pending.disconnected or self.transport.is_closing():
                pending.response_complete = True
                return
            head = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            head += [JSON, b"content-length: %d\r\n" % len(body)]
            if status == 503:
                head.append(RETRY)
            elif status == 401:
                head.append(AUTHENTICATE)
            if not pending.keep_alive:
                head.append(CLOSE)
            head += [b"\r\n", body]
            self.transport.write(b"".join(head))
            pending.response_complete = True
            if not pending.keep_alive:
                self.transport.close()
            self.on_response_complete()  # uvicorn: count it, resume reading, start a queued request or keep-alive

else:  # pragma: no cover
    FastProtocol = None  # type: ignore[assignment,misc]


def in_use() -> bool:
    return FastProtocol is not None and FastProtocol.in_use


def install(routes: dict[str, Any], max_body_bytes: int) -> bool:
    """Serve ``routes`` (path → endpoint with a ``start`` method) from the protocol, when uvicorn's "auto"
    HTTP protocol is its httptools one. False (nothing changed) otherwise."""
    from uvicorn import config as uvicorn_config
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    if FastProtocol is None or AutoHTTPProtocol is not HttpToolsProtocol:
        log.info("uvicorn's HTTP protocol is not httptools: prediction routes stay on the ASGI path")
        return False
    FastProtocol.routes = {path.encode(): endpoint.start for path, endpoint in routes.items()}
    FastProtocol.max_body_bytes = max_body_bytes
    uvicorn_config.HTTP_PROTOCOLS["auto"] = f"{__name__}:FastProtocol"
    return True
