"""An asyncio adaptive batcher: rows that arrive while a batch is being scored form the next batch.

No timer: an idle batcher scores a lone request at once, and under load the batch grows by itself to
whatever arrived during the previous one (up to ``max_batch_size``), so one Redis round trip and one
ONNX call serve many requests. ``max_concurrent`` batches may be in progress at once, so one waits on
Redis while another computes. A request whose rows waited longer than ``max_wait_s`` for a batch, or
that finds ``max_queued`` rows already waiting, is shed with :class:`Overloaded` (HTTP 503, retryable)
instead of joining a queue it cannot get out of in time.

Kept apart from what a batch means: the handler gets the batch's requests (each a group of rows with the
caller's tag) and returns one result per request, so whatever is per batch (a lookup, a model call, the
prediction log's hand-off, the metrics) is done once per batch, and whatever must hold for a request as a
whole (all its rows answered, or none) is decided per request. A request is never split across batches: one
larger than ``max_batch_size`` is a batch of its own.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Row = TypeVar("Row")
Result = TypeVar("Result")
Tag = TypeVar("Tag")
MAX_TURNS = 8  # event-loop turns a batch may wait for rows that keep arriving


class Overloaded(RuntimeError):
    """The batch queue is full or too slow: retry later."""


class Pending(Generic[Row, Result]):
    """One request in the queue: its rows, the caller's tag (e.g. when it started), and its future."""

    __slots__ = ("rows", "tag", "future", "enqueued")

    def __init__(self, rows: Sequence[Row], tag: object, future: asyncio.Future[Result], enqueued: float) -> None:
        self.rows = rows
        self.tag = tag
        self.future = future
        self.enqueued = enqueued


class Later(Generic[Result]):
    """What a handler returns when its results stand only once ``ready`` completes (e.g. the prediction log
    confirmed the batch's events): the batch's slot is freed at once, and each request is answered when
    ``ready`` is done — with its result, or with ``on_failure(result, error)`` if ``ready`` failed."""

    __slots__ = ("results", "ready", "on_failure")

    def __init__(self, results: list[Result], ready: asyncio.Future[None],
                 on_failure: Callable[[Result, BaseException], Result]) -> None:
        self.results = results
        self.ready = ready
        self.on_failure = on_failure


class AdaptiveBatcher(Generic[Row, Result]):
    def __init__(self, handler: Callable[[list[Pending[Row, Result]]], Awaitable[list[Result] | Later[Result]]], *,
                 max_batch_size: int = 64,
                 max_concurrent: int = 2, max_wait_s: float = 1.0, max_queued: int = 4096,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.handler = handler
        self.max_batch_size = max_batch_size
        self.max_concurrent = max_concurrent
        self.max_wait_s = max_wait_s
        self.max_queued = max_queued
        self.on_batch = on_batch
        self._queue: collections.deque[Pending[Row, Result]] = collections.deque()
        self._queued_rows = 0
        self._running = 0

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    async def submit(self, rows: Sequence[Row], tag: object = None) -> Result:
        """The handler's result for this request (``rows``, scored in one batch)."""
        return await self.submit_nowait(rows, tag)

    def submit_nowait(self, rows: Sequence[Row], tag: object = None) -> asyncio.Future[Result]:
        """Queue the request; its future gets the result (or :class:`Overloaded`). For callers that answer from
        a callback instead of a task."""
        if self._queued_rows + len(rows) > self.max_queued:
            raise Overloaded(f"{self._queued_rows} rows already waiting for the model; retry later")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._queue.append(Pending(rows, tag, future, time.monotonic()))
        self._queued_rows += len(rows)
        if self._running < self.max_concurrent:
            self._running += 1
            loop.create_task(self._drain())
        return future

    async def _drain(self) -> None:
        """Score batches until the queue is empty; at most ``max_concurrent`` of these run at once.

        Before taking a batch that is not full, turns of the event loop while rows keep arriving: each turn
        lets the requests whose bytes already arrived be parsed and join the batch, and the batch is taken
        as soon as a turn brings nothing new (or it is full, or after ``MAX_TURNS``). An idle server pays one
        turn (microseconds); a loaded one gets larger batches — one lookup, one model call and one burst of
        log hand-offs for more rows — without ever waiting on a clock."""
        try:
            while self._queue:
                seen = -1
                for _ in range(MAX_TURNS):
                    if self._queued_rows >= self.max_batch_size or self._queued_rows == seen:
                        break
                    seen = self._queued_rows
                    await asyncio.sleep(0)
                batch = self._take()
                if batch:
                    await self._score(batch)
        finally:
            self._running -= 1

    def _take(self) -> list[Pending[Row, Result]]:
        batch: list[Pending[Row, Result]] = []
        size = 0
        oldest_allowed = time.monotonic() - self.max_wait_s
        while self._queue and size + len(self._queue[0].rows) <= self.max_batch_size:
            pending = self._queue.popleft()
            self._queued_rows -= len(pending.rows)
            if pending.future.done():  # the client went away
                continue
            if pending.enqueued < oldest_allowed:
                pending.future.set_exception(Overloaded(
                    f"waited more than {self.max_wait_s * 1000:.0f} ms for the model; retry later"))
                continue
            batch.append(pending)
            size += len(pending.rows)
        if not batch and self._queue:  # a single request larger than a batch: score it alone
            pending = self._queue.popleft()
            self._queued_rows -= len(pending.rows)
            batch.append(pending)
        return batch

    async def _score(self, batch: list[Pending[Row, Result]]) -> None:
        if self.on_batch is not None:
            self.on_batch(sum(len(pending.rows) for pending in batch))
        try:
            results = await self.handler(batch)
        except Exception as exc:  # every request of the batch gets the same error
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        if isinstance(results, Later):
            later = results
            later.ready.add_done_callback(lambda ready: _answer_later(batch, later, ready))
            return
        _answer(batch, results)


def _answer(batch: list[Pending[Row, Result]], results: list[Result]) -> None:
    for pending, result in zip(batch, results, strict=True):
        if not pending.future.done():
            pending.future.set_result(result)


def _answer_later(batch: list[Pending[Row, Result]], later: Later[Result], ready: asyncio.Future[None]) -> None:
    error = asyncio.CancelledError() if ready.cancelled() else ready.exception()
    if error is None:
        _answer(batch, later.results)
    else:
        _answer(batch, [later.on_failure(result, error) for result in later.results])
