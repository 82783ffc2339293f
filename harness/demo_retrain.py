"""The demo's closed loop: traffic → a card-testing attack (many tiny transactions, most of them fraud: a shift of
the amounts *and* a concept the model never saw) → a drift alert → the retraining controller waits for the
attack's labels, retrains, gates the candidate against Production on the newest labelled traffic, starts the
rollout → the rollout controller walks it to Production. Then a bad training change (three depth-1 trees):
its candidates are blocked at the gate until the circuit breaker opens. Zero failed requests throughout.

Both controllers run in this process (threads), on the real broker, registry and server; the policy is
``pipeline.yaml``'s ``retraining:`` with the demo's shorter spans (:data:`POLICY`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
from confluent_kafka import Producer

from harness.demo_rollout import timeline
from harness.traffic import Traffic
from harness.workspace import Workspace
from lifecycle import data as datamod
from lifecycle.pipeline import definition
from lifecycle.registry import Registry
from lifecycle.retrain.controller import Controller
from lifecycle.retrain.policy import RetrainPolicy
from lifecycle.retrain.record import DecisionLog
from lifecycle.retrain.trace import lines as trace_lines
from lifecycle.retrain.trace import trace
from lifecycle.rollout.controller import Controller as RolloutController
from mlops.connections import kafka_config
from streaming import process as consumer_process

ROOT = Path(__file__).resolve().parents[1]
POLICY = {  # pipeline.yaml's retraining: section, with spans a demo can wait for
    "triggers": [{"type": "drift_alert", "severity": ["critical"]}],
    "cooldown": "0s", "max_per_day": 100, "circuit_breaker": 2,  # (every demo run's retrains stay in the registry)
    "rollout_steps": [0, 5, 25, 50, 100],
    "rollout_policy": {"min_samples": 200, "min_step_s": 2, "max_step_s": 300},
    "window_gate": {"window": "30m", "gate_share": 0.5, "min_labels": 300, "min_accuracy": 0.85,
                    "min_improvement": 0.0, "confidence": 0.95, "too_few_labels": "block",
                    "wait_for_labels": "3m"},
}
ATTACK_SHARE = 0.3  # of the attack phase's transactions: tiny amounts, 90 % of them fraud
BAD_TRAINING = {"n_estimators": 3, "max_depth": 1, "learning_rate": 0.1, "random_state": 0}


@dataclasses.dataclass
class Sender:
    """Transactions through ``/predict_batch`` with their true labels, the labels sent to ``/outcomes`` one chunk
    later (they arrive after the predictions, as chargebacks do)."""

    url: str
    frame: pd.DataFrame
    rng: np.random.Generator
    pending: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    sent: int = 0

    def send(self, n: int, attack_share: float = 0.0, chunk: int = 200) -> None:
        for start in range(0, n, chunk):
            rows = self.frame.sample(min(chunk, n - start), replace=True, random_state=int(self.rng.integers(1 << 30)))
            amounts = rows["transaction_amount"].to_numpy(float)
            labels = rows[datamod.LABEL].to_numpy(int)
            tiny = self.rng.random(len(rows)) < attack_share
            amounts = np.where(tiny, self.rng.uniform(0.5, 3.0, len(rows)), amounts)
            labels = np.where(tiny, (self.rng.random(len(rows)) < 0.9).astype(int), labels)
            body = {"requests": [{"customer_id": c, "transaction_amount": round(float(a), 2)}
                                 for c, a in zip(rows["customer_id"], amounts, strict=True)]}
            answers = httpx.post(f"{self.url}/predict_batch", json=body, timeout=60).raise_for_status().json()
            self.flush()
            self.pending = [{"request_id": a["request_id"], "label": int(y)}
                            for a, y in zip(answers, labels, strict=True)]
            self.sent += len(rows)
            time.sleep(0.2)

    def flush(self) -> None:
        if self.pending:
            httpx.post(f"{self.url}/outcomes", json={"outcomes": self.pending}, timeout=60).raise_for_status()
            self.pending = []


def _wait(predicate, timeout: float, poll: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


def _print_decision(d: dict[str, str], t0: float) -> None:
    at = float(d.get("at_s", "0")) - t0
    subject = f"{d.get('alert_type')} {d.get('alert_severity')} {d.get('alert_subject')} ({d.get('alert_version')})"
    line = f"    +{at:6.1f}s  {subject:<52} {d.get('action'):<7} {d.get('rail') or '':<15} -> {d.get('outcome')}"
    print(line)
    for key in ("label_wait", "window_gate", "outcome_reason"):
        if d.get(key) and (key != "outcome_reason" or d.get("outcome") != "rollout_started"):
            print(f"{'':14}{key.replace('_', ' ')}: {d[key][:160]}")


def demo_retrain(registry: Registry, ws: Workspace, url: str, run_dir: Path, result_file: Path | None = None
                 ) -> bool:
    name, settings = ws.model.name, ws.settings
    pipeline = definition.load(ROOT / "pipeline.yaml")
    policy = RetrainPolicy.from_section(POLICY)
    print(f"  policy (pipeline.yaml's retraining:, demo spans): {json.dumps(POLICY)}")
    group = f"demo-retrain-{uuid.uuid4().hex[:8]}"
    drift = consumer_process.start(
        {**ws.env, "MLOPS_DRIFT_EVAL_INTERVAL_S": "0.5"}, run_dir / "retrain-drift-consumer.log", 0,
        "--group", f"{group}-drift", "--slot-seconds", "1", "--window-seconds", "30", "--max-events", "600")
    retrain = Controller(settings, registry, pipeline, policy, name, lease_s=60, group=group, from_now=True)
    rollouts = RolloutController(settings, registry, name, record_every_s=600)
    handler = logging.FileHandler(run_dir / "retrain-controller.log")  # the timeline below says it; details there
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for logger in ("retrain", "lifecycle.rollout.controller", "pipeline"):
        logging.getLogger(logger).setLevel(logging.INFO)
        logging.getLogger(logger).propagate = False
        logging.getLogger(logger).addHandler(handler)
    threads = [threading.Thread(target=retrain.run, kwargs={"poll_s": 0.5}, daemon=True),
               threading.Thread(target=rollouts.run, args=(0.5,), daemon=True)]
    for t in threads:
        t.start()
    log = DecisionLog(registry)
    log.reset(name, "demo", "the demo starts from a closed circuit breaker")  # (an earlier run left it open)
    known = {d.run_id for d in log.decisions(name)}
    sender = Sender(url, datamod.training_frame(ws.dataset), np.random.default_rng(7))
    t0 = time.time()
    printed: set[str] = set()

    def mine() -> list[dict[str, str]]:
        return [d.to_dict() for d in reversed(log.decisions(name)) if d.run_id not in known]

    def show() -> list[dict[str, str]]:
        decisions = mine()
        for d in decisions:
            if d["decision_run_id"] not in printed and d.get("outcome") != "running":
                printed.add(d["decision_run_id"])
                _print_decision(d, t0)
        return decisions

    from mlops.provenance import git_state

    commit = git_state()  # the code this run ran (the tree may change while it runs)
    start_version = registry.production(name).version  # type: ignore[union-attr]
    result: dict[str, Any] = {"production_before": start_version}
    try:
        if not drift.wait_assigned() or not _wait(retrain.assigned.is_set, 60):
            print(drift.log()[-2000:])
            return False
        ordinary = sender.frame.sample(20_000, replace=True, random_state=3)[["customer_id", "transaction_amount"]]
        rows = ordinary.to_dict("records")

        def body(client: int, i: int) -> dict:
            return rows[(client * 7919 + i) % len(rows)]

        with Traffic(url, clients=2, rate=100, body=body) as traffic:
            print(f"  Production {start_version}; steady traffic (2 clients) from now to the end, counted below")
            sender.send(600)
            sender.flush()
            print(f"  +{time.time() - t0:5.1f}s  600 ordinary transactions, labelled")
            print(f"  +{time.time() - t0:5.1f}s  card-testing attack: {ATTACK_SHARE:.0%} of transactions are "
                  "$0.50-$3.00, 90 % of those fraud (Production never saw fraud there)")
            # The attack goes on (its labels arriving a chunk behind) until a retrain is decided on, and for 1,000
            # transactions after: the label wait asks for labelled traffic from after the alert.
            opened: float | None = None
            while sender.sent < 30_000 and (opened is None or sender.sent < opened + 1_000):
                sender.send(200, ATTACK_SHARE)
                if opened is None and any(d.get("action") == "retrain" for d in mine()):
                    opened = sender.sent
            sender.flush()
            print(f"  +{time.time() - t0:5.1f}s  {sender.sent - 600} attack-time transactions sent, labelled")
            if not _wait(lambda: any(d.get("outcome") not in ("running", None) and d.get("action") == "retrain"
                                     for d in show()), 300):
                print("  no retrain decided within 5 minutes")
                return False
            first = next(d for d in mine() if d.get("action") == "retrain")
            if first.get("outcome") != "rollout_started":
                print(f"  the retrain ended {first.get('outcome')}: {first.get('outcome_reason')}")
                return False
            candidate = first["candidate"]
            print(f"  rollout {first['rollout_id']} of {candidate} (steps shadow → 5 → 25 → 50 → 100 %):")
            if not _wait(lambda: (d := log.find(name, first["alert_id"])) is not None
                         and d.tags.get("outcome") in ("promoted", "rolled_back", "rollout_aborted"), 300):
                print("  the rollout did not end within 5 minutes")
                return False
            timeline(registry, name, first["rollout_id"], t0)
            done = log.find(name, first["alert_id"])
            assert done is not None
            result.update(candidate=candidate, outcome=done.tags.get("outcome"),
                          alert_to_production_s=float(done.tags.get("alert_to_production_s", "nan")),
                          alert_at=done.tags.get("alert_at"), window_gate=done.tags.get("window_gate"),
                          label_wait=done.tags.get("label_wait"), phases=_phases(registry, done.tags))
            print(f"  {name}:{candidate} is Production {result['alert_to_production_s']:.0f} s after the drift alert; "
                  f"the record, `registry history --name {name} --trace {first['alert_id']}`:")
            for line in trace_lines(trace(registry, name, first["alert_id"])).splitlines():
                if ": hold (" not in line:
                    print(f"    {line[:150]}")
            print("  where the time went: " + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.0f} s"
                                                      for k, v in result["phases"].items()))

            drift.stop()  # the alerts below are replays of the first, so the breaker's count is exact
            print(f"  +{time.time() - t0:5.1f}s  a bad change to the training step: {BAD_TRAINING}")
            retrain.pipeline = _with_training(pipeline, BAD_TRAINING)
            producer = Producer(kafka_config(settings))
            alert = json.loads(done.tags.get("alert", "{}"))
            for i in range(3):
                replay = {**alert, "model_version": registry.production(name).version,  # type: ignore[union-attr]
                          "timestamp": datetime.now(UTC).isoformat()}
                producer.produce(settings.alerts_topic, json.dumps(replay).encode())
                producer.flush(10)
                print(f"  +{time.time() - t0:5.1f}s  the attack goes on: drift alert replayed ({i + 1} of 3), "
                      "400 more labelled transactions")
                before = len([d for d in mine() if d.get("outcome") != "running"])
                sender.send(400, ATTACK_SHARE)
                sender.flush()
                if not _wait(lambda n=before: len([d for d in show() if d.get("outcome") != "running"]) > n, 300):
                    print("  no decision on the replayed alert within 5 minutes")
                    return False
            time.sleep(1.0)
        show()
        decisions = mine()
        last = decisions[-3:]
        statuses = traffic.statuses()
        failed = sum(n for status, n in statuses.items() if status != 200)
        print(f"  {len(traffic.results)} steady requests and {sender.sent} transactions in batches, {failed} failed; "
              f"versions seen {dict(traffic.versions())}")
        production = registry.production(name)
        ok = (failed == 0 and result.get("outcome") == "promoted" and production is not None
              and production.version == result.get("candidate")
              and [d.get("outcome") for d in last] == ["gate_blocked", "gate_blocked", "skip"]
              and last[-1].get("rail") == "circuit_breaker")
        result.update(failed_requests=failed, requests=len(traffic.results) + sender.sent,
                      decisions=[{k: d.get(k) for k in ("alert_id", "alert_type", "alert_subject", "action", "rail",
                                                          "outcome", "candidate", "rollout_id", "window_gate",
                                                          "label_wait", "alert_to_production_s", "outcome_reason")}
                                 for d in decisions], passed=ok)
        if last and last[-1].get("rail") == "circuit_breaker":
            print(f"  the circuit breaker is open: `registry retrain reset --name {name}` closes it after a fix")
        if result_file is not None:
            _write(result_file, result, commit)
        return ok
    finally:
        retrain.stop()
        rollouts.stop()
        for t in threads:
            t.join(60)
        drift.stop()


def _phases(registry: Registry, tags: dict[str, str]) -> dict[str, float]:
    """From the alert to Production, in seconds: the alert reaching a decision, the wait for labels, training
    (the pipeline's run), the window gate and the rollout's start, the rollout's steps."""
    run = registry.client.get_run(tags["training_run_id"]).info
    alert = datetime.fromisoformat(tags["alert_at"]).timestamp()
    decided, trained, ended = float(tags["at_s"]), run.start_time / 1000, run.end_time / 1000
    started = datetime.fromisoformat(registry.rollout_decisions(tags["model"], tags["rollout_id"])[0]["at"]).timestamp()
    production = datetime.fromisoformat(tags["rollout_ended_at"]).timestamp()
    return {"alert_to_decision_s": decided - alert, "label_wait_s": trained - decided, "training_s": ended - trained,
            "window_gate_and_rollout_start_s": started - ended, "rollout_steps_s": production - started}


def _with_training(pipeline: definition.Pipeline, params: dict[str, Any]) -> definition.Pipeline:
    stages = [dataclasses.replace(s, params=dict(params)) if s.type == "train" else s for s in pipeline.stages]
    return dataclasses.replace(pipeline, stages=stages)


def _write(path: Path, result: dict[str, Any], commit: dict[str, Any]) -> None:
    from mlops.provenance import machine

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "closed-loop-demo", "at": datetime.now(UTC).isoformat(),
                                "git": commit, "machine": machine(), "policy": POLICY, "result": result},
                               indent=2, default=str) + "\n")
    print(f"  wrote {path}")
