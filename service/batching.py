"""An asyncio adaptive batcher: rows that arrive while a batch is being scored form the next batch.

No timer: an idle batcher scores a lone request at once, and under load the batch grows by itself to
whatever arrived during the previous one (up to ``max_batch_size``), so one Redis round trip and one
ONNX call serve many requests. ``max_concurrent`` batches may be in progress at once, so one waits on
Redis while another computes. A request whose rows waited longer than ``max_wait_s`` for a batch, or
that finds ``max_queued`` rows already waiting, is shed with :class:`Overloaded` (HTTP 503, retryable)
instead of joining a queue it cannot get out of in time.

Kept apart from what a batch means: the handler gets a flat list of rows and returns one result per row.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Row = TypeVar("Row")
Result = TypeVar("Result")


class Overloaded(RuntimeError):
    """The batch queue is full or too slow: retry later."""


class _Pending(Generic[Row, Result]):
    __slots__ = ("rows", "future", "enqueued")

    def __init__(self, rows: Sequence[Row], future: asyncio.Future[list[Result]], enqueued: float) -> None:
        self.rows = rows
        self.future = future
        self.enqueued = enqueued


class AdaptiveBatcher(Generic[Row, Result]):
    def __init__(self, handler: Callable[[list[Row]], Awaitable[list[Result]]], *, max_batch_size: int = 64,
                 max_concurrent: int = 2, max_wait_s: float = 1.0, max_queued: int = 4096,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.handler = handler
        self.max_batch_size = max_batch_size
        self.max_concurrent = max_concurrent
        self.max_wait_s = max_wait_s
        self.max_queued = max_queued
        self.on_batch = on_batch
        self._queue: collections.deque[_Pending[Row, Result]] = collections.deque()
        self._queued_rows = 0
        self._running = 0

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    async def submit(self, rows: Sequence[Row]) -> list[Result]:
        """Results for ``rows`` (at most ``max_batch_size`` of them), in order."""
        if self._queued_rows + len(rows) > self.max_queued:
            raise Overloaded(f"{self._queued_rows} rows already waiting for the model; retry later")
        future: asyncio.Future[list[Result]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(rows, future, time.monotonic()))
        self._queued_rows += len(rows)
        if self._running < self.max_concurrent:
            self._running += 1
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """Score batches until the queue is empty; at most ``max_concurrent`` of these run at once."""
        try:
            while self._queue:
                batch = self._take()
                if batch:
                    await self._score(batch)
        finally:
            self._running -= 1

    def _take(self) -> list[_Pending[Row, Result]]:
        batch: list[_Pending[Row, Result]] = []
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

    async def _score(self, batch: list[_Pending[Row, Result]]) -> None:
        rows = [row for pending in batch for row in pending.rows]
        if self.on_batch is not None:
            self.on_batch(len(rows))
        try:
            results = await self.handler(rows)
        except Exception as exc:  # every request of the batch gets the same error
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        start = 0
        for pending in batch:
            end = start + len(pending.rows)
            if not pending.future.done():
                pending.future.set_result(results[start:end])
            start = end
