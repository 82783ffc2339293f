"""The rollout controller on the real stack (MLflow registry, `bentoml serve`, Kafka, Feast): a good candidate
goes through every step to Production by itself, a bad one is rolled back at its first step, with no failed
request either way and every decision on record."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections import Counter

import pytest

from harness.traffic import Traffic
from lifecycle import model_store
from lifecycle.registry import Registry
from lifecycle.rollout.controller import Controller
from lifecycle.rollout.state import Rollouts
from lifecycle.train import register as store_model
from lifecycle.train import train
from mlops.rollout import Policy
from mlops.schema import LABEL
from tests.support import follower_env, start_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]
POLICY = Policy(min_samples=150, min_step_s=3, max_step_s=600)


def run_rollout(workspace, models, steps=(0, 50, 100), timeout: float = 150):
    """v1 in Production, v2 rolled out by a controller under traffic: (registry, name, rollout, traffic)."""
    reg = Registry(model_store.default_backend())
    name = f"fraud_{uuid.uuid4().hex[:8]}"
    for version, model in zip(("v1", "v2"), models, strict=True):
        store_model(model, name, version, backend=reg.backend)
    reg.register(name, "v1")
    reg.promote(name, "v1", "production")
    reg.register(name, "v2")
    server = start_server(workspace, follower_env(reg.backend, name))
    controller = Controller(workspace.settings, reg, name, record_every_s=600)
    thread = threading.Thread(target=controller.run, args=(0.5,), daemon=True)
    started = time.monotonic()
    try:
        with Traffic(server.url, customers=400) as traffic:
            state = Rollouts(reg).start(name, "v2", steps, POLICY, actor="test")
            thread.start()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and reg.rollout(name).active:
                time.sleep(0.5)
            ended_s = time.monotonic() - started
            time.sleep(2)  # the replicas follow the end of the rollout under traffic
    finally:
        controller.stop()
        thread.join(30)
        server.stop()
    return reg, name, state, traffic, ended_s


def test_a_good_candidate_goes_to_production_by_itself(workspace, trained):
    reg, name, state, traffic, seconds = run_rollout(workspace, (trained[0], trained[0]))
    final = reg.rollout(name)
    record = reg.rollout_decisions(name, state.id)
    assert final.status == "completed", (final, [(r["action"], r["reason"]) for r in record])
    assert reg.production(name).version == "v2" and reg.get(name, "v1").stage == "Archived"
    moves = [r for r in record if r["action"] != "hold"]  # holds: recorded when what it waits for changes
    assert [(r["action"], r["step"]) for r in moves] == [("start", 0), ("promote", 50), ("promote", 100),
                                                         ("promote", 100)]
    assert all(r["actor"].startswith("controller@") for r in record[1:])
    assert all(r["reason"].startswith("collecting") for r in record if r["action"] == "hold")
    shadow = moves[1]  # the shadow step's statistics are on record
    assert shadow["metrics"]["predictions.agreement"] == 1.0 and shadow["metrics"]["predictions.psi"] == 0
    assert traffic.statuses() == Counter({200: len(traffic.results)}), traffic.statuses()
    assert set(traffic.versions()) == {"v1", "v2"}
    print(f"\ngood candidate: shadow -> 50 % -> 100 % -> Production in {seconds:.1f} s, "
          f"{len(traffic.results)} requests, 0 failed")


def test_a_candidate_trained_on_corrupted_labels_is_rolled_back_at_its_first_step(workspace, trained):
    corrupted = dataclasses.replace(workspace.dataset, transactions=workspace.dataset.transactions.assign(
        **{LABEL: 1 - workspace.dataset.transactions[LABEL]}))
    reg, name, state, traffic, seconds = run_rollout(workspace, (trained[0], train(corrupted)),
                                                     steps=(0, 5, 25, 50, 100))
    final = reg.rollout(name)
    record = reg.rollout_decisions(name, state.id)
    assert final.status == "rolled_back" and final.step_index == 0, final
    assert [r["action"] for r in record if r["action"] != "hold"] == ["start", "rollback"]
    assert "predictions" in record[-1]["reason"]
    assert record[-1]["metrics"]["predictions.agreement"] < POLICY.min_agreement
    assert reg.production(name).version == "v1" and reg.get(name, "v2").stage == "Archived"
    assert traffic.statuses() == Counter({200: len(traffic.results)}), traffic.statuses()
    assert set(traffic.versions()) == {"v1"}  # in shadow it answered nobody
    assert seconds < 60, seconds
    print(f"\ncorrupted candidate rolled back in the shadow step {seconds:.1f} s after the start, "
          f"{len(traffic.results)} requests, 0 failed")
