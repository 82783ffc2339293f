"""Reading a pipeline definition (YAML or JSON) into plain data the validator and runner share."""

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
REQUIRED_STAGES = ("fetch-data", "validate", "train", "evaluate", "gate", "register")
TOP_LEVEL_KEYS = {"name", "model_name", "description", "stages", "rollback"}


class DefinitionError(ValueError):
    """The file cannot be read as a pipeline definition at all."""


@dataclass
class Stage:
    name: str
    type: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Pipeline:
    name: str
    model_name: str
    stages: list[Stage]
    rollback: dict[str, Any] | None
    raw: dict[str, Any]

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)


def load(path: Path) -> Pipeline:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise DefinitionError(f"cannot read {path}: {exc.strerror}") from None
    try:
        raw = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise DefinitionError(f"{path} is not valid {'JSON' if Path(path).suffix == '.json' else 'YAML'}: "
                              f"{str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list):
        raise DefinitionError(f"{path}: expected a mapping with a 'stages' list")
    stages = []
    for i, item in enumerate(raw["stages"]):
        if not isinstance(item, dict) or "name" not in item:
            raise DefinitionError(f"{path}: stage #{i + 1} needs at least a 'name'")
        params = item.get("params") or {}
        if not isinstance(params, dict):
            raise DefinitionError(f"{path}: stage {item['name']!r} params must be a mapping")
        stages.append(Stage(str(item["name"]), str(item.get("type", KNOWN_STAGES.get(item["name"], ""))), params))
    rollback = raw.get("rollback")
    return Pipeline(str(raw.get("name", Path(path).stem)), str(raw.get("model_name", "fraud_detector")), stages,
                    rollback if isinstance(rollback, dict) else None, raw)
