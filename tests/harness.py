"""Helpers the integration tests share: build a workspace, run the server, read Kafka."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from mlops import data as datamod
from mlops import services as svc
from mlops.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
N_CUSTOMERS = 400
N_TRANSACTIONS = 8_000


@dataclass
class Workspace:
    root: Path
    run_dir: Path
    feature_repo: Path
    settings: Settings
    model_tag: str
    env: dict[str, str] = field(default_factory=dict)


def feast_cli(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    feast = Path(sys.executable).with_name("feast")
    result = subprocess.run([str(feast), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"feast {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def prepare_workspace(root: Path, run_dir: Path) -> Workspace:
    """Seeded data → trained ONNX model in the store → `feast apply` + `feast materialize-incremental`."""
    from mlops.train import register, train

    repo = root / "feature_repo"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    dataset = datamod.generate(N_CUSTOMERS, N_TRANSACTIONS, seed=7)
    datamod.write(dataset, repo / "data")
    stored = register(train(dataset), "fraud_detector", "v1")

    env = {**os.environ}
    for line in svc.RunDir(run_dir).env_file.read_text().splitlines():
        key, _, value = line.partition("=")
        env[key] = value
    env.update({
        "MLOPS_FEATURE_REPO": str(repo),
        "MLOPS_SPOOL_PATH": str(root / "spool" / "predictions.jsonl"),
        "MLOPS_KAFKA_RETRY_INTERVAL_S": "1",
        "PYTHONUNBUFFERED": "1",
    })
    feast_cli(repo, env, "apply")
    feast_cli(repo, env, "materialize-incremental", time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()))
    settings = Settings.load().model_copy(update={"feature_repo": repo})
    return Workspace(root, run_dir, repo, settings, stored.tag, env)


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_server(ws: Workspace, extra_env: dict[str, str] | None = None, timeout: float = 120) -> Server:
    port = svc.free_port()
    log_path = ws.root / f"server-{port}.log"
    bentoml = Path(sys.executable).with_name("bentoml")
    process = subprocess.Popen(
        [str(bentoml), "serve", "service.service:FraudDetector", "--port", str(port), "--host", "127.0.0.1"],
        cwd=ROOT, env={**ws.env, **(extra_env or {})}, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"server not ready within {timeout}s:\n{server.log_tail()}")


def metric_value(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of ``name`` whose label set contains ``labels`` (Prometheus text format)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if labels in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def read_events(bootstrap: str, topic: str, wanted: set[str], timeout: float = 60, settle: float = 2.0,
                key: str = "request_id") -> list[dict[str, Any]]:
    """All events on ``topic`` whose ``key`` is in ``wanted``; waits for every wanted one (plus ``settle``
    seconds, so duplicates would show)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             value_deserializer=lambda b: json.loads(b))
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        complete_at: float | None = None
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                found.extend(r.value for r in records if r.value.get(key) in wanted)
            if complete_at is None and {e[key] for e in found} >= wanted:
                complete_at = time.monotonic()
            if complete_at is not None and time.monotonic() - complete_at >= settle:
                break
        return found
    finally:
        consumer.close()
