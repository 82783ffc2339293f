"""`pipeline validate`: completeness, stage order, dependencies, the evaluation gate and rollback, with stable
codes. Reads our vocabulary and the reference tools' (see :mod:`lifecycle.pipeline.definition`).

Errors: MISSING_STAGE, UNKNOWN_STAGE, DUPLICATE_STAGE, STAGE_TYPE_MISMATCH, STAGE_ORDER, MISSING_GATE,
GATE_NO_THRESHOLD, INVALID_THRESHOLD, INVALID_ROLLBACK, UNKNOWN_DEPENDENCY, DEPENDENCY_CYCLE, INVALID_RETRAINING,
INVALID_COMPUTE.
Warnings: MISSING_TRANSFORM, LOW_THRESHOLD, NO_PRODUCTION_COMPARISON, NO_MIN_IMPROVEMENT, REGISTER_TO_PRODUCTION,
MISSING_ROLLBACK, ROLLBACK_DISABLED, UNKNOWN_FIELD.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lifecycle.pipeline.compute import Compute, ComputeError
from lifecycle.pipeline.definition import KNOWN_STAGES, REQUIRED_STAGES, STAGE_TYPES, TOP_LEVEL_KEYS, Pipeline, Stage
from lifecycle.retrain.policy import PolicyError, RetrainPolicy

DEFAULT_MIN_SCORE = 0.85
# Candidate AUC must beat Production's by at least this (a retrain on the same data must not pass by +0.0000).
DEFAULT_MIN_IMPROVEMENT = 0.005
ROLLBACK_STRATEGIES = ("previous_production", "previous_version")
THRESHOLD_KEYS = ("min_auc", "min_accuracy")


@dataclass(frozen=True)
class Finding:
    level: str  # "error" | "warning"
    code: str
    message: str
    stage: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def gate_of(pipeline: Pipeline) -> tuple[Stage, dict[str, Any]] | None:
    """The stage that gates the candidate and its parameters: a ``gate`` stage, or thresholds (``min_auc``,
    ``min_accuracy``, or a ``gate`` mapping) inside ``evaluate``, as the reference writes them."""
    gate = pipeline.stage("gate")
    if gate is not None:
        return gate, gate.params
    evaluate = pipeline.stage("evaluate")
    if evaluate is None:
        return None
    nested = evaluate.params.get("gate")
    if isinstance(nested, dict):
        return evaluate, nested
    if any(k in evaluate.params for k in (*THRESHOLD_KEYS, "compare_to_production")):
        return evaluate, evaluate.params
    return None


def _cycle(pipeline: Pipeline) -> list[str] | None:
    """One dependency cycle (as a list of stage names), or None."""
    graph = {s.name: [d for d in s.depends_on] for s in pipeline.stages}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in graph.get(node, []):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in graph:
        if node not in state and (found := visit(node)):
            return found
    return None


def validate(pipeline: Pipeline, strict: bool = False) -> list[Finding]:
    found: list[Finding] = []

    def error(code: str, message: str, stage: str | None = None) -> None:
        found.append(Finding("error", code, message, stage))

    def warning(code: str, message: str, stage: str | None = None) -> None:
        found.append(Finding("warning", code, message, stage))

    for key in sorted(set(pipeline.raw) - TOP_LEVEL_KEYS):
        warning("UNKNOWN_FIELD", f"unknown top-level field {key!r} is ignored")
    if "retraining" in pipeline.raw:  # the retraining controller's guard rails (lifecycle/retrain/policy.py)
        try:
            RetrainPolicy.from_section(pipeline.raw["retraining"])
        except PolicyError as exc:
            error("INVALID_RETRAINING", str(exc))
    if "compute" in pipeline.raw:  # where the heavy stages run (lifecycle/pipeline/compute.py)
        try:
            Compute.resolve(pipeline.raw["compute"])
        except ComputeError as exc:
            error("INVALID_COMPUTE", str(exc))
    for stage in pipeline.stages:
        for key in stage.extra_keys:
            warning("UNKNOWN_FIELD", f"unknown field {key!r} in stage {stage.name!r} is ignored", stage.name)
    names = [s.name for s in pipeline.stages]
    kinds = [s.kind for s in pipeline.stages]
    for name in sorted({n for n in names if names.count(n) > 1}):
        error("DUPLICATE_STAGE", f"stage {name!r} appears {names.count(name)} times", name)
    for kind in sorted({k for k in kinds if kinds.count(k) > 1 and k in KNOWN_STAGES}):
        same = [s.name for s in pipeline.stages if s.kind == kind]
        if len(set(same)) > 1:
            error("DUPLICATE_STAGE", f"stages {', '.join(map(repr, same))} all mean {kind!r}", same[-1])
    for stage in pipeline.stages:
        if stage.kind not in KNOWN_STAGES:
            error("UNKNOWN_STAGE", f"stage {stage.name!r} is not one the runner knows ({', '.join(KNOWN_STAGES)}, "
                  "or deploy for register)", stage.name)
        elif stage.type != KNOWN_STAGES[stage.kind]:
            error("STAGE_TYPE_MISMATCH", f"stage {stage.name!r} has type {stage.type!r}, "
                  f"expected {KNOWN_STAGES[stage.kind]!r}", stage.name)

    # Dependencies: every name must exist, and they must not loop.
    for stage in pipeline.stages:
        for dep in stage.depends_on:
            if dep not in names:
                error("UNKNOWN_DEPENDENCY", f"stage {stage.name!r} depends on {dep!r}, which is not a stage of this "
                      "pipeline", stage.name)
    cycle = _cycle(pipeline)
    if cycle:
        error("DEPENDENCY_CYCLE", f"depends_on forms a cycle: {' → '.join(cycle)}", cycle[0])

    gate_found = gate_of(pipeline)
    for kind in REQUIRED_STAGES:
        if kind not in kinds and kind != "gate":
            error("MISSING_STAGE", f"required stage {kind!r} is missing", kind)
    if "preprocess" not in kinds:
        warning("MISSING_TRANSFORM", "no 'preprocess' stage: the runner's default split (25 % holdout) is used")

    # Order (as the runner executes: file order, dependencies first): data → transform → train → evaluate →
    # deploy, and fetch-data → validate, evaluate → gate → register.
    order = pipeline.execution_order() if not cycle else pipeline.stages
    rank = {t: i for i, t in enumerate(STAGE_TYPES)}
    last = None
    for stage in order:
        if stage.type not in rank:
            continue
        if last is not None and rank[stage.type] < rank[last.type]:
            error("STAGE_ORDER", f"stage {stage.name!r} ({stage.type}) comes after {last.name!r} ({last.type}); "
                  f"order must be {' → '.join(STAGE_TYPES)}", stage.name)
        last = stage if last is None or rank[stage.type] >= rank[last.type] else last
    position = {s.kind: i for i, s in enumerate(order)}
    for before, after in (("validate", "fetch-data"), ("gate", "evaluate"), ("register", "gate")):
        if before in position and after in position and position[before] < position[after]:
            error("STAGE_ORDER", f"stage {before!r} must come after {after!r}", before)

    if gate_found is None:
        error("MISSING_GATE", "no 'gate' stage and no thresholds in 'evaluate': nothing stops a worse model from "
              "being registered")
    else:
        gate, params = gate_found
        thresholds = {k: params[k] for k in THRESHOLD_KEYS if k in params}
        if not thresholds:
            error("GATE_NO_THRESHOLD", f"the gate ({gate.name}) sets neither min_auc nor min_accuracy", gate.name)
        for key, value in thresholds.items():
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= 1:
                error("INVALID_THRESHOLD", f"{key} must be a number in (0, 1], got {value!r}", gate.name)
            elif value < DEFAULT_MIN_SCORE:
                warning("LOW_THRESHOLD", f"{key} {value} is below the recommended {DEFAULT_MIN_SCORE}", gate.name)
        if not params.get("compare_to_production", False):
            warning("NO_PRODUCTION_COMPARISON", "the gate does not compare the candidate with Production", gate.name)
        else:
            margin = params.get("min_improvement", DEFAULT_MIN_IMPROVEMENT)
            if not isinstance(margin, int | float) or isinstance(margin, bool) or not 0 <= margin < 1:
                error("INVALID_THRESHOLD", f"min_improvement must be a number in [0, 1), got {margin!r}", gate.name)
            elif margin == 0:
                warning("NO_MIN_IMPROVEMENT", "min_improvement is 0: a retrain on the same data passes the "
                        "comparison with Production by +0.0000", gate.name)
    register = pipeline.stage("register")
    if register is not None and str(register.params.get("stage", "staging")).lower() == "production":
        warning("REGISTER_TO_PRODUCTION", "registering straight into production skips staging", register.name)

    if pipeline.rollback is None:
        warning("MISSING_ROLLBACK", "no 'rollback' section: `registry rollback` still works, but the pipeline "
                "does not declare how to undo a release")
    elif not pipeline.rollback.get("enabled", True):
        warning("ROLLBACK_DISABLED", "rollback is disabled")
    elif pipeline.rollback.get("strategy", "previous_production") not in ROLLBACK_STRATEGIES:
        error("INVALID_ROLLBACK", f"unknown rollback strategy {pipeline.rollback.get('strategy')!r}; "
              f"use one of {', '.join(ROLLBACK_STRATEGIES)}")

    if strict:
        found = [Finding("error", f.code, f.message, f.stage) if f.level == "warning" else f for f in found]
    return found
