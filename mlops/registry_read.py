"""Reading the model registry (MLflow's Model Registry, stages as aliases and tags): what serves, what is
staged, each version's metrics and the history of stage changes. The service follows the ``production`` and
``staging`` aliases through this; changing stages (the lock, promote, rollback) is :mod:`lifecycle.registry`,
which extends :class:`RegistryReader`, so the request path never imports the write side.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mlflow.entities.model_registry import ModelVersion as MlflowVersion
from mlflow.exceptions import MlflowException

from mlops import models
from mlops.mlflow_backend import HISTORY_EXPERIMENT, Backend
from mlops.rollout import DECISIONS_EXPERIMENT, RolloutState, RolloutStateError
from mlops.rollout import TAG as ROLLOUT_TAG
from mlops.settings import Settings

STAGES = ("None", "Staging", "Production", "Archived")
STAGE_ALIASES = {s.lower(): s for s in STAGES}
ALIAS_OF_STAGE = {"Production": "production", "Staging": "staging"}
STAGE_TAG = "stage"
LOCK_SUFFIX = ".lock"
_LOCK_MODEL = re.compile(r"\.lock(\.\d+)?$")


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
        name=mv.name, version=tags[models.VERSION_TAG], stage=tags.get(STAGE_TAG, "None"),
        metrics=_json_tag(tags, "metrics"), params=_json_tag(tags, "params"),
        training_data_hash=tags.get("training_data_hash"), git_commit=tags.get("git_commit"), created_at=created,
        stage_changed_at=tags.get("stage_changed_at", created), mlflow_version=str(mv.version), run_id=mv.run_id,
        aliases=list(mv.aliases or []),
    )


class RegistryReader:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.client = backend.client

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> RegistryReader:
        return cls(Backend.from_settings(settings or Settings.load()))

    @property
    def uri(self) -> str:
        return self.backend.display_uri

    # -- reads ------------------------------------------------------------------------------------

    def _mlflow_version(self, name: str, version: str) -> MlflowVersion:
        try:
            mv = models.find(self.backend, name, version)
        except models.ModelStoreError as exc:
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
            names.extend(m.name for m in page if not _LOCK_MODEL.search(m.name))
            token = page.token
            if not token:
                return sorted(names)

    def list(self, name: str | None = None, stage: str | None = None) -> list[ModelVersion]:
        wanted = normalize_stage(stage) if stage else None
        out = []
        for model in [name] if name else self._model_names():
            for mv in models.all_versions(self.backend, model):
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
        return _version(mv) if models.VERSION_TAG in mv.tags else None

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
            models.check_name(name)  # it goes into a filter string
        except models.ModelStoreError as exc:
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
                             "seq": int(t.get("seq_ns", "0")), "fence": int(t.get("fence", "0")),
                             "run_id": run.info.run_id})
            token = page.token
            if not token:
                break
        rows.sort(key=lambda r: r["seq"])
        return rows

    def rollout(self, name: str) -> RolloutState | None:
        """The model's rollout (active or the last one ended), None when it never had one."""
        try:
            tags = self.client.get_registered_model(name).tags or {}
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                return None
            raise
        if ROLLOUT_TAG not in tags:
            return None
        try:
            return RolloutState.from_tag(tags[ROLLOUT_TAG])
        except RolloutStateError as exc:
            raise RegistryError(f"{name}: {exc}") from None

    def rollout_decisions(self, name: str, rollout_id: str | None = None) -> list[dict[str, Any]]:
        """Every recorded rollout decision of ``name`` (or of one rollout), oldest first, with its statistics."""
        try:
            models.check_name(name)
        except models.ModelStoreError as exc:
            raise RegistryError(str(exc)) from None
        experiment = self.client.get_experiment_by_name(DECISIONS_EXPERIMENT)
        if experiment is None:
            return []
        query = f"tags.model = '{name}'" + (f" and tags.rollout_id = '{rollout_id}'" if rollout_id else "")
        rows, token = [], None
        while True:
            page = self.client.search_runs([experiment.experiment_id], query, max_results=1000, page_token=token)
            for run in page:
                t = run.data.tags
                rows.append({"model": t["model"], "rollout_id": t["rollout_id"], "candidate": t["candidate"],
                             "baseline": t["baseline"], "step": int(t["step"]), "action": t["action"],
                             "status": t["status"], "actor": t["actor"], "reason": t.get("reason", ""),
                             "at": t["at"], "seq": int(t.get("seq_ns", "0")),
                             "checks": json.loads(t.get("checks", "[]")), "metrics": dict(run.data.metrics),
                             "run_id": run.info.run_id})
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


def _with_aliases(mv: MlflowVersion, aliases: dict[tuple[str, str], list[str]]) -> MlflowVersion:
    mv._aliases = sorted(aliases.get((mv.name, str(mv.version)), []))  # search results carry no aliases
    return mv
