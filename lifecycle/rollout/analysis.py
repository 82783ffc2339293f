"""One step's analysis: the candidate against Production over the same window, and what to do about it.

Checks (each one's statistics go into the decision record):

* ``samples`` — both arms have ``min_samples`` predictions and the step has run ``min_step_s``: before that
  the answer is *hold*, whatever the data say (a rollback needs evidence too, see the tests below, but a
  promotion needs enough data to have had the chance to find a problem).
At the 100 % step no request goes to Production any more: the baseline arm is Production's from the step
before (the controller reads it back from the prediction log), so the candidate is still compared with it.

* ``split`` — sample-ratio mismatch on distinct customers (the unit of randomisation), anytime-valid
  (:func:`~lifecycle.rollout.stats.sample_ratio_mismatch`) at a strict 0.001: a broken split makes every other
  comparison untrustworthy, so the rollout is *paused* for a person, never promoted or rolled back on it.
* ``errors`` — rows each arm failed to score, a rate difference by mSPRT (tau 0.01): worse → *rollback*. The
  service answers a candidate's failed rows with Production (no request fails) and logs them with
  ``failed_version``; Production's own failures fail the request and reach no log, so its arm counts 0.
* ``predictions`` — in the shadow step, where both versions scored the same rows, the share of rows on which
  the candidate takes Production's decision below ``min_agreement`` (0.8) → *rollback*; in every step, PSI
  between the two score distributions (bins: deciles of Production's scores) above ``max_psi`` (1.0) →
  *rollback*. A better model moves the distribution too (a retrained one scored PSI 0.6 against its
  predecessor in the demo), so PSI is only a gross guard against a broken or inverted model (> 3), judged
  once both arms hold ``min_samples`` distinct customers (one customer's predictions are alike, so the
  independent rows are the customers; the demo's 15 customers in a 5 % arm gave a good candidate PSI 1.6):
  PSI is a distance, not a test, and
  between two samples of one distribution it is about (bins - 1)(1/n1 + 1/n0) times a chi-square(bins - 1)
  variable, so 0.2 is out of reach of chance from 200 per arm on (at 100 it happens at one look in forty,
  which the A/A simulation showed before this rule). The paired mean difference is reported beside them.
* ``latency`` — in the shadow step, Mann-Whitney's AUC by mSPRT on the model call times of the two versions
  on the same batches: significantly slower *and* a P95 ratio above ``max_latency_ratio`` → *rollback* (a
  significant but tiny slowdown is not worth one). Only there: in the traffic steps a batch mixes both
  versions' rows, so they share the request latency, and each version's call covers a different number of
  rows (the candidate's few rows would look cheap per call and dear per row).
* ``quality`` — realised accuracy per arm where outcomes were joined: significantly worse by more than
  ``max_quality_drop`` → *rollback*.

Error rate of the whole rollout: a good candidate is rolled back only if one of the mSPRTs rejects at some look
of some step; each runs at ``alpha / (tests x steps)`` (Bonferroni), so the chance is at most ``alpha`` however
often the controller looks (anytime validity) — measured by simulating 1,000 A/A rollouts in the tests.
All passing with enough samples → *promote* (the last step: *complete*).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lifecycle.rollout import stats as rstats
from mlops import stats as mstats
from mlops.rollout import RolloutState

SRM_ALPHA = 0.001
TESTS = 4  # errors, predictions (paired mean in shadow), latency, quality
MIN_LABELS = 100  # joined outcomes per arm before the quality check judges


@dataclass
class Arm:
    """What one arm did during the step (the candidate's or Production's)."""

    version: str
    predictions: int = 0
    customers: int = 0
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    model_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    requests: int = 0  # rows routed to this arm (scored or failed); 0: not counted
    errors: int = 0  # rows it failed to score
    labelled: int = 0
    correct: int = 0


@dataclass
class StepData:
    candidate: Arm
    baseline: Arm
    elapsed_s: float
    paired: tuple[np.ndarray, np.ndarray] | None = None  # shadow: (candidate, production) scores, same rows
    threshold: float = 0.5


@dataclass(frozen=True)
class Check:
    name: str
    verdict: str  # pass, fail, wait, skip
    detail: str
    values: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "verdict": self.verdict, "detail": self.detail, "values": self.values}


@dataclass(frozen=True)
class Decision:
    action: str  # promote, hold, rollback, pause
    reason: str
    checks: tuple[Check, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "reason": self.reason, "checks": [c.to_dict() for c in self.checks]}


def psi_between(candidate: np.ndarray, baseline: np.ndarray, bins: int = 10) -> float:
    """PSI of the candidate's scores against Production's, on Production's deciles."""
    edges = np.unique(np.quantile(baseline, np.linspace(0, 1, bins + 1)[1:-1]))
    ref = np.bincount(np.searchsorted(edges, baseline, side="right"), minlength=len(edges) + 1)
    cur = np.bincount(np.searchsorted(edges, candidate, side="right"), minlength=len(edges) + 1)
    return float(mstats.psi(ref.astype(np.float64), cur.astype(np.float64)))


def _evidence(e: rstats.Evidence, prefix: str = "") -> dict[str, float]:
    return {f"{prefix}estimate": e.estimate, f"{prefix}lower": e.lower, f"{prefix}upper": e.upper,
            f"{prefix}p_value": e.p_value}


def decide(state: RolloutState, data: StepData) -> Decision:
    policy = state.policy
    alpha = policy.alpha / (TESTS * len(state.steps))
    cand, base = data.candidate, data.baseline
    checks: list[Check] = []
    enough = (cand.predictions >= policy.min_samples and base.predictions >= policy.min_samples
              and data.elapsed_s >= policy.min_step_s)
    checks.append(Check("samples", "pass" if enough else "wait",
                        f"{cand.predictions} / {base.predictions} predictions (need {policy.min_samples} each), "
                        f"{data.elapsed_s:.0f} s (need {policy.min_step_s:g})",
                        {"candidate": cand.predictions, "baseline": base.predictions, "elapsed_s": data.elapsed_s}))

    if state.shadow:
        checks.append(Check("split", "skip", "shadow: both versions score every request"))
    elif state.share >= 1:
        checks.append(Check("split", "skip", "the candidate takes all traffic (Production: the step before's)"))
    elif cand.customers + base.customers > 0:
        p = rstats.sample_ratio_mismatch([cand.customers, base.customers], [state.share, 1 - state.share])
        verdict = "fail" if p < SRM_ALPHA else "pass"
        observed = cand.customers / (cand.customers + base.customers)
        checks.append(Check("split", verdict, f"candidate's share of customers {observed:.4f}, planned "
                            f"{state.share:.4f}, p = {p:.2g}", {"observed_share": observed, "p_value": p}))
    else:
        checks.append(Check("split", "wait", "no customers yet"))

    if cand.requests > 0 and base.requests > 0:
        e = rstats.rate_difference(cand.errors, cand.requests, base.errors, base.requests, alpha, tau=0.01)
        worse = e.rejects(alpha) and e.estimate > 0
        checks.append(Check("errors", "fail" if worse else "pass",
                            f"error rate {cand.errors / cand.requests:.4f} vs {base.errors / base.requests:.4f}",
                            _evidence(e)))
    else:
        checks.append(Check("errors", "skip", "failures are not counted per arm"))

    checks.append(_predictions(state, data, alpha))
    checks.append(_latency(state, data, alpha))
    checks.append(_quality(state, data, alpha))

    failed = [c for c in checks if c.verdict == "fail"]
    if any(c.name == "split" for c in failed):
        return Decision("pause", "sample ratio mismatch: " + next(c.detail for c in failed if c.name == "split"),
                        tuple(checks))
    if failed:
        return Decision("rollback", "; ".join(f"{c.name}: {c.detail}" for c in failed), tuple(checks))
    if not enough:
        stuck = data.elapsed_s > policy.max_step_s
        return Decision("hold", ("stuck: " if stuck else "collecting: ") + checks[0].detail, tuple(checks))
    return Decision("promote", "every check passed with enough samples", tuple(checks))


def _predictions(state: RolloutState, data: StepData, alpha: float) -> Check:
    policy = state.policy
    if data.paired is not None and len(data.paired[0]) >= 2:
        cand, prod = data.paired
        agreement = float(np.mean((cand >= data.threshold) == (prod >= data.threshold)))
        e = rstats.paired_difference(cand, prod, alpha, tau=0.05)
        psi = psi_between(cand, prod)
        values = {"psi": psi, "agreement": agreement, **_evidence(e, "paired_")}
        if len(cand) < policy.min_samples:
            return Check("predictions", "wait", f"shadow on {len(cand)} rows: PSI {psi:.3f}, judged from "
                         f"{policy.min_samples} rows", values)
        bad = psi > policy.max_psi or agreement < policy.min_agreement
        return Check("predictions", "fail" if bad else "pass",
                     f"shadow on {len(cand)} rows: label agreement {agreement:.3f} (min {policy.min_agreement:g}), "
                     f"PSI {psi:.3f} (max {policy.max_psi:g}), mean score difference {e.estimate:+.4f}", values)
    cand, base = data.candidate.scores, data.baseline.scores
    if len(cand) < 2 or len(base) < 2:
        return Check("predictions", "wait", "too few scores")
    psi = psi_between(cand, base)
    e = rstats.mean_difference(cand, base, alpha, tau=0.05)
    # One customer's predictions are alike (same features): the independent rows are the customers, when known.
    units = [a.customers or a.predictions for a in (data.candidate, data.baseline)]
    if min(units) < policy.min_samples:
        return Check("predictions", "wait", f"score PSI {psi:.3f}, judged from {policy.min_samples} customers per "
                     f"arm ({units[0]} / {units[1]})", {"psi": psi, **_evidence(e, "mean_")})
    bad = psi > policy.max_psi
    return Check("predictions", "fail" if bad else "pass",
                 f"score PSI {psi:.3f} (max {policy.max_psi:g}), mean score {float(np.mean(cand)):.4f} vs "
                 f"{float(np.mean(base)):.4f}", {"psi": psi, **_evidence(e, "mean_")})


def _latency(state: RolloutState, data: StepData, alpha: float) -> Check:
    if not state.shadow:
        return Check("latency", "skip", "judged in the shadow step, where both versions score the same rows")
    cand, base = data.candidate.model_ms, data.baseline.model_ms
    if len(cand) < 2 or len(base) < 2:
        return Check("latency", "skip", "no model times")
    e = rstats.rank_test(cand, base, alpha)
    p95c, p95b = float(np.percentile(cand, 95)), float(np.percentile(base, 95))
    ratio = p95c / p95b if p95b > 0 else math.inf
    slower = e.rejects(alpha) and e.estimate > 0 and ratio > state.policy.max_latency_ratio
    return Check("latency", "fail" if slower else "pass",
                 f"model P95 {p95c:.3f} vs {p95b:.3f} ms (x{ratio:.2f}, max x{state.policy.max_latency_ratio:g}), "
                 f"P(candidate slower) {e.estimate + 0.5:.3f}", {"p95_ratio": ratio, **_evidence(e)})


def _quality(state: RolloutState, data: StepData, alpha: float) -> Check:
    cand, base = data.candidate, data.baseline
    if cand.labelled < MIN_LABELS or base.labelled < MIN_LABELS:
        return Check("quality", "skip" if cand.labelled + base.labelled == 0 else "wait",
                     f"{cand.labelled} / {base.labelled} outcomes joined (judged from {MIN_LABELS} each)")
    drop = state.policy.max_quality_drop
    e = rstats.rate_difference(cand.correct, cand.labelled, base.correct, base.labelled, alpha, tau=drop)
    worse = e.rejects(alpha) and e.estimate < -drop
    return Check("quality", "fail" if worse else "pass",
                 f"accuracy {cand.correct / cand.labelled:.4f} vs {base.correct / base.labelled:.4f} "
                 f"(max drop {drop:g})", _evidence(e))
