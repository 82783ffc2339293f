"""Fixes to the server stack under BentoML, applied when the service module is imported.

1. A BentoML defect that cost this service its P99.

BentoML 1.4's ``TimeoutMiddleware`` (bentoml/_internal/server/http/traffic.py) arms a timer per request
with ``loop.call_later(timeout, ...)`` and never cancels it when the request finishes, so every request
leaves a timer handle, a future and their context alive for ``traffic.timeout`` seconds. At 5,000 requests/s
and the default 60 s that is ~1.7 million live objects per worker; CPython's full collections walk all of
them, and measured here each took 100-400 ms — the whole P99 tail (P99 ~200 ms at P50 ~4 ms, where the
same work in a plain uvicorn app had a P99 of ~8 ms). The replacement below is the same middleware, with
the timer cancelled when the request is done, and its 504 in the service's one error body. tests/test_bentoml_fixes.py
checks that timers no longer accumulate.

2. uvicorn answers a request it cannot parse (bad request line, header, chunking) with a plain-text 400; the
   service promises ``{"error", "detail"}`` on every failure, so the same 400 is sent with that body.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bentoml._internal.server.http import traffic
from starlette.responses import JSONResponse

from service import upstream

_original_call = traffic.TimeoutMiddleware.__call__


async def _timeout_middleware_call(self: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

    async def _send(message: Any) -> None:
        if not waiter.done():
            waiter.set_result(None)
        await send(message)

    fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
    try:
        await waiter
    except TimeoutError:
        if fut.cancel():
            resp = JSONResponse({"error": "timeout",  # the service's one error body
                                 "detail": f"not able to process the request in {self.timeout} seconds"},
                                status_code=504)
            await resp(scope, receive, send)
    else:
        await fut
    finally:
        timer.cancel()  # the fix: the timer (and the future it holds) goes away with the request


def _originals_400() -> dict[str, object]:
    from uvicorn.protocols.http import h11_impl, httptools_impl

    return {"httptools": httptools_impl.HttpToolsProtocol.send_400_response,
            "h11": h11_impl.H11Protocol.send_400_response}


_original_400 = _originals_400()
BAD_REQUEST_BODY = b'{"error":"invalid_request","detail":"malformed HTTP request"}'


def _send_json_400(self: Any, msg: str) -> None:
    """uvicorn's ``send_400_response`` (httptools and h11 protocols), with the error body in JSON."""
    head = [b"HTTP/1.1 400 Bad Request\r\n"]
    for name, value in self.server_state.default_headers:
        head.extend([name, b": ", value, b"\r\n"])
    head.extend([b"content-type: application/json\r\n",
                 b"content-length: " + str(len(BAD_REQUEST_BODY)).encode("ascii") + b"\r\n",
                 b"connection: close\r\n\r\n", BAD_REQUEST_BODY])
    self.transport.write(b"".join(head))
    self.transport.close()


def apply() -> None:
    """Idempotent: install the fixed middleware call and the JSON 400 of uvicorn's protocols (upstream's
    originals kept in ``upstream.ORIGINALS``, where the version check reads them)."""
    from uvicorn.protocols.http import h11_impl, httptools_impl

    for target, original in ((f"{traffic.__name__}:TimeoutMiddleware.__call__", _original_call),
                             (f"{httptools_impl.__name__}:HttpToolsProtocol.send_400_response",
                              _original_400["httptools"]),
                             (f"{h11_impl.__name__}:H11Protocol.send_400_response", _original_400["h11"])):
        upstream.ORIGINALS.setdefault(target, original)

    traffic.TimeoutMiddleware.__call__ = _timeout_middleware_call  # type: ignore[method-assign]
    httptools_impl.HttpToolsProtocol.send_400_response = _send_json_400  # type: ignore[method-assign]
    h11_impl.H11Protocol.send_400_response = _send_json_400  # type: ignore[method-assign]
