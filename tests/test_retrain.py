"""The retraining controller (issue 21): the guard rails one by one, then alerts handled on a real MLflow
registry with the real training pipeline — a retrain whose candidate beats Production starts its rollout, a
redelivered alert is not acted on twice, a failing candidate trips the circuit breaker, a controller that died
mid-retrain leaves no stuck claim — every decision on record with its links."""

from __future__ import annotations

import copy
import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from lifecycle.data import generate, training_frame
from lifecycle.pipeline import definition, runner
from lifecycle.pipeline.validator import validate
from lifecycle.registry import Registry, RegistryError
from lifecycle.registry_cli import main as registry_main
from lifecycle.retrain.controller import Controller, Stopped, load
from lifecycle.retrain.policy import Past, PolicyError, RetrainPolicy, Trigger, Verdict, WindowGate, decide
from lifecycle.retrain.record import EXPERIMENT, TRAINING_TAG, DecisionLog
from lifecycle.retrain.trace import lines as trace_lines
from lifecycle.retrain.trace import trace
from lifecycle.retrain.window import compare
from mlops.mlflow_backend import Backend
from mlops.schema import LABEL, MODEL_FEATURES, TIMESTAMP
from mlops.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
SMALL_DATA = {"source": "synthetic", "customers": 200, "transactions": 3000, "seed": 42}
NOW = 1_800_000_000.0


def alert(kind: str = "drift_alert", severity: str = "critical", status: str = "firing", model: str = "m",
          at: str | None = None) -> dict:
    return {"type": kind, "severity": severity, "status": status, "model_name": model, "model_version": "1",
            "feature": "transaction_amount", "timestamp": at or datetime.now(UTC).isoformat()}


# -- the policy ---------------------------------------------------------------------------------------------


def test_the_shipped_pipeline_declares_its_guard_rails_and_validates_strictly():
    pipeline, policy = load(ROOT / "pipeline.yaml")
    assert validate(pipeline, strict=True) == []
    assert policy == RetrainPolicy(triggers=(Trigger("drift_alert"), Trigger("performance_alert"),
                                             Trigger("skew_alert", ("warning", "critical"))),
                                   cooldown_s=6 * 3600, max_per_day=3, circuit_breaker=3, dry_run=False,
                                   max_alert_age_s=3600)


@pytest.mark.parametrize(("section", "message"), [
    ({"cooldown": "soon"}, "retraining.cooldown: 'soon' is not a span"),
    ({"max_per_day": 0}, "retraining.max_per_day: 0 is not a whole number of at least 1"),
    ({"triggers": [{"type": "latency_alert"}]}, "unknown alert type 'latency_alert'"),
    ({"triggers": [{"type": "drift_alert", "severity": ["fatal"]}]}, "severity ['fatal']"),
    ({"triggers": []}, "retraining.triggers: empty"),
    ({"dry_run": "yes"}, "retraining.dry_run: 'yes' is not true or false"),
    ({"rollout_steps": [5, 50]}, "the last step must be 100"),
    ({"cooldwn": "1h"}, "unknown field(s) cooldwn"),
    ({"window_gate": {"wait_for_labels": "soon"}}, "retraining.window_gate.wait_for_labels: 'soon' is not a span"),
    ({"rollout_policy": {"min_samples": 0}}, "retraining.rollout_policy: min_samples >= 1"),
    ({"rollout_policy": {"min_samples": 2.5}}, "retraining.rollout_policy.min_samples: 2.5 is not a whole number"),
    ({"rollout_policy": {"min_agreement": "high"}}, "retraining.rollout_policy.min_agreement: 'high' is not a"),
    ({"rollout_policy": {"min_sample": 5}}, "retraining.rollout_policy: unknown field(s) min_sample"),
])
def test_a_bad_retraining_section_is_named_by_the_validator(tmp_path, section, message):
    with pytest.raises(PolicyError) as info:
        RetrainPolicy.from_section(section)
    assert message in str(info.value)
    body = {**copy.deepcopy(BASE), "retraining": section}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(body))
    found = validate(definition.load(tmp_path / "p.yaml"))
    assert [(f.code, message in f.message) for f in found if f.level == "error"] == [("INVALID_RETRAINING", True)]


def test_only_firing_alerts_of_a_configured_type_and_severity_trigger():
    policy = RetrainPolicy()
    assert policy.triggered_by(alert())
    assert policy.triggered_by(alert("skew_alert", "warning"))
    assert not policy.triggered_by(alert(status="resolved"))
    assert not policy.triggered_by(alert(severity="warning"))
    assert not policy.triggered_by(alert("drift_change_point", "info", "info"))
    # a backlog a new controller reads: older than max_alert_age starts nothing
    assert not policy.triggered_by(alert(at="2026-12-04T10:00:00+00:00"), now=NOW)
    assert policy.triggered_by(alert(at=datetime.fromtimestamp(NOW - 600, UTC).isoformat()), now=NOW)


def past(action: str = "retrain", outcome: str = "rollout_started", ago: float = 10 * 86400, alert_id: str = "a"):
    return Past(alert_id, action, outcome, NOW - ago)


@pytest.mark.parametrize(("history", "rollout", "policy", "rail"), [
    ([], None, RetrainPolicy(), ""),
    ([past(outcome="running", ago=5)], None, RetrainPolicy(), "running"),
    ([past(outcome="gate_blocked")] * 3, None, RetrainPolicy(), "circuit_breaker"),
    ([past(outcome="gate_blocked")] * 2 + [past(outcome="failed")], "r1", RetrainPolicy(), "circuit_breaker"),
    # a success, or a reset, ends the run of failures the breaker counts
    ([past(outcome="gate_blocked")] * 2 + [past()] + [past(outcome="failed")] * 3, None, RetrainPolicy(), ""),
    ([past(outcome="failed")] * 2 + [past("reset", "reset")] + [past(outcome="failed")] * 3, None,
     RetrainPolicy(), ""),
    ([past("skip", "skip")] * 5, None, RetrainPolicy(), ""),  # skips are no candidates
    ([], "r1", RetrainPolicy(), "rollout_active"),
    ([past(ago=3600)], None, RetrainPolicy(cooldown_s=7200), "cooldown"),
    ([past(ago=7300)], None, RetrainPolicy(cooldown_s=7200), ""),
    ([past(ago=3600 * h) for h in (2, 5, 20)], None, RetrainPolicy(cooldown_s=60), "max_per_day"),
    ([past(ago=3600 * h) for h in (2, 5, 25)], None, RetrainPolicy(cooldown_s=60), ""),
    ([], None, RetrainPolicy(dry_run=True), "dry_run"),
    # a candidate its rollout rolled back failed too; one promoted is a success
    ([past(outcome="rolled_back")] * 3, None, RetrainPolicy(), "circuit_breaker"),
    ([past(outcome="promoted")] + [past(outcome="rolled_back")] * 3, None, RetrainPolicy(), ""),
    # stopped (the controller was told to stop) and aborted by a person: neither failure nor success
    ([past(outcome="gate_blocked"), past(outcome="stopped"), past(outcome="rollout_aborted"),
      past(outcome="failed"), past(outcome="gate_blocked")], None, RetrainPolicy(), "circuit_breaker"),
    # a retrain cut short made no candidate: it does not hold the next attempt back
    ([past(outcome="interrupted", ago=60)], None, RetrainPolicy(cooldown_s=7200), ""),
    ([past(outcome="stopped", ago=60)], None, RetrainPolicy(cooldown_s=7200), ""),
])
def test_each_guard_rail(history, rollout, policy, rail):
    verdict = decide(policy, history, NOW, rollout)
    assert verdict.rail == rail, verdict
    assert verdict.action == {"": "retrain", "dry_run": "dry_run"}.get(rail, "skip")


# -- the controller on a real registry ----------------------------------------------------------------------


def pipeline_file(tmp_path: Path, name: str, **gate) -> definition.Pipeline:
    body = copy.deepcopy(BASE)
    body["model_name"] = name
    for s in body["stages"]:
        if s["name"] == "fetch-data":
            s["params"] = dict(SMALL_DATA)
        if s["name"] == "train":
            s["params"] = {"n_estimators": 40, "max_depth": 3}
        if s["name"] == "gate":
            s["params"].update(gate)
    path = tmp_path / f"{name}-{len(gate)}.yaml"
    path.write_text(yaml.safe_dump(body))
    return definition.load(path)


def weak_production(tmp_path: Path, name: str) -> Registry:
    """A registry (SQLite in ``tmp_path``) whose Production is a weak model (2 stumps): the pipeline's
    candidate beats it."""
    registry = Registry(Backend.for_uri(str(tmp_path / "m.db")))
    weak = pipeline_file(tmp_path, name, min_auc=0.5, min_accuracy=0.5)
    next(s for s in weak.stages if s.kind == "train").params = {"n_estimators": 2, "max_depth": 1}
    registry.promote(name, runner.run(weak, registry, model_name=name)["registered"]["version"], "production")
    return registry


@pytest.fixture
def setup(tmp_path):
    name = f"retrain_{tmp_path.name[-10:].replace('-', '_').lower()}"
    return weak_production(tmp_path, name), name


class GivenWindow(Controller):
    """The controller with its labelled window given as rows (tests/test_retrain_window.py reads the real one
    from the broker); empty by default: too few labels, so the pipeline's holdout gate decides alone."""

    window = pd.DataFrame(columns=["request_id", TIMESTAMP, *MODEL_FEATURES, LABEL])

    def read_window(self, since, until) -> pd.DataFrame:
        return self.window


def controller(tmp_path, registry, name, policy=None, lease_s=120.0, window=None, **gate) -> GivenWindow:
    ctl = GivenWindow(Settings(), registry, pipeline_file(tmp_path, name, **gate),
                      policy or RetrainPolicy(cooldown_s=0), name, lease_s)
    if window is not None:
        ctl.window = window
    return ctl


def recent(n: int, seed: int, flip: bool = False) -> pd.DataFrame:
    """``n`` labelled rows like served traffic's (the generator's, another seed), oldest first; ``flip``: the
    labels turned over (a concept the trained models do not know)."""
    frame = training_frame(generate(300, n, seed=seed)).head(n).sort_values(TIMESTAMP).reset_index(drop=True)
    if flip:
        frame[LABEL] = 1 - frame[LABEL]
    return frame.assign(request_id=[f"q{i}" for i in range(len(frame))])


def test_a_drift_alert_retrains_gates_and_starts_the_rollout_once(tmp_path, setup, capsys):
    registry, name = setup
    ctl = controller(tmp_path, registry, name)
    assert ctl.handle(alert(model="another"), "t:0:1") is None  # not this model: not on record
    assert ctl.handle(alert(status="resolved", model=name), "t:0:2") is None
    got = ctl.handle(alert(model=name), "t:0:3")
    assert (got["action"], got["outcome"]) == ("retrain", "rollout_started"), got
    rollout = registry.rollout(name)
    assert rollout.active and rollout.id == got["rollout_id"] and rollout.candidate == got["candidate"]
    assert "t:0:3" in rollout.reason and got["decision_run_id"] in rollout.reason
    # the links: decision → training run → registered candidate → rollout
    training = registry.client.get_run(got["training_run_id"])
    assert training.data.tags[TRAINING_TAG] == got["decision_run_id"] and training.data.tags["gate"] == "passed"
    assert registry.get(name, got["candidate"]).run_id == got["training_run_id"]
    decision = registry.client.get_run(got["decision_run_id"])
    assert decision.info.status == "FINISHED" and decision.info.experiment_id == \
        registry.backend.experiment_id(EXPERIMENT)
    # delivered again (a restart before the offset commit): found by its id, nothing more happens
    again = ctl.handle(alert(model=name), "t:0:3")
    assert again["duplicate"] and again["decision_run_id"] == got["decision_run_id"]
    # another alert while the rollout runs: on record, and skipped
    skipped = ctl.handle(alert("performance_alert", model=name), "t:1:7")
    assert (skipped["action"], skipped["rail"]) == ("skip", "rollout_active")
    assert [d.tags["alert_id"] for d in DecisionLog(registry).decisions(name)] == ["t:1:7", "t:0:3"]
    # the chain, traced from any of its links
    for ident in ("t:0:3", got["decision_run_id"], got["training_run_id"], got["candidate"], got["rollout_id"]):
        chain = trace(registry, name, ident)
        assert chain["decision"]["run_id"] == got["decision_run_id"], ident
    assert chain["alert"]["type"] == "drift_alert" and chain["training"]["gate"] == "passed"
    assert [step["action"] for step in chain["rollout"]] == ["start"]
    assert [row["to_stage"] for row in chain["stages"]] == ["Staging"]
    text = trace_lines(chain).splitlines()
    assert text[0].startswith("alert     t:0:3: drift_alert critical on transaction_amount (version 1, ")
    assert [line.split()[0] for line in text] == ["alert", "decision", "training", "window", "rollout", "registry"]
    with pytest.raises(RegistryError, match="no retraining decision of .* links to 'nope'"):
        trace(registry, name, "nope")
    capsys.readouterr()
    assert registry_main(["--mlflow-uri", registry.backend.uri, "history", "--name", name, "--trace", "t:0:3",
                          "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["decision"]["rollout_id"] == got["rollout_id"]


def test_failed_candidates_trip_the_circuit_breaker_until_a_reset(tmp_path, setup, capsys):
    registry, name = setup
    ctl = controller(tmp_path, registry, name, RetrainPolicy(cooldown_s=0, circuit_breaker=2, max_per_day=10),
                     min_auc=0.9999)  # no candidate can pass
    outcomes = [ctl.handle(alert(model=name), f"t:0:{i}") for i in range(3)]
    assert [o["outcome"] for o in outcomes] == ["gate_blocked", "gate_blocked", "skip"]
    assert outcomes[0]["outcome_reason"].startswith("gate: auc") and outcomes[2]["rail"] == "circuit_breaker"
    assert registry.client.get_run(outcomes[0]["training_run_id"]).info.status == "FAILED"
    assert registry.rollout(name) is None
    assert "`registry retrain reset --name" in outcomes[2]["reason"]
    assert registry_main(["--mlflow-uri", registry.backend.uri, "retrain", "reset", "--name", name, "--reason",
                          "threshold fixed"]) == 0
    assert ctl.handle(alert(model=name), "t:0:9")["outcome"] == "gate_blocked"  # tried again after the reset
    capsys.readouterr()
    assert registry_main(["--mlflow-uri", registry.backend.uri, "--json", "retrain", "decisions", "--name",
                          name]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["action"] for r in listed] == ["retrain", "reset", "skip", "retrain", "retrain"]
    assert listed[1]["reason"] == "threshold fixed"


def test_a_ray_cluster_out_of_reach_is_neither_a_failed_candidate_nor_a_cooldown(tmp_path, setup):
    """MLOPS_RAY_ADDRESS naming a cluster that cannot be reached: the retrain is on record as unavailable, the
    circuit breaker does not count it and the cooldown does not hold it against the next alert."""
    registry, name = setup
    policy = RetrainPolicy(cooldown_s=3600, circuit_breaker=1, max_per_day=10)
    ctl = GivenWindow(Settings(ray_address="nope://x"), registry, pipeline_file(tmp_path, name), policy, name)
    outcomes = [ctl.handle(alert(model=name), f"t:0:{i}") for i in range(2)]
    assert [(o["action"], o["outcome"]) for o in outcomes] == [("retrain", "unavailable")] * 2
    assert outcomes[0]["outcome_reason"] == "no Ray at nope://x: RuntimeError: Module: nope does not exist."
    assert registry.rollout(name) is None and len(registry.list(name)) == 1  # no candidate made
    ok = GivenWindow(Settings(), registry, pipeline_file(tmp_path, name), policy, name)
    assert ok.handle(alert(model=name), "t:0:9")["outcome"] == "rollout_started"  # the cluster back: retrained


def test_dry_run_decides_and_records_without_training(tmp_path, setup):
    registry, name = setup
    ctl = controller(tmp_path, registry, name, RetrainPolicy(dry_run=True))
    got = ctl.handle(alert(model=name), "t:0:1")
    assert (got["action"], got["status"]) == ("dry_run", "FINISHED")
    assert len(registry.list(name)) == 1  # nothing trained


def test_a_retrain_whose_controller_died_is_closed_and_the_alert_acted_on_again(tmp_path, setup):
    """The dead controller's claim (RUNNING, its heartbeat stopped) and its training run are closed as
    interrupted; the alert then retrains once — no stuck claim, no second retrain beside the first."""
    registry, name = setup
    dead = DecisionLog(registry, lease_s=0.5)
    claim = dead.open(name, "t:0:5", alert(model=name), Verdict("retrain", "guard rails passed"))
    orphan = registry.client.create_run(registry.backend.experiment_id(), tags={TRAINING_TAG: claim.run_id})
    ctl = controller(tmp_path, registry, name, lease_s=60)
    busy = ctl.handle(alert(model=name), "t:0:6")  # the claim is fresh: another controller is training
    assert (busy["action"], busy["rail"]) == ("skip", "running")
    time.sleep(0.6)
    ctl.log.lease_s = 0.5
    got = ctl.handle(alert(model=name), "t:0:5")
    assert got["outcome"] == "rollout_started" and not got.get("duplicate")
    closed = registry.client.get_run(claim.run_id)
    assert closed.info.status == "KILLED" and closed.data.tags["retrain.outcome"] == "interrupted"
    assert registry.client.get_run(orphan.info.run_id).info.status == "KILLED"
    assert [d.tags["outcome"] for d in DecisionLog(registry).decisions(name)] == \
        ["rollout_started", "skip", "interrupted"]


def test_the_window_gate_judges_the_candidate_on_recent_labelled_traffic(tmp_path, setup):
    """The newest half of the window is judged on (the older half trained on): a candidate that beats the
    weak Production there with confidence rolls out; on traffic whose labels turned over since it cannot, and
    is blocked with the interval in the reason."""
    registry, name = setup
    policy = RetrainPolicy(cooldown_s=0, max_per_day=10)
    good = controller(tmp_path, registry, name, policy, window=recent(2_000, seed=11)).handle(
        alert(model=name), "t:0:1")
    assert good["outcome"] == "rollout_started", good
    assert good["window_gate"].startswith("accuracy ") and good["window_rows_trained"] == "1000"
    metrics = registry.client.get_run(good["decision_run_id"]).data.metrics
    assert metrics["window_rows"] == 1000 and metrics["window_difference_low"] >= 0
    assert registry.client.get_run(good["training_run_id"]).data.metrics["labelled_rows"] == 1000
    from lifecycle.rollout.state import Rollouts

    Rollouts(registry).abort(name, "test", "next case")
    # the judged (newest) half's labels turned over after the trained-on half: the holdout gate passes, the
    # window shows the candidate wrong on today's traffic
    turned = pd.concat([recent(1_000, seed=12), recent(1_000, seed=14, flip=True)], ignore_index=True)
    turned[TIMESTAMP] = pd.date_range("2026-12-01", periods=len(turned), freq="s", tz="UTC")
    flipped = controller(tmp_path, registry, name, policy, window=turned).handle(alert(model=name), "t:0:2")
    assert flipped["outcome"] == "gate_blocked", flipped
    assert flipped["outcome_reason"].startswith("window gate: accuracy") and "below" in flipped["outcome_reason"]


def test_too_few_labels_leave_the_holdout_gate_alone_or_block(tmp_path, setup):
    registry, name = setup
    few = recent(100, seed=13)
    holdout = controller(tmp_path, registry, name, window=few).handle(alert(model=name), "t:0:1")
    assert holdout["outcome"] == "rollout_started"
    assert holdout["window_gate"] == "50 labelled rows to judge on, fewer than 200: the pipeline's holdout gate " \
                                     "decided alone"
    from lifecycle.rollout.state import Rollouts

    Rollouts(registry).abort(name, "test", "next case")
    strict = RetrainPolicy(cooldown_s=0, window_gate=WindowGate(too_few_labels="block"))
    blocked = controller(tmp_path, registry, name, strict, window=few).handle(alert(model=name), "t:0:2")
    assert (blocked["outcome"], blocked["outcome_reason"]) == (
        "gate_blocked", "window gate: 50 labelled rows to judge on, fewer than 200")


def test_the_paired_interval_covers_the_true_difference_as_often_as_it_says():
    """1,000 windows of 1,000 rows from two models of equal accuracy that disagree on 20 % of rows: the 95 %
    interval of the difference covers 0 in 93-97 % of them."""
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(1_000):
        y = rng.integers(0, 2, 1_000)
        right_a = rng.random(1_000) < 0.85
        disagree = rng.random(1_000) < 0.2
        right_b = np.where(disagree, rng.random(1_000) < 0.85, right_a)
        a, b = np.where(right_a, y, 1 - y).astype(float), np.where(right_b, y, 1 - y).astype(float)
        result = compare(y, a, b, threshold=0.5)
        covered += result.low <= 0 <= result.high
    assert 930 <= covered <= 970, covered


def test_the_command_refuses_bad_arguments_and_files_in_one_line(tmp_path, capsys):
    from lifecycle.retrain.controller import main

    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**copy.deepcopy(BASE), "retraining": {"cooldown": "x"}}))
    for argv, expected in ((["--pipeline", str(tmp_path / "nope.yaml")], "cannot read"),
                           (["--pipeline", str(tmp_path / "bad.yaml")], "retraining.cooldown: 'x' is not a span"),
                           (["--lease-s", "0"], "--lease-s and --max-seconds must be > 0")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err


def test_the_rollout_runs_under_the_retraining_policy_and_its_end_goes_on_the_decision(tmp_path, setup):
    """The rollout a retrain starts is judged by ``retraining.rollout_policy``; when it completes the decision
    becomes ``promoted`` with the time from the alert to the new Production (record and histogram); one
    rolled back becomes ``rolled_back``, a failed candidate for the circuit breaker."""
    from lifecycle.retrain import metrics
    from lifecycle.rollout.state import Rollouts
    from mlops.rollout import Policy

    registry, name = setup
    quick = Policy(min_samples=50, min_step_s=1, max_step_s=60)
    ctl = controller(tmp_path, registry, name, RetrainPolicy(cooldown_s=0, rollout_policy=quick),
                     compare_to_production=False)  # the second candidate need not beat the first
    alerted = datetime.fromtimestamp(time.time() - 30, UTC).isoformat()
    got = ctl.handle(alert(model=name, at=alerted), "t:0:1")
    state = registry.rollout(name)
    assert state.policy == quick and state.id == got["rollout_id"]
    assert ctl.follow_rollouts() == []  # still running
    rollouts = Rollouts(registry)
    for i in range(len(state.steps)):
        rollouts.apply(name, state.id, i, "promote", "test", "every check passed")
    before = metrics.ALERT_TO_PRODUCTION.labels(name)._sum.get()
    ended = ctl.follow_rollouts()
    assert [e["outcome"] for e in ended] == ["promoted"]
    assert registry.production(name).version == got["candidate"]
    done = ctl.log.find(name, "t:0:1")
    seconds = float(done.tags["alert_to_production_s"])
    assert 30 <= seconds < 300 and registry.client.get_run(done.run_id).data.metrics["alert_to_production_s"] == \
        pytest.approx(seconds, abs=0.1)
    assert metrics.ALERT_TO_PRODUCTION.labels(name)._sum.get() - before == pytest.approx(seconds, abs=0.1)
    assert ctl.follow_rollouts() == []  # once
    assert trace_lines(trace(registry, name, "t:0:1")).splitlines()[-1].startswith(
        f"result    {got['candidate']} in Production ")
    # the next candidate is rolled back by its rollout: a failed candidate
    second = ctl.handle(alert(model=name), "t:0:2")
    assert second["outcome"] == "rollout_started", second
    rollouts.apply(name, second["rollout_id"], 0, "rollback", "test", "predictions: agreement 0.41")
    assert [e["outcome"] for e in ctl.follow_rollouts()] == ["rolled_back"]
    assert [p.outcome for p in ctl.log.history(name)] == ["rolled_back", "promoted"]


def test_a_retrain_waits_for_the_labels_of_the_traffic_after_its_alert(tmp_path, setup):
    """``wait_for_labels``: a drift alert comes before the labels of the traffic it is about. ``min_labels``
    rows predicted after the alert in the judged share: the retrain goes on at once; rows from before it only:
    the retrain waits the whole wait, says so, and goes on; told to stop while waiting: on record as stopped,
    the alert open for the next controller."""
    registry, name = setup
    window = recent(600, seed=15)
    window[TIMESTAMP] = pd.date_range(datetime.now(UTC), periods=len(window), freq="10ms")  # after the alert
    gate = WindowGate(min_labels=200, wait_for_labels_s=2, min_accuracy=0.0, min_improvement=-1.0)  # (passes)
    policy = RetrainPolicy(cooldown_s=0, max_per_day=10, window_gate=gate)
    alerted = datetime.fromtimestamp(time.time() - 5, UTC).isoformat()
    fresh = controller(tmp_path, registry, name, policy, window=window).handle(alert(model=name, at=alerted), "t:0:1")
    assert fresh["label_wait"] == "waited 0 s for labels: 300 of the judged 300 rows are from after the alert", fresh
    from lifecycle.rollout.state import Rollouts

    Rollouts(registry).abort(name, "test", "next case")
    late = datetime.fromtimestamp(time.time() + 3600, UTC).isoformat()  # every row is older than this alert
    started = time.monotonic()
    stale = controller(tmp_path, registry, name, policy, window=window).handle(alert(model=name, at=late), "t:0:2")
    assert time.monotonic() - started >= 2
    assert fresh["outcome"] == "rollout_started" and stale["label_wait"] == (
        "waited the whole 2 s for labels: 0 of the judged 300 rows are from after the alert (asked: 200)")
    Rollouts(registry).abort(name, "test", "next case")
    waiting = controller(tmp_path, registry, name, RetrainPolicy(
        cooldown_s=0, max_per_day=10, window_gate=WindowGate(wait_for_labels_s=600)), window=window)
    threading.Timer(1.0, waiting.stop).start()
    with pytest.raises(Stopped):
        waiting.handle(alert(model=name, at=late), "t:0:3")
    assert waiting.log.find(name, "t:0:3") is None  # open again
    stopped = waiting.log.decisions(name)[0]
    assert (stopped.status, stopped.tags["outcome"]) == ("KILLED", "stopped")
    assert stopped.tags["outcome_reason"].startswith("the controller stopped while waiting for labels")
    # the consumer group keeps a controller that waits and trains between two polls (librdkafka's ceiling: a day)
    assert waiting.max_poll_interval_ms == (600 + 3600) * 1000
    assert controller(tmp_path, registry, name, RetrainPolicy(window_gate=WindowGate(wait_for_labels_s=2 * 86400))
                      ).max_poll_interval_ms == 86_400_000
