"""Power analysis before an A/B experiment or a rollout: how many predictions per arm, and how long at today's
traffic, to detect a given change of a rate (statsmodels' power functions, the field's standard).

Two numbers, because the stack can run either design:

* **fixed horizon**: the two-sample test of proportions (Cohen's h, ``NormalIndPower``) read once, at the
  planned sample; the smallest sample for the wanted power;
* **sequential** (what rollouts and sequential experiments read at every look, :mod:`lifecycle.rollout.stats`):
  the smallest sample at which the mSPRT's confidence sequence excludes "no change" with the wanted power when
  the true effect is the minimum one (observed difference minus z_power standard errors still clear of the
  half-width). It may stop earlier; it is the price of looking all the time, typically 2-3x the fixed sample.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from scipy.stats import norm
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import proportion_effectsize

from lifecycle.rollout.stats import mixture_test


@dataclass(frozen=True)
class Plan:
    baseline_rate: float
    expected_rate: float
    alpha: float
    power: float
    share: float  # the candidate arm's share of traffic
    fixed_per_arm: int  # the candidate arm's sample (the baseline's is larger by (1 - share) / share)
    fixed_baseline: int
    sequential_per_arm: int
    sequential_baseline: int
    daily_traffic: int | None
    fixed_days: float | None
    sequential_days: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def expected(baseline_rate: float, mde: float, relative: bool) -> float:
    rate = baseline_rate * (1 + mde) if relative else baseline_rate + mde
    if not 0 < rate < 1:
        raise ValueError(f"baseline {baseline_rate} with an effect of {mde}{' (relative)' if relative else ''} "
                         f"gives a rate of {rate:g}, outside (0, 1)")
    return rate


def _sequential_n(p0: float, p1: float, ratio: float, alpha: float, power: float) -> int:
    """Smallest candidate-arm n at which the confidence sequence (tau = the effect) excludes 0 with probability
    ``power`` when the true difference is ``p1 - p0``."""
    effect, z = abs(p1 - p0), float(norm.ppf(power))

    def excludes(n1: int) -> bool:
        var = p1 * (1 - p1) / n1 + p0 * (1 - p0) / (n1 * ratio)
        e = mixture_test(effect, var, alpha, effect, (n1, int(n1 * ratio)))
        return effect - z * math.sqrt(var) >= e.upper - e.estimate

    hi = 1
    while not excludes(hi):
        hi *= 2
        if hi > 10**12:
            raise ValueError("the effect is too small to detect at any realistic sample")
    lo = hi // 2
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if excludes(mid) else (mid, hi)
    return hi


def plan(baseline_rate: float, mde: float, alpha: float = 0.05, power: float = 0.8, share: float = 0.5,
         relative: bool = False, daily_traffic: int | None = None) -> Plan:
    """``mde``: the smallest change worth detecting, absolute (0.01 = one point) or relative (0.1 = 10 %)."""
    if not 0 < baseline_rate < 1:
        raise ValueError(f"the baseline rate must be in (0, 1), got {baseline_rate}")
    if not mde or not math.isfinite(mde):
        raise ValueError("the minimum detectable effect must be a non-zero finite number")
    if not 0 < alpha < 1 or not 0 < power < 1 or not 0 < share < 1:
        raise ValueError("alpha, power and the candidate's share must be in (0, 1)")
    if daily_traffic is not None and daily_traffic <= 0:
        raise ValueError("daily traffic must be positive")
    p1 = expected(baseline_rate, mde, relative)
    ratio = (1 - share) / share
    effect = abs(proportion_effectsize(p1, baseline_rate))
    n1 = math.ceil(NormalIndPower().solve_power(effect_size=effect, alpha=alpha, power=power, ratio=ratio,
                                                alternative="two-sided"))
    s1 = _sequential_n(baseline_rate, p1, ratio, alpha, power)
    days = (lambda n: n / (daily_traffic * share)) if daily_traffic else (lambda n: None)
    return Plan(baseline_rate, p1, alpha, power, share, n1, math.ceil(n1 * ratio), s1, math.ceil(s1 * ratio),
                daily_traffic, days(n1), days(s1))
