"""Which model version(s) serve, following the registry without dropping a request.

A background thread polls the registry. While a rollout is active (:mod:`mlops.rollout`, the registry's
``rollout`` tag) its step decides: the candidate scores its share of customers, or, in the shadow step, every
row beside Production without answering. Without one, ``MLOPS_CANARY_SHARE`` > 0 sends that share to the
Staging version (a manual canary). When any of this changes, the
new ONNX session is created and warmed up off the request path, then a new immutable ``Serving`` replaces
the old one in a single reference assignment. A batch takes the ``Serving`` it started with, so in-flight
requests finish on the old session while new ones use the new. Sessions stay cached by version, so a
rollback to a recently served version is a swap, not a load.
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass

from mlops import models
from mlops.registry_read import RegistryReader
from mlops.rollout import in_share
from mlops.settings import Settings
from service import metrics
from service.onnx_predictor import OnnxPredictor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Targets:
    """What the registry says should serve: compared at every poll, built into a :class:`Serving` on change."""

    production: str
    canary: str | None = None
    canary_share: float = 0.0
    shadow: str | None = None
    rollout: str | None = None  # the rollout step this routing serves (mlops.rollout.RolloutState.step_key)


@dataclass(frozen=True)
class Serving:
    production: OnnxPredictor
    canary: OnnxPredictor | None = None
    canary_share: float = 0.0
    shadow: OnnxPredictor | None = None
    rollout: str | None = None

    def route(self, entity_id: str | None) -> OnnxPredictor:
        """Canary rows are chosen by a stable hash of the entity, so one customer sees one version."""
        if self.canary is None or self.canary_share <= 0:
            return self.production
        chosen = in_share(entity_id, self.canary_share) if entity_id else random.random() < self.canary_share
        return self.canary if chosen else self.production

    @property
    def versions(self) -> tuple[str, str | None]:
        return self.production.model.version, self.canary.model.version if self.canary else None

    @property
    def targets(self) -> Targets:
        return Targets(self.production.model.version, self.canary.model.version if self.canary else None,
                       self.canary_share, self.shadow.model.version if self.shadow else None, self.rollout)


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
        self.current = self._build(self._targets())
        self._publish_info(None, self.current)
        self._thread: threading.Thread | None = None
        if self.registry is not None:
            self._thread = threading.Thread(target=self._follow, name="registry-follower", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _targets(self) -> Targets:
        """What should serve as the registry says now: ``models:/<name>@production``; an active rollout's
        candidate at its step's share (or as shadow); else, with ``MLOPS_CANARY_SHARE``, ``@staging``."""
        if self.pinned:
            return Targets(self.pinned)
        production = self.registry.production(self.name) if self.registry else None
        prod_version = production.version if production else models.load(self.name).version
        if self.registry is None:
            return Targets(prod_version)
        rollout = self.registry.rollout(self.name)
        if rollout is not None and rollout.active and rollout.candidate != prod_version:
            if rollout.shadow:
                return Targets(prod_version, shadow=rollout.candidate, rollout=rollout.step_key)
            return Targets(prod_version, rollout.candidate, rollout.share, rollout=rollout.step_key)
        if self.settings.canary_share > 0:
            staging = self.registry.latest(self.name, "Staging")
            if staging and staging.version != prod_version:
                return Targets(prod_version, staging.version, self.settings.canary_share)
        return Targets(prod_version)

    def _session(self, version: str) -> OnnxPredictor:
        if version not in self._sessions:
            self._sessions[version] = OnnxPredictor.load(models.load(self.name, version),
                                                         self.settings.onnx_provider)
        return self._sessions[version]

    def _build(self, targets: Targets) -> Serving:
        return Serving(self._session(targets.production),
                       self._session(targets.canary) if targets.canary else None,
                       targets.canary_share if targets.canary else 0.0,
                       self._session(targets.shadow) if targets.shadow else None, targets.rollout)

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
        if targets == self.current.targets:
            return False
        new = self._build(targets)  # loads and warms up before anyone sees it
        old, self.current = self.current, new
        self._publish_info(old, new)
        metrics.MODEL_SWAPS.inc()
        log.info("now serving %s, was %s", new.targets, old.targets)
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
            return {p for p in (s.production, s.canary, s.shadow) if p is not None} if s else set()

        for p in predictors(old) - predictors(new):
            metrics.MODEL_INFO.labels(p.model.name, p.model.version, p.provider).set(0)
        for p in predictors(new):
            metrics.MODEL_INFO.labels(p.model.name, p.model.version, p.provider).set(1)
        if old is not None and old.targets.canary and old.targets.canary != new.targets.canary:
            metrics.ROLLOUT_SHARE.labels(self.name, old.targets.canary).set(0)
        if new.targets.canary:
            metrics.ROLLOUT_SHARE.labels(self.name, new.targets.canary).set(new.canary_share)
