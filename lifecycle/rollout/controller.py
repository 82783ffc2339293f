"""The rollout controller: watches a model's active rollout and applies the analysis' decisions by itself.

    mlops-rollout --name fraud_detector [--interval 5] [--metrics-port 9111] [--once] [--max-seconds S]

Every ``interval`` seconds: read the rollout from the registry; read the step's predictions and outcomes from
Kafka since the step began (:mod:`lifecycle.rollout.step_data`); judge them (:mod:`lifecycle.rollout.analysis`);
apply a promotion, rollback or pause through the registry's lock (:mod:`lifecycle.rollout.state`), which
refuses a decision on a step that has moved on. Holds are recorded when their reason changes and every
``record_every_s`` otherwise, so the record shows what the controller was waiting for without one run per
look. Nothing to lose on a crash: a restarted controller reads the step again from its start.

Several controllers may run (one per zone, or a spare): the first to apply a decision wins, the others' stale
decisions are refused by the compare-and-set and they read the new step.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import threading
import time
from datetime import datetime

from mlflow.exceptions import MlflowException
from pydantic import ValidationError

from lifecycle.registry import Registry, RegistryError
from lifecycle.rollout.analysis import Decision, decide
from lifecycle.rollout.metrics import ACTIVE, DECISIONS, FAILURES, LAST_DECISION, STEP, STEP_AGE, STUCK
from lifecycle.rollout.state import Rollouts
from lifecycle.rollout.step_data import StepReader
from mlops.cli_args import OneLineParser, serve_metrics, settings_error
from mlops.connections import kafka_config
from mlops.rollout import RolloutState
from mlops.settings import Settings

log = logging.getLogger(__name__)



def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


class Controller:
    def __init__(self, settings: Settings, registry: Registry, name: str, record_every_s: float = 300.0) -> None:
        self.settings, self.registry, self.name = settings, registry, name
        self.rollouts = Rollouts(registry)
        self.record_every_s = record_every_s
        self.actor = f"controller@{socket.gethostname()}"
        self.kafka = kafka_config(settings)
        self.key: tuple[str, int, str] | None = None
        self.reader: StepReader | None = None
        self.before: StepReader | None = None  # the 100 % step: Production's arm of the step before
        self.last_hold: tuple[str, float] | None = None
        self._stop = threading.Event()
        for action in ("promote", "rollback", "pause"):  # born at 0, so the first one is an increase
            DECISIONS.labels(name, action)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        for reader in (self.reader, self.before):
            if reader is not None:
                reader.close()
        self.reader = self.before = None
        self.key = None

    def look(self) -> Decision | None:
        """One look: the decision taken (applied, or a hold), None when there is nothing to judge."""
        state = self.registry.rollout(self.name)
        self._export(state)
        if state is None or state.status != "running":
            self.close()
            return None
        key = (state.id, state.step_index, state.step_started_at)
        if key != self.key:
            self._open(state)
            self.key = key
        assert self.reader is not None
        self.reader.poll()
        baseline = None
        if self.before is not None:
            self.before.poll()
            baseline = self.before.baseline.arm()
        elapsed = time.time() - _seconds(state.step_started_at)
        data = self.reader.data(elapsed, baseline)
        decision = decide(state, data)
        if state.kind == "experiment" and decision.action == "promote":  # the split holds until concluded
            decision = Decision("hold", "experiment: until `registry experiment conclude`", decision.checks)
        log.debug("look at step %d after %.1fs: %d / %d predictions -> %s (%s)", state.step_index + 1, elapsed,
                  data.candidate.predictions, data.baseline.predictions, decision.action, decision.reason)
        STUCK.labels(self.name).set(1 if decision.reason.startswith("stuck") else 0)
        self._apply(state, decision)
        return decision

    def _open(self, state: RolloutState) -> None:
        self.close()
        topics = (self.settings.predictions_topic, self.settings.outcomes_topic)
        since = int(_seconds(state.step_started_at) * 1000)
        self.reader = StepReader(self.kafka, state, *topics, since, threshold=self.settings.decision_threshold)
        if state.share >= 1 and state.previous_step_started_at:
            self.before = StepReader(self.kafka, state, *topics, int(_seconds(state.previous_step_started_at) * 1000),
                                     until_ms=since, threshold=self.settings.decision_threshold,
                                     step_index=state.step_index - 1)
        self.last_hold = None
        log.info("judging rollout %s of %s, step %d (%s %%) since %s", state.id, self.name, state.step_index + 1,
                 state.step, state.step_started_at)

    def _apply(self, state: RolloutState, decision: Decision) -> None:
        checks = [c.to_dict() for c in decision.checks]
        if decision.action == "hold":
            kind = decision.reason.split(":", 1)[0]
            now = time.monotonic()
            last = self.last_hold
            if last is not None and last[0] == kind and now - last[1] < self.record_every_s:
                return
            self.last_hold = (kind, now)
        try:
            self.rollouts.apply(self.name, state.id, state.step_index, decision.action, self.actor, decision.reason,
                                checks)
        except RegistryError as exc:  # another controller or a person moved it: read it again next look
            log.info("decision %s on step %d not applied: %s", decision.action, state.step_index + 1, exc)
            return
        if decision.action != "hold":
            DECISIONS.labels(self.name, decision.action).inc()
            LAST_DECISION.labels(self.name).set(time.time())
            log.warning("rollout %s of %s: %s at step %d (%s %%): %s", state.id, self.name, decision.action,
                        state.step_index + 1, state.step, decision.reason)

    def _export(self, state: RolloutState | None) -> None:
        for status in ("running", "paused"):
            ACTIVE.labels(self.name, status).set(1 if state is not None and state.status == status else 0)
        STEP.labels(self.name).set(state.step if state is not None and state.active else -1)
        STEP_AGE.labels(self.name).set(time.time() - _seconds(state.step_started_at)
                                       if state is not None and state.active else 0)
        if state is None or not state.active:
            STUCK.labels(self.name).set(0)

    def run(self, interval_s: float, max_seconds: float | None = None) -> None:
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        try:
            while not self._stop.is_set() and (deadline is None or time.monotonic() < deadline):
                try:
                    self.look()
                except (MlflowException, RegistryError, OSError, RuntimeError) as exc:
                    FAILURES.labels(self.name).inc()
                    log.error("rollout look failed (retrying): %s", exc)
                    self.close()
                self._stop.wait(interval_s)
        finally:
            self.close()


def parser() -> OneLineParser:
    p = OneLineParser(prog="mlops-rollout", description="Judge a model's active rollout and apply the decisions.")
    p.add_argument("--name", help="the registered model (default: MLOPS_MODEL_NAME)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between looks")
    p.add_argument("--record-every", type=float, default=300.0, help="seconds between recorded holds")
    p.add_argument("--metrics-port", type=int, default=9111, help="Prometheus port; 0: off")
    p.add_argument("--once", action="store_true", help="one look, print the decision as JSON, exit")
    p.add_argument("--max-seconds", type=float, help="stop after this long")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.load()
    except ValidationError as exc:
        print(f"mlops-rollout: bad setting: {settings_error(exc)}", file=sys.stderr)
        return 2
    if not args.interval > 0 or not args.record_every > 0 or not 0 <= args.metrics_port <= 65535:
        print("mlops-rollout: --interval and --record-every must be > 0, --metrics-port in 0..65535", file=sys.stderr)
        return 2
    name = args.name or settings.model_name
    controller = Controller(settings, Registry.from_settings(settings), name, args.record_every)
    if args.once:
        try:
            decision = controller.look()
        finally:
            controller.close()
        print(json.dumps(decision.to_dict() if decision else None, indent=2, default=float))
        return 0
    if not serve_metrics(args.metrics_port, "mlops-rollout"):
        return 2
    signal.signal(signal.SIGTERM, lambda *_: controller.stop())
    signal.signal(signal.SIGINT, lambda *_: controller.stop())
    log.info("watching the rollouts of %s every %gs", name, args.interval)
    controller.run(args.interval, args.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
