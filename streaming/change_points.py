"""Change points on the drift score stream: when a feature's drift score *level* changes, even below the alert
thresholds.

The threshold rules answer "is the window far from the reference now"; they say nothing when a score that sat
at 0.02 for a day moves to 0.12 and stays there (still under PSI's 0.2), the early sign of a slow drift. An
adaptive change detector on the sequence of scores, one value per evaluation, does: river's Page-Hinkley
(default; a cumulative-sum test for a rise of the mean, ``mode="up"``: a fall is the windows recovering, which
the resolved alerts already say) or ADWIN (adaptive windowing; a change either way). river is the field's
maintained library of streaming detectors; these are its classes, unmodified, one per (model, version, feature).

Scale: each value fed is the metric's score divided by the metric's default threshold (``psi``: 0.2), so 1.0
means "at the drift threshold" for every feature and one detector setting fits all of them.

A detected change becomes a ``drift_change_point`` event on the alerts topic (informational: no state, no
resolution). Every consumer of the group sees the same topic-wide windows and runs its own detectors, so a
claim in Redis (set-if-absent with a time-to-live, :meth:`streaming.alert_state.AlertStates.claim_once`) lets
one event per feature through per ``cooldown_s`` (default: the window length), whichever consumer detects it
first. Detectors live in memory: a restarted consumer starts them afresh (``min_instances`` evaluations
before the first possible detection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from river import drift

from mlops import stattests

Detector = Literal["page_hinkley", "adwin", "off"]
DETECTORS: tuple[str, ...] = ("page_hinkley", "adwin", "off")
Key = tuple[str, str, str]  # model name, version, feature


@dataclass(frozen=True)
class ChangePointConfig:
    detector: Detector = "page_hinkley"
    metric: str = "psi"
    # Page-Hinkley on threshold-scaled scores: a sustained rise of about half the drift threshold is found
    # within a few evaluations; single-evaluation noise of a few percent of it accumulates nothing (delta).
    min_instances: int = 30
    delta: float = 0.05
    threshold: float = 1.0
    adwin_delta: float = 0.002
    cooldown_s: float = 300.0

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ValueError(f"unknown change detector {self.detector!r}; known: {', '.join(DETECTORS)}")
        stattests.get(self.metric)  # ValueError naming the known tests
        if self.min_instances < 1 or self.delta < 0 or self.threshold <= 0 or not 0 < self.adwin_delta < 1:
            raise ValueError("change points: min_instances >= 1, delta >= 0, threshold > 0, 0 < adwin_delta < 1")
        if self.cooldown_s <= 0:
            raise ValueError(f"change points: cooldown_s must be > 0, got {self.cooldown_s}")

    def new_detector(self) -> drift.PageHinkley | drift.ADWIN:
        if self.detector == "adwin":
            return drift.ADWIN(delta=self.adwin_delta)
        return drift.PageHinkley(min_instances=self.min_instances, delta=self.delta, threshold=self.threshold,
                                 mode="up")


class ChangePoints:
    """One river detector per (model, version, feature), fed the scaled score once per evaluation."""

    def __init__(self, config: ChangePointConfig) -> None:
        self.config = config
        self.scale = stattests.get(config.metric).default_threshold
        self.detectors: dict[Key, Any] = {}

    @property
    def enabled(self) -> bool:
        return self.config.detector != "off"

    def update(self, key: Key, scores: dict[str, float]) -> float | None:
        """Feed this evaluation's score; returns the scaled value when the detector signals a change here."""
        value = scores.get(self.config.metric)
        if not self.enabled or value is None or value != value:  # NaN: no evidence either way
            return None
        detector = self.detectors.get(key)
        if detector is None:
            detector = self.detectors[key] = self.config.new_detector()
        scaled = float(value) / self.scale
        detector.update(scaled)
        return scaled if detector.drift_detected else None

