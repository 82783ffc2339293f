"""When an alert may start a retrain: the guard rails of ``pipeline.yaml``'s ``retraining:`` section, and the one
function that applies them to an alert and the decisions already on record.

    retraining:
      triggers:                       # alert type, and the severities that count (default: critical)
        - {type: drift_alert, severity: [critical]}
        - {type: performance_alert, severity: [critical]}
        - {type: skew_alert, severity: [warning, critical]}
      cooldown: 6h                    # after a retrain started, alerts within this only go on record
      max_alert_age: 1h               # older alerts (a backlog a new controller reads) start nothing
      max_per_day: 3                  # retrains started in any 24 hours
      circuit_breaker: 3              # this many failed candidates in a row stop retraining until a reset
      dry_run: false                  # decide and record, never train
      rollout_steps: [0, 5, 25, 50, 100]
      rollout_policy: {min_samples: 500, min_step_s: 60}   # the rollout's Policy (mlops.rollout), as a person's
      window_gate:                    # the candidate against Production on recent labelled traffic
        window: 7d                    # logged predictions of the last 7 days that have their outcome
        gate_share: 0.5               # the newest half judged on (kept out of training), the rest trained on
        min_labels: 200               # fewer labelled rows judged on: too_few_labels decides
        min_accuracy: 0.85            # the candidate's accuracy there
        min_improvement: 0.0          # the lower end of the interval of (candidate − Production)
        confidence: 0.95
        too_few_labels: holdout       # holdout: the pipeline's own gate alone; block: no rollout
        wait_for_labels: 0s           # wait up to this long for min_labels judged rows from after the alert

The rails are checked in a fixed order, and the first that holds names the decision's reason, so the record
says why an alert did not retrain in words an operator can act on.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from mlops.rollout import DEFAULT_STEPS, Policy, check_steps

SPAN = re.compile(r"(?P<n>\d+(?:\.\d+)?)(?P<unit>[smhd]?)")
UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
ALERT_TYPES = ("drift_alert", "performance_alert", "skew_alert")
SEVERITIES = ("warning", "critical")
KEYS = {"triggers", "cooldown", "max_per_day", "circuit_breaker", "dry_run", "rollout_steps", "window_gate",
        "max_alert_age", "rollout_policy"}
GATE_KEYS = {"window", "gate_share", "min_labels", "min_accuracy", "min_improvement", "confidence",
             "too_few_labels", "wait_for_labels"}
FAILED = ("gate_blocked", "failed", "interrupted", "rolled_back")  # candidate outcomes the circuit breaker counts
# neither: the controller was stopped, the compute (a Ray cluster) was out of reach, a person aborted the rollout
NEUTRAL = ("stopped", "unavailable", "rollout_aborted")
CUT_SHORT = ("interrupted", "stopped", "unavailable")  # retrains that made no candidate: their alert is open again
DAY_S = 86_400.0


class PolicyError(ValueError):
    """``retraining:`` cannot be read; the message names the field."""


@dataclass(frozen=True)
class Trigger:
    type: str
    severities: tuple[str, ...] = ("critical",)

    def matches(self, alert: dict[str, Any]) -> bool:
        return alert.get("type") == self.type and alert.get("severity") in self.severities


@dataclass(frozen=True)
class WindowGate:
    """The candidate against Production on the recent labelled window: logged predictions with the outcomes
    that arrived. The newest ``gate_share`` of it (by prediction time) is kept out of training and judged on;
    the candidate passes when its accuracy there is at least ``min_accuracy`` and the lower end of the
    ``confidence`` interval of (candidate − Production) is at least ``min_improvement``."""

    window_s: float = 7 * 86400.0
    gate_share: float = 0.5
    min_labels: int = 200  # labelled rows in the judged share; fewer: ``too_few_labels`` decides
    min_accuracy: float = 0.85
    min_improvement: float = 0.0
    confidence: float = 0.95
    too_few_labels: str = "holdout"  # "holdout": the pipeline's own gate decides alone; "block"
    # A drift alert comes before the labels of the traffic it is about: a retrain then would learn nothing new,
    # and be judged on traffic from before the change. With a wait, the retrain (its claim held) waits until the
    # judged share holds ``min_labels`` rows predicted after the alert, or the wait is over.
    wait_for_labels_s: float = 0.0

    @classmethod
    def from_section(cls, section: Any) -> WindowGate:
        if not isinstance(section, dict):
            raise PolicyError("retraining.window_gate: must be a mapping")
        if unknown := sorted(set(section) - GATE_KEYS):
            raise PolicyError(f"retraining.window_gate: unknown field(s) {', '.join(unknown)}")
        values: dict[str, Any] = {}
        if "window" in section:
            values["window_s"] = span_s(section["window"], "retraining.window_gate.window")
        if "wait_for_labels" in section:
            values["wait_for_labels_s"] = span_s(section["wait_for_labels"], "retraining.window_gate.wait_for_labels")
        for key, low, high, inside in (("gate_share", 0, 1, True), ("confidence", 0, 1, True),
                                       ("min_accuracy", 0, 1, False), ("min_improvement", -1, 1, False)):
            if key in section:
                value = section[key]
                number = isinstance(value, int | float) and not isinstance(value, bool)
                if not number or not (low < value < high if inside else low <= value <= high):
                    bounds = f"between {low} and {high}" + (" (not either)" if inside else "")
                    raise PolicyError(f"retraining.window_gate.{key}: {value!r} is not {bounds}")
                values[key] = float(value)
        if "min_labels" in section:
            if not isinstance(section["min_labels"], int) or isinstance(section["min_labels"], bool) \
                    or section["min_labels"] < 2:
                raise PolicyError(f"retraining.window_gate.min_labels: {section['min_labels']!r} is not a whole "
                                  "number of at least 2")
            values["min_labels"] = section["min_labels"]
        if "too_few_labels" in section:
            if section["too_few_labels"] not in ("holdout", "block"):
                raise PolicyError(f"retraining.window_gate.too_few_labels: {section['too_few_labels']!r} is not "
                                  "holdout or block")
            values["too_few_labels"] = section["too_few_labels"]
        return cls(**values)


@dataclass(frozen=True)
class RetrainPolicy:
    triggers: tuple[Trigger, ...] = (Trigger("drift_alert"), Trigger("performance_alert"),
                                     Trigger("skew_alert", ("warning", "critical")))
    cooldown_s: float = 6 * 3600.0
    max_per_day: int = 3
    circuit_breaker: int = 3
    dry_run: bool = False
    rollout_steps: tuple[int, ...] = DEFAULT_STEPS
    window_gate: WindowGate = WindowGate()
    rollout_policy: Policy = Policy()  # how the started rollout judges its steps
    max_alert_age_s: float = 3600.0  # older alerts (a backlog read by a new controller) start nothing

    def triggered_by(self, alert: dict[str, Any], now: float | None = None) -> bool:
        """A firing alert of a configured type and severity, at most ``max_alert_age_s`` old (a resolution
        never retrains; an alert without a readable time counts as new)."""
        if alert.get("status") != "firing" or not any(t.matches(alert) for t in self.triggers):
            return False
        at = alert_time(alert)
        return at is None or (time.time() if now is None else now) - at <= self.max_alert_age_s

    @classmethod
    def from_section(cls, section: dict[str, Any] | None) -> RetrainPolicy:
        if section is None:
            return cls()
        if not isinstance(section, dict):
            raise PolicyError("retraining: must be a mapping")
        if unknown := sorted(set(section) - KEYS):
            raise PolicyError(f"retraining: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(KEYS))})")
        values: dict[str, Any] = {}
        if "triggers" in section:
            values["triggers"] = tuple(_trigger(t) for t in _list(section["triggers"], "triggers"))
            if not values["triggers"]:
                raise PolicyError("retraining.triggers: empty (no alert could start a retrain; use dry_run to "
                                  "watch without training)")
        if "cooldown" in section:
            values["cooldown_s"] = span_s(section["cooldown"], "retraining.cooldown")
        if "max_alert_age" in section:
            values["max_alert_age_s"] = span_s(section["max_alert_age"], "retraining.max_alert_age")
        for key in ("max_per_day", "circuit_breaker"):
            if key in section:
                value = section[key]
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise PolicyError(f"retraining.{key}: {value!r} is not a whole number of at least 1")
                values[key] = value
        if "dry_run" in section:
            if not isinstance(section["dry_run"], bool):
                raise PolicyError(f"retraining.dry_run: {section['dry_run']!r} is not true or false")
            values["dry_run"] = section["dry_run"]
        if "rollout_steps" in section:
            steps = tuple(_list(section["rollout_steps"], "rollout_steps"))
            if not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
                raise PolicyError(f"retraining.rollout_steps: {list(steps)!r} are not whole percentages")
            try:
                check_steps(steps)
            except ValueError as exc:
                raise PolicyError(f"retraining.rollout_steps: {exc}") from None
            values["rollout_steps"] = steps
        if "window_gate" in section:
            values["window_gate"] = WindowGate.from_section(section["window_gate"])
        if "rollout_policy" in section:
            values["rollout_policy"] = _rollout_policy(section["rollout_policy"])
        return cls(**values)


def _rollout_policy(section: Any) -> Policy:
    if not isinstance(section, dict):
        raise PolicyError("retraining.rollout_policy: must be a mapping")
    known = [f.name for f in fields(Policy)]
    if unknown := sorted(set(section) - set(known)):
        raise PolicyError(f"retraining.rollout_policy: unknown field(s) {', '.join(unknown)} "
                          f"(known: {', '.join(known)})")
    for key, value in section.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise PolicyError(f"retraining.rollout_policy.{key}: {value!r} is not a number")
    if not isinstance(section.get("min_samples", 1), int):
        raise PolicyError(f"retraining.rollout_policy.min_samples: {section['min_samples']!r} is not a whole number")
    try:
        return Policy(**{k: int(v) if k == "min_samples" else float(v) for k, v in section.items()})
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"retraining.rollout_{exc}") from None


@dataclass(frozen=True)
class Past:
    """A decision on record, as the rails read it."""

    alert_id: str
    action: str  # "retrain", "skip", "dry_run", "reset"
    outcome: str  # for a retrain: "running", "rollout_started" → "promoted" | "rolled_back" | "rollout_aborted",
    #               "gate_blocked", "failed", "interrupted" (its controller died), "stopped", "unavailable"
    at: float  # when it was decided (epoch seconds)


@dataclass(frozen=True)
class Verdict:
    action: str  # "retrain", "skip" or "dry_run"
    reason: str
    rail: str = ""  # the guard rail that held, for metrics ("cooldown", "max_per_day", ...)
    details: dict[str, Any] = field(default_factory=dict)


def decide(policy: RetrainPolicy, history: Sequence[Past], now: float, rollout: str | None = None) -> Verdict:
    """What to do about a triggering alert, given the decisions on record (newest first) and the model's active
    rollout (its id, or None)."""
    retrains = [p for p in history if p.action == "retrain"]
    if running := [p for p in retrains if p.outcome == "running"]:
        return Verdict("skip", f"a retrain is running (alert {running[0].alert_id})", "running")
    failures = 0
    for p in history:  # newest first: failed candidates since the last success or reset
        if p.action == "reset" or (p.action == "retrain" and p.outcome not in FAILED + NEUTRAL):
            break
        failures += p.action == "retrain" and p.outcome in FAILED
    if failures >= policy.circuit_breaker:
        return Verdict("skip", f"circuit breaker open: the last {failures} candidates failed (limit "
                               f"{policy.circuit_breaker}); `registry retrain reset --name <model>` closes it",
                       "circuit_breaker", {"failures": failures})
    if rollout:
        return Verdict("skip", f"rollout {rollout} is in progress: never two at once", "rollout_active")
    # A retrain cut short (its controller died or stopped) made no candidate: the next attempt is not held back.
    retrains = [p for p in retrains if p.outcome not in CUT_SHORT]
    if retrains and now - retrains[0].at < policy.cooldown_s:
        left = policy.cooldown_s - (now - retrains[0].at)
        return Verdict("skip", f"cooldown: the last retrain started {now - retrains[0].at:.0f} s ago "
                               f"(cooldown {policy.cooldown_s:.0f} s, {left:.0f} s left)", "cooldown")
    today = [p for p in retrains if now - p.at < DAY_S]
    if len(today) >= policy.max_per_day:
        return Verdict("skip", f"{len(today)} retrains in the last 24 h (max_per_day {policy.max_per_day})",
                       "max_per_day")
    if policy.dry_run:
        return Verdict("dry_run", "dry run: this alert would start a retrain", "dry_run")
    return Verdict("retrain", "guard rails passed")


def alert_time(alert: dict[str, Any]) -> float | None:
    """The alert's own time (epoch seconds), None when it has none that reads."""
    try:
        return datetime.fromisoformat(str(alert["timestamp"])).timestamp()
    except (KeyError, ValueError):
        return None


def span_s(value: Any, where: str) -> float:
    """Seconds from a number or a span (``90s``, ``30m``, ``6h``, ``1d``)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str) and (m := SPAN.fullmatch(value.strip())):
        return float(m["n"]) * UNIT_S[m["unit"]]
    raise PolicyError(f"{where}: {value!r} is not a span like 90s, 30m, 6h, 1d")


def _list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise PolicyError(f"retraining.{key}: must be a list")
    return value


def _trigger(value: Any) -> Trigger:
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict) or set(value) - {"type", "severity"}:
        raise PolicyError(f"retraining.triggers: {value!r} is not {{type: ..., severity: [...]}}")
    kind = value.get("type")
    if kind not in ALERT_TYPES:
        raise PolicyError(f"retraining.triggers: unknown alert type {kind!r} (one of {', '.join(ALERT_TYPES)})")
    severities = value.get("severity", ["critical"])
    severities = [severities] if isinstance(severities, str) else severities
    if not isinstance(severities, list) or not severities or set(severities) - set(SEVERITIES):
        raise PolicyError(f"retraining.triggers: severity {value.get('severity')!r} (of {', '.join(SEVERITIES)})")
    return Trigger(kind, tuple(severities))
