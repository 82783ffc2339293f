"""A/B experiments: the Bayesian read-out against Monte Carlo, the stopping rules under continuous looks, and
start → status → conclude on the real stack (registry, `bentoml serve`, Kafka, outcomes over HTTP)."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest

from lifecycle.rollout import experiment as ex
from tests.support import follower_env, start_server
from tests.test_rollout import registry_cli


@pytest.mark.parametrize("a, b", [((30, 70), (45, 55)), ((500, 9500), (520, 9480)), ((3, 1), (1, 3))])
def test_probability_to_beat_is_exact(a, b):
    rng = np.random.default_rng(0)
    pa, pb = rng.beta(1 + a[0], 1 + a[1], 400_000), rng.beta(1 + b[0], 1 + b[1], 400_000)
    assert ex.prob_b_beats_a(*a, *b) == pytest.approx(float(np.mean(pb > pa)), abs=0.004)
    assert ex.prob_b_beats_a(*a, *a) == pytest.approx(0.5, abs=1e-9)


def test_expected_loss_is_small_for_the_clear_winner():
    lose_c, lose_b = ex.expected_losses(ex.ArmCounts(1000, 950), ex.ArmCounts(1000, 900))
    assert lose_c < 1e-4 < 0.04 < lose_b < 0.06


def test_the_stopping_rules():
    seq = ex.readout("accuracy", "sequential", ex.ArmCounts(2000, 1900), ex.ArmCounts(2000, 1800), 5000)
    assert seq.verdict == "candidate" and seq.lower > 0 and seq.prob_candidate_better > 0.999
    worse = ex.readout("accuracy", "sequential", ex.ArmCounts(2000, 1800), ex.ArmCounts(2000, 1900), 5000)
    assert worse.verdict == "baseline"
    assert ex.readout("accuracy", "sequential", ex.ArmCounts(300, 270), ex.ArmCounts(300, 271), 5000).verdict \
        == "continue"
    assert ex.readout("accuracy", "sequential", ex.ArmCounts(5000, 4500), ex.ArmCounts(5000, 4501), 5000).verdict \
        == "no_difference"
    early = ex.readout("accuracy", "fixed", ex.ArmCounts(2000, 1900), ex.ArmCounts(2000, 1800), 5000)
    assert early.verdict == "continue"  # a fixed design is read once, at its sample
    assert ex.readout("accuracy", "fixed", ex.ArmCounts(5000, 4750), ex.ArmCounts(5000, 4500), 5000).verdict \
        == "candidate"


def test_peeking_at_a_sequential_aa_experiment_rarely_names_a_winner():
    """400 A/A experiments at 90 % accuracy, read every 250 labelled predictions per arm up to 5,000."""
    rng = np.random.default_rng(11)
    winners = 0
    for _ in range(400):
        c = b = 0
        for look in range(1, 21):
            c += int(rng.binomial(250, 0.9))
            b += int(rng.binomial(250, 0.9))
            verdict = ex.readout("accuracy", "sequential", ex.ArmCounts(250 * look, c), ex.ArmCounts(250 * look, b),
                                 5000, draws=100).verdict
            if verdict in ("candidate", "baseline"):
                winners += 1
                break
    assert winners / 400 <= 0.05, winners


@pytest.mark.integration
@pytest.mark.slow
def test_an_experiment_starts_reads_out_and_concludes_through_the_rollout(workspace, rollout):
    reg, _, name = rollout
    uri = ["--mlflow-uri", reg.backend.uri]
    started = registry_cli("experiment", "start", "--name", name, "--version", "v2", "--samples", "300",
                           "--share", "0.5", *uri, "--json")
    assert started.returncode == 0, started.stderr
    assert json.loads(started.stdout)["kind"] == "experiment" and json.loads(started.stdout)["share"] == 0.5
    server = start_server(workspace, follower_env(reg.backend, name))
    try:
        body = {"requests": [{"customer_id": f"C{i:06d}", "transaction_amount": 75.0 + i} for i in range(250)]}
        answers = []
        for _ in range(4):
            r = httpx.post(f"{server.url}/predict_batch", json=body, timeout=60)
            assert r.status_code == 200, r.text
            answers += r.json()
        assert {a["model_version"] for a in answers} == {"v1", "v2"}
        # The outcomes say v2 is right on each of its rows and v1 wrong on each of its own.
        by_customer = {a["customer_id"]: a["label"] for a in answers if a["model_version"] == "v2"}
        truth = [{"request_id": a["request_id"], "label": by_customer.get(a["customer_id"], 1 - a["label"])}
                 for a in answers]
        for i in range(0, len(truth), 250):
            assert httpx.post(f"{server.url}/outcomes", json={"outcomes": truth[i:i + 250]}, timeout=30
                              ).status_code == 200
    finally:
        server.stop()
    time.sleep(1)
    status = registry_cli("experiment", "status", "--name", name, *uri, "--json")
    assert status.returncode == 0, status.stderr
    readout = json.loads(status.stdout)
    assert readout["candidate"]["rate"] == 1.0 and readout["baseline"]["rate"] < 0.5, readout
    assert readout["verdict"] == "candidate" and readout["prob_candidate_better"] > 0.999
    concluded = registry_cli("experiment", "conclude", "--name", name, *uri, "--json")
    assert concluded.returncode == 0, concluded.stderr
    state = json.loads(concluded.stdout)["state"]
    assert (state["kind"], state["steps"][state["step_index"]], state["status"]) == ("rollout", 100, "running")
    assert [r["action"] for r in reg.rollout_decisions(name)] == ["start", "promote"]
    again = registry_cli("experiment", "status", "--name", name, *uri)
    assert again.returncode == 1 and "no experiment running" in again.stderr
