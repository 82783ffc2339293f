"""BentoML's request-timeout middleware, as fixed by service.bentoml_fixes: no timer outlives its request."""

from __future__ import annotations

import asyncio

import httpx
from bentoml._internal.server.http.traffic import TimeoutMiddleware
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from service import bentoml_fixes


async def ok(request):
    return PlainTextResponse("ok")


async def slow(request):
    await asyncio.sleep(1)
    return PlainTextResponse("late")


def live_timers(loop: asyncio.AbstractEventLoop) -> int:
    return sum(1 for handle in loop._scheduled if not handle.cancelled())  # type: ignore[attr-defined]


def test_requests_leave_no_timer_behind_and_the_timeout_still_answers_504():
    bentoml_fixes.apply()
    app = TimeoutMiddleware(Starlette(routes=[Route("/ok", ok), Route("/slow", slow)]), timeout=0.2)

    async def run() -> tuple[int, int, int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            before = live_timers(asyncio.get_running_loop())
            statuses = [(await client.get("/ok")).status_code for _ in range(200)]
            after = live_timers(asyncio.get_running_loop())
            timed_out = (await client.get("/slow")).status_code
        assert statuses == [200] * 200
        return before, after, timed_out

    before, after, timed_out = asyncio.run(run())
    assert after == before, f"{after - before} timers outlived their requests"
    assert timed_out == 504
