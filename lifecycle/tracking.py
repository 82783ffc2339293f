"""Tracked training runs on the MLflow backend (:mod:`mlops.mlflow_backend`): what a person browsing the
experiment needs to reproduce and judge a model."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from mlops.mlflow_backend import HISTORY_EXPERIMENT, Backend, TrackingError, sqlite_file

__all__ = ["HISTORY_EXPERIMENT", "Backend", "TrackingError", "TrainingRun", "git_commit", "sqlite_file",
           "training_run"]


def git_commit() -> str | None:
    """The checkout's commit, or None outside a git checkout (never an error)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


@dataclass
class TrainingRun:
    """One MLflow run: what a person browsing the experiment needs to reproduce and judge a model."""

    backend: Backend
    run_id: str
    artifact_uri: str

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, json.dumps(v) if isinstance(v, dict | list) else str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.backend.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, 0) for k, v in metrics.items() if isinstance(v, int | float)]
        if items:
            self.backend.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None and v != ""]
        if items:
            self.backend.client.log_batch(self.run_id, tags=items)

    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        self.backend.client.log_artifacts(self.run_id, str(local_dir), artifact_path)


@contextmanager
def training_run(backend: Backend, run_name: str, tags: dict[str, Any] | None = None) -> Iterator[TrainingRun]:
    """An MLflow run that ends FINISHED, or FAILED (with the reason as a tag) when the block raises."""
    commit = git_commit()
    try:
        run = backend.client.create_run(backend.experiment_id(), run_name=run_name, tags={
            "mlflow.source.name": "mlops-stack", "mlflow.user": _user(),
            **({"mlflow.source.git.commit": commit, "git_commit": commit} if commit else {}),
            **{k: str(v) for k, v in (tags or {}).items() if v is not None},
        })
    except MlflowException as exc:
        raise TrackingError(f"MLflow at {backend.display_uri} refused a new run: {exc.message}") from None
    tracked = TrainingRun(backend, run.info.run_id, run.info.artifact_uri)
    try:
        yield tracked
    except BaseException as exc:
        tracked.set_tags({"failure": str(exc)[:4000]})
        backend.client.set_terminated(tracked.run_id, "FAILED")
        raise
    backend.client.set_terminated(tracked.run_id, "FINISHED")


def _user() -> str:
    import getpass

    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except (KeyError, OSError):
        return socket.gethostname()
