"""Minimal reproduction of a BentoML 1.4 defect, ready to attach to an upstream report.

``bentoml._internal.server.http.traffic.TimeoutMiddleware`` arms ``loop.call_later(timeout, ...)`` for every
request and never cancels the handle when the request completes, so each finished request leaves a live
timer (with its future and context) for ``traffic.timeout`` seconds (60 by default).

    python docs/upstream/timeout_middleware_leak.py      # prints the live timers before and after 1,000 requests

On BentoML 1.4.39 it prints ``1000 timers outlived their requests``; with the one-line fix (``timer.cancel()``
in a ``finally``, as service/bentoml_fixes.py does) it prints ``0``.
"""

from __future__ import annotations

import asyncio

import httpx
from bentoml._internal.server.http.traffic import TimeoutMiddleware
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route


async def ok(request):
    return PlainTextResponse("ok")


def live_timers(loop: asyncio.AbstractEventLoop) -> int:
    return sum(1 for handle in loop._scheduled if not handle.cancelled())  # type: ignore[attr-defined]


async def leaked(requests: int = 1000) -> int:
    app = TimeoutMiddleware(Starlette(routes=[Route("/", ok)]), timeout=60)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        before = live_timers(asyncio.get_running_loop())
        for _ in range(requests):
            assert (await client.get("/")).status_code == 200
        return live_timers(asyncio.get_running_loop()) - before


if __name__ == "__main__":
    print(f"{asyncio.run(leaked())} timers outlived their requests")
