"""`registry history --name N --trace ID`: one retraining decision followed from its alert to its alias change.

ID is any link of the chain: the alert's ``topic:partition:offset:time``, the decision's run id, the training run's
id, the candidate's version or the rollout's id. The answer: the alert, the decision (action, guard rail,
reason, outcome), the training run (status, gate, holdout metrics), the rollout's decisions step by step, and
the candidate's stage changes in the registry.
"""

from __future__ import annotations

import json
from typing import Any

from lifecycle.registry import Registry, RegistryError
from lifecycle.retrain.record import DecisionLog
from mlops.rollout import DECISIONS_EXPERIMENT

LINKS = ("alert_id", "training_run_id", "rollout_id", "candidate")


def trace(registry: Registry, name: str, ident: str) -> dict[str, Any]:
    found = next((d for d in DecisionLog(registry).decisions(name)
                  if ident == d.run_id or any(ident == d.tags.get(k) for k in LINKS)), None)
    if found is None:
        raise RegistryError(f"no retraining decision of {name} links to {ident!r} (an alert id, a decision or "
                            "training run id, a candidate version or a rollout id)")
    tags = dict(found.tags)
    alert = json.loads(tags.pop("alert", "{}") or "{}")
    out: dict[str, Any] = {"alert": alert, "decision": {"run_id": found.run_id, "status": found.status, **tags}}
    client = registry.client
    if run_id := tags.get("training_run_id"):
        run = client.get_run(run_id)
        out["training"] = {"run_id": run_id, "status": run.info.status, "gate": run.data.tags.get("gate"),
                           "failed_stage": run.data.tags.get("failed_stage"),
                           "metrics": {k: v for k, v in run.data.metrics.items()
                                       if k in ("auc", "accuracy", "labelled_rows", "production_auc")}}
    if rollout_id := tags.get("rollout_id"):
        runs = client.search_runs([registry.backend.experiment_id(DECISIONS_EXPERIMENT)],
                                  filter_string=f"tags.rollout_id = '{rollout_id}'", max_results=1000)
        steps = sorted((r.data.tags for r in runs), key=lambda t: int(t.get("seq_ns", "0")))
        out["rollout"] = [{k: t.get(k) for k in ("at", "step", "action", "status", "actor", "reason")}
                          for t in steps]
    if candidate := tags.get("candidate"):
        out["stages"] = [row for row in registry.history(name) if row.get("version") == candidate]
    return out


def lines(chain: dict[str, Any]) -> str:
    d, alert = chain["decision"], chain["alert"]
    out = [f"alert     {d.get('alert_id')}: {alert.get('type')} {alert.get('severity')} on "
           f"{alert.get('feature') or alert.get('metric') or '-'} (version {alert.get('model_version')}, "
           f"{alert.get('timestamp')})",
           f"decision  {d['run_id']}: {d.get('action')} ({d.get('rail') or 'passed'}) — {d.get('reason')}; "
           f"outcome {d.get('outcome')}" + (f": {d['outcome_reason']}" if d.get("outcome_reason") else "")]
    if t := chain.get("training"):
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(t["metrics"].items()))
        out.append(f"training  {t['run_id']}: {t['status']}, gate {t['gate']}" + (f", {metrics}" if metrics else ""))
    if d.get("label_wait"):
        out.append(f"labels    {d['label_wait']}")
    if d.get("window_gate"):
        out.append(f"window    {d['window_gate']}")
    for step in chain.get("rollout", []):
        out.append(f"rollout   {(step['at'] or '')[:19]} step {step['step']}: {step['action']} ({step['status']}) "
                   f"by {step['actor']} — {step['reason']}")
    for row in chain.get("stages", []):
        out.append(f"registry  {row['at'][:19]} {row['version']}: {row['from_stage']} -> {row['to_stage']} "
                   f"({row.get('reason') or ''})")
    if d.get("alert_to_production_s"):
        out.append(f"result    {d.get('candidate')} in Production {float(d['alert_to_production_s']):.0f} s after the "
                   "alert")
    return "\n".join(out)
