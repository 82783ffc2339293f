"""Builds the integration-test workspace: seeded data, a stored model, a Feast repo on the real Redis."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mlops import data as datamod
from mlops import server_process
from mlops import services as svc
from mlops.feast_cli import apply_and_materialize, feast, feast_env
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
    dataset: datamod.Dataset
    env: dict[str, str] = field(default_factory=dict)


def feast_cli(repo: Path, env: dict[str, str], *args: str):
    return feast(repo, env, *args)


def prepare_workspace(root: Path, run_dir: Path) -> Workspace:
    """Seeded data → trained ONNX model in the store → `feast apply` + `feast materialize-incremental`."""
    from mlops.train import register, train

    repo = root / "feature_repo"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    dataset = datamod.generate(N_CUSTOMERS, N_TRANSACTIONS, seed=7)
    datamod.write(dataset, repo / "data")
    stored = register(train(dataset), "fraud_detector", "v1")

    env = feast_env(svc.RunDir(run_dir).env_file)
    env.update({
        "MLOPS_FEATURE_REPO": str(repo),
        "MLOPS_SPOOL_PATH": str(root / "spool" / "predictions.jsonl"),
        "MLOPS_KAFKA_RETRY_INTERVAL_S": "1",
        "PYTHONUNBUFFERED": "1",
    })
    apply_and_materialize(repo, env)
    settings = Settings.load().model_copy(update={"feature_repo": repo})
    return Workspace(root, run_dir, repo, settings, stored.tag, dataset, env)


def start_server(ws: Workspace, extra_env: dict[str, str] | None = None) -> server_process.ServerProcess:
    port = svc.free_port()
    return server_process.start(port, {**ws.env, **(extra_env or {})}, ws.root / f"server-{port}.log")


def metric_value(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of ``name`` whose label set contains ``labels`` (Prometheus text format)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if labels in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class ConsumerProcess:
    """`python -m streaming consume` as a child process (so tests can SIGKILL it mid-stream)."""

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


def start_consumer(ws: Workspace, env: dict[str, str], *args: str) -> ConsumerProcess:
    port = svc.free_port()
    log_path = ws.root / f"consumer-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "streaming", "consume", "--metrics-port", str(port), "--metrics-local", *args],
        cwd=ROOT, env={**ws.env, **env}, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
    )
    return ConsumerProcess(process, log_path, port)
