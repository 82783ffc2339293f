"""Which model version(s) serve, following the registry without dropping a request.

A background thread polls the registry. When Production (or, with a canary share, Staging) changes, the
new ONNX session is created and warmed up off the request path, then a new immutable ``Serving`` replaces
the old one in a single reference assignment. A batch takes the ``Serving`` it started with, so in-flight
requests finish on the old session while new ones use the new. Sessions stay cached by version, so a
rollback to a recently served version is a swap, not a load.
"""

from __future__ import annotations

import logging
import random
import threading
import zlib
from dataclasses import dataclass

from mlops import models
from mlops.registry_read import RegistryReader
from mlops.settings import Settings
from service import metrics
from service.onnx_predictor import OnnxPredictor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Serving:
    production: OnnxPredictor
    canary: OnnxPredictor | None = None
    canary_share: float = 0.0

    def route(self, entity_id: str | None) -> OnnxPredictor:
        """Canary rows are chosen by a stable hash of the entity, so one customer sees one version."""
        if self.canary is None or self.canary_share <= 0:
            return self.production
        draw = (zlib.crc32(entity_id.encode()) % 10_000) / 10_000 if entity_id else random.random()
        return self.canary if draw < self.canary_share else self.production

    @property
    def versions(self) -> tuple[str, str | None]:
        return self.production.model.version, self.canary.model.version if self.canary else None


class ModelSelector:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = settings.model_name
        self.pinned = settings.model_version
        # MLflow's registry: MLOPS_MLFLOW_URI (a shared `mlflow server`), else the embedded SQLite store.
        self.registry = RegistryReader.from_settings(settings) if settings.follow_registry and not self.pinned else None
        self._sessions: dict[str, OnnxPredictor] = {}
        self._seen_token: tuple[int, ...] | None = None
        self._stop = threading.Event()
        self.current = self._build(*self._targets())
        self._publish_info(None, self.current)
        self._thread: threading.Thread | None = None
        if self.registry is not None:
            self._thread = threading.Thread(target=self._follow, name="registry-follower", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _targets(self) -> tuple[str, str | None]:
        """(production version, canary version or None) as the registry says now: the versions behind
        ``models:/<name>@production`` and, with a canary share, ``models:/<name>@staging``."""
        if self.pinned:
            return self.pinned, None
        production = self.registry.production(self.name) if self.registry else None
        prod_version = production.version if production else models.load(self.name).version
        canary = None
        if self.registry is not None and self.settings.canary_share > 0:
            staging = self.registry.latest(self.name, "Staging")
            canary = staging.version if staging and staging.version != prod_version else None
        return prod_version, canary

    def _session(self, version: str) -> OnnxPredictor:
        if version not in self._sessions:
            self._sessions[version] = OnnxPredictor.load(models.load(self.name, version),
                                                         self.settings.onnx_provider)
        return self._sessions[version]

    def _build(self, production: str, canary: str | None) -> Serving:
        return Serving(self._session(production), self._session(canary) if canary else None,
                       self.settings.canary_share if canary else 0.0)

    def refresh(self) -> bool:
        """Swap to what the registry says if it changed; True when a swap happened.

        An embedded (SQLite) registry whose files did not change since the last look is not asked again: a
        registry query is milliseconds of CPU under the GIL, every poll interval, in every worker — a
        latency spike each time for the requests on the event loop (measured: ~2.5 % of a loaded worker's
        CPU). A server is asked at every poll."""
        token = self.registry.backend.change_token() if self.registry is not None else None
        if token is not None and token == self._seen_token:
            return False
        targets = self._targets()
        self._seen_token = token
        if targets == self.current.versions:
            return False
        new = self._build(*targets)  # loads and warms up before anyone sees it
        old, self.current = self.current, new
        self._publish_info(old, new)
        metrics.MODEL_SWAPS.inc()
        log.info("now serving %s (canary %s), was %s", new.versions[0], new.versions[1], old.versions)
        return True

    def _follow(self) -> None:
        while not self._stop.wait(self.settings.registry_poll_s):
            try:
                self.refresh()
            except Exception:  # keep serving the current version; try again at the next poll
                metrics.MODEL_RELOAD_FAILURES.inc()
                log.exception("could not follow the registry")

    def _publish_info(self, old: Serving | None, new: Serving) -> None:
        def predictors(s: Serving | None) -> set[OnnxPredictor]:
            return {p for p in (s.production, s.canary) if p is not None} if s else set()

        for p in predictors(old) - predictors(new):
            metrics.MODEL_INFO.labels(p.model.name, p.model.version, p.provider).set(0)
        for p in predictors(new):
            metrics.MODEL_INFO.labels(p.model.name, p.model.version, p.provider).set(1)
