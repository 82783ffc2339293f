"""A rollout's state changes, in the registry, under its fenced lock, each one on record.

The state is the registered model's ``rollout`` tag (:mod:`mlops.rollout`); each change and each decision is
one MLflow run in the ``model-rollout-decisions`` experiment (who, when, why, and every check's statistics as
metrics), so ``registry rollout history`` can show the whole record, unlike tools that keep the last few
analysis runs. A decision names the rollout and the step it was made on and is applied only if the rollout is
still there (compare-and-set under the lock): a controller that decided on step 2 while a person paused the
rollout or another controller promoted it changes nothing.

Stages: starting puts the candidate in Staging (``@staging``); completing promotes it to Production (the
registry archives the old one, ``@production`` moves, the service follows); a rollback archives the candidate;
an abort returns it to None. Production never changes before the last step is passed, so rolling back is only
ever a change of the candidate's share to 0, which every replica applies within its poll interval.
"""

from __future__ import annotations

import json
import math
import socket
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from mlflow.entities import Metric

from lifecycle.registry import Lease, Registry, RegistryError
from mlops.registry_read import STAGE_TAG
from mlops.rollout import DECISIONS_EXPERIMENT, DEFAULT_STEPS, TAG, Policy, RolloutState, check_steps

ACTIONS = ("start", "promote", "hold", "rollback", "pause", "resume", "abort")


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _metric_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in text)[:250]


class Rollouts:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def status(self, name: str) -> RolloutState | None:
        return self.registry.rollout(name)

    def start(self, name: str, candidate: str, steps: Sequence[int] = DEFAULT_STEPS, policy: Policy | None = None,
              actor: str = "cli", reason: str = "", kind: str = "rollout",
              experiment: dict[str, Any] | None = None) -> RolloutState:
        check_steps(tuple(steps))
        with self.registry.locked(name) as lease:
            current = self.registry.rollout(name)
            if current is not None and current.active:
                raise RegistryError(f"{name} already has a rollout in progress ({current.id}: {current.candidate} at "
                                    f"step {current.step_index + 1} of {len(current.steps)}, {current.status}); "
                                    "abort it first")
            production = self.registry.production(name)
            if production is None:
                raise RegistryError(f"{name} has no Production version to roll out against")
            mv = self.registry._mlflow_version(name, candidate)
            stage = mv.tags.get(STAGE_TAG)
            if stage is None:
                raise RegistryError(f"{name}:{candidate} is not registered")
            if candidate == production.version:
                raise RegistryError(f"{name}:{candidate} is already in Production")
            if stage == "Archived":
                raise RegistryError(f"{name}:{candidate} is archived; register a new version to roll it out")
            now = _now()
            state = RolloutState(id=uuid.uuid4().hex[:12], model=name, candidate=candidate,
                                 baseline=production.version, steps=tuple(steps), step_index=0, status="running",
                                 started_at=now, step_started_at=now, updated_at=now, actor=actor,
                                 reason=reason or "started", policy=policy or Policy(), kind=kind,
                                 experiment=experiment or {})
            if stage != "Staging":
                self.registry.move(lease, mv, "Staging", f"rollout {state.id} started")
            self.registry.model_tag(lease, TAG, state.to_tag())
            self._record(lease, state, "start", actor, state.reason)
        return state

    def apply(self, name: str, rollout_id: str, step_index: int, action: str, actor: str, reason: str,
              checks: Sequence[dict[str, Any]] = ()) -> RolloutState:
        """Apply a decision made on ``rollout_id`` at ``step_index``; RegistryError when the rollout moved on."""
        if action not in ("promote", "hold", "rollback", "pause"):
            raise ValueError(f"unknown decision {action!r}")
        with self.registry.locked(name) as lease:
            state = self._expect(name, rollout_id, step_index)
            now = _now()
            if action == "hold":
                new = state
            elif action == "pause":
                new = state.moved(status="paused", updated_at=now, actor=actor, reason=reason)
            elif action == "rollback":
                new = state.moved(status="rolled_back", updated_at=now, actor=actor, reason=reason)
                mv = self.registry._mlflow_version(name, state.candidate)
                self.registry.move(lease, mv, "Archived", f"rollout {state.id} rolled back: {reason}")
            elif state.last_step:
                new = state.moved(status="completed", updated_at=now, actor=actor, reason=reason)
                mv = self.registry._mlflow_version(name, state.candidate)
                self.registry.move(lease, mv, "Production", f"rollout {state.id} completed",
                                   retire_reason=f"replaced by {state.candidate} (rollout {state.id})")
            else:  # a concluded experiment continues as a rollout from its split
                new = state.moved(step_index=state.step_index + 1, step_started_at=now,
                                  previous_step_started_at=state.step_started_at, updated_at=now, actor=actor,
                                  reason=reason, kind="rollout")
            if new is not state:
                self.registry.model_tag(lease, TAG, new.to_tag())
            self._record(lease, state if action == "hold" else new, action, actor, reason, checks)
        return new

    def pause(self, name: str, actor: str = "cli", reason: str = "paused") -> RolloutState:
        return self._by_person(name, "pause", actor, reason)

    def resume(self, name: str, actor: str = "cli", reason: str = "resumed") -> RolloutState:
        return self._by_person(name, "resume", actor, reason)

    def abort(self, name: str, actor: str = "cli", reason: str = "aborted") -> RolloutState:
        return self._by_person(name, "abort", actor, reason)

    def _by_person(self, name: str, action: str, actor: str, reason: str) -> RolloutState:
        with self.registry.locked(name) as lease:
            state = self.registry.rollout(name)
            if state is None or not state.active:
                raise RegistryError(f"{name} has no rollout in progress")
            now = _now()
            if action == "pause":
                if state.status == "paused":
                    raise RegistryError(f"rollout {state.id} is already paused")
                new = state.moved(status="paused", updated_at=now, actor=actor, reason=reason)
            elif action == "resume":
                if state.status == "running":
                    raise RegistryError(f"rollout {state.id} is not paused")
                # The step's clock starts again: its minimum time counts from the resume.
                new = state.moved(status="running", step_started_at=now, updated_at=now, actor=actor, reason=reason)
            else:
                new = state.moved(status="aborted", updated_at=now, actor=actor, reason=reason)
                mv = self.registry._mlflow_version(name, state.candidate)
                self.registry.move(lease, mv, "None", f"rollout {state.id} aborted: {reason}")
            self.registry.model_tag(lease, TAG, new.to_tag())
            self._record(lease, new, action, actor, reason)
        return new

    def _expect(self, name: str, rollout_id: str, step_index: int) -> RolloutState:
        state = self.registry.rollout(name)
        if state is None or state.id != rollout_id:
            raise RegistryError(f"rollout {rollout_id} of {name} is no longer the current one")
        if not state.active:
            raise RegistryError(f"rollout {rollout_id} has ended ({state.status})")
        if state.step_index != step_index:
            raise RegistryError(f"rollout {rollout_id} moved from step {step_index + 1} to {state.step_index + 1}")
        if state.status != "running":
            raise RegistryError(f"rollout {rollout_id} is {state.status}")
        return state

    def _record(self, lease: Lease, state: RolloutState, action: str, actor: str, reason: str,
                checks: Sequence[dict[str, Any]] = ()) -> None:
        client = self.registry.client
        experiment = self.registry.backend.experiment_id(DECISIONS_EXPERIMENT)
        lease.check()
        tags = {"model": state.model, "rollout_id": state.id, "candidate": state.candidate,
                "baseline": state.baseline, "step": str(state.step), "step_index": str(state.step_index),
                "action": action, "status": state.status, "actor": actor, "reason": reason[:4000], "at": _now(),
                "seq_ns": str(time.time_ns()), "host": socket.gethostname(), "fence": str(lease.generation),
                "checks": json.dumps([{k: c[k] for k in ("name", "verdict", "detail") if k in c} for c in checks])}
        run = client.create_run(experiment, run_name=f"{state.model} {state.id} step {state.step}: {action}", tags=tags)
        metrics = {_metric_name(f"{c['name']}.{key}"): float(value) for c in checks
                   for key, value in c.get("values", {}).items() if isinstance(value, int | float)}
        stamp = int(time.time() * 1000)
        finite = [Metric(key, value, stamp, 0) for key, value in metrics.items() if math.isfinite(value)]
        if finite:
            client.log_batch(run.info.run_id, metrics=finite)
        client.set_terminated(run.info.run_id, "FINISHED")
