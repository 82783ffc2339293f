"""Alert rules and the per-(model version, feature) drift state machine.

A feature enters a drifted state (warning or critical) when a rule fires, and leaves it only when no
rule of that severity would fire even with thresholds relaxed by ``resolve_ratio`` (hysteresis), so a
score hovering at a threshold does not flap. Alerts are sent on state changes only, never per event.

A rule reads any score the column has: ``psi``, ``ks``, ``chi2``, ``chi2_pvalue`` and the registry's tests
(:mod:`mlops.stattests`: ``wasserstein``, ``jensen_shannon``, ``cramers_v``, ``kl``, ``hellinger``). The
optional ``tests`` mapping (column -> test names) replaces the automatic choice of extra tests for a column.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from mlops import stattests

Severity = Literal["ok", "warning", "critical"]
SEVERITY_RANK = {"ok": 0, "warning": 1, "critical": 2}
METRICS = ("psi", "ks", "chi2", "chi2_pvalue", *sorted(set(stattests.REGISTRY) - {"psi", "ks"}))


class RulesError(ValueError):
    """The rules file is unreadable or invalid."""


@dataclass(frozen=True)
class Rule:
    metric: str
    threshold: float
    severity: Severity
    op: Literal[">", "<"] = ">"
    columns: tuple[str, ...] | None = None  # None: every column

    def applies_to(self, column: str) -> bool:
        return self.columns is None or column in self.columns

    def fires(self, value: float, relax: float = 1.0) -> bool:
        if self.op == ">":
            return value > self.threshold * relax
        return value < self.threshold / relax


@dataclass(frozen=True)
class Verdict:
    severity: Severity
    rule: Rule | None  # the most severe rule that fired (None when ok)
    value: float | None


@dataclass
class RuleSet:
    rules: list[Rule] = field(default_factory=list)
    min_samples: int = 500
    resolve_ratio: float = 0.8
    # Per column, the registry's tests to score besides PSI/KS/chi-square (mlops.stattests); unlisted columns
    # get the automatic choice by kind and reference size.
    tests: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def default(cls) -> RuleSet:
        """PSI > 0.2 critical, PSI > 0.1 warning, KS > 0.15 warning."""
        return cls(rules=[Rule("psi", 0.2, "critical"), Rule("psi", 0.1, "warning"), Rule("ks", 0.15, "warning")])

    @classmethod
    def load(cls, path: Path) -> RuleSet:
        try:
            text = path.read_text()
            body = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise RulesError(f"cannot read rules file {path}: {exc}") from exc
        return cls.from_dict(body or {}, source=str(path))

    @classmethod
    def from_dict(cls, body: dict, source: str = "rules") -> RuleSet:
        try:
            rules = []
            for raw in body.get("rules", []):
                rule = Rule(metric=raw["metric"], threshold=float(raw["threshold"]), severity=raw["severity"],
                            op=raw.get("op", ">"),
                            columns=tuple(raw["columns"]) if raw.get("columns") else None)
                if rule.metric not in METRICS or rule.severity not in ("warning", "critical") or rule.op not in "<>":
                    raise ValueError(f"invalid rule {raw}")
                if not math.isfinite(rule.threshold):  # NaN never fires: the rule would be silently off
                    raise ValueError(f"threshold must be a finite number in {raw}")
                rules.append(rule)
            tests = {str(column): tuple(names) for column, names in (body.get("tests") or {}).items()}
            for name in {n for names in tests.values() for n in names}:
                stattests.get(name)  # ValueError naming the known tests
            ruleset = cls(rules=rules or cls.default().rules, min_samples=int(body.get("min_samples", 500)),
                          resolve_ratio=float(body.get("resolve_ratio", 0.8)), tests=tests)
        except (KeyError, TypeError, ValueError) as exc:
            raise RulesError(f"{source}: {exc}") from exc
        if ruleset.min_samples < 1 or not 0 < ruleset.resolve_ratio <= 1:
            raise RulesError(f"{source}: min_samples must be >= 1 and 0 < resolve_ratio <= 1")
        return ruleset

    def judge(self, column: str, scores: dict[str, float], current: Severity) -> Verdict:
        strict = self._worst(column, scores, 1.0)
        if SEVERITY_RANK[strict.severity] >= SEVERITY_RANK[current]:
            return strict
        relaxed = self._worst(column, scores, self.resolve_ratio)
        if SEVERITY_RANK[relaxed.severity] >= SEVERITY_RANK[current]:
            return Verdict(current, relaxed.rule, relaxed.value)  # inside the hysteresis band: stay
        return strict

    def _worst(self, column: str, scores: dict[str, float], relax: float) -> Verdict:
        worst = Verdict("ok", None, None)
        for rule in self.rules:
            value = scores.get(rule.metric)
            if value is None or not rule.applies_to(column) or not rule.fires(value, relax):
                continue
            if SEVERITY_RANK[rule.severity] > SEVERITY_RANK[worst.severity]:
                worst = Verdict(rule.severity, rule, value)
        return worst
