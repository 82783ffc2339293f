"""One partition scored: rows checked as the API checks a request, store features as of each row's time from
Feast's offline store (or as logged, for a backfill), the served ONNX graph, one output file written atomically.

A row the API would refuse (no customer, a bad amount) or could not answer (a customer the store had no
snapshot of at that time) goes to ``_rejects/`` with its reason, never silently away: scored + rejected = read.
Store features given in the input (all four, as /predict accepts them) are used as given, like the API does.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lifecycle.batch import inputs, runtimes
from lifecycle.batch.inputs import Partition
from mlops.offline import AsOfJoin, features_as_of, open_store
from mlops.schema import (
    AMOUNT_MAX,
    ENTITY,
    ENTITY_ID_MAX_LENGTH,
    FLOAT32_MAX,
    ID_PATTERN,
    MODEL_FEATURES,
    STORE_FEATURES,
    TIMESTAMP,
)

JOB_FILE = "_job.json"
EMPTY = "_empty"  # a partition whose every row was rejected: a marker, not a part file (no schema to give it)
REJECTS = "_rejects"  # "_" and "." names: not part of the dataset for Parquet readers


@dataclass(frozen=True)
class Job:
    """Everything a worker needs, shipped with each task (a Ray worker on another node has no MLflow cache)."""

    model_name: str
    model_version: str
    onnx: bytes = field(repr=False)
    threshold: float
    output: str
    feature_repo: str = ""
    redis_address: str = "127.0.0.1:6379"
    features: str = "offline"  # "offline": Feast's offline store as of each row's time; "logged": as served
    chunk_rows: int = 65_536
    kafka: dict[str, Any] = field(default_factory=dict, repr=False)  # the log's client settings (secrets too)
    model_threads: int = 1  # model threads per worker: 1 where a worker is a core (Ray), 0 = all cores
    runtime: runtimes.Choice = field(default_factory=lambda: runtimes.Choice("onnxruntime"), repr=False)
    source: str = ""  # what was read, for the job file

    def describe(self) -> dict[str, Any]:
        """What identifies the job's output: a resumed job must be the same job."""
        return {"model_name": self.model_name, "model_version": self.model_version, "features": self.features,
                "threshold": self.threshold, "source": self.source}


@dataclass
class PartitionResult:
    key: str
    read: int = 0
    scored: int = 0
    rejected: int = 0
    skipped: bool = False  # finished by an earlier run
    seconds: float = 0.0
    model_seconds: float = 0.0
    runtime: str = ""  # what scored it: "compiled", or "onnxruntime"
    reasons: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def part_path(job: Job, partition: Partition) -> Path:
    return Path(job.output) / f"part-{partition.key}.parquet"


def score_partition(partition: Partition, job: Job) -> PartitionResult:
    """Score one partition unless its output exists (a finished partition is never redone)."""
    out = part_path(job, partition)
    empty = Path(job.output) / EMPTY / partition.key
    if out.exists() or empty.exists():
        return PartitionResult(partition.key, skipped=True)
    import pyarrow as pa
    import pyarrow.parquet as pq

    started = time.perf_counter()
    result = PartitionResult(partition.key)
    model, result.runtime = _model(job)
    store = offline_features(job) if job.features == "offline" else None
    chunks = (inputs.read_parquet(partition, job.chunk_rows) if partition.path
              else inputs.read_log(partition, job.kafka, job.chunk_rows))
    scored_tmp, rejects_tmp = out.parent / f".{out.name}.tmp", Path(job.output) / REJECTS / f".{out.name}.tmp"
    writer = rejects_writer = None
    try:
        for frame in chunks:
            result.read += len(frame)
            good, bad = check_rows(frame)
            good, unknown = with_store_features(good, job, store)
            # a reject keeps the columns it came with (one schema in every chunk), whichever check refused it
            bad = pd.concat([bad, unknown]).reindex(columns=[*frame.columns, "reject_reason"])
            good = good.drop(columns=["log_error"], errors="ignore")
            if len(good):
                model_started = time.perf_counter()
                good = predict(good, model, job)
                result.model_seconds += time.perf_counter() - model_started
                table = pa.Table.from_pandas(good, preserve_index=False)
                writer = writer or pq.ParquetWriter(scored_tmp, table.schema)
                writer.write_table(table.cast(writer.schema))
                result.scored += len(good)
            if len(bad):
                for reason, n in bad["reject_reason"].value_counts().items():
                    result.reasons[str(reason)] = result.reasons.get(str(reason), 0) + int(n)
                # As text, for people to read, in one schema whatever a chunk held: mixed columns (a bad amount
                # beside the numbers of rows rejected later) by pandas, the rest by Arrow (fast for times).
                bad = bad.astype({c: "string" for c in bad.columns if bad[c].dtype == object})
                table = pa.Table.from_pandas(bad, preserve_index=False)
                table = table.cast(pa.schema([(name, pa.string()) for name in table.column_names]))
                if rejects_writer is None:
                    rejects_tmp.parent.mkdir(parents=True, exist_ok=True)
                    rejects_writer = pq.ParquetWriter(rejects_tmp, table.schema)
                rejects_writer.write_table(table.cast(rejects_writer.schema))
                result.rejected += len(bad)
    except BaseException:
        for w in (writer, rejects_writer):
            if w is not None:
                w.close()
        scored_tmp.unlink(missing_ok=True)
        rejects_tmp.unlink(missing_ok=True)
        raise
    if rejects_writer is not None:
        rejects_writer.close()
        os.replace(rejects_tmp, rejects_tmp.parent / out.name)
    if writer is None:  # every row rejected (or none read)
        empty.parent.mkdir(exist_ok=True)
        empty.touch()
    else:
        writer.close()
        os.replace(scored_tmp, out)  # last: the part file is the partition's "done"
    result.seconds = time.perf_counter() - started
    return result


def check_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows a request could be made of, the others with a ``reject_reason``), the API's checks vectorised."""
    reason = pd.Series("", index=frame.index, dtype=object)

    def refuse(mask: pd.Series, why: str) -> None:
        reason[mask & (reason == "")] = why

    if "log_error" in frame.columns:
        refuse(frame["log_error"].notna(), "unreadable prediction-log event")
    customer = frame[ENTITY] if ENTITY in frame.columns else pd.Series(None, index=frame.index, dtype=object)
    refuse(customer.isna(), f"no {ENTITY}")
    text = customer.astype("string")
    refuse(~text.str.match(ID_PATTERN).fillna(False).astype(bool) | (text.str.len() > ENTITY_ID_MAX_LENGTH),
           f"{ENTITY} is not 1-{ENTITY_ID_MAX_LENGTH} of A-Z a-z 0-9 _ . : -")
    stamp = pd.to_datetime(frame[TIMESTAMP], utc=True, errors="coerce") if TIMESTAMP in frame.columns \
        else pd.Series(pd.NaT, index=frame.index)
    refuse(stamp.isna(), f"no valid {TIMESTAMP}")
    amount = pd.to_numeric(frame["transaction_amount"], errors="coerce") if "transaction_amount" in frame.columns \
        else pd.Series(np.nan, index=frame.index)
    refuse(~amount.between(0, AMOUNT_MAX), f"transaction_amount is not a number from 0 to {AMOUNT_MAX:g}")
    given = {}
    for name in STORE_FEATURES:
        if name in frame.columns:
            given[name] = pd.to_numeric(frame[name], errors="coerce").astype(np.float64)
            refuse(frame[name].notna() & ~given[name].between(0, FLOAT32_MAX),
                   f"{name} is not a number from 0 to float32's largest")
    ok = reason == ""
    good = frame[ok].assign(**{TIMESTAMP: stamp[ok], "transaction_amount": amount[ok].astype(np.float64)},
                            **{name: value[ok] for name, value in given.items()})
    bad = frame[~ok].assign(reject_reason=reason[~ok])
    return good, bad


def with_store_features(frame: pd.DataFrame, job: Job, store) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each row with its four store features: given in the input, as logged, or from the offline store as of
    the row's time; rows with none to be had are returned apart (rejected: an unknown customer at that time)."""
    if frame.empty:
        return frame, frame.assign(reject_reason=pd.Series(dtype=object))
    given = frame[[n for n in STORE_FEATURES if n in frame.columns]]
    complete = given.notna().all(axis=1) if given.shape[1] == len(STORE_FEATURES) else pd.Series(False, frame.index)
    frame = frame.copy()
    for name in STORE_FEATURES:
        if name not in frame.columns:
            frame[name] = np.nan
    need = ~complete
    if need.any():
        if job.features == "logged":
            looked = frame.loc[need, [f"logged_{n}" for n in STORE_FEATURES]].set_axis(list(STORE_FEATURES), axis=1)
        elif isinstance(store, AsOfJoin):
            looked = store.features(frame.loc[need, [ENTITY, TIMESTAMP]]).set_axis(frame.index[need])
        else:
            looked = features_as_of(Path(job.feature_repo), frame.loc[need, [ENTITY, TIMESTAMP]], job.redis_address,
                                    store=store).set_axis(frame.index[need])
        for name in STORE_FEATURES:  # a feature given in the input wins, as in /predict
            frame.loc[need, name] = frame.loc[need, name].fillna(looked[name]).astype(np.float64)
    missing = frame[list(STORE_FEATURES)].isna().any(axis=1)
    why = "no store features for this customer at this time" if job.features == "offline" \
        else "the logged event has no store features"
    return frame[~missing], frame[missing].assign(reject_reason=why)


def predict(frame: pd.DataFrame, model, job: Job) -> pd.DataFrame:
    proba = model.positive_proba(frame[list(MODEL_FEATURES)].to_numpy(dtype=np.float32))
    return frame.assign(prediction=proba, label=(proba >= job.threshold).astype(np.int8),
                        model_name=job.model_name, model_version=job.model_version)


_models: dict[tuple[str, str, str, int], tuple[Any, str]] = {}
_stores: dict[str, Any] = {}


def _model(job: Job) -> tuple[Any, str]:
    """One loaded model per model, runtime and worker process."""
    key = (job.model_name, job.model_version, job.runtime.runtime, job.model_threads)
    if key not in _models:
        _models[key] = runtimes.load(job.onnx, job.runtime, job.model_threads)
    return _models[key]


def offline_features(job: Job):
    """The feature view's join over its file source, loaded once per worker; else Feast's store (it joins).
    Opening the store costs seconds (Feast parses the repo): once per process."""
    if job.feature_repo not in _stores:
        store = open_store(Path(job.feature_repo), job.redis_address)
        _stores[job.feature_repo] = AsOfJoin.from_store(store) or store
    return _stores[job.feature_repo]


def claim_output(job: Job) -> None:
    """The output folder holds this job or nothing: resuming into another job's output would mix models."""
    out = Path(job.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / JOB_FILE
    if path.exists():
        before = json.loads(path.read_text())
        if before != job.describe():
            changed = ", ".join(f"{k} {before.get(k)!r} → {v!r}" for k, v in job.describe().items()
                                if before.get(k) != v)
            raise inputs.BatchInputError(f"{out} holds the output of another job ({changed}); choose another "
                                         "--output or remove it")
        return
    path.write_text(json.dumps(job.describe(), indent=2))
