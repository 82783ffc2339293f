"""The rollout's decision rules on simulated canaries: good ones complete, bad ones are rolled back at their
first step, a broken split pauses, and 1,000 A/A rollouts are falsely rolled back at most alpha of the time."""

from __future__ import annotations

import numpy as np
import pytest

from bench.rollout import CANDIDATES, PRODUCTION, simulate
from lifecycle.rollout.analysis import Arm, StepData, decide
from mlops.rollout import Policy, RolloutState

POLICY = Policy(min_samples=500, min_step_s=30)


@pytest.mark.slow
def test_a_thousand_aa_rollouts_are_rolled_back_at_most_alpha_of_the_time():
    rng = np.random.default_rng(2026)
    ends = [simulate(PRODUCTION, rng, POLICY)["end"] for _ in range(1000)]
    assert ends.count("rolled_back") / 1000 <= POLICY.alpha, ends.count("rolled_back")
    assert ends.count("paused") <= 10 and ends.count("stuck") == 0
    assert ends.count("completed") >= 1000 * (1 - POLICY.alpha) - 10


def test_a_better_retrain_with_other_scores_goes_through_every_step():
    rng = np.random.default_rng(4)
    ends = [simulate(CANDIDATES["better retrain"], rng, POLICY)["end"] for _ in range(50)]
    assert ends == ["completed"] * 50, ends


@pytest.mark.parametrize("label", [k for k in CANDIDATES if k not in ("same (A/A)", "better retrain")])
def test_a_bad_candidate_is_rolled_back_at_its_first_step(label):
    rng = np.random.default_rng(5)
    ends = [simulate(CANDIDATES[label], rng, POLICY) for _ in range(50)]
    assert all(e["end"] == "rolled_back" and e["step_index"] == 0 for e in ends), ends[:3]


def test_a_broken_split_pauses_the_rollout_for_a_person():
    rng = np.random.default_rng(6)
    ends = [simulate(PRODUCTION, rng, POLICY, actual_share=0.10) for _ in range(20)]
    assert all(e["end"] == "paused" and e["step_index"] == 1 for e in ends), ends[:3]
    assert "sample ratio mismatch" in ends[0]["reason"]


def arm(version: str, n: int, rng: np.random.Generator) -> Arm:
    return Arm(version, predictions=n, customers=n, scores=rng.beta(2, 8, n), model_ms=rng.lognormal(-1.6, 0.4, n))


def state_at(step_index: int) -> RolloutState:
    return RolloutState(id="r", model="m", candidate="v2", baseline="v1", step_index=step_index, policy=POLICY)


def test_too_few_samples_or_too_little_time_holds_and_says_so():
    rng = np.random.default_rng(7)
    d = decide(state_at(1), StepData(arm("v2", 120, rng), arm("v1", 2300, rng), elapsed_s=45))
    assert d.action == "hold" and d.reason.startswith("collecting: 120 / 2300 predictions")
    d = decide(state_at(1), StepData(arm("v2", 600, rng), arm("v1", 11400, rng), elapsed_s=10))
    assert d.action == "hold" and "10 s (need 30)" in d.reason
    d = decide(state_at(1), StepData(arm("v2", 120, rng), arm("v1", 2300, rng), elapsed_s=POLICY.max_step_s + 1))
    assert d.action == "hold" and d.reason.startswith("stuck: ")


def test_enough_of_a_good_candidate_is_promoted_with_every_check_on_record():
    rng = np.random.default_rng(8)
    d = decide(state_at(1), StepData(arm("v2", 600, rng), arm("v1", 11400, rng), elapsed_s=60))
    assert d.action == "promote", d
    verdicts = {c.name: c.verdict for c in d.checks}
    assert verdicts == {"samples": "pass", "split": "pass", "errors": "skip", "predictions": "pass",
                        "latency": "skip", "quality": "skip"}
    assert {"psi", "mean_p_value"} <= set(next(c for c in d.checks if c.name == "predictions").values)


def test_the_last_step_compares_with_productions_arm_of_the_step_before():
    rng = np.random.default_rng(9)
    d = decide(state_at(4), StepData(arm("v2", 2000, rng), arm("v1", 2000, rng), elapsed_s=60))
    assert d.action == "promote" and {c.name: c.verdict for c in d.checks}["split"] == "skip"


def test_a_candidate_failing_its_rows_is_rolled_back_before_it_has_samples():
    """The service answers a failing candidate's rows with Production and logs them as the candidate's errors:
    40 of 40 failed (0 scored) against Production's 0 of 800 is evidence enough, however few the samples."""
    rng = np.random.default_rng(10)
    failing = Arm("v2", predictions=0, customers=40, requests=40, errors=40)
    production = arm("v1", 800, rng)
    production.requests = 800
    d = decide(state_at(1), StepData(failing, production, elapsed_s=5))
    assert d.action == "rollback" and d.reason.startswith("errors: error rate 1.0000 vs 0.0000"), d
    healthy = arm("v2", 600, rng)
    healthy.requests = 600
    production = arm("v1", 11400, rng)
    production.requests = 11400
    d = decide(state_at(1), StepData(healthy, production, elapsed_s=60))
    assert d.action == "promote" and {c.name: c.verdict for c in d.checks}["errors"] == "pass"
