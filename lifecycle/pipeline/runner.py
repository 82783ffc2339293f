"""Runs a validated pipeline stage by stage; the first failed stage stops it with its reason."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from lifecycle.pipeline.definition import Pipeline
from lifecycle.pipeline.stages import STAGES, Context, StageFailed
from lifecycle.registry import Registry

log = logging.getLogger("pipeline")


def run(pipeline: Pipeline, registry: Registry, version: str | None = None, data_dir: Path | None = None,
        model_name: str | None = None) -> dict[str, Any]:
    """Returns a summary; raises :class:`StageFailed` for the stage that stopped the run."""
    ctx = Context(model_name=model_name or pipeline.model_name, registry=registry, version=version,
                  data_dir=data_dir)
    ctx.summary.update(pipeline=pipeline.name, stages=[])
    for stage in pipeline.stages:
        started = time.perf_counter()
        log.info("stage %s: started", stage.name)
        try:
            outcome = STAGES[stage.name](ctx, stage.params)
        except StageFailed as exc:
            log.error("stage %s: FAILED: %s", stage.name, exc.reason)
            ctx.summary["stages"].append({"stage": stage.name, "status": "failed", "reason": exc.reason})
            exc.summary = ctx.summary  # type: ignore[attr-defined]
            raise
        seconds = time.perf_counter() - started
        log.info("stage %s: done in %.2fs: %s", stage.name, seconds, outcome)
        ctx.summary["stages"].append({"stage": stage.name, "status": "ok", "seconds": round(seconds, 3),
                                      "outcome": outcome})
    return ctx.summary
