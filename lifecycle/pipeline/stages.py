"""What each pipeline stage does. A stage reads and extends the run's context, logs what it did, and
raises :class:`StageFailed` with a reason when the pipeline must stop."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lifecycle import data as datamod
from lifecycle import model_store, train
from lifecycle.onnx_export import ParityError
from lifecycle.pipeline.compute import Compute
from lifecycle.pipeline.validator import DEFAULT_MIN_IMPROVEMENT, THRESHOLD_KEYS
from lifecycle.registry import Registry, RegistryError, check_metrics, register_stage
from lifecycle.tracking import TrainingRun
from mlops import offline
from mlops.schema import ENTITY, LABEL, MODEL_FEATURES, STORE_FEATURES, TIMESTAMP
from mlops.settings import Settings

log = logging.getLogger("pipeline")


class StageFailed(RuntimeError):
    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"stage {stage!r} failed: {reason}")
        self.stage = stage
        self.reason = reason


@dataclass
class Context:
    model_name: str
    registry: Registry
    run: TrainingRun
    settings: Settings
    version: str | None = None
    data_dir: Path | None = None
    compute: Compute = field(default_factory=Compute)
    values: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def fetch_data(ctx: Context, params: dict[str, Any]) -> str:
    """``synthetic`` (seeded), ``parquet`` (a data folder) or ``feast``: the transactions of the Feast repo's data
    folder, joined point-in-time with ``customer_stats`` by Feast's offline store."""
    source, joined = params.get("source", "synthetic"), ""
    if source == "synthetic":
        ctx.values["dataset"] = datamod.generate(int(params.get("customers", 2_000)),
                                                 int(params.get("transactions", 40_000)), int(params.get("seed", 42)))
    elif source in ("parquet", "feast"):
        repo = Path(params.get("feature_repo") or ctx.settings.feature_repo)
        path = ctx.data_dir or Path(params.get("path") or repo / "data")
        try:
            ctx.values["dataset"] = datamod.read(path)
        except FileNotFoundError as exc:
            raise StageFailed("fetch-data", f"no data at {path} ({exc.filename})") from None
        except datamod.DataError as exc:
            raise StageFailed("fetch-data", str(exc)) from None
        if source == "feast":
            try:
                ctx.values["frame"], joined = ctx.compute.join(repo, ctx.values["dataset"].transactions,
                                                               ctx.settings.redis_address)
            except offline.OfflineStoreError as exc:
                raise StageFailed("fetch-data", str(exc)) from None
            ctx.run.set_tags({"point_in_time_join.how": joined})
    else:
        raise StageFailed("fetch-data", f"unknown source {source!r} (synthetic, parquet or feast)")
    d = ctx.values["dataset"]
    ctx.run.set_tags({"data_source": source, "point_in_time_join": "feast" if source == "feast" else "pandas"})
    return (f"{d.customers[ENTITY].nunique()} customers ({len(d.customers)} snapshots), {len(d.transactions)} "
            f"transactions from {source}" + (f", features joined point-in-time by Feast's definition ({joined})"
                                             if source == "feast" else ""))


def validate_data(ctx: Context, params: dict[str, Any]) -> str:
    d: datamod.Dataset = ctx.values["dataset"]
    expected = {"customers": [ENTITY, *STORE_FEATURES, TIMESTAMP],
                "transactions": [ENTITY, "transaction_amount", LABEL, TIMESTAMP]}
    for table, columns in expected.items():
        frame = getattr(d, table)
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise StageFailed("validate", f"{table} lacks columns {missing}")
        if frame.empty:
            raise StageFailed("validate", f"{table} has no rows")
        max_nulls = float(params.get("max_null_fraction", 0.0))
        for column in columns:
            share = float(frame[column].isna().mean())
            if share > max_nulls:
                raise StageFailed("validate", f"{table}.{column} is {share:.1%} null (max {max_nulls:.1%})")
    numeric = {**{c: d.customers[c] for c in STORE_FEATURES},
               "transaction_amount": d.transactions["transaction_amount"], LABEL: d.transactions[LABEL]}
    for column, series in numeric.items():
        if not np.issubdtype(series.dtype, np.number):
            raise StageFailed("validate", f"{column} is {series.dtype}, not numeric")
    for column, bounds in (params.get("ranges") or {}).items():
        if column not in numeric:
            raise StageFailed("validate", f"range given for unknown column {column!r}")
        low, high = bounds
        bad = numeric[column][(numeric[column] < low) | (numeric[column] > high)]
        if len(bad):
            raise StageFailed("validate", f"{len(bad)} values of {column} outside [{low}, {high}], "
                              f"e.g. {bad.iloc[0]!r}")
    if set(np.unique(d.transactions[LABEL])) - {0, 1}:
        raise StageFailed("validate", f"{LABEL} must be 0/1")
    orphans = ~d.transactions[ENTITY].isin(d.customers[ENTITY])
    if orphans.any():
        raise StageFailed("validate", f"{int(orphans.sum())} transactions name unknown customers")
    return f"schema, nulls and {len(params.get('ranges') or {})} ranges OK"


def preprocess(ctx: Context, params: dict[str, Any]) -> str:
    holdout = float(params.get("holdout", 0.25))
    if not 0 < holdout < 1:
        raise StageFailed("preprocess", f"holdout must be in (0, 1), got {holdout}")
    frame = ctx.values.get("frame")
    if frame is None:
        frame = datamod.training_frame(ctx.values["dataset"])
    labelled = ctx.values.get("labelled")
    if labelled is not None and len(labelled):  # recent served traffic with its outcomes (a retrain's)
        frame = pd.concat([frame[[*MODEL_FEATURES, LABEL]], labelled[[*MODEL_FEATURES, LABEL]]], ignore_index=True)
        ctx.run.log_metrics({"labelled_rows": float(len(labelled))})
    x_tr, x_te, y_tr, y_te = train.split_frame(frame, holdout, int(params.get("seed", 0)))
    ctx.values.update(x_train=x_tr, x_holdout=x_te, y_train=y_tr, y_holdout=y_te)
    return (f"{len(y_tr)} train / {len(y_te)} holdout rows, fraud rate {y_tr.mean():.3f}"
            + (f" ({len(labelled)} of them recent logged rows with outcomes)" if labelled is not None else ""))


def fit(ctx: Context, params: dict[str, Any]) -> str:
    if "x_train" not in ctx.values:
        preprocess(ctx, {})
    ctx.values["params"] = params
    ctx.values["estimator"] = ctx.compute.fit(ctx.values["x_train"], ctx.values["y_train"], params)
    ctx.run.log_params({**train.DEFAULT_PARAMS, **params})
    return f"GradientBoostingClassifier {params}" + (" (a Ray task)" if ctx.compute.engine == "ray" else "")


def evaluate(ctx: Context, params: dict[str, Any]) -> str:
    try:
        onnx_bytes, metrics = train.evaluate(ctx.values["estimator"], ctx.values["x_holdout"],
                                             ctx.values["y_holdout"], float(params.get("parity_tolerance", 1e-5)))
    except ParityError as exc:
        raise StageFailed("evaluate", str(exc)) from None
    metrics["n_train"] = int(len(ctx.values["y_train"]))
    ctx.values.update(onnx_bytes=onnx_bytes, metrics=metrics)
    ctx.summary["metrics"] = metrics
    ctx.run.log_metrics(metrics)
    outcome = (f"auc={metrics['auc']:.4f} accuracy={metrics['accuracy']:.4f} "
               f"onnx parity={metrics['onnx_parity_max_abs_diff']:.2e}")
    gate_params = params.get("gate") if isinstance(params.get("gate"), dict) else params
    if any(k in gate_params for k in (*THRESHOLD_KEYS, "compare_to_production")):  # the reference's gate in evaluate
        outcome += f"; gate {gate(ctx, gate_params)}"
    return outcome


def gate(ctx: Context, params: dict[str, Any]) -> str:
    """Absolute thresholds, then (``compare_to_production``) beating Production's AUC on the same holdout by at
    least ``min_improvement`` (default 0.005), so a retrain on identical data does not pass by +0.0000."""
    metrics = ctx.values["metrics"]
    for key in ("auc", "accuracy"):
        floor = params.get(f"min_{key}")
        if floor is not None and metrics[key] < float(floor):
            ctx.run.set_tags({"gate": "blocked"})
            raise StageFailed("gate", f"{key} {metrics[key]:.4f} is below the threshold {float(floor):.4f}")
    notes = []
    production = ctx.registry.production(ctx.model_name)
    if params.get("compare_to_production", False) and production is not None:
        margin = float(params.get("min_improvement", DEFAULT_MIN_IMPROVEMENT))
        stored = model_store.load(ctx.model_name, production.version, ctx.registry.backend)
        prod_metrics = train.score_metrics(ctx.values["y_holdout"],
                                           ctx.compute.score(stored.onnx_path.read_bytes(), ctx.values["x_holdout"]))
        ctx.summary["production"] = {"version": production.version, **prod_metrics}
        ctx.run.log_metrics({"production_auc": prod_metrics["auc"],
                             "auc_improvement": metrics["auc"] - prod_metrics["auc"]})
        if metrics["auc"] < prod_metrics["auc"] + margin:
            ctx.run.set_tags({"gate": "blocked"})
            raise StageFailed("gate", f"candidate auc {metrics['auc']:.4f} does not beat Production "
                              f"{production.version} ({prod_metrics['auc']:.4f}) by {margin} on the same holdout "
                              f"({metrics['auc'] - prod_metrics['auc']:+.4f})")
        notes.append(f"beats Production {production.version} (auc {prod_metrics['auc']:.4f}) by "
                     f"{metrics['auc'] - prod_metrics['auc']:+.4f} (min {margin})")
    elif params.get("compare_to_production", False):
        notes.append("no Production version yet: absolute thresholds only")
    ctx.run.set_tags({"gate": "passed"})
    return "passed" + (f"; {'; '.join(notes)}" if notes else "")


def register(ctx: Context, params: dict[str, Any]) -> str:
    v = ctx.values
    stage = str(params.get("stage", "staging"))
    try:  # before the model is stored: a refused stage must not use up the version label
        register_stage("None" if stage.lower() == "production" else stage)
        check_metrics(v["metrics"])
    except RegistryError as exc:
        raise StageFailed("register", str(exc)) from None
    trained = train.assemble(v["estimator"], v["onnx_bytes"], v["metrics"], v["params"],
                             v["x_train"], v["x_holdout"], v["y_train"], v["y_holdout"])
    ctx.run.set_tags({"training_data_hash": trained.data_hash})
    stored = train.register(trained, ctx.model_name, ctx.version, run=ctx.run)
    meta = stored.metadata
    version = ctx.registry.register(ctx.model_name, stored.version, meta["metrics"], meta["params"],
                                    meta["training_data_hash"], meta.get("git_commit"),
                                    stage="None" if stage.lower() == "production" else stage)
    if stage.lower() == "production":
        version = ctx.registry.promote(ctx.model_name, stored.version, "production", "pipeline")
    ctx.summary["registered"] = {"version": version.version, "stage": version.stage,
                                 "mlflow_model_version": version.mlflow_version, "mlflow_run_id": ctx.run.run_id}
    return f"{version.name}:{version.version} stored and registered in {version.stage}"


STAGES = {
    "fetch-data": fetch_data,
    "validate": validate_data,
    "preprocess": preprocess,
    "train": fit,
    "evaluate": evaluate,
    "gate": gate,
    "register": register,
}
