"""Runs `python -m streaming consume` (or `join`) as a child process (the demo and the tests use it)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ConsumerProcess:
    process: subprocess.Popen
    log_path: Path
    metrics_port: int

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_assigned(self, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "assigned partitions" in self.log():
                return True
            if self.process.poll() is not None:
                return False
            time.sleep(0.2)
        return False


def start(env: dict[str, str], log_path: Path, metrics_port: int, *args: str, command: str = "consume"
          ) -> ConsumerProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "streaming", command, "--metrics-port", str(metrics_port), "--metrics-local", *args],
        cwd=ROOT, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
    )
    return ConsumerProcess(process, log_path, metrics_port)
