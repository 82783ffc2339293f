"""The model registry on MLflow's Model Registry: stages as aliases and tags, a lock, and a history.

MLflow deprecated stages (2.9) in favour of aliases, and keeps no history of them. Our guarantees on top:

- **Stage** (None → Staging → Production → Archived) is the model version tag ``stage``; the alias
  ``production`` always names the one Production version and ``staging`` the newest Staging one, so
  ``models:/fraud_detector@production`` is what serves. An alias names one version by construction.
- **One step.** A stage change (promote, archive, rollback) reads and writes several tags and aliases, so it
  runs under a registry-wide lock that every host shares, a *fenced lease* (see :class:`Lease`). The only
  compare-and-set MLflow's store offers on SQLite and PostgreSQL alike is creating a registered model (an INSERT
  on its unique name: a second one fails with RESOURCE_ALREADY_EXISTS; tags, aliases and deletes are plain
  writes). So the lock is a sequence of registered models ``<name>.lock.<n>``: taking it, fresh or over an
  expired lease, is creating generation ``n + 1`` of the newest ``n`` once that one is released or expired, and
  of two promoters that saw the same ``n`` exactly one creates ``n + 1``. ``n`` is the fencing token: before each
  alias or stage write the holder checks that ``n`` is still the newest generation, that it carries its owner
  token, and that its lease has not run out; the change's history run and the version tag ``stage_fence``
  record ``n``. A holder paused past its lease therefore gets a :class:`RegistryError` instead of writing.
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
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mlflow.entities.model_registry import ModelVersion as MlflowVersion
from mlflow.entities.model_registry import RegisteredModel
from mlflow.exceptions import MlflowException

from lifecycle import model_store
from lifecycle.tracking import HISTORY_EXPERIMENT, Backend
from mlops.registry_read import (
    ALIAS_OF_STAGE,
    LOCK_SUFFIX,
    STAGE_TAG,
    STAGES,
    ModelVersion,
    RegistryError,
    RegistryReader,
    normalize_stage,
)
from mlops.settings import Settings

__all__ = ["ALIAS_OF_STAGE", "STAGES", "STAGE_TAG", "ModelVersion", "Registry", "RegistryError", "check_metrics",
           "lock_name", "normalize_stage", "register_stage"]

LOCK_TTL_S = 120.0  # the default lease (MLOPS_REGISTRY_LOCK_LEASE_S)
# A holder stops writing this long before its lease ends (at most a quarter of the lease): hosts' clocks differ,
# and a waiter compares the holder's expiry with its own clock.
LOCK_MARGIN_S = 5.0

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


def lock_name(name: str, generation: int) -> str:
    """The registered model that is generation ``generation`` of ``name``'s promotion lock."""
    return f"{name}{LOCK_SUFFIX}.{generation}"


def _lock_is_free(tags: dict[str, str], now: float) -> bool:
    """Released by its holder, or its lease ran out (a crashed or paused holder): the next generation may be taken."""
    try:
        expires = float(tags.get("expires", "inf"))
    except ValueError:
        expires = math.inf
    return "released" in tags or expires < now


@dataclass
class Lease:
    """A holder's handle on the promotion lock: its generation ``n`` (the fencing token: generations only grow),
    the owner token written into ``<name>.lock.<n>`` when it was created, and the lease's end.

    MLflow cannot make a tag or alias write conditional, so the fence is checked by the writer just before each
    write (:meth:`check`); a waiter takes over only after the lease has ended, and the holder stops writing
    ``margin`` seconds before that, so the check-then-write window is covered unless the holder stalls for
    longer than the margin between the two."""

    registry: Registry
    name: str
    generation: int
    owner: str
    expires: float
    lease_s: float

    @property
    def lock(self) -> str:
        return lock_name(self.name, self.generation)

    @property
    def margin_s(self) -> float:
        return min(LOCK_MARGIN_S, self.lease_s / 4)

    def check(self) -> None:
        """Before every alias or stage write: the lease is still running and still ours, else RegistryError.
        Past half its length the lease is renewed first (safe: nobody may take over a lease that has not ended)."""
        left = self.expires - time.time()
        if left <= self.margin_s:
            raise RegistryError(
                f"lost the registry lock of {self.name}: the lease of generation {self.generation} "
                f"{'ended' if left <= 0 else 'was about to end'} ({-left:+.1f}s), as this step paused past "
                f"{self.lease_s:g}s; nothing more is written")
        if left < self.lease_s / 2:
            self.renew()
        else:
            self._verify()

    def renew(self) -> None:
        """Only the holder renews: verified, then a new expiry on its own generation, then verified again (a
        takeover racing the renewal has created a newer generation, which the second check sees)."""
        self._verify()
        expires = time.time() + self.lease_s
        self.registry.client.set_registered_model_tag(self.lock, "expires", repr(expires))
        self.expires = expires
        self._verify()

    def release(self) -> None:
        """Only the holder releases: its own generation is marked released, never deleted (the newest generation
        is the counter the next one is taken from), then older generations are cleared away. A lock taken over
        meanwhile is a newer generation, which this never touches."""
        self._verify()
        client = self.registry.client
        client.set_registered_model_tag(self.lock, "released", _now())
        for generation in self.registry._lock_models(self.name):
            if generation < self.generation:
                try:
                    client.delete_registered_model(lock_name(self.name, generation))
                except MlflowException:
                    pass  # another release cleared it first

    def _verify(self) -> None:
        locks = self.registry._lock_models(self.name)
        newest = max(locks, default=0)
        mine = locks.get(self.generation)
        if newest > self.generation:
            raise RegistryError(f"lost the registry lock of {self.name}: generation {newest} took it over from "
                                f"{self.generation} (its lease ended, or that promoter's clock ran ahead); "
                                "nothing more is written")
        if mine is None or mine.tags.get("owner") != self.owner:
            raise RegistryError(f"not the holder of the registry lock of {self.name}: generation {self.generation} "
                                f"{'is gone' if mine is None else 'has another owner token'} (newest: {newest})")
        if "released" in mine.tags:
            raise RegistryError(f"the registry lock of {self.name} (generation {self.generation}) was released")


class Registry(RegistryReader):
    """The registry with its writes: registering, promoting and rolling back under the fenced lock."""

    def __init__(self, backend: Backend, lock_timeout_s: float = 60.0, lock_lease_s: float | None = None) -> None:
        """``lock_lease_s`` unset: MLOPS_REGISTRY_LOCK_LEASE_S (callers that pass only the timeout still honour it)."""
        super().__init__(backend)
        self.lock_timeout_s = lock_timeout_s
        self.lock_lease_s = lock_lease_s if lock_lease_s is not None else Settings.load().registry_lock_lease_s

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Registry:
        settings = settings or Settings.load()
        return cls(Backend.from_settings(settings), settings.registry_lock_timeout_s, settings.registry_lock_lease_s)

    # -- the lock ---------------------------------------------------------------------------------

    @contextmanager
    def _locked(self, name: str) -> Iterator[Lease]:
        lease = self._acquire(name)
        try:
            yield lease
        finally:
            try:
                lease.release()
            except (RegistryError, MlflowException):
                pass  # taken over: every write after the takeover was refused, and the newer generation stands

    def _acquire(self, name: str) -> Lease:
        try:
            model_store.check_name(name)  # it goes into a filter string
        except model_store.ModelStoreError as exc:
            raise RegistryError(str(exc)) from None
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.01
        while True:
            lease = self._try_acquire(name)
            if lease is not None:
                return lease
            if time.monotonic() > deadline:
                raise RegistryError(f"the registry lock of {name} stayed taken for {self.lock_timeout_s:.0f}s "
                                    f"(another promotion is running; a crashed one's lease ends after "
                                    f"{self.lock_lease_s:g}s)")
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.25)

    def _try_acquire(self, name: str) -> Lease | None:
        """One attempt: the next generation when the newest is released or expired, else None."""
        locks = self._lock_models(name)
        newest = max(locks, default=0)
        if newest and not _lock_is_free(locks[newest].tags, time.time()):
            return None
        return self._claim(name, newest)

    def _claim(self, name: str, seen: int) -> Lease | None:
        """The compare-and-set: create ``<name>.lock.<seen + 1>``. Of every promoter that saw generation
        ``seen`` free, only one creates it; the others get RESOURCE_ALREADY_EXISTS. A name that a release
        cleared away can be created again by a promoter that read an old listing: it then sees a newer
        generation and withdraws."""
        generation = seen + 1
        lease = Lease(self, name, generation, uuid.uuid4().hex, time.time() + self.lock_lease_s, self.lock_lease_s)
        tags = {"owner": lease.owner, "expires": repr(lease.expires), "lease_s": f"{self.lock_lease_s:g}",
                "holder": f"{socket.gethostname()}:{os.getpid()}", "taken_at": _now()}
        try:
            self.client.create_registered_model(lease.lock, tags=tags,
                                                description="registry lock: a stage change is in progress")
        except MlflowException as exc:
            # Taken; or taken and cleared away between MLflow's insert and its look-up of the existing one.
            if exc.error_code in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                return None
            raise
        if max(self._lock_models(name), default=0) != generation:
            try:
                self.client.delete_registered_model(lease.lock)
            except MlflowException:
                pass
            return None
        return lease

    def _lock_models(self, name: str) -> dict[int, RegisteredModel]:
        """Every generation of ``name``'s lock still stored, with its tags (search results carry them)."""
        prefix = f"{name}{LOCK_SUFFIX}."
        found: dict[int, RegisteredModel] = {}
        token = None
        while True:
            # LIKE's '_' matches any character, and SQLite's LIKE ignores case: the prefix is checked again here.
            page = self.client.search_registered_models(f"name LIKE '{prefix}%'", max_results=1000, page_token=token)
            for model in page:
                rest = model.name[len(prefix):]
                if model.name.startswith(prefix) and rest.isdigit():
                    found[int(rest)] = model
            token = page.token
            if not token:
                return found

    # -- writes -----------------------------------------------------------------------------------

    # Every write under the lock goes through these: the fence is checked just before it.

    def _tag(self, lease: Lease, mv: MlflowVersion, key: str, value: str) -> None:
        lease.check()
        self.client.set_model_version_tag(mv.name, mv.version, key, value)

    def _alias(self, lease: Lease, alias: str, number: str | int) -> None:
        lease.check()
        self.client.set_registered_model_alias(lease.name, alias, str(number))

    def _unalias(self, lease: Lease, alias: str) -> None:
        lease.check()
        self.client.delete_registered_model_alias(lease.name, alias)

    def _model_tag(self, lease: Lease, key: str, value: str) -> None:
        lease.check()
        self.client.set_registered_model_tag(lease.name, key, value)

    def _record(self, lease: Lease, version: str, from_stage: str, to_stage: str, reason: str, at: str) -> None:
        experiment = self.backend.experiment_id(HISTORY_EXPERIMENT)
        name = lease.name
        lease.check()
        run = self.client.create_run(experiment, run_name=f"{name}:{version} {from_stage} -> {to_stage}", tags={
            "model": name, "version": version, "from_stage": from_stage, "to_stage": to_stage, "reason": reason,
            "at": at, "seq_ns": str(time.time_ns()), "host": socket.gethostname(), "fence": str(lease.generation)})
        self.client.set_terminated(run.info.run_id, "FINISHED")

    def _set_stage(self, lease: Lease, mv: MlflowVersion, to_stage: str, reason: str, now: str) -> None:
        from_stage = mv.tags.get(STAGE_TAG, "None")
        self._tag(lease, mv, STAGE_TAG, to_stage)
        self._tag(lease, mv, "stage_changed_at", now)
        self._tag(lease, mv, "stage_fence", str(lease.generation))
        self._record(lease, mv.tags[model_store.VERSION_TAG], from_stage, to_stage, reason, now)

    def register(self, name: str, version: str, metrics: dict[str, Any] | None = None,
                 params: dict[str, Any] | None = None, training_data_hash: str | None = None,
                 git_commit: str | None = None, stage: str = "None", reason: str = "registered") -> ModelVersion:
        """Enter a stored version (see :mod:`lifecycle.model_store`) into the lifecycle, in None or Staging."""
        stage = register_stage(stage)
        check_metrics(metrics)
        with self._locked(name) as lease:
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
                    self._tag(lease, mv, key, json.dumps(value, sort_keys=True))
            for key, value in (("training_data_hash", training_data_hash), ("git_commit", git_commit)):
                if value:
                    self._tag(lease, mv, key, value)
            self._set_stage(lease, mv, stage, reason, _now())
            if stage == "Staging":
                self._alias(lease, ALIAS_OF_STAGE["Staging"], mv.version)
        return self.get(name, version)

    def promote(self, name: str, version: str, stage: str, reason: str = "promoted") -> ModelVersion:
        """Move a version to ``stage``; promoting to Production moves the alias and archives the previous
        Production version in the same locked step."""
        stage = normalize_stage(stage)
        with self._locked(name) as lease:
            mv = self._mlflow_version(name, version)
            current = mv.tags.get(STAGE_TAG)
            if current is None:
                raise RegistryError(f"{name}:{version} is not registered")
            if current == stage:
                raise RegistryError(f"{name}:{version} is already in {stage}")
            self._move(lease, mv, stage, reason)
        return self.get(name, version)

    def _move(self, lease: Lease, mv: MlflowVersion, stage: str, reason: str,
              retire_reason: str | None = None) -> None:
        """The one place a version changes stage (the caller holds ``lease``; every write checks it)."""
        name = lease.name
        now = _now()
        label = mv.tags[model_store.VERSION_TAG]
        aliases = self._alias_map(name)
        if stage == "Production":
            old_number = aliases.get(ALIAS_OF_STAGE["Production"])
            # The alias first: from this write on, models:/name@production is the new version.
            self._alias(lease, ALIAS_OF_STAGE["Production"], mv.version)
            for old in self._tagged(name, "Production") | ({old_number} if old_number else set()):
                if old != str(mv.version):
                    self._set_stage(lease, self.client.get_model_version(name, old), "Archived",
                                    retire_reason or f"replaced by {label}", now)
        else:
            for alias, number in aliases.items():
                if number == str(mv.version) and alias in ALIAS_OF_STAGE.values():
                    self._unalias(lease, alias)
            if stage == "Staging":
                self._alias(lease, ALIAS_OF_STAGE["Staging"], mv.version)
        self._set_stage(lease, mv, stage, reason, now)
        if stage != "Staging" and aliases.get(ALIAS_OF_STAGE["Staging"]) == str(mv.version):
            self._repoint_staging(lease, exclude=str(mv.version))

    def _tagged(self, name: str, stage: str) -> set[str]:
        return {str(v.version) for v in model_store.all_versions(self.backend, name) if v.tags.get(STAGE_TAG) == stage}

    def _repoint_staging(self, lease: Lease, exclude: str) -> None:
        """``@staging`` follows the newest remaining Staging version, or goes away."""
        name = lease.name
        staged = [v for v in model_store.all_versions(self.backend, name)
                  if v.tags.get(STAGE_TAG) == "Staging" and str(v.version) != exclude]
        alias = ALIAS_OF_STAGE["Staging"]
        if staged:
            newest = max(staged, key=lambda v: v.tags.get("stage_changed_at", ""))
            self._alias(lease, alias, newest.version)
        elif self._alias_map(name).get(alias) == exclude:
            self._unalias(lease, alias)

    def rollback(self, name: str, to: str | None = None, reason: str = "rollback") -> tuple[ModelVersion, ModelVersion]:
        """Production goes back to ``to``, or to the version that was Production before the current one;
        returns (restored, retired)."""
        with self._locked(name) as lease:
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
            self._move(lease, target, "Production", reason, retire_reason=f"rolled back to {to}")
        return self.get(name, to), self.get(name, current.version)

    # The rollout (lifecycle/rollout/state.py) writes through these, under the same lock and fence.
    locked = _locked
    move = _move
    model_tag = _model_tag
