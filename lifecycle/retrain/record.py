"""Every retraining decision as one MLflow run (experiment ``model-retraining-decisions``): the alert it answered
(its ``topic:partition:offset:time`` is its id), the action and the guard rail that chose it, and, for a retrain,
the links onward: the training run, the candidate version, the rollout. A retrain's run stays RUNNING while it
trains, with a heartbeat: the record is also the claim that stops a second retrain, and one whose heartbeat
stopped (its controller died) is closed as ``interrupted`` so the alert can be acted on again.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from lifecycle.registry import Registry
from lifecycle.retrain.policy import CUT_SHORT, Past, Verdict

EXPERIMENT = "model-retraining-decisions"
PREFIX = "retrain."
TRAINING_TAG = "retrain_decision"  # on the pipeline's training run: the decision that started it


@dataclass(frozen=True)
class Decision:
    run_id: str
    status: str  # MLflow's: RUNNING while a retrain trains, then FINISHED (KILLED when interrupted)
    tags: dict[str, str]

    @property
    def past(self) -> Past:
        return Past(self.tags.get("alert_id", ""), self.tags.get("action", ""), self.tags.get("outcome", ""),
                    float(self.tags.get("at_s", "0")))

    def to_dict(self) -> dict[str, Any]:
        return {"decision_run_id": self.run_id, "status": self.status, **self.tags}


class DecisionLog:
    def __init__(self, registry: Registry, lease_s: float = 120.0) -> None:
        self.registry, self.client, self.lease_s = registry, registry.client, lease_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}"

    @property
    def experiment(self) -> str:
        return self.registry.backend.experiment_id(EXPERIMENT)

    def decisions(self, model: str, limit: int = 500) -> list[Decision]:
        """Newest first."""
        runs = self.client.search_runs([self.experiment], filter_string=f"tags.`{PREFIX}model` = '{model}'",
                                       max_results=limit, order_by=["attributes.start_time DESC"])
        found = [Decision(r.info.run_id, r.info.status, {k.removeprefix(PREFIX): v for k, v in r.data.tags.items()
                                                          if k.startswith(PREFIX)}) for r in runs]
        return sorted(found, key=lambda d: int(d.tags.get("at_ns", "0")), reverse=True)

    def history(self, model: str) -> list[Past]:
        return [d.past for d in self.decisions(model)]

    def find(self, model: str, alert_id: str) -> Decision | None:
        """The decision that answered this alert, unless it was cut short (then the alert is open again)."""
        return next((d for d in self.decisions(model) if d.tags.get("alert_id") == alert_id
                     and d.tags.get("outcome") not in CUT_SHORT), None)

    def open(self, model: str, alert_id: str, alert: dict[str, Any], verdict: Verdict) -> Decision:
        """A retrain's record stays RUNNING (the claim); a skip or a dry run is finished at once."""
        now = time.time()
        tags = {"model": model, "alert_id": alert_id, "alert_type": str(alert.get("type")),
                "alert_severity": str(alert.get("severity")), "alert_version": str(alert.get("model_version")),
                "alert_subject": str(alert.get("feature") or alert.get("metric") or ""),
                "alert_at": str(alert.get("timestamp", "")), "alert": json.dumps(alert, default=str)[:4000],
                "action": verdict.action, "rail": verdict.rail, "reason": verdict.reason[:4000],
                "outcome": "running" if verdict.action == "retrain" else verdict.action,
                "at_s": repr(now), "at_ns": str(time.time_ns()), "controller": self.owner,
                "heartbeat": repr(now)}
        run = self.client.create_run(self.experiment, run_name=f"{model} {verdict.action} on {alert_id}",
                                     tags={PREFIX + k: v for k, v in tags.items()})
        if verdict.action != "retrain":
            self.client.set_terminated(run.info.run_id, "FINISHED")
        return Decision(run.info.run_id, "RUNNING" if verdict.action == "retrain" else "FINISHED", tags)

    def metrics(self, run_id: str, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, 0) for k, v in values.items()])

    def heartbeat(self, run_id: str) -> None:
        self.client.set_tag(run_id, PREFIX + "heartbeat", repr(time.time()))

    def finish(self, run_id: str, outcome: str, reason: str, status: str = "FINISHED", **links: str) -> None:
        self.update(run_id, outcome=outcome, outcome_reason=reason[:4000], finished_at_s=repr(time.time()), **links)
        self.client.set_terminated(run_id, status)

    def update(self, run_id: str, **tags: str) -> None:
        """All at once (one batch): a reader never sees an outcome without its links."""
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(PREFIX + key, str(value)) for key, value in tags.items()])

    def close_stale(self, model: str) -> list[str]:
        """Retrains whose heartbeat stopped for longer than the lease: closed as ``interrupted`` (KILLED)."""
        closed = []
        for d in self.decisions(model):
            if d.status == "RUNNING" and time.time() - float(d.tags.get("heartbeat", "0")) > self.lease_s:
                self.update(d.run_id, outcome="interrupted",
                            outcome_reason=f"its controller ({d.tags.get('controller')}) stopped mid-retrain (no "
                                           f"heartbeat for {self.lease_s:g} s)")
                self._end_training(d.run_id)
                self.client.set_terminated(d.run_id, "KILLED")
                closed.append(d.run_id)
        return closed

    def reset(self, model: str, actor: str, reason: str) -> Decision:
        """Closes the circuit breaker: failures before a reset no longer count."""
        return self.open(model, f"reset:{time.time_ns()}", {"type": "reset", "by": actor},
                         Verdict("reset", reason or "reset", "reset"))

    def _end_training(self, decision_run_id: str) -> None:
        """The pipeline run the dead controller had started (tagged with its decision) ends KILLED too."""
        runs = self.client.search_runs([self.registry.backend.experiment_id()],
                                       filter_string=f"tags.{TRAINING_TAG} = '{decision_run_id}'")
        for run in runs:
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, "KILLED")
