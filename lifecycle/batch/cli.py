"""`mlops-score`: score Parquet files, or backfill a time range of the prediction log, with a registered model.

    mlops-score --input transactions.parquet --output scored/                       # Production, Feast offline
    mlops-score --log-since 1h --model models:/fraud_detector/v3 --output backfill/  # a candidate on logged traffic
    mlops-score ... --engine ray --address ray://head:10001                          # the same on a Ray cluster

Exit 0 when every partition is written (rejected rows included, counted and kept in ``_rejects/``), 2 for bad
input found before any work (arguments, model, columns, an output folder of another job), 1 when a partition
fails (the finished ones are kept: the same command resumes where it stopped).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mlops.cli_args import OneLineParser, positive_int, settings_error

PROG = "mlops-score"
AGO = re.compile(r"(?P<n>\d+(?:\.\d+)?)(?P<unit>[smhd])")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
SUMMARY_FILE = "_summary.json"


def when(text: str) -> datetime:
    """An ISO time (UTC unless it says) or a span before now: ``90s``, ``30m``, ``1h``, ``7d``."""
    import argparse

    if match := AGO.fullmatch(text.strip()):
        return datetime.now(UTC) - timedelta(**{UNITS[match["unit"]]: float(match["n"])})
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an ISO time nor a span like 30m, 1h, 7d") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="a Parquet file or a folder of them: customer_id, "
                                                   "event_timestamp, transaction_amount (other columns are kept)")
    source.add_argument("--log-since", type=when, metavar="WHEN", help="backfill the prediction log from WHEN "
                                                                        "(ISO time, or 30m, 1h, 7d ago: give ISO "
                                                                        "times to resume a backfill)")
    p.add_argument("--log-until", type=when, metavar="WHEN", help="... to WHEN (default: now)")
    p.add_argument("--topic", help="prediction-log topic (default: MLOPS_PREDICTIONS_TOPIC)")
    p.add_argument("--model", help="models:/name@alias or models:/name/version (default: "
                                   "models:/<MLOPS_MODEL_NAME>@production)")
    p.add_argument("--output", type=Path, required=True, help="folder of part-*.parquet (and _rejects/)")
    p.add_argument("--features", choices=("offline", "logged"),
                   help="store features as of each row's time from Feast's offline store, or as the log has them "
                        "(default: offline for --input, logged for the log)")
    p.add_argument("--engine", choices=("auto", "local", "ray"), default="auto",
                   help="local: this process; ray: Ray Data (local, or --address); auto (default): ray when "
                        "given --address, else local")
    p.add_argument("--address", help="a Ray cluster (ray://host:10001, or auto); default: Ray in this process")
    p.add_argument("--model-runtime", choices=("auto", "onnxruntime", "compiled"), default="auto",
                   help="compiled: the graph's trees built to C (about 4x faster), held to onnxruntime's answers "
                        "before use; auto (default): compiled when the graph allows and a C compiler is here")
    p.add_argument("--workers", type=positive_int, help="Ray tasks at once (default: one per CPU)")
    p.add_argument("--chunk-rows", type=positive_int, default=65_536, help="rows read and scored at a time")
    p.add_argument("--partition-rows", type=positive_int, default=250_000,
                   help="Parquet rows per partition (the unit of work and of resuming)")
    p.add_argument("--partition-offsets", type=positive_int, default=200_000,
                   help="log events per partition (the unit of resuming)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pydantic import ValidationError

    from lifecycle.batch import engines, runtimes
    from lifecycle.batch.inputs import BatchInputError, log_partitions, parquet_partitions
    from lifecycle.batch.scoring import Job, claim_output
    from mlops import models
    from mlops.connections import kafka_config
    from mlops.settings import Settings, SettingsError

    def fail(code: int, why: str) -> int:
        print(f"{PROG}: {why}", file=sys.stderr)
        return code

    try:
        settings = Settings.load()
        kafka = kafka_config(settings) if args.log_since else {}
    except ValidationError as exc:
        return fail(2, f"bad setting: {settings_error(exc)}")
    except SettingsError as exc:
        return fail(2, str(exc))
    features = args.features or ("offline" if args.input else "logged")
    until = args.log_until or datetime.now(UTC)
    if args.log_since and args.log_since >= until:
        return fail(2, f"--log-since {args.log_since.isoformat()} is not before --log-until {until.isoformat()}")
    if args.log_until and not args.log_since:
        return fail(2, "--log-until needs --log-since")
    uri = args.model or f"models:/{settings.model_name}@production"
    try:
        stored = models.load_uri(uri)
    except models.ModelStoreError as exc:
        return fail(2, str(exc))
    topic = args.topic or settings.predictions_topic
    source = (str(args.input.resolve()) if args.input
              else f"kafka:{topic}:{args.log_since.isoformat()}/{until.isoformat()}")
    job = Job(model_name=stored.name, model_version=stored.version, onnx=stored.onnx_path.read_bytes(),
              threshold=settings.decision_threshold, output=str(args.output.resolve()),
              feature_repo=str(settings.feature_repo.resolve()), redis_address=settings.redis_address,
              features=features, chunk_rows=args.chunk_rows, kafka=kafka, source=source)
    try:
        if features == "offline":
            _check_offline_store(job)
        partitions = (parquet_partitions(args.input, args.partition_rows) if args.input
                      else log_partitions(kafka, topic, args.log_since, until, args.partition_offsets))
        claim_output(job)
    except BatchInputError as exc:
        return fail(2, str(exc))
    try:
        job = dataclasses.replace(job, runtime=runtimes.choose(args.model_runtime, job.onnx))
    except runtimes.NotCompilable as exc:
        return fail(2, f"--model-runtime compiled: {exc}")
    rows = sum(p.rows for p in partitions)
    engine = engines.choose(args.engine, args.address)
    if engine == "local":  # one process: the model call may use every core (a Ray task is one core)
        job = dataclasses.replace(job, model_threads=0)
    summary = _Summary(job, engine, len(partitions), rows)
    from tqdm import tqdm

    bar = tqdm(total=rows, unit=" rows", unit_scale=True, file=sys.stderr, dynamic_ncols=True,
               disable=args.no_progress or None, desc=f"{stored.name}:{stored.version} ({engine})")

    def done(result, partition) -> None:
        summary.add(result)
        bar.update(partition.rows)

    try:  # stdout is the summary's alone (--json): what Ray prints there (a worker's death) goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            if engine == "ray":
                engines.run_ray(partitions, job, done, args.address, args.workers)
            else:
                engines.run_local(partitions, job, done)
    except BatchInputError as exc:  # found in a partition (the log shortened by retention, ...)
        bar.close()
        return fail(1, f"{exc}; finished partitions are kept: run the same command to resume")
    except Exception as exc:  # a worker's failure, in any engine: one line, never a traceback
        bar.close()
        return fail(1, f"a partition failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                       "; finished partitions are kept: run the same command to resume")
    bar.close()
    report = summary.finish()
    (args.output / SUMMARY_FILE).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2) if args.json else summary.lines(report))
    return 0


def _check_offline_store(job) -> None:
    """Open it here (a missing repo or registry is bad input); the single process then uses this one."""
    from lifecycle.batch.inputs import BatchInputError
    from lifecycle.batch.scoring import offline_features
    from mlops.offline import OfflineStoreError

    try:
        offline_features(job)
    except OfflineStoreError as exc:
        raise BatchInputError(str(exc)) from None


class _Summary:
    def __init__(self, job, engine: str, partitions: int, rows: int) -> None:
        self.job, self.engine, self.partitions, self.rows = job, engine, partitions, rows
        self.started = time.monotonic()
        self.totals: dict[str, Any] = {"read": 0, "scored": 0, "rejected": 0, "skipped_partitions": 0,
                                       "model_seconds": 0.0}
        self.reasons: dict[str, int] = {}
        self.runtimes: dict[str, int] = {}  # partitions scored by each (a worker that cannot load the library)

    def add(self, result) -> None:
        if result.skipped:
            self.totals["skipped_partitions"] += 1
            return
        self.runtimes[result.runtime] = self.runtimes.get(result.runtime, 0) + 1
        for key in ("read", "scored", "rejected", "model_seconds"):
            self.totals[key] += getattr(result, key)
        for reason, n in result.reasons.items():
            self.reasons[reason] = self.reasons.get(reason, 0) + n

    def finish(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        t = self.totals
        return {**self.job.describe(), "engine": self.engine, **self.job.runtime.describe(),
                "partitions_by_runtime": self.runtimes, "output": self.job.output,
                "partitions": self.partitions, **t, "model_seconds": round(t["model_seconds"], 3),
                "rejected_by_reason": self.reasons, "seconds": round(seconds, 3),
                "rows_per_s": round(t["read"] / seconds) if seconds else None,
                "finished_at": datetime.now(UTC).isoformat()}

    @staticmethod
    def lines(r: dict[str, Any]) -> str:
        out = [f"{r['model_name']}:{r['model_version']} on {r['source']} ({r['engine']}, {r['runtime']}): "
               f"{r['read']:,} rows read, "
               f"{r['scored']:,} scored, {r['rejected']:,} rejected in {r['seconds']:.1f} s"
               + (f" ({r['rows_per_s']:,} rows/s)" if r["rows_per_s"] else "")
               + (f"; {r['skipped_partitions']} of {r['partitions']} partitions already done" if
                  r["skipped_partitions"] else ""),
               f"output: {r['output']}/part-*.parquet"]
        if r.get("runtime_note"):
            out.append(f"model runtime onnxruntime, {r['runtime_note']}")
        if r["rejected"]:
            out.append(f"rejects: {r['output']}/_rejects/ — " + "; ".join(
                f"{n:,} {why}" for why, n in sorted(r["rejected_by_reason"].items(), key=lambda kv: -kv[1])))
        return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
