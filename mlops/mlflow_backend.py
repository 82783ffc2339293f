"""The MLflow backend: one URI for tracking and the model registry, and its client.

The embedded SQLite store under ``MLOPS_MLFLOW_DIR`` (artifacts beside it), or ``MLOPS_MLFLOW_URI``, an
``mlflow server`` that many hosts share (PostgreSQL behind it, artifacts proxied through it). Everything goes
through an explicit ``MlflowClient``, never MLflow's process-global "current URI", so one process can talk to
two backends (the tests do). In the shared core because readers (the service following the registry, the
stream consumers loading a version's files) need it as much as training does (:mod:`lifecycle.tracking`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from mlflow.environment_variables import MLFLOW_DISABLE_TELEMETRY, MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT
from mlflow.exceptions import MlflowException

from mlops.connections import apply_mlflow_auth, redact_uri, with_db_password
from mlops.settings import Settings

# Our command lines own stdout (`--json`): MLflow must not print run links there. And nothing here may phone
# home (no network but the package registries; usage data is nobody's business).
MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.set(True)
MLFLOW_DISABLE_TELEMETRY.set(True)

HISTORY_EXPERIMENT = "model-registry-history"
# SQLite waits this long for a lock held by another writer instead of failing with "database is locked".
SQLITE_BUSY_TIMEOUT_S = 60


class TrackingError(RuntimeError):
    """The MLflow backend could not be reached or refused an operation."""


@dataclass(frozen=True)
class Backend:
    uri: str = field(repr=False)  # may hold the database password: see display_uri
    artifact_root: str | None = None  # embedded store only; a server chooses its own
    experiment: str = "fraud-detector-training"
    _experiments: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Backend:
        if settings.mlflow_uri:
            apply_mlflow_auth(settings)
            return _cached(with_db_password(settings.mlflow_uri, settings), None, settings.mlflow_experiment)
        home = settings.mlflow_dir.resolve()
        home.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{home / 'mlflow.db'}?timeout={SQLITE_BUSY_TIMEOUT_S}"
        return _cached(uri, (home / "artifacts").as_uri(), settings.mlflow_experiment)

    @classmethod
    def for_uri(cls, uri: str, experiment: str = "fraud-detector-training") -> Backend:
        """A URI, or a plain path taken as an embedded SQLite file (artifacts beside it, as for a sqlite URI;
        MLflow's own default would be ./mlruns under whatever folder the process runs in)."""
        db = sqlite_file(uri)
        if uri.startswith("sqlite:///") and db is not None:
            return _cached(uri, (db.parent / "artifacts").as_uri(), experiment)
        if "://" in uri or db is None:
            return _cached(uri, None, experiment)
        db.parent.mkdir(parents=True, exist_ok=True)
        return _cached(f"sqlite:///{db}?timeout={SQLITE_BUSY_TIMEOUT_S}", (db.parent / "artifacts").as_uri(),
                       experiment)

    @property
    def client(self) -> MlflowClient:
        return _client(self.uri)

    @property
    def display_uri(self) -> str:
        """The URI as `mlflow ui --backend-store-uri` takes it, without a password."""
        return redact_uri(self.uri.split("?", 1)[0])

    def change_token(self) -> tuple[int, ...] | None:
        """Something that changes whenever the embedded SQLite store is written (its files' sizes and mtimes),
        so a poller can skip a query when nothing changed; None for a server or any other database (ask it)."""
        db = sqlite_file(self.uri)
        if db is None:
            return None
        token: list[int] = []
        for path in (db, db.with_name(db.name + "-wal")):
            try:
                st = path.stat()
            except OSError:
                token += [0, 0]
                continue
            token += [st.st_mtime_ns, st.st_size]
        return tuple(token)

    def experiment_id(self, name: str | None = None) -> str:
        """The experiment's id, created on first use (two processes creating it at once is fine)."""
        name = name or self.experiment
        if name not in self._experiments:
            found = self.client.get_experiment_by_name(name)
            if found is None:
                location = f"{self.artifact_root}/{name}" if self.artifact_root else None
                try:
                    self._experiments[name] = self.client.create_experiment(name, artifact_location=location)
                except MlflowException as exc:
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    found = self.client.get_experiment_by_name(name)
            if found is not None:
                self._experiments[name] = found.experiment_id
        return self._experiments[name]


def sqlite_file(uri: str) -> Path | None:
    """The SQLite file a backend URI names: ``sqlite:///path`` or a plain path (resolved); None for anything else
    (a server, another database, an in-memory SQLite)."""
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///").split("?", 1)[0]
        return Path(path) if path and path != ":memory:" else None
    if "://" in uri:
        return None
    return Path(uri).resolve()


_BACKENDS: dict[tuple[str, str | None, str], Backend] = {}
_CLIENTS: dict[str, MlflowClient] = {}


def _cached(uri: str, artifact_root: str | None, experiment: str) -> Backend:
    key = (uri, artifact_root, experiment)
    if key not in _BACKENDS:
        _BACKENDS[key] = Backend(uri, artifact_root, experiment)
    return _BACKENDS[key]


def _client(uri: str) -> MlflowClient:
    if uri not in _CLIENTS:
        _CLIENTS[uri] = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return _CLIENTS[uri]
