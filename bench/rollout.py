"""Simulated rollouts through the real decision rules (lifecycle/rollout/analysis.py): how often a candidate
no different from Production is rolled back (the A/A false-rollback rate), and how fast bad ones are caught.

    python -m bench.rollout [--runs 1000] [--name rollout-sim]

Each simulated look brings ``traffic`` predictions, split by the step's share (shadow: the candidate scores
every row beside Production); each arm's scores, model times, errors and joined outcomes are drawn from its
own model. The decision at each look is what the controller would apply: promote (next step), hold, rollback,
pause. Results: bench/results/<name>.json and a table.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from bench.common import print_table, write_results
from lifecycle.rollout.analysis import Arm, StepData, decide
from mlops.rollout import Policy, RolloutState

KEEP = 2000  # values kept per arm and step (the controller keeps a uniform sample of this size too)


@dataclass(frozen=True)
class ArmModel:
    score_a: float = 2.0  # scores ~ Beta(a, b)
    score_b: float = 8.0
    model_ms: float = 0.2  # median model time; lognormal with sigma 0.4
    error_rate: float = 0.001
    accuracy: float = 0.95
    labelled_share: float = 0.3


PRODUCTION = ArmModel()
CANDIDATES = {
    "same (A/A)": PRODUCTION,
    "better retrain": replace(PRODUCTION, score_a=1.6, score_b=7.0, accuracy=0.96),
    "5x slower": replace(PRODUCTION, model_ms=1.0),
    "corrupted labels": replace(PRODUCTION, score_a=5.0, score_b=3.0, accuracy=0.80),
    "accuracy -8 points": replace(PRODUCTION, accuracy=0.87),
    "errors x10": replace(PRODUCTION, error_rate=0.01),
}


def _draw(model: ArmModel, n: int, rng: np.random.Generator, arm: Arm) -> None:
    if n <= 0:
        return
    arm.predictions += n
    arm.customers += n
    arm.requests += n
    arm.errors += int(rng.binomial(n, model.error_rate))
    labelled = int(rng.binomial(n, model.labelled_share))
    arm.labelled += labelled
    arm.correct += int(rng.binomial(labelled, model.accuracy))
    arm.scores = _keep(arm.scores, rng.beta(model.score_a, model.score_b, n), rng)
    arm.model_ms = _keep(arm.model_ms, model.model_ms * rng.lognormal(0, 0.4, n), rng)


def _keep(old: np.ndarray, new: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    both = np.concatenate([old, new])
    return both if len(both) <= KEEP else rng.choice(both, KEEP, replace=False)


def simulate(candidate: ArmModel, rng: np.random.Generator, policy: Policy, traffic: int = 2000,
             look_s: float = 10.0, max_looks: int = 40, actual_share: float | None = None) -> dict[str, Any]:
    """One rollout to its end: completed, rolled_back, paused or stuck (max_looks in one step)."""
    state = RolloutState(id="sim", model="m", candidate="c", baseline="b", policy=policy)
    looks = 0
    base = Arm("b")
    while True:
        cand = Arm("c")
        if state.share < 1:  # at 100 % the baseline stays Production's arm of the step before
            base = Arm("b")
        paired_c: list[np.ndarray] = []
        paired_b: list[np.ndarray] = []
        for look in range(1, max_looks + 1):
            looks += 1
            if state.shadow:
                _draw(PRODUCTION, traffic, rng, base)
                _draw(candidate, traffic, rng, cand)
                # Same rows: the candidate's score is Production's moved by the models' difference.
                b = rng.beta(PRODUCTION.score_a, PRODUCTION.score_b, min(traffic, KEEP))
                c = b if candidate == PRODUCTION else rng.beta(candidate.score_a, candidate.score_b, len(b))
                paired_b.append(b)
                paired_c.append(c)
                paired = (np.concatenate(paired_c)[-KEEP:], np.concatenate(paired_b)[-KEEP:])
            else:
                share = state.share if actual_share is None else actual_share
                n_c = int(rng.binomial(traffic, share))
                _draw(candidate, n_c, rng, cand)
                _draw(PRODUCTION, traffic - n_c, rng, base)
                paired = None
            decision = decide(state, StepData(cand, base, look * look_s, paired))
            if decision.action == "promote":
                if state.last_step:
                    return {"end": "completed", "step_index": state.step_index, "looks": looks}
                state = state.moved(step_index=state.step_index + 1)
                break
            if decision.action in ("rollback", "pause"):
                return {"end": "rolled_back" if decision.action == "rollback" else "paused",
                        "step_index": state.step_index, "looks": looks, "reason": decision.reason}
        else:
            return {"end": "stuck", "step_index": state.step_index, "looks": looks}


def run(runs: int, seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    policy = Policy(min_samples=500, min_step_s=30)
    rng = np.random.default_rng(seed)
    rows = []
    for label, candidate in CANDIDATES.items():
        started = time.perf_counter()
        n = runs if label == "same (A/A)" else max(50, runs // 10)  # the others: a tenth
        ends = [simulate(candidate, rng, policy) for _ in range(n)]
        counts = {end: sum(e["end"] == end for e in ends) for end in ("completed", "rolled_back", "paused", "stuck")}
        caught = [e for e in ends if e["end"] == "rolled_back"]
        rows.append({"candidate": label, "runs": n, **counts,
                     "rolled_back_share": counts["rolled_back"] / n,
                     "first_step_share": sum(e["step_index"] == 0 for e in caught) / n,
                     "median_looks_to_rollback": float(np.median([e["looks"] for e in caught])) if caught else None,
                     "seconds": time.perf_counter() - started})
    broken = [simulate(PRODUCTION, rng, policy, actual_share=0.10) for _ in range(max(50, runs // 10))]
    rows.append({"candidate": "same, split broken (10 % for a planned 5 %)", "runs": len(broken),
                 **{end: sum(e["end"] == end for e in broken)
                    for end in ("completed", "rolled_back", "paused", "stuck")},
                 "rolled_back_share": sum(e["end"] == "rolled_back" for e in broken) / len(broken)})
    return rows, {"policy": policy.__dict__, "traffic_per_look": 2000, "look_s": 10.0, "seed": seed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.rollout", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1000, help="A/A rollouts (bad candidates: a tenth, at least 50)")
    p.add_argument("--name", default="rollout-sim")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows, settings = run(args.runs, args.seed)
    path = write_results(args.name, rows, settings)
    print_table(f"simulated rollouts (alpha {settings['policy']['alpha']}) -> {path}", rows,
                ["candidate", "runs", "completed", "rolled_back", "paused", "stuck", "first_step_share",
                 "median_looks_to_rollback"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
