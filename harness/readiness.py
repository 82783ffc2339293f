"""Waiting for a child process to answer: one loop for the servers the tools, tests and benchmarks start."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import httpx


def wait_ready(
    process: subprocess.Popen, probe: Callable[[], bool], timeout: float, interval: float = 0.5
) -> str | None:
    """Call ``probe`` until it says ready. None once ready; otherwise why not (the process exited, or time ran
    out), for the caller's error message. A connection refused while the process starts counts as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"exited with {process.returncode}"
        try:
            if probe():
                return None
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    return f"not ready within {timeout:.0f}s"


def http_ok(url: str, timeout: float = 2.0) -> Callable[[], bool]:
    """A probe: GET ``url`` answers 200."""
    return lambda: httpx.get(url, timeout=timeout).status_code == 200
