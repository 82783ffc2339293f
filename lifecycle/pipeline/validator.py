"""`pipeline validate`: completeness, stage order, the evaluation gate and rollback, with stable codes.

Errors: MISSING_STAGE, UNKNOWN_STAGE, DUPLICATE_STAGE, STAGE_TYPE_MISMATCH, STAGE_ORDER, MISSING_GATE,
GATE_NO_THRESHOLD, INVALID_THRESHOLD, INVALID_ROLLBACK.
Warnings: MISSING_TRANSFORM, LOW_THRESHOLD, NO_PRODUCTION_COMPARISON, REGISTER_TO_PRODUCTION,
MISSING_ROLLBACK, ROLLBACK_DISABLED, UNKNOWN_FIELD.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lifecycle.pipeline.definition import KNOWN_STAGES, REQUIRED_STAGES, STAGE_TYPES, TOP_LEVEL_KEYS, Pipeline

DEFAULT_MIN_SCORE = 0.85
ROLLBACK_STRATEGIES = ("previous_production",)


@dataclass(frozen=True)
class Finding:
    level: str  # "error" | "warning"
    code: str
    message: str
    stage: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def validate(pipeline: Pipeline, strict: bool = False) -> list[Finding]:
    found: list[Finding] = []

    def error(code: str, message: str, stage: str | None = None) -> None:
        found.append(Finding("error", code, message, stage))

    def warning(code: str, message: str, stage: str | None = None) -> None:
        found.append(Finding("warning", code, message, stage))

    for key in sorted(set(pipeline.raw) - TOP_LEVEL_KEYS):
        warning("UNKNOWN_FIELD", f"unknown top-level field {key!r} is ignored")
    names = [s.name for s in pipeline.stages]
    for name in sorted({n for n in names if names.count(n) > 1}):
        error("DUPLICATE_STAGE", f"stage {name!r} appears {names.count(name)} times", name)
    for stage in pipeline.stages:
        if stage.name not in KNOWN_STAGES:
            error("UNKNOWN_STAGE", f"stage {stage.name!r} is not one the runner knows ({', '.join(KNOWN_STAGES)})",
                  stage.name)
        elif stage.type != KNOWN_STAGES[stage.name]:
            error("STAGE_TYPE_MISMATCH", f"stage {stage.name!r} has type {stage.type!r}, "
                  f"expected {KNOWN_STAGES[stage.name]!r}", stage.name)
    for name in REQUIRED_STAGES:
        if name not in names and name != "gate":
            error("MISSING_STAGE", f"required stage {name!r} is missing", name)
    if "preprocess" not in names:
        warning("MISSING_TRANSFORM", "no 'preprocess' stage: the runner's default split (25 % holdout) is used")

    # Order: data → transform → train → evaluate → deploy, and evaluate → gate → register.
    rank = {t: i for i, t in enumerate(STAGE_TYPES)}
    last = None
    for stage in pipeline.stages:
        if stage.type not in rank:
            continue
        if last is not None and rank[stage.type] < rank[last.type]:
            error("STAGE_ORDER", f"stage {stage.name!r} ({stage.type}) comes after {last.name!r} ({last.type}); "
                  f"order must be {' → '.join(STAGE_TYPES)}", stage.name)
        last = stage if last is None or rank[stage.type] >= rank[last.type] else last
    for before, after in (("validate", "fetch-data"), ("gate", "evaluate"), ("register", "gate")):
        if before in names and after in names and names.index(before) < names.index(after):
            error("STAGE_ORDER", f"stage {before!r} must come after {after!r}", before)

    gate = pipeline.stage("gate")
    if gate is None:
        error("MISSING_GATE", "no 'gate' stage: nothing stops a worse model from being registered")
    else:
        thresholds = {k: gate.params[k] for k in ("min_auc", "min_accuracy") if k in gate.params}
        if not thresholds:
            error("GATE_NO_THRESHOLD", "the gate sets neither min_auc nor min_accuracy", "gate")
        for key, value in thresholds.items():
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= 1:
                error("INVALID_THRESHOLD", f"{key} must be a number in (0, 1], got {value!r}", "gate")
            elif value < DEFAULT_MIN_SCORE:
                warning("LOW_THRESHOLD", f"{key} {value} is below the recommended {DEFAULT_MIN_SCORE}", "gate")
        if not gate.params.get("compare_to_production", False):
            warning("NO_PRODUCTION_COMPARISON", "the gate does not compare the candidate with Production", "gate")
    register = pipeline.stage("register")
    if register is not None and str(register.params.get("stage", "staging")).lower() == "production":
        warning("REGISTER_TO_PRODUCTION", "registering straight into production skips staging", "register")

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
