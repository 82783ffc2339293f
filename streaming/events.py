"""Parsing and checking prediction events; anything unusable is a poison message with a reason code."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any


class PoisonEvent(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class PredictionEvent:
    model_name: str
    model_version: str
    timestamp: float
    features: dict[str, float]
    prediction: float
    label: int | None

    def value(self, column: str) -> Any:
        if column == "prediction":
            return self.prediction
        if column == "label":
            return self.label
        return self.features[column]


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PoisonEvent("bad_field", f"{name} is not a finite number: {value!r}")
    return float(value)


def parse(raw: bytes | None) -> PredictionEvent:
    if raw is None:
        raise PoisonEvent("bad_json", "empty message")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PoisonEvent("bad_json", str(exc)) from None
    if not isinstance(body, dict):
        raise PoisonEvent("bad_json", "not a JSON object")
    missing = [k for k in ("model_name", "model_version", "timestamp", "features", "prediction") if k not in body]
    if missing:
        raise PoisonEvent("missing_field", f"missing {missing}")
    if not isinstance(body["features"], dict):
        raise PoisonEvent("bad_field", "features is not an object")
    try:
        ts = datetime.fromisoformat(str(body["timestamp"])).timestamp()
    except ValueError:
        raise PoisonEvent("bad_field", f"timestamp is not ISO-8601: {body['timestamp']!r}") from None
    features = {str(k): _number(v, f"features.{k}") for k, v in body["features"].items()}
    label = body.get("label")
    if label is not None and label not in (0, 1):
        raise PoisonEvent("bad_field", f"label is not 0 or 1: {label!r}")
    return PredictionEvent(str(body["model_name"]), str(body["model_version"]), ts, features,
                           _number(body["prediction"], "prediction"), label)
