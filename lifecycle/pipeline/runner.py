"""Runs a validated pipeline stage by stage, as one MLflow run; the first failed stage stops it with its reason.

The run carries the pipeline's name, every stage's outcome and duration, the training parameters and holdout
metrics, the gate's verdict, and (when the gate passed) the registered model; a stopped pipeline leaves a
FAILED run that says which stage stopped it and why.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from lifecycle.pipeline.compute import Compute
from lifecycle.pipeline.definition import Pipeline
from lifecycle.pipeline.stages import STAGES, Context, StageFailed
from lifecycle.registry import Registry
from lifecycle.tracking import training_run
from mlops.settings import Settings

log = logging.getLogger("pipeline")


def run(pipeline: Pipeline, registry: Registry, version: str | None = None, data_dir: Path | None = None,
        model_name: str | None = None, settings: Settings | None = None,
        tags: dict[str, str] | None = None, labelled: Any = None, compute: Compute | None = None) -> dict[str, Any]:
    """Returns a summary; raises :class:`StageFailed` for the stage that stopped the run. ``tags`` go on the run
    (the retraining controller links its decision this way); ``labelled``: recent logged rows with their true
    labels, trained on beside the fetched data; ``compute``: where the heavy stages run (default: the
    pipeline's ``compute:`` section with ``MLOPS_RAY_ADDRESS`` over it)."""
    name = model_name or pipeline.model_name
    settings = settings or Settings.load()
    compute = compute or Compute.resolve(pipeline.raw.get("compute"), address=settings.ray_address)
    tags = {"pipeline": pipeline.name, "model_name": name, "compute": compute.engine, **(tags or {})}
    with compute.session(), training_run(registry.backend, f"pipeline {pipeline.name}", tags) as tracked:
        ctx = Context(model_name=name, registry=registry, run=tracked, settings=settings, version=version,
                      data_dir=data_dir, compute=compute)
        if labelled is not None:
            ctx.values["labelled"] = labelled
        ctx.summary.update(pipeline=pipeline.name, mlflow_run_id=tracked.run_id, stages=[])
        for stage in pipeline.execution_order():
            started = time.perf_counter()
            log.info("stage %s: started", stage.name)
            try:
                outcome = STAGES[stage.kind](ctx, stage.params)
            except StageFailed as exc:
                log.error("stage %s: FAILED: %s", stage.name, exc.reason)
                ctx.summary["stages"].append({"stage": stage.name, "status": "failed", "reason": exc.reason})
                tracked.set_tags({"failed_stage": stage.name, "failure_reason": exc.reason[:4000]})
                exc.summary = ctx.summary  # type: ignore[attr-defined]
                raise
            seconds = time.perf_counter() - started
            log.info("stage %s: done in %.2fs: %s", stage.name, seconds, outcome)
            tracked.log_metrics({f"seconds_{stage.kind}": seconds})
            tracked.set_tags({f"stage.{stage.kind}": outcome[:4000]})
            ctx.summary["stages"].append({"stage": stage.name, "status": "ok", "seconds": round(seconds, 3),
                                          "outcome": outcome})
    return ctx.summary
