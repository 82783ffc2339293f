"""Reading a pipeline definition (YAML or JSON) into plain data the validator and runner share.

Two vocabularies are read: ours (``pipeline.yaml``: ``fetch-data``, ``validate``, ``preprocess``, ``train``,
``evaluate``, ``gate``, ``register`` with ``params``) and the reference tools' (``pipeline.json``: a ``deploy``
stage, the accuracy gate inside ``evaluate``, ``config`` for parameters, ``depends_on`` between stages). Each
stage gets a ``kind``, the runner stage it means.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Stage categories, in the order a pipeline must run them.
STAGE_TYPES = ("data", "transform", "train", "evaluate", "deploy")
# Stages the runner knows, with the category each belongs to.
KNOWN_STAGES = {
    "fetch-data": "data",
    "validate": "data",
    "preprocess": "transform",
    "train": "train",
    "evaluate": "evaluate",
    "gate": "evaluate",
    "register": "deploy",
}
# Other names for those stages (lowercase, '_' read as '-'): the reference's and common ones.
STAGE_NAME_ALIASES = {
    "data": "fetch-data", "ingest": "fetch-data", "data-ingestion": "fetch-data", "load-data": "fetch-data",
    "data-validation": "validate", "validate-data": "validate", "validation": "validate",
    "transform": "preprocess", "preprocessing": "preprocess", "feature-engineering": "preprocess",
    "training": "train", "train-model": "train",
    "evaluation": "evaluate", "evaluate-model": "evaluate",
    "deploy": "register", "deployment": "register", "register-model": "register",
}
TYPE_ALIASES = {"ingest": "data", "validation": "data", "preprocess": "transform", "training": "train",
                "evaluation": "evaluate", "deployment": "deploy", "register": "deploy"}
REQUIRED_STAGES = ("fetch-data", "validate", "train", "evaluate", "gate", "register")
TOP_LEVEL_KEYS = {"name", "model_name", "description", "stages", "rollback", "version", "retraining", "compute"}
STAGE_KEYS = {"name", "type", "params", "config", "depends_on", "description"}


class DefinitionError(ValueError):
    """The file cannot be read as a pipeline definition at all."""


def canonical(name: str) -> str:
    """The runner stage a name means (unknown names come back normalised, and stay unknown)."""
    key = name.strip().lower().replace("_", "-")
    return STAGE_NAME_ALIASES.get(key, key)


@dataclass
class Stage:
    name: str
    type: str
    params: dict[str, Any] = field(default_factory=dict)
    depends_on: list[str] = field(default_factory=list)
    extra_keys: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return canonical(self.name)


@dataclass
class Pipeline:
    name: str
    model_name: str
    stages: list[Stage]
    rollback: dict[str, Any] | None
    raw: dict[str, Any]

    def stage(self, kind: str) -> Stage | None:
        """The stage of this kind (``register`` finds a ``deploy`` stage too)."""
        return next((s for s in self.stages if s.kind == kind), None)

    def execution_order(self) -> list[Stage]:
        """File order, except that a stage runs after everything it ``depends_on`` (stable topological sort).
        Unknown dependencies and cycles are the validator's business; here they are ignored."""
        by_name = {s.name: s for s in self.stages}
        done: list[Stage] = []
        visiting: set[str] = set()

        def visit(stage: Stage) -> None:
            if stage in done or stage.name in visiting:
                return
            visiting.add(stage.name)
            for dep in stage.depends_on:
                if dep in by_name:
                    visit(by_name[dep])
            visiting.discard(stage.name)
            done.append(stage)

        for stage in self.stages:
            visit(stage)
        return done


def load(path: Path) -> Pipeline:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise DefinitionError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise DefinitionError(f"cannot read {path}: not a text file (byte {exc.start} is not UTF-8)") from None
    try:
        raw = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
    except (ValueError, RecursionError, yaml.YAMLError) as exc:  # ValueError: JSON, and YAML's bad dates
        raise DefinitionError(f"{path} is not valid {'JSON' if Path(path).suffix == '.json' else 'YAML'}: "
                              f"{str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list):
        raise DefinitionError(f"{path}: expected a mapping with a 'stages' list")
    stages = []
    for i, item in enumerate(raw["stages"]):
        if not isinstance(item, dict) or "name" not in item:
            raise DefinitionError(f"{path}: stage #{i + 1} needs at least a 'name'")
        params = item.get("params", item.get("config")) or {}
        if not isinstance(params, dict):
            raise DefinitionError(f"{path}: stage {item['name']!r} params must be a mapping")
        depends_on = item.get("depends_on") or []
        if isinstance(depends_on, str):
            depends_on = [depends_on]
        if not isinstance(depends_on, list) or not all(isinstance(d, str) for d in depends_on):
            raise DefinitionError(f"{path}: stage {item['name']!r} depends_on must be a stage name or a list of them")
        kind = canonical(str(item["name"]))
        raw_type = str(item.get("type", KNOWN_STAGES.get(kind, ""))).lower()
        stages.append(Stage(str(item["name"]), TYPE_ALIASES.get(raw_type, raw_type), params, list(depends_on),
                            sorted(set(item) - STAGE_KEYS)))
    rollback = raw.get("rollback")
    return Pipeline(str(raw.get("name", Path(path).stem)), str(raw.get("model_name", "fraud_detector")), stages,
                    rollback if isinstance(rollback, dict) else None, raw)
