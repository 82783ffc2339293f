"""What the stream consumers read from a model version's files: the drift reference profile, the calibration,
the holdout metrics.

Loaded from the model store (MLflow, cached locally) by (name, version) as events name them, and cached; a
version without the file is asked again every 30 s (it may be registered meanwhile)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

from mlops.calibration import CALIBRATION_FILE, Calibration
from mlops.profile import PROFILE_FILE, ReferenceProfile

T = TypeVar("T")


class ProfileCache(Generic[T]):
    """Per (model name, version): the loader's answer, cached; a missing one re-checked every ``retry_s``."""

    def __init__(self, loader: Callable[[str, str], T | None], retry_s: float = 30.0) -> None:
        self._loader = loader
        self._retry_s = retry_s
        self._known: dict[tuple[str, str], T] = {}
        self._missing: dict[tuple[str, str], float] = {}

    def get(self, name: str, version: str) -> T | None:
        key = (name, version)
        if key in self._known:
            return self._known[key]
        if time.monotonic() - self._missing.get(key, -1e9) < self._retry_s:
            return None
        found = self._loader(name, version)
        if found is None:
            self._missing[key] = time.monotonic()
        else:
            self._known[key] = found
        return found


def _stored(name: str, version: str):
    from mlops import models

    try:
        return models.load(name, version)
    except models.ModelStoreError:
        return None


def _read(name: str, version: str, file: str) -> bytes | None:
    stored = _stored(name, version)
    path = stored.path / file if stored is not None else None
    return path.read_bytes() if path is not None and path.exists() else None


def load_holdout_metrics(name: str, version: str) -> dict[str, float] | None:
    """The version's holdout metrics from its training run (the baseline of the quality alerts)."""
    stored = _stored(name, version)
    return dict(stored.metadata.get("metrics") or {}) if stored is not None else None


def load_profile_from_store(name: str, version: str) -> ReferenceProfile | None:
    raw = _read(name, version, PROFILE_FILE)
    return ReferenceProfile.from_bytes(raw) if raw is not None else None


def load_calibration_from_store(name: str, version: str) -> Calibration | None:
    raw = _read(name, version, CALIBRATION_FILE)
    return Calibration.from_bytes(raw) if raw is not None else None
