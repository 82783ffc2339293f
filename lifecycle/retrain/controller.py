"""`mlops-retrain`: alerts in, retrains out. Reads the alerts topic as a consumer group of one; each firing
alert of a configured kind for the model goes through the guard rails (:mod:`lifecycle.retrain.policy`), and
one that passes runs the training pipeline on fresh data (the pipeline's own gate included, against
Production on the same holdout) on the offline store's history plus the older part of the recent labelled
window (logged predictions with their outcomes), then judges the candidate against Production on the window's
newest part with a confidence interval, and when it passes starts its progressive rollout — the rollout
controller takes it from there.

Exactly once on the alerts it acts on: an alert's offset is committed only after its decision is on record,
and a redelivered alert (a restart, a rebalance) finds its decision by id and is not acted on again. The
decisions of one model are taken under the registry's fenced lock, so two controllers (a deployment during a
rolling update) never start two retrains; a controller killed mid-retrain leaves a claim whose heartbeat
stops, which the next one closes as ``interrupted`` before acting on the alert again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lifecycle.pipeline import definition, runner
from lifecycle.pipeline.compute import Compute, ComputeError
from lifecycle.pipeline.stages import StageFailed
from lifecycle.ray_runtime import RayUnavailable
from lifecycle.registry import Registry, RegistryError
from lifecycle.retrain import metrics
from lifecycle.retrain.policy import RetrainPolicy, alert_time, decide
from lifecycle.retrain.record import TRAINING_TAG, DecisionLog
from lifecycle.retrain.window import compare, labelled_window
from lifecycle.retrain.window import split as window_split
from lifecycle.rollout.state import Rollouts
from mlops import models
from mlops.rollout import FINAL
from mlops.schema import LABEL, MODEL_FEATURES, TIMESTAMP
from mlops.settings import Settings

log = logging.getLogger("retrain")
ACTOR = "retrain-controller"
FOLLOW_S = 5.0  # how often the rollouts this controller started are looked at


class Stopped(Exception):
    """The controller was asked to stop in the middle of a retrain."""


class Controller:
    def __init__(self, settings: Settings, registry: Registry, pipeline: definition.Pipeline,
                 policy: RetrainPolicy, name: str | None = None, lease_s: float = 120.0,
                 group: str | None = None, from_now: bool = False) -> None:
        self.settings, self.registry, self.pipeline, self.policy = settings, registry, pipeline, policy
        self.name = name or pipeline.model_name
        # where the pipeline's heavy stages and the window gate's scoring run (its compute: section, with
        # MLOPS_RAY_ADDRESS over it)
        self.compute = Compute.resolve(pipeline.raw.get("compute"), address=settings.ray_address)
        self.group = group or f"mlops-retrain-{self.name}"
        self.from_now = from_now  # a group without offsets starts at the topic's end, not its beginning
        self.log = DecisionLog(registry, lease_s)
        self.rollouts = Rollouts(registry)
        self.assigned = threading.Event()  # set once the consumer holds the alerts topic's partitions
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def handle(self, alert: dict[str, Any], alert_id: str) -> dict[str, Any] | None:
        """The decision for one alert (None: not for this model, or not a trigger); a retrain runs to its end
        (rollout started, gate blocked, failed) before this returns."""
        if alert.get("model_name") != self.name or not self.policy.triggered_by(alert):
            return None
        with self.registry.locked(self.name):  # one decision at a time per model, across controllers
            self.log.close_stale(self.name)
            if (done := self.log.find(self.name, alert_id)) is not None:
                log.info("alert %s: already decided (%s)", alert_id, done.tags.get("outcome"))
                return {**done.to_dict(), "duplicate": True}
            rollout = self.registry.rollout(self.name)
            verdict = decide(self.policy, self.log.history(self.name), time.time(),
                             rollout.id if rollout is not None and rollout.active else None)
            decision = self.log.open(self.name, alert_id, alert, verdict)
        log.info("alert %s (%s %s): %s — %s", alert_id, alert.get("type"), alert.get("severity"), verdict.action,
                 verdict.reason)
        metrics.DECISIONS.labels(self.name, verdict.action, verdict.rail or "none").inc()
        if verdict.action != "retrain":
            return decision.to_dict()
        metrics.RUNNING.labels(self.name).set(1)
        with self._heartbeat(decision.run_id):  # the claim stays fresh until the outcome is on record
            try:
                outcome, reason, links = self._retrain(decision.run_id, alert_id, alert)
            except Stopped as exc:  # on record, not a failed candidate: the alert stays open for the next controller
                self.log.finish(decision.run_id, "stopped", str(exc), status="KILLED")
                metrics.RETRAINS.labels(self.name, "stopped").inc()
                raise
            finally:
                metrics.RUNNING.labels(self.name).set(0)
            self.log.finish(decision.run_id, outcome, reason, **links)
        metrics.RETRAINS.labels(self.name, outcome).inc()
        if outcome == "rollout_started" and (at := alert_time(alert)) is not None:
            metrics.ALERT_TO_ROLLOUT.labels(self.name).observe(max(0.0, time.time() - at))
        log.info("alert %s: %s — %s", alert_id, outcome, reason)
        return {**decision.to_dict(), "outcome": outcome, "outcome_reason": reason, **links}

    @contextlib.contextmanager
    def _heartbeat(self, decision_id: str) -> Iterator[None]:
        beating = threading.Event()

        def beat() -> None:
            while not beating.wait(self.log.lease_s / 4):
                try:
                    self.log.heartbeat(decision_id)
                except Exception as exc:  # noqa: BLE001 - MLflow away for a beat: the next one tries again
                    log.warning("heartbeat of %s failed: %s", decision_id, exc)

        heart = threading.Thread(target=beat, daemon=True, name="retrain-heartbeat")
        heart.start()
        try:
            yield
        finally:
            beating.set()
            heart.join()

    def _retrain(self, decision_id: str, alert_id: str, alert: dict[str, Any]) -> tuple[str, str, dict[str, str]]:
        try:
            window, waited = self._labelled(alert_time(alert))
        except Stopped:
            raise
        except Exception as exc:  # noqa: BLE001 - the log unreadable: on record, not a crash here
            return "failed", f"the labelled window could not be read: {type(exc).__name__}: {str(exc)[:2000]}", {}
        try:  # one Ray (in this process, or the cluster's) for the training and the window gate
            with self.compute.session():
                return self._train_and_judge(decision_id, alert_id, alert, window, waited)
        except RayUnavailable as exc:  # the cluster, not the candidate: neither counted nor cooled down
            return "unavailable", str(exc), {"label_wait": waited} if waited else {}

    def _train_and_judge(self, decision_id: str, alert_id: str, alert: dict[str, Any], window: pd.DataFrame,
                         waited: str) -> tuple[str, str, dict[str, str]]:
        trained_on, judged_on = window_split(window, self.policy.window_gate.gate_share)
        try:
            summary = runner.run(self.pipeline, self.registry, model_name=self.name, settings=self.settings,
                                 tags={TRAINING_TAG: decision_id, "retrain_alert": alert_id}, labelled=trained_on,
                                 compute=self.compute)
        except Stopped:
            raise
        except StageFailed as exc:
            links = {"training_run_id": str(getattr(exc, "summary", {}).get("mlflow_run_id", "")),
                     **({"label_wait": waited} if waited else {})}
            outcome = "gate_blocked" if exc.stage == "gate" else "failed"
            return outcome, f"{exc.stage}: {exc.reason}", links
        except Exception as exc:  # noqa: BLE001 - a broken store, a crash in training: on record, not a crash here
            return "failed", f"{type(exc).__name__}: {str(exc)[:2000]}", {"label_wait": waited} if waited else {}
        candidate = summary["registered"]["version"]
        links = {"training_run_id": summary["mlflow_run_id"], "candidate": candidate,
                 "window_rows_trained": str(len(trained_on)), **({"label_wait": waited} if waited else {})}
        try:
            passed, why = self._window_gate(decision_id, candidate, judged_on)
        except Exception as exc:  # noqa: BLE001 - a model that cannot be loaded or scored: no rollout
            return "failed", f"the window gate could not run: {type(exc).__name__}: {str(exc)[:1000]}", links
        links["window_gate"] = why
        if not passed:
            return "gate_blocked", f"window gate: {why}", links
        try:
            state = self.rollouts.start(self.name, candidate, self.policy.rollout_steps,
                                        policy=self.policy.rollout_policy, actor=ACTOR,
                                        reason=f"retrain on {alert.get('type')} {alert_id} (decision {decision_id})")
        except RegistryError as exc:  # a person started a rollout meanwhile, Production went away, ...
            return "failed", f"the candidate {candidate} passed its gate but its rollout did not start: {exc}", links
        return "rollout_started", f"candidate {candidate} passed the gate; rollout {state.id} started", {
            **links, "rollout_id": state.id}

    def _labelled(self, alerted_at: float | None) -> tuple[pd.DataFrame, str]:
        """The recent labelled window; with ``wait_for_labels``, read again until its judged share holds
        ``min_labels`` rows predicted after the alert (the traffic the alert is about, with its outcomes) or the
        wait is over. Returns the window and what the wait was (empty: none)."""
        gate = self.policy.window_gate
        started = time.monotonic()
        every = min(60.0, max(1.0, gate.wait_for_labels_s / 60))
        while True:
            now = datetime.now(UTC)
            window = self.read_window(now - timedelta(seconds=gate.window_s), now)
            if not gate.wait_for_labels_s or alerted_at is None:
                return window, ""
            _, judged = window_split(window, gate.gate_share)
            after = int((pd.to_datetime(judged[TIMESTAMP], utc=True) >= pd.Timestamp(alerted_at, unit="s", tz="UTC"))
                        .sum())
            waited = time.monotonic() - started
            if after >= gate.min_labels:
                return window, (f"waited {waited:.0f} s for labels: {after} of the judged {len(judged)} rows are "
                                "from after the alert")
            if waited >= gate.wait_for_labels_s:
                return window, (f"waited the whole {gate.wait_for_labels_s:.0f} s for labels: {after} of the judged "
                                f"{len(judged)} rows are from after the alert (asked: {gate.min_labels})")
            if self._stop.wait(every):
                raise Stopped(f"the controller stopped while waiting for labels ({waited:.0f} s in)")

    def follow_rollouts(self) -> list[dict[str, str]]:
        """Rollouts this controller started that have ended since: each decision's outcome becomes the rollout's
        result (``promoted``, ``rolled_back`` — a failed candidate for the circuit breaker — or
        ``rollout_aborted``), with the time from the alert to the new Production for a promotion."""
        ended = []
        for d in self.log.decisions(self.name):
            if d.tags.get("outcome") != "rollout_started" or not (rollout_id := d.tags.get("rollout_id")):
                continue
            status, at = self._rollout_end(rollout_id)
            if status is None:
                continue
            result = {"completed": "promoted", "rolled_back": "rolled_back"}.get(status, "rollout_aborted")
            values = {"outcome": result, "rollout_ended_at": at}
            alerted = alert_time({"timestamp": d.tags.get("alert_at", "")})
            if result == "promoted" and alerted is not None:
                seconds = max(0.0, datetime.fromisoformat(at).timestamp() - alerted)
                values["alert_to_production_s"] = f"{seconds:.1f}"
                self.log.metrics(d.run_id, {"alert_to_production_s": seconds})
                metrics.ALERT_TO_PRODUCTION.labels(self.name).observe(seconds)
            self.log.update(d.run_id, **values)
            metrics.ROLLOUTS_ENDED.labels(self.name, result).inc()
            log.info("rollout %s of decision %s ended: %s", rollout_id, d.run_id, result)
            ended.append({"decision_run_id": d.run_id, **values})
        return ended

    def _rollout_end(self, rollout_id: str) -> tuple[str | None, str]:
        """(final status, when) of a rollout that ended; (None, "") while it runs."""
        state = self.registry.rollout(self.name)
        if state is not None and state.id == rollout_id:
            return (state.status, state.updated_at) if not state.active else (None, "")
        final = [r for r in self.registry.rollout_decisions(self.name, rollout_id) if r["status"] in FINAL]
        return (final[-1]["status"], final[-1]["at"]) if final else (None, "")

    @property
    def max_poll_interval_ms(self) -> int:
        """Longer than the longest handling of one alert (label wait, then up to an hour of training and gating),
        so the group does not drop this controller mid-retrain; librdkafka's ceiling is a day."""
        return int(min(86_400.0, max(300.0, self.policy.window_gate.wait_for_labels_s + 3_600.0)) * 1000)

    def read_window(self, since: datetime, until: datetime) -> pd.DataFrame:
        """The recent labelled window from the real topics (predictions with the outcomes that arrived)."""
        from mlops.connections import kafka_config

        return labelled_window(kafka_config(self.settings), self.settings.predictions_topic,
                               self.settings.outcomes_topic, since, until)

    def _window_gate(self, decision_id: str, candidate: str, rows: pd.DataFrame) -> tuple[bool, str]:
        """Candidate and Production on the same judged rows; the comparison goes on the decision's record."""
        gate = self.policy.window_gate
        if len(rows) < gate.min_labels:
            why = f"{len(rows)} labelled rows to judge on, fewer than {gate.min_labels}"
            if gate.too_few_labels == "block":
                return False, why
            return True, f"{why}: the pipeline's holdout gate decided alone"
        production = self.registry.production(self.name)
        if production is None:
            return True, "no Production version to compare with: the pipeline's holdout gate decided alone"
        x = rows[list(MODEL_FEATURES)].to_numpy(np.float32)
        scores = {version: self.compute.score(models.load(self.name, version, self.registry.backend).onnx_path
                                              .read_bytes(), x) for version in (candidate, production.version)}
        result = compare(rows[LABEL].to_numpy(), scores[candidate], scores[production.version],
                         self.settings.decision_threshold, gate.confidence)
        self.log.metrics(decision_id, result.to_dict())
        why = (f"accuracy {result.candidate:.4f} against Production {production.version}'s {result.production:.4f} "
               f"on {result.rows} labelled rows, difference {result.difference:+.4f} "
               f"({gate.confidence:.0%} interval {result.low:+.4f} to {result.high:+.4f})")
        if result.candidate < gate.min_accuracy:
            return False, f"{why}: below the floor {gate.min_accuracy}"
        if result.low < gate.min_improvement:
            return False, f"{why}: the interval's lower end is below the minimum improvement {gate.min_improvement:+}"
        return True, why

    def run(self, max_seconds: float | None = None, poll_s: float = 1.0) -> int:
        """Consume the alerts topic until stopped (or ``max_seconds``); returns the alerts handled."""
        from confluent_kafka import Consumer, KafkaException

        from mlops.connections import kafka_config

        consumer = Consumer({**kafka_config(self.settings), "group.id": self.group, "enable.auto.commit": False,
                             "auto.offset.reset": "latest" if self.from_now else "earliest",
                             "enable.partition.eof": False,
                             # a killed controller's partitions pass to the next one after this long (not 45 s)
                             "session.timeout.ms": 10_000, "heartbeat.interval.ms": 2_000,
                             # one alert is handled between two polls: the label wait and the training included
                             "max.poll.interval.ms": self.max_poll_interval_ms})
        consumer.subscribe([self.settings.alerts_topic], on_assign=lambda *_: self.assigned.set())
        deadline = time.monotonic() + max_seconds if max_seconds else None
        handled, followed = 0, 0.0
        try:
            while not self._stop.is_set() and (deadline is None or time.monotonic() < deadline):
                if time.monotonic() - followed >= FOLLOW_S:
                    followed = time.monotonic()
                    try:
                        self.follow_rollouts()
                    except Exception as exc:  # noqa: BLE001 - MLflow away: the next round reads it again
                        log.warning("following rollouts failed: %s", exc)
                message = consumer.poll(poll_s)
                if message is None:
                    continue
                if message.error():
                    log.warning("alerts topic: %s", message.error())  # librdkafka reconnects by itself
                    continue
                # The message's own time too: a topic deleted and made again numbers its messages from 0, and
                # an id of offsets alone would find the old topic's decisions ("already decided") for new alerts.
                alert_id = f"{message.topic()}:{message.partition()}:{message.offset()}:{message.timestamp()[1]}"
                metrics.ALERTS_READ.labels(self.name).inc()
                try:
                    alert = json.loads(message.value())
                except (ValueError, TypeError):
                    alert = None
                if isinstance(alert, dict):
                    try:
                        self.handle(alert, alert_id)
                    except Stopped:
                        break  # its offset stays uncommitted: the next controller acts on the alert
                    handled += 1
                for attempt in range(3):  # the decision is on record: now the offset
                    try:
                        consumer.commit(message=message, asynchronous=False)
                        break
                    except KafkaException as exc:  # (a rebalance meanwhile): redelivered, found on record, no act
                        log.warning("offset commit of %s failed (%s)%s", alert_id, exc,
                                    ": retrying" if attempt < 2 else "; a redelivery finds its decision")
                        if self._stop.wait(1.0):
                            break
        finally:
            consumer.close()
        return handled


def load(pipeline_path: Path) -> tuple[definition.Pipeline, RetrainPolicy]:
    """The pipeline and its ``retraining:`` policy; DefinitionError/PolicyError/ComputeError for a bad file."""
    pipeline = definition.load(pipeline_path)
    Compute.resolve(pipeline.raw.get("compute"))  # (a bad compute section: refused at start, not at a retrain)
    return pipeline, RetrainPolicy.from_section(pipeline.raw.get("retraining"))


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from mlops.cli_args import OneLineParser, serve_metrics, settings_error

    p = OneLineParser(prog="mlops-retrain", description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", type=Path, default=Path("pipeline.yaml"))
    p.add_argument("--model", help="default: the pipeline's model_name")
    p.add_argument("--max-seconds", type=float, help="stop after this long (default: run until stopped)")
    p.add_argument("--metrics-port", type=int, default=9112, help="Prometheus port; 0: off")
    p.add_argument("--lease-s", type=float, default=120.0,
                   help="a retrain whose heartbeat stopped this long ago is taken as interrupted")
    args = p.parse_args(argv)
    from lifecycle.pipeline.definition import DefinitionError
    from lifecycle.retrain.policy import PolicyError

    if not args.lease_s > 0 or (args.max_seconds is not None and not args.max_seconds > 0) \
            or not 0 <= args.metrics_port <= 65535:
        print("mlops-retrain: --lease-s and --max-seconds must be > 0, --metrics-port in 0..65535", file=sys.stderr)
        return 2
    try:
        pipeline, policy = load(args.pipeline)
        settings = Settings.load()
    except ValidationError as exc:
        print(f"mlops-retrain: bad setting: {settings_error(exc)}", file=sys.stderr)
        return 2
    except (DefinitionError, PolicyError, ComputeError, OSError) as exc:
        print(f"mlops-retrain: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    controller = Controller(settings, Registry.from_settings(settings), pipeline, policy, args.model, args.lease_s)
    if not serve_metrics(args.metrics_port, "mlops-retrain"):
        return 2
    import signal

    signal.signal(signal.SIGTERM, lambda *_: controller.stop())
    signal.signal(signal.SIGINT, lambda *_: controller.stop())
    controller.run(args.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
