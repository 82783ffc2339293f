"""Model registry: versions, stages (None → Staging → Production → Archived), history, rollback.

Artifacts live in BentoML's model store (``lifecycle.model_store``); the registry keeps their metadata and
stages in SQLite. SQLite because a stage change must be one atomic transaction and the store must survive
restarts, with nothing to operate: ``BEGIN IMMEDIATE`` serialises writers across processes, and a partial
unique index makes two Production versions of one model impossible even if a writer misbehaves. Point
``MLOPS_REGISTRY_PATH`` at a shared volume for several writers on one host; a multi-host deployment needs a
shared SQL server instead (the schema is plain SQL).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

STAGES = ("None", "Staging", "Production", "Archived")
STAGE_ALIASES = {s.lower(): s for s in STAGES}

SCHEMA = """
CREATE TABLE IF NOT EXISTS model_versions (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    stage TEXT NOT NULL DEFAULT 'None' CHECK (stage IN ('None', 'Staging', 'Production', 'Archived')),
    metrics TEXT NOT NULL DEFAULT '{}',
    params TEXT NOT NULL DEFAULT '{}',
    training_data_hash TEXT,
    git_commit TEXT,
    created_at TEXT NOT NULL,
    stage_changed_at TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE UNIQUE INDEX IF NOT EXISTS one_production_per_model ON model_versions (name) WHERE stage = 'Production';
CREATE TABLE IF NOT EXISTS stage_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    from_stage TEXT NOT NULL,
    to_stage TEXT NOT NULL,
    at TEXT NOT NULL,
    reason TEXT
);
"""


class RegistryError(RuntimeError):
    """A registry operation was refused; the message says why."""


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    stage: str
    metrics: dict[str, Any]
    params: dict[str, Any]
    training_data_hash: str | None
    git_commit: str | None
    created_at: str
    stage_changed_at: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def normalize_stage(stage: str) -> str:
    try:
        return STAGE_ALIASES[stage.lower()]
    except KeyError:
        raise RegistryError(f"unknown stage {stage!r}: use one of {', '.join(s.lower() for s in STAGES)}") from None


def _now() -> str:
    return datetime.now(UTC).isoformat()


class Registry:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken before reading so concurrent writers queue instead of racing."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    # -- reads ------------------------------------------------------------------------------------

    def get(self, name: str, version: str) -> ModelVersion:
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM model_versions WHERE name=? AND version=?", (name, version)).fetchone()
        if row is None:
            raise RegistryError(f"{name}:{version} is not registered")
        return _version(row)

    def list(self, name: str | None = None, stage: str | None = None) -> list[ModelVersion]:
        sql, args = "SELECT * FROM model_versions WHERE 1=1", []
        if name:
            sql += " AND name=?"
            args.append(name)
        if stage:
            sql += " AND stage=?"
            args.append(normalize_stage(stage))
        with self._connect() as conn:
            rows = conn.execute(sql + " ORDER BY name, created_at, version", args).fetchall()
        return [_version(r) for r in rows]

    def production(self, name: str) -> ModelVersion | None:
        found = self.list(name, "Production")
        return found[0] if found else None

    def latest(self, name: str, stage: str) -> ModelVersion | None:
        found = self.list(name, stage)
        return max(found, key=lambda v: v.stage_changed_at) if found else None

    def history(self, name: str) -> list[dict[str, Any]]:
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM stage_history WHERE name=? ORDER BY id", (name,)).fetchall()
        return [dict(r) for r in rows]

    def compare(self, name: str, versions: list[str]) -> dict[str, Any]:
        found = [self.get(name, v) for v in versions]
        metric_names = sorted({k for v in found for k in v.metrics})
        param_names = sorted({k for v in found for k in v.params})
        return {
            "name": name,
            "versions": [v.version for v in found],
            "stages": {v.version: v.stage for v in found},
            "metrics": {m: {v.version: v.metrics.get(m) for v in found} for m in metric_names},
            "params": {p: {v.version: v.params.get(p) for v in found} for p in param_names
                       if len({json.dumps(v.params.get(p)) for v in found}) > 1},
            "training_data_hash": {v.version: v.training_data_hash for v in found},
        }

    # -- writes -----------------------------------------------------------------------------------

    def register(self, name: str, version: str, metrics: dict[str, Any] | None = None,
                 params: dict[str, Any] | None = None, training_data_hash: str | None = None,
                 git_commit: str | None = None, stage: str = "None") -> ModelVersion:
        stage = normalize_stage(stage)
        if stage == "Production":
            raise RegistryError("register into staging or none, then promote to production")
        now = _now()
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO model_versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, version, stage, json.dumps(metrics or {}), json.dumps(params or {}), training_data_hash,
                     git_commit, now, now),
                )
                conn.execute("INSERT INTO stage_history (name, version, from_stage, to_stage, at, reason) "
                             "VALUES (?, ?, 'None', ?, ?, 'registered')", (name, version, stage, now))
        except sqlite3.IntegrityError:
            raise RegistryError(f"{name}:{version} is already registered; versions are immutable") from None
        return self.get(name, version)

    def promote(self, name: str, version: str, stage: str, reason: str = "promoted") -> ModelVersion:
        """Move a version to ``stage``; promoting to Production archives the current Production version
        in the same transaction."""
        stage = normalize_stage(stage)
        with self._write() as conn:
            row = conn.execute("SELECT stage FROM model_versions WHERE name=? AND version=?",
                               (name, version)).fetchone()
            if row is None:
                raise RegistryError(f"{name}:{version} is not registered")
            if row["stage"] == stage:
                raise RegistryError(f"{name}:{version} is already in {stage}")
            now = _now()
            if stage == "Production":
                for old in conn.execute("SELECT version FROM model_versions WHERE name=? AND stage='Production'",
                                        (name,)).fetchall():
                    self._move(conn, name, old["version"], "Production", "Archived", now,
                               f"replaced by {version}")
            self._move(conn, name, version, row["stage"], stage, now, reason)
        return self.get(name, version)

    def rollback(self, name: str) -> tuple[ModelVersion, ModelVersion]:
        """Production goes back to the version that was Production before it; returns (restored, retired)."""
        with self._write() as conn:
            current = conn.execute("SELECT version FROM model_versions WHERE name=? AND stage='Production'",
                                   (name,)).fetchone()
            if current is None:
                raise RegistryError(f"{name} has no Production version to roll back from")
            previous = conn.execute(
                "SELECT version FROM stage_history WHERE name=? AND to_stage='Production' AND version != ? "
                "ORDER BY id DESC LIMIT 1", (name, current["version"])).fetchone()
            if previous is None:
                raise RegistryError(f"{name}:{current['version']} is the only version ever in Production")
            now = _now()
            prev_stage = conn.execute("SELECT stage FROM model_versions WHERE name=? AND version=?",
                                      (name, previous["version"])).fetchone()["stage"]
            self._move(conn, name, current["version"], "Production", "Archived", now,
                       f"rolled back to {previous['version']}")
            self._move(conn, name, previous["version"], prev_stage, "Production", now, "rollback")
        return self.get(name, previous["version"]), self.get(name, current["version"])

    @staticmethod
    def _move(conn: sqlite3.Connection, name: str, version: str, from_stage: str, to_stage: str, now: str,
              reason: str) -> None:
        conn.execute("UPDATE model_versions SET stage=?, stage_changed_at=? WHERE name=? AND version=?",
                     (to_stage, now, name, version))
        conn.execute("INSERT INTO stage_history (name, version, from_stage, to_stage, at, reason) "
                     "VALUES (?, ?, ?, ?, ?, ?)", (name, version, from_stage, to_stage, now, reason))


def _version(row: sqlite3.Row) -> ModelVersion:
    return ModelVersion(
        name=row["name"], version=row["version"], stage=row["stage"], metrics=json.loads(row["metrics"]),
        params=json.loads(row["params"]), training_data_hash=row["training_data_hash"],
        git_commit=row["git_commit"], created_at=row["created_at"], stage_changed_at=row["stage_changed_at"],
    )

