"""Helpers the integration tests share: the workspace, the server and consumer processes, metrics."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harness import server_process
from harness import workspace as wsmod
from harness.workspace import Workspace
from lifecycle.tracking import Backend
from mlops.connections import apply_mlflow_auth
from mlops.settings import Settings
from streaming import process as consumer_process
from streaming.process import ConsumerProcess
from tools import services as svc

ROOT = Path(__file__).resolve().parents[1]
N_CUSTOMERS = 400
N_TRANSACTIONS = 8_000

__all__ = ["ConsumerProcess", "Workspace", "prepare_workspace", "start_server", "start_consumer", "metric_value",
           "feast_features", "server_backend", "MLFLOW_CREDENTIALS", "LOOPBACK", "listening_addresses", "stored",
           "follower_env"]


# Credentials of the secured MLflow server, as a deployment hands them to the stack (conftest's mlflow_server).
MLFLOW_CREDENTIALS = ("MLOPS_MLFLOW_USERNAME", "MLOPS_MLFLOW_PASSWORD_FILE")


def server_backend(uri: str) -> Backend:
    """The backend of the secured MLflow server, its credentials taken from the settings (the service's path)."""
    apply_mlflow_auth(Settings())
    return Backend.for_uri(uri)


# 127.0.0.1 as /proc/net/tcp{,6} write it: IPv4, or IPv4-mapped IPv6.
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F"}


def listening_addresses(port: int) -> set[str]:
    """Addresses with a listening socket on ``port`` (hex, as /proc/net/tcp{,6} write them)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            address, state = line.split()[1], line.split()[3]
            if state == "0A" and address.endswith(f":{port:04X}"):  # LISTEN
                found.add(address.rsplit(":", 1)[0])
    return found


def prepare_workspace(root: Path, run_dir: Path) -> Workspace:
    repo = wsmod.copy_feature_repo(root / "feature_repo")
    ws = wsmod.prepare(root, svc.RunDir(run_dir).env_file, repo, n_customers=N_CUSTOMERS,
                       n_transactions=N_TRANSACTIONS, seed=7, version="v1")
    ws.env["MLOPS_KAFKA_RETRY_INTERVAL_S"] = "1"
    return ws


def start_server(ws: Workspace, extra_env: dict[str, str] | None = None,
                 timeout: float = 180, spool_path: Path | None = None) -> server_process.ServerProcess:
    port = svc.free_port()
    return server_process.start(port, {**ws.env, **(extra_env or {})}, ws.root / f"server-{port}.log", timeout,
                                spool_path=spool_path)


def metric_value(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of ``name`` whose label set contains ``labels`` (Prometheus text format)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if labels in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def start_consumer(ws: Workspace, env: dict[str, str], *args: str, command: str = "consume") -> ConsumerProcess:
    port = svc.free_port()
    return consumer_process.start({**ws.env, **env}, ws.root / f"consumer-{port}.log", port, *args, command=command)


def feast_features(ws: Workspace, customers: list[str]) -> list[dict | None]:
    """The customers' store features through the Feast SDK (the reference the service's own reader must equal)."""
    from mlops.schema import ENTITY, FEATURE_VIEW, STORE_FEATURES
    from service.online_store import open_feature_store

    table = open_feature_store(ws.settings).get_online_features(
        features=[f"{FEATURE_VIEW}:{name}" for name in STORE_FEATURES],
        entity_rows=[{ENTITY: c} for c in customers]).to_dict()
    rows = [{name: table[name][i] for name in STORE_FEATURES} for i in range(len(customers))]
    return [None if any(v is None for v in row.values()) else row for row in rows]


def stored(backend: Backend, trained) -> str:
    """A fresh registered model (its own name, so each test starts from an empty registry) with v1 and v2."""
    from lifecycle.train import register as store_model

    name = f"fraud_{uuid.uuid4().hex[:8]}"
    for version, model in zip(("v1", "v2"), trained, strict=True):
        store_model(model, name, version, backend=backend)
    return name


def follower_env(backend: Backend, name: str, **extra: str) -> dict[str, str]:
    """A server that follows ``name`` in this registry (its poll every 0.5 s)."""
    credentials = {k: os.environ[k] for k in MLFLOW_CREDENTIALS if k in os.environ}  # a secured server's
    return {"MLOPS_MODEL_VERSION": "", "MLOPS_MODEL_NAME": name, "MLOPS_MLFLOW_URI": backend.uri,
            "MLOPS_REGISTRY_POLL_S": "0.5", **credentials, **extra}


def feast_pipeline(feature_repo: Path, dest: Path) -> Path:
    """The shipped pipeline.yaml reading ``feature_repo`` through Feast, with a quick training step (40 trees)."""
    import yaml

    body = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
    stages = {s["name"]: s for s in body["stages"]}
    stages["fetch-data"]["params"] = {"source": "feast", "feature_repo": str(feature_repo)}
    stages["train"]["params"] = {"n_estimators": 40, "max_depth": 3}
    path = dest / "pipeline.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


RAY_TURN = Path(tempfile.gettempdir()) / "mlops-tests-ray.lock"  # one file for every test worker of the machine


@contextmanager
def ray_turn_held() -> Iterator[None]:
    """One Ray at a time across the test workers: each Ray is sized to every core, so two at once would each
    run at half speed and slow every test beside them (CI ran 13 minutes longer with both Ray test files in,
    tests beside them two to three times slower). The other worker waits its turn."""
    import fcntl

    with RAY_TURN.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
