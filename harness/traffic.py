"""Steady /predict traffic in background threads, recording every outcome (and, optionally, readiness).

Used to prove promotions and rollbacks drop no request (tests, demo) and what outages do to requests
(the fault tests). Each client sends its next request when the last one answered, at most ``rate`` per
second, so the load stays bounded while the server struggles.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

import httpx


class Outcome(NamedTuple):
    at: float  # monotonic time of the answer
    status: int  # HTTP status, 0 for a transport error
    version: str | None  # model version that answered (200), else the error code or exception
    request_id: str
    seconds: float  # how long the request took


class Traffic:
    def __init__(self, url: str, clients: int = 4, customers: int = 300, rate: float | None = None,
                 watch_readiness: bool = False, body: Callable[[int, int], dict] | None = None) -> None:
        self.url = url
        self.customers = customers
        self.body = body  # (client, i) -> the request's fields; default: a fixed amount over ``customers``
        self.interval = 1.0 / rate if rate else 0.0
        self.results: list[Outcome] = []
        self.readiness: list[tuple[float, int]] = []  # (monotonic time, /readyz status)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        if watch_readiness:
            self._threads.append(threading.Thread(target=self._watch_readiness, daemon=True))

    def _client(self, n: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            i = 0
            while not self._stop.is_set():
                request_id = f"traffic-{n}-{i}-{uuid.uuid4().hex[:6]}"
                body = {**(self.body(n, i) if self.body else {"customer_id": f"C{(n * 97 + i) % self.customers:06d}",
                                                               "transaction_amount": 80.0}),
                        "request_id": request_id}
                started = time.monotonic()
                try:
                    r = http.post("/predict", json=body)
                    version = r.json().get("model_version" if r.status_code == 200 else "error")
                    self.results.append(Outcome(time.monotonic(), r.status_code, version, request_id,
                                                time.monotonic() - started))
                except httpx.HTTPError as exc:
                    self.results.append(Outcome(time.monotonic(), 0, repr(exc), request_id, time.monotonic() - started))
                i += 1
                pause = self.interval - (time.monotonic() - started)
                if pause > 0:
                    self._stop.wait(pause)

    def _watch_readiness(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5) as http:
            while not self._stop.wait(0.2):
                try:
                    status = http.get("/readyz").status_code
                except httpx.HTTPError:
                    status = 0
                self.readiness.append((time.monotonic(), status))

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def takeover(self, since: float, version: str, timeout: float = 30, settle: float = 1.0) -> float | None:
        """Seconds from ``since`` until ``version`` took over: it answered, and for ``settle`` seconds after the
        last answer from anything else only it answered. None when that did not happen within ``timeout``.

        A batch that started before the switch may still answer with the old version after the first answer
        from the new one, so the takeover point is the first new answer after the *last* old one.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            after = [r for r in self.results if r[0] > since]
            last_other = max((r[0] for r in after if r[2] != version), default=since)
            hits = [r[0] for r in after if r[2] == version and r[0] > last_other]
            if hits and time.monotonic() - hits[0] >= settle:
                return hits[0] - since
            time.sleep(0.1)
        return None

    def statuses(self) -> Counter:
        return Counter(r.status for r in self.results)

    def versions(self) -> Counter:
        return Counter(r.version for r in self.results)

    def accepted(self) -> set[str]:
        """Request ids the server answered with 200: each must be in the prediction log exactly once."""
        return {r.request_id for r in self.results if r.status == 200}

    def slowest(self) -> float:
        return max((r.seconds for r in self.results), default=0.0)
