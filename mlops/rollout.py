"""A progressive rollout's state, as the registry stores it and every replica reads it.

The state is one JSON tag (``rollout``) on the registered model, written only under the registry's fenced lock
(:mod:`lifecycle.rollout`), never an environment variable: every replica reads the same step within its poll
interval, and a replica restarted mid-rollout reads the step the rollout is at. This module is the read side
(the service imports it); the writes and the decisions live in :mod:`lifecycle.rollout`.

Steps are traffic percentages for the candidate; 0 is the shadow step (the candidate scores the same requests
as Production, answers none). A customer is in the candidate's share when the stable hash of its id falls
under the share (:func:`in_share`), so a customer sees one version for a whole step, and the candidate's
customers of one step stay its customers at every larger step.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field, replace
from typing import Any

TAG = "rollout"
DECISIONS_EXPERIMENT = "model-rollout-decisions"  # one MLflow run per decision: the rollout's record
SHADOW = 0
DEFAULT_STEPS: tuple[int, ...] = (SHADOW, 5, 25, 50, 100)
ACTIVE = ("running", "paused")
FINAL = ("completed", "rolled_back", "aborted")
STATUSES = ACTIVE + FINAL
HASH_BUCKETS = 10_000


class RolloutStateError(ValueError):
    """The stored rollout tag is not a rollout state this code can read."""


def bucket(entity_id: str) -> int:
    """The customer's stable bucket in [0, HASH_BUCKETS): the same in every replica and process (crc32)."""
    return zlib.crc32(entity_id.encode()) % HASH_BUCKETS


def in_share(entity_id: str, share: float) -> bool:
    return bucket(entity_id) < share * HASH_BUCKETS


def step_key(rollout_id: str, step_index: int) -> str:
    return f"{rollout_id}:{step_index}"


def parse_steps(text: str) -> tuple[int, ...]:
    """``"shadow,5,25,50,100"`` → (0, 5, 25, 50, 100): strictly increasing percentages ending at 100."""
    steps = []
    for part in (p.strip().lower() for p in text.split(",")):
        if part == "shadow":
            steps.append(SHADOW)
            continue
        try:
            steps.append(int(part.rstrip("%")))
        except ValueError:
            raise ValueError(f"step {part!r} is neither 'shadow' nor a whole percentage") from None
    check_steps(steps)
    return tuple(steps)


def check_steps(steps: list[int] | tuple[int, ...]) -> None:
    if not steps or steps[-1] != 100:
        raise ValueError("the last step must be 100 (the candidate takes all traffic before it is promoted)")
    if any(not 0 <= s <= 100 for s in steps) or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise ValueError(f"steps must increase strictly within 0..100 (0 = shadow), got {list(steps)}")


@dataclass(frozen=True)
class Policy:
    """What a step needs before the analysis may promote it, and the error rate of its tests."""

    min_samples: int = 500  # predictions per arm in the step
    min_step_s: float = 60.0
    max_step_s: float = 3600.0  # a step still undecided after this is "stuck" (an alert), never promoted blindly
    alpha: float = 0.05  # false-rollback probability of a good candidate, over the whole rollout
    # A retrained, better model moves the score distribution too (PSI 0.6 against its predecessor in the demo),
    # so PSI is only a gross guard (a broken or inverted model: > 3); in shadow, where both score the same rows,
    # the candidate must take the same decision as Production on at least min_agreement of them.
    max_psi: float = 1.0
    min_agreement: float = 0.8
    max_latency_ratio: float = 1.5  # canary P95 / Production P95 above which (significantly) it is rolled back
    max_quality_drop: float = 0.05  # realised accuracy drop (absolute) tolerated before a rollback

    def __post_init__(self) -> None:
        if self.min_samples < 1 or self.min_step_s < 0 or self.max_step_s < self.min_step_s:
            raise ValueError("policy: min_samples >= 1, 0 <= min_step_s <= max_step_s")
        if (not 0 < self.alpha < 1 or self.max_psi <= 0 or self.max_latency_ratio <= 1
                or not 0 < self.max_quality_drop < 1 or not 0 <= self.min_agreement <= 1):
            raise ValueError("policy: 0 < alpha < 1, max_psi > 0, max_latency_ratio > 1, 0 < max_quality_drop < 1, "
                             "0 <= min_agreement <= 1")


@dataclass(frozen=True)
class RolloutState:
    id: str
    model: str
    candidate: str
    baseline: str
    steps: tuple[int, ...] = DEFAULT_STEPS
    step_index: int = 0
    status: str = "running"
    started_at: str = ""
    step_started_at: str = ""
    previous_step_started_at: str = ""  # the 100 % step compares with Production's arm of the step before
    updated_at: str = ""
    actor: str = ""
    reason: str = ""
    policy: Policy = field(default_factory=Policy)
    kind: str = "rollout"  # or "experiment": the split is held until `registry experiment conclude`
    experiment: dict[str, Any] = field(default_factory=dict)  # metric, design, planned sample per arm

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def step(self) -> int:
        return self.steps[self.step_index]

    @property
    def share(self) -> float:
        """The candidate's share of live traffic now (0 in shadow and once the rollout ended)."""
        return self.step / 100 if self.active else 0.0

    @property
    def shadow(self) -> bool:
        return self.active and self.step == SHADOW

    @property
    def last_step(self) -> bool:
        return self.step_index == len(self.steps) - 1

    @property
    def step_key(self) -> str:
        """What each prediction served under this step carries (``rollout`` in the event): the controller counts
        only those, so a replica still on the step before cannot skew the comparison or the split."""
        return step_key(self.id, self.step_index)

    def to_tag(self) -> str:
        body = asdict(self)
        body["steps"] = list(self.steps)
        return json.dumps(body, sort_keys=True)

    @classmethod
    def from_tag(cls, text: str) -> RolloutState:
        try:
            body: dict[str, Any] = json.loads(text)
            policy = Policy(**body.pop("policy", {}))
            state = cls(**{**body, "steps": tuple(body["steps"]), "policy": policy})
            check_steps(state.steps)
        except (ValueError, TypeError, KeyError) as exc:
            raise RolloutStateError(f"unreadable rollout state: {exc}") from None
        if (state.status not in STATUSES or not 0 <= state.step_index < len(state.steps)
                or state.kind not in ("rollout", "experiment")):
            raise RolloutStateError(f"unreadable rollout state: status {state.status!r}, step {state.step_index}")
        return state

    def moved(self, **changes: Any) -> RolloutState:
        return replace(self, **changes)
