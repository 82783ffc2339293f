"""Closed-loop /predict traffic in background threads, recording every outcome.

Used to prove promotions and rollbacks drop no request (tests, demo).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import httpx


class Traffic:
    def __init__(self, url: str, clients: int = 4, customers: int = 300) -> None:
        self.url = url
        self.customers = customers
        self.results: list[tuple[float, int, str | None, str]] = []  # (monotonic time, status, version, request id)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, n: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            i = 0
            while not self._stop.is_set():
                request_id = f"traffic-{n}-{i}-{uuid.uuid4().hex[:6]}"
                body = {"customer_id": f"C{(n * 97 + i) % self.customers:06d}", "transaction_amount": 80.0,
                        "request_id": request_id}
                try:
                    r = http.post("/predict", json=body)
                    version = r.json().get("model_version") if r.status_code == 200 else None
                    self.results.append((time.monotonic(), r.status_code, version, request_id))
                except httpx.HTTPError as exc:
                    self.results.append((time.monotonic(), 0, repr(exc), request_id))
                i += 1

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
        return Counter(r[1] for r in self.results)

    def versions(self) -> Counter:
        return Counter(r[2] for r in self.results)
