"""An A/B experiment's read-out: the candidate against Production on an outcome metric, the frequentist
sequential answer and the Bayesian one side by side, and an explicit stopping rule.

Metrics (per prediction of the arm, from outcomes joined by ``request_id``):

* ``accuracy`` — correct decisions per labelled prediction;
* ``caught`` — frauds caught (predicted 1 and truly 1) per labelled prediction, i.e. per 1,000 transactions
  ×1,000: the business rate a fraud team watches.

Frequentist: the mSPRT's confidence sequence on the difference (:mod:`lifecycle.rollout.stats`), valid at
every look. Bayesian: Beta(1, 1) priors on each arm's rate; the probability that the candidate's rate is the
higher one (exact, Evan Miller's sum over Beta functions) and the expected loss of choosing each arm (what
it costs, in the metric, if it is the wrong one; Monte Carlo from the posteriors). They answer different
questions; the stopping rule is the frequentist one, because its error rate holds under continuous looks:

* **sequential** design: stop as soon as the confidence sequence excludes 0 (winner: the sign), or at the
  planned sample with "no difference found";
* **fixed** design: read once, at the planned sample (the two-sided z-test at alpha); before it, "continue".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import special, stats

from lifecycle.rollout import stats as rstats

METRICS = ("accuracy", "caught")
DESIGNS = ("sequential", "fixed")


@dataclass(frozen=True)
class ArmCounts:
    labelled: int
    successes: int  # correct (accuracy) or caught frauds (caught)

    @property
    def rate(self) -> float:
        return self.successes / self.labelled if self.labelled else float("nan")


@dataclass(frozen=True)
class Readout:
    metric: str
    design: str
    candidate: ArmCounts
    baseline: ArmCounts
    planned: int
    estimate: float
    lower: float
    upper: float
    p_value: float
    prob_candidate_better: float
    expected_loss_candidate: float
    expected_loss_baseline: float
    verdict: str  # continue, candidate, baseline, no_difference

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["candidate"]["rate"], body["baseline"]["rate"] = self.candidate.rate, self.baseline.rate
        return body


def prob_b_beats_a(a_success: int, a_fail: int, b_success: int, b_fail: int) -> float:
    """P(p_B > p_A) for p_A ~ Beta(1 + a_success, 1 + a_fail), p_B ~ Beta(1 + b_success, 1 + b_fail), exactly."""
    alpha_a, beta_a, alpha_b, beta_b = 1 + a_success, 1 + a_fail, 1 + b_success, 1 + b_fail
    i = np.arange(alpha_b, dtype=np.float64)
    terms = (special.betaln(alpha_a + i, beta_a + beta_b) - np.log(beta_b + i)
             - special.betaln(1 + i, beta_b) - special.betaln(alpha_a, beta_a))
    return float(np.clip(np.exp(special.logsumexp(terms)), 0.0, 1.0))


def expected_losses(candidate: ArmCounts, baseline: ArmCounts, draws: int = 200_000, seed: int = 0
                    ) -> tuple[float, float]:
    """(loss of choosing the candidate, loss of choosing the baseline): E[max(other - chosen, 0)]."""
    rng = np.random.default_rng(seed)
    c = rng.beta(1 + candidate.successes, 1 + candidate.labelled - candidate.successes, draws)
    b = rng.beta(1 + baseline.successes, 1 + baseline.labelled - baseline.successes, draws)
    return float(np.maximum(b - c, 0).mean()), float(np.maximum(c - b, 0).mean())


def readout(metric: str, design: str, candidate: ArmCounts, baseline: ArmCounts, planned: int,
            alpha: float = 0.05, draws: int = 100_000) -> Readout:
    """``draws``: Monte Carlo draws of the expected losses (the stopping rule does not use them)."""
    if metric not in METRICS or design not in DESIGNS:
        raise ValueError(f"metric one of {METRICS}, design one of {DESIGNS}")
    tau = max(0.01, 0.1 * max(baseline.rate if baseline.labelled else 0.1, 0.01))
    e = rstats.rate_difference(candidate.successes, candidate.labelled, baseline.successes, baseline.labelled,
                               alpha, tau=tau)
    prob = prob_b_beats_a(baseline.successes, baseline.labelled - baseline.successes,
                          candidate.successes, candidate.labelled - candidate.successes)
    loss_c, loss_b = expected_losses(candidate, baseline, draws)
    reached = min(candidate.labelled, baseline.labelled) >= planned
    if design == "sequential":
        found = e.lower > 0 or e.upper < 0
        verdict = ("candidate" if e.lower > 0 else "baseline") if found else "no_difference" if reached else "continue"
    elif not reached:
        verdict = "continue"
    else:
        pooled = (candidate.successes + baseline.successes) / (candidate.labelled + baseline.labelled)
        se = np.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / candidate.labelled + 1 / baseline.labelled))
        z = (candidate.rate - baseline.rate) / se
        significant = 2 * stats.norm.sf(abs(z)) < alpha
        verdict = ("candidate" if z > 0 else "baseline") if significant else "no_difference"
    return Readout(metric, design, candidate, baseline, planned, e.estimate, e.lower, e.upper, e.p_value, prob,
                   loss_c, loss_b, verdict)
