"""The model registry on MLflow's Model Registry: stages as aliases and tags, a lock, and a history.

MLflow deprecated stages (2.9) in favour of aliases, and keeps no history of them. Our guarantees on top:

- **Stage** (None → Staging → Production → Archived) is the model version tag ``stage``; the alias
  ``production`` always names the one Production version and ``staging`` the newest Staging one, so
  ``models:/fraud_detector@production`` is what serves. An alias names one version by construction.
- **One step.** A stage change (promote, archive, rollback) reads and writes several tags and aliases, so it
  runs under a registry-wide lock that every host shares: a registered model named ``<name>.lock``, created
  to take it and deleted to release it. Creating a registered model is atomic in MLflow's database (unique
  name) on SQLite and PostgreSQL alike, so concurrent promoters, on any host, queue. A lock left by a crashed
  process expires after ``LOCK_TTL_S``.
- **History.** Every stage change is an MLflow run in the experiment ``model-registry-history`` (tags:
  model, version, from, to, reason, time): it survives restarts, is shared by every host and is browsable in
  the MLflow UI. Rollback finds "the previous Production" there.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mlflow.entities.model_registry import ModelVersion as MlflowVersion
from mlflow.exceptions import MlflowException

from lifecycle import model_store
from lifecycle.tracking import HISTORY_EXPERIMENT, Backend
from mlops.settings import Settings

STAGES = ("None", "Staging", "Production", "Archived")
STAGE_ALIASES = {s.lower(): s for s in STAGES}
ALIAS_OF_STAGE = {"Production": "production", "Staging": "staging"}
STAGE_TAG = "stage"
LOCK_SUFFIX = ".lock"
LOCK_TTL_S = 120.0


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
    mlflow_version: str = ""
    run_id: str | None = None
    aliases: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def normalize_stage(stage: str) -> str:
    try:
        return STAGE_ALIASES[stage.lower()]
    except KeyError:
        raise RegistryError(f"unknown stage {stage!r}: use one of {', '.join(s.lower() for s in STAGES)}") from None


def register_stage(stage: str) -> str:
    """The stage a new version may enter: None or Staging (Production only through a promotion)."""
    stage = normalize_stage(stage)
    if stage not in ("None", "Staging"):
        raise RegistryError("register into staging or none, then promote to production")
    return stage


def check_metrics(metrics: dict[str, Any] | None) -> None:
    """Metrics are finite numbers: NaN or a string would be stored, listed and compared as if it were a score."""
    for key, value in (metrics or {}).items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise RegistryError(f"metric {key!r} must be a finite number, not {value!r}")


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _json_tag(tags: dict[str, str], key: str) -> dict[str, Any]:
    try:
        value = json.loads(tags.get(key) or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _version(mv: MlflowVersion) -> ModelVersion:
    tags = mv.tags
    created = tags.get("created_at") or datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat()
    return ModelVersion(
        name=mv.name, version=tags[model_store.VERSION_TAG], stage=tags.get(STAGE_TAG, "None"),
        metrics=_json_tag(tags, "metrics"), params=_json_tag(tags, "params"),
        training_data_hash=tags.get("training_data_hash"), git_commit=tags.get("git_commit"), created_at=created,
        stage_changed_at=tags.get("stage_changed_at", created), mlflow_version=str(mv.version), run_id=mv.run_id,
        aliases=list(mv.aliases or []),
    )


class Registry:
    def __init__(self, backend: Backend, lock_timeout_s: float = 60.0) -> None:
        self.backend = backend
        self.client = backend.client
        self.lock_timeout_s = lock_timeout_s

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Registry:
        settings = settings or Settings.load()
        return cls(Backend.from_settings(settings), settings.registry_lock_timeout_s)

    @property
    def uri(self) -> str:
        return self.backend.display_uri

    # -- reads ------------------------------------------------------------------------------------

    def _mlflow_version(self, name: str, version: str) -> MlflowVersion:
        try:
            mv = model_store.find(self.backend, name, version)
        except model_store.ModelStoreError as exc:
            raise RegistryError(str(exc)) from None
        if mv is None:
            raise RegistryError(f"{name}:{version} is not registered")
        return self.client.get_model_version(name, mv.version)  # search results carry no aliases

    def get(self, name: str, version: str) -> ModelVersion:
        mv = self._mlflow_version(name, version)
        if STAGE_TAG not in mv.tags:
            raise RegistryError(f"{name}:{version} is not registered")
        return _version(mv)

    def _model_names(self) -> list[str]:
        names, token = [], None
        while True:
            page = self.client.search_registered_models(max_results=1000, page_token=token)
            names.extend(m.name for m in page if not m.name.endswith(LOCK_SUFFIX))
            token = page.token
            if not token:
                return sorted(names)

    def list(self, name: str | None = None, stage: str | None = None) -> list[ModelVersion]:
        wanted = normalize_stage(stage) if stage else None
        out = []
        for model in [name] if name else self._model_names():
            for mv in model_store.all_versions(self.backend, model):
                if STAGE_TAG in mv.tags and (wanted is None or mv.tags[STAGE_TAG] == wanted):
                    out.append(mv)
        aliases = self._aliases({mv.name for mv in out})
        return [_version(_with_aliases(mv, aliases)) for mv in out]

    def _aliases(self, names: set[str]) -> dict[tuple[str, str], list[str]]:
        found: dict[tuple[str, str], list[str]] = {}
        for name in names:
            for alias, number in self._alias_map(name).items():
                found.setdefault((name, number), []).append(alias)
        return found

    def _alias_map(self, name: str) -> dict[str, str]:
        try:
            aliases = self.client.get_registered_model(name).aliases or {}
            return {alias: str(number) for alias, number in aliases.items()}
        except MlflowException:
            return {}

    def by_alias(self, name: str, alias: str) -> ModelVersion | None:
        """``models:/name@alias``, or None when the model or the alias does not exist."""
        try:
            mv = self.client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                return None
            raise
        return _version(mv) if model_store.VERSION_TAG in mv.tags else None

    def production(self, name: str) -> ModelVersion | None:
        return self.by_alias(name, ALIAS_OF_STAGE["Production"])

    def latest(self, name: str, stage: str) -> ModelVersion | None:
        stage = normalize_stage(stage)
        if stage in ALIAS_OF_STAGE:
            return self.by_alias(name, ALIAS_OF_STAGE[stage])
        found = self.list(name, stage)
        return max(found, key=lambda v: v.stage_changed_at) if found else None

    def history(self, name: str) -> list[dict[str, Any]]:
        """Every stage change of ``name``, oldest first."""
        try:
            model_store.check_name(name)  # it goes into a filter string
        except model_store.ModelStoreError as exc:
            raise RegistryError(str(exc)) from None
        experiment = self.client.get_experiment_by_name(HISTORY_EXPERIMENT)
        if experiment is None:
            return []
        rows, token = [], None
        while True:
            page = self.client.search_runs([experiment.experiment_id], f"tags.model = '{name}'",
                                           max_results=1000, page_token=token)
            for run in page:
                t = run.data.tags
                rows.append({"name": t["model"], "version": t["version"], "from_stage": t["from_stage"],
                             "to_stage": t["to_stage"], "at": t["at"], "reason": t.get("reason", ""),
                             "seq": int(t.get("seq_ns", "0")), "run_id": run.info.run_id})
            token = page.token
            if not token:
                break
        rows.sort(key=lambda r: r["seq"])
        return rows

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

    # -- the lock ---------------------------------------------------------------------------------

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        lock = f"{name}{LOCK_SUFFIX}"
        owner = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.01
        while True:
            try:
                tags = {"owner": owner, "expires": str(time.time() + LOCK_TTL_S)}
                self.client.create_registered_model(lock, tags=tags,
                                                    description="registry lock: a stage change is in progress")
                break
            except MlflowException as exc:
                # Taken; or taken and released between MLflow's insert and its look-up of the holder.
                if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                    raise
            self._break_if_expired(lock)
            if time.monotonic() > deadline:
                raise RegistryError(f"the registry lock of {name} stayed taken for {self.lock_timeout_s:.0f}s "
                                    f"(another promotion is running, or {lock} is stale)")
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.25)
        try:
            yield
        finally:
            try:
                held = self.client.get_registered_model(lock)
                if held.tags.get("owner") == owner:
                    self.client.delete_registered_model(lock)
            except MlflowException:
                pass

    def _break_if_expired(self, lock: str) -> None:
        try:
            held = self.client.get_registered_model(lock)
        except MlflowException:
            return
        if float(held.tags.get("expires", "inf")) < time.time():
            try:
                self.client.delete_registered_model(lock)
            except MlflowException:
                pass

    # -- writes -----------------------------------------------------------------------------------

    def _record(self, name: str, version: str, from_stage: str, to_stage: str, reason: str, at: str) -> None:
        experiment = self.backend.experiment_id(HISTORY_EXPERIMENT)
        run = self.client.create_run(experiment, run_name=f"{name}:{version} {from_stage} -> {to_stage}", tags={
            "model": name, "version": version, "from_stage": from_stage, "to_stage": to_stage, "reason": reason,
            "at": at, "seq_ns": str(time.time_ns()), "host": socket.gethostname()})
        self.client.set_terminated(run.info.run_id, "FINISHED")

    def _set_stage(self, mv: MlflowVersion, to_stage: str, reason: str, now: str) -> None:
        from_stage = mv.tags.get(STAGE_TAG, "None")
        self.client.set_model_version_tag(mv.name, mv.version, STAGE_TAG, to_stage)
        self.client.set_model_version_tag(mv.name, mv.version, "stage_changed_at", now)
        self._record(mv.name, mv.tags[model_store.VERSION_TAG], from_stage, to_stage, reason, now)

    def register(self, name: str, version: str, metrics: dict[str, Any] | None = None,
                 params: dict[str, Any] | None = None, training_data_hash: str | None = None,
                 git_commit: str | None = None, stage: str = "None", reason: str = "registered") -> ModelVersion:
        """Enter a stored version (see :mod:`lifecycle.model_store`) into the lifecycle, in None or Staging."""
        stage = register_stage(stage)
        check_metrics(metrics)
        with self._locked(name):
            try:
                mv = model_store.find(self.backend, name, version)
            except model_store.ModelStoreError as exc:
                raise RegistryError(str(exc)) from None
            if mv is None:
                raise RegistryError(f"no artifact for {name}:{version} in MLflow: train it first "
                                    "(mlops-train / pipeline run) or pass --model-file")
            if STAGE_TAG in mv.tags:
                raise RegistryError(f"{name}:{version} is already registered; versions are immutable")
            for key, value in (("metrics", metrics), ("params", params)):
                if value:
                    self.client.set_model_version_tag(name, mv.version, key, json.dumps(value, sort_keys=True))
            for key, value in (("training_data_hash", training_data_hash), ("git_commit", git_commit)):
                if value:
                    self.client.set_model_version_tag(name, mv.version, key, value)
            self._set_stage(mv, stage, reason, _now())
            if stage == "Staging":
                self.client.set_registered_model_alias(name, ALIAS_OF_STAGE["Staging"], mv.version)
        return self.get(name, version)

    def promote(self, name: str, version: str, stage: str, reason: str = "promoted") -> ModelVersion:
        """Move a version to ``stage``; promoting to Production moves the alias and archives the previous
        Production version in the same locked step."""
        stage = normalize_stage(stage)
        with self._locked(name):
            mv = self._mlflow_version(name, version)
            current = mv.tags.get(STAGE_TAG)
            if current is None:
                raise RegistryError(f"{name}:{version} is not registered")
            if current == stage:
                raise RegistryError(f"{name}:{version} is already in {stage}")
            self._move(name, mv, stage, reason)
        return self.get(name, version)

    def _move(self, name: str, mv: MlflowVersion, stage: str, reason: str,
              retire_reason: str | None = None) -> None:
        """The one place a version changes stage (caller holds the lock)."""
        now = _now()
        label = mv.tags[model_store.VERSION_TAG]
        aliases = self._alias_map(name)
        if stage == "Production":
            old_number = aliases.get(ALIAS_OF_STAGE["Production"])
            # The alias first: from this write on, models:/name@production is the new version.
            self.client.set_registered_model_alias(name, ALIAS_OF_STAGE["Production"], mv.version)
            for old in self._tagged(name, "Production") | ({old_number} if old_number else set()):
                if old != str(mv.version):
                    self._set_stage(self.client.get_model_version(name, old), "Archived",
                                    retire_reason or f"replaced by {label}", now)
        else:
            for alias, number in aliases.items():
                if number == str(mv.version) and alias in ALIAS_OF_STAGE.values():
                    self.client.delete_registered_model_alias(name, alias)
            if stage == "Staging":
                self.client.set_registered_model_alias(name, ALIAS_OF_STAGE["Staging"], mv.version)
        self._set_stage(mv, stage, reason, now)
        if stage != "Staging" and aliases.get(ALIAS_OF_STAGE["Staging"]) == str(mv.version):
            self._repoint_staging(name, exclude=str(mv.version))

    def _tagged(self, name: str, stage: str) -> set[str]:
        return {str(v.version) for v in model_store.all_versions(self.backend, name) if v.tags.get(STAGE_TAG) == stage}

    def _repoint_staging(self, name: str, exclude: str) -> None:
        """``@staging`` follows the newest remaining Staging version, or goes away."""
        staged = [v for v in model_store.all_versions(self.backend, name)
                  if v.tags.get(STAGE_TAG) == "Staging" and str(v.version) != exclude]
        alias = ALIAS_OF_STAGE["Staging"]
        if staged:
            newest = max(staged, key=lambda v: v.tags.get("stage_changed_at", ""))
            self.client.set_registered_model_alias(name, alias, newest.version)
        elif self._alias_map(name).get(alias) == exclude:
            self.client.delete_registered_model_alias(name, alias)

    def rollback(self, name: str, to: str | None = None, reason: str = "rollback") -> tuple[ModelVersion, ModelVersion]:
        """Production goes back to ``to``, or to the version that was Production before the current one;
        returns (restored, retired)."""
        with self._locked(name):
            current = self.production(name)
            if current is None:
                raise RegistryError(f"{name} has no Production version to roll back from")
            if to is None:
                earlier = [h["version"] for h in self.history(name)
                           if h["to_stage"] == "Production" and h["version"] != current.version]
                if not earlier:
                    raise RegistryError(f"{name}:{current.version} is the only version ever in Production")
                to = earlier[-1]
            elif to == current.version:
                raise RegistryError(f"{name}:{to} is already in Production")
            target = self._mlflow_version(name, to)
            if STAGE_TAG not in target.tags:
                raise RegistryError(f"{name}:{to} is not registered")
            self._move(name, target, "Production", reason, retire_reason=f"rolled back to {to}")
        return self.get(name, to), self.get(name, current.version)


def _with_aliases(mv: MlflowVersion, aliases: dict[tuple[str, str], list[str]]) -> MlflowVersion:
    mv._aliases = sorted(aliases.get((mv.name, str(mv.version)), []))  # search results carry no aliases
    return mv
