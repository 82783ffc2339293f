"""Runs `bentoml serve` for the fraud service as a child process and waits until /readyz says ready."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from harness.readiness import http_ok, wait_ready
from tools.services import free_port

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "service.service:FraudDetector"


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen
    log_path: Path
    grpc_port: int = 0

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def stop(self, timeout: float = 30) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def private_home(env: dict[str, str], path: Path) -> Path:
    """A BentoML home of this server's own that shares the model store.

    `bentoml serve` empties ``$BENTOML_HOME/prometheus_multiproc_dir`` when it starts, which wipes the
    metrics of any other server running on the same home; a home per server, whose ``models`` and
    ``bentos`` link to the shared ones, keeps each server's metrics its own.
    """
    shared = Path(env.get("BENTOML_HOME") or os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")
    path.mkdir(parents=True, exist_ok=True)
    for sub in ("models", "bentos"):
        target = (shared / sub).resolve()
        target.mkdir(parents=True, exist_ok=True)
        link = path / sub
        if link.is_symlink() and link.resolve() != target:
            link.unlink()
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    return path


def start(port: int, env: dict[str, str], log_path: Path, timeout: float = 180,
          extra_args: tuple[str, ...] = (), spool_path: Path | None = None) -> ServerProcess:
    """``bentoml serve`` on ``port``, ready. Each server gets a spool folder of its own beside its log unless
    ``spool_path`` is given (a spool has one owner: a second server on it is refused)."""
    exe = Path(sys.executable).with_name("bentoml")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    spool_path = spool_path or log_path.parent / f"spool-{port}" / "predictions.jsonl"
    env = {**env, "MLOPS_SPOOL_PATH": str(spool_path)}
    if "MLOPS_GRPC_PORT" not in env:  # gRPC binds with SO_REUSEPORT: two servers must not share a port
        env = {**env, "MLOPS_GRPC_PORT": str(free_port())}
    home = private_home(env, log_path.parent / f"bentoml-home-{port}")
    tmp = home / "tmp"  # what the server leaves in the temp dir (Feast's metrics dirs) stays with its home
    tmp.mkdir(exist_ok=True)
    env = {**env, "BENTOML_HOME": str(home), "TMPDIR": str(tmp)}
    process = subprocess.Popen(
        [str(exe), "serve", SERVICE, "--port", str(port), "--host", "127.0.0.1", *extra_args],
        cwd=ROOT, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    server = ServerProcess(f"http://127.0.0.1:{port}", process, log_path, int(env["MLOPS_GRPC_PORT"]))
    why_not = wait_ready(process, http_ok(f"{server.url}/readyz"), timeout)
    if why_not is None:
        return server
    server.stop()
    raise RuntimeError(f"bentoml serve {why_not}:\n{server.log_tail()}")
