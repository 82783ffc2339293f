"""The training pipeline in this process and on Ray (in this process: Ray-local), by data size.

    python -m bench.pipeline [--whole 40000,200000] [--join 40000,200000,1000000,4000000,10000000]
                             [--name pipeline-run1]

Each size: the demo's customers and their history, and that many transactions (the demo's, drawn again with
their labels: the join and the gate have real work), written to a copy of the Feast repo and applied. Then,
for each engine, in a process of its own (what a user waits for, Ray's start included):

- **whole** (`pipeline run` of the shipped pipeline.yaml on that repo, into a fresh MLflow store): seconds end to
  end, each stage's seconds from the run's summary, the peak resident memory of the process tree;
- **join** (the stage Ray spreads: the point-in-time join over the whole history, alone): seconds end to end,
  the join's own, Ray's start, the peak memory; and that both engines kept the same rows. For reference, the
  same join by Feast's own offline stores (file, and Feast's Ray store) at the small sizes.

Results in bench/results/<name>.json with the git commit and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.batch import PeakMemory
from bench.common import print_table, write_results

ROOT = Path(__file__).resolve().parents[1]
REDIS = "127.0.0.1:6379"  # (named for Feast's config; offline reads never contact it)
ENGINES = ("local", "ray")
# Feast's own offline stores doing the same join, for reference (the pipeline joined through the file store
# before it had an engine; Feast 0.67's Ray store is what "Ray" means to a Feast user): slower by far, so only
# up to these sizes
REFERENCES = {"feast-file": 200_000, "feast-ray": 40_000}


def make_repo(root: Path, size: int, env: dict[str, str]) -> Path:
    from harness import workspace
    from lifecycle import data as datamod
    from tools import feast_cli

    repo = workspace.copy_feature_repo(root / f"repo-{size}")
    base = datamod.generate(2_000, 40_000, 42)
    drawn = base.transactions.sample(size, replace=size > len(base.transactions), random_state=0)
    datamod.write(datamod.Dataset(base.customers, drawn.reset_index(drop=True)), repo / "data")
    feast_cli.feast(repo, env, "apply")
    return repo


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    started = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = PeakMemory(process.pid)
    stdout, stderr = process.communicate()
    seconds, peak = time.perf_counter() - started, memory.stop()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:5])}: exit {process.returncode}: {stderr[-2000:]}")
    return seconds, peak, stdout


def whole(repo: Path, engine: str, root: Path, env: dict[str, str]) -> dict[str, Any]:
    body = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
    for stage in body["stages"]:
        if stage["name"] == "fetch-data":
            stage["params"] = {"source": "feast", "feature_repo": str(repo)}
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(body))
    store = root / f"mlflow-{repo.name}-{engine}"
    uri = f"sqlite:///{store}.db?artifact_root={store}-artifacts"
    seconds, peak, stdout = timed([sys.executable, "-m", "lifecycle.pipeline", "run", "--pipeline", str(path),
                                   "--engine", engine, "--mlflow-uri", uri, "--name", "bench_model"], env)
    summary = json.loads(stdout)
    stages = {s["stage"]: s["seconds"] for s in summary["stages"]}
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak / 2**20), "stage_seconds": stages,
            "auc": summary["metrics"]["auc"], "n_train": summary["metrics"]["n_train"]}


def join(repo: Path, engine: str, env: dict[str, str]) -> dict[str, Any]:
    seconds, peak, stdout = timed([sys.executable, "-m", "bench.pipeline", "join-once", "--repo", str(repo),
                                   "--engine", engine], env)
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak / 2**20), **json.loads(stdout)}


def join_once(repo: Path, engine: str) -> dict[str, Any]:
    """In the measured process: read the data as the pipeline's data stage does, start Ray, join."""
    import pandas as pd

    from lifecycle import data as datamod
    from lifecycle.pipeline.compute import Compute
    from mlops import offline
    from mlops.schema import ENTITY, TIMESTAMP

    started = time.perf_counter()
    import feast  # noqa: F401 - its import (seconds) is the process's start, not the join's

    import_s = time.perf_counter() - started
    started = time.perf_counter()
    transactions = datamod.read(repo / "data").transactions
    read_s = time.perf_counter() - started
    compute = Compute.resolve(engine="ray" if engine == "feast-ray" else "local" if engine == "feast-file" else engine)
    before = time.perf_counter()
    with compute.session():
        start_s = time.perf_counter() - before
        joined_at = time.perf_counter()
        if engine in REFERENCES:
            with tempfile.TemporaryDirectory() as scratch:
                store = {"type": "ray", "storage_path": scratch} if engine == "feast-ray" else None
                frame, how = offline.training_frame(repo, transactions, REDIS, store), f"Feast's {engine[6:]} store"
        else:
            frame, how = compute.join(repo, transactions, REDIS)
        join_s = time.perf_counter() - joined_at
    # the values, not Feast's dtypes (ints as floats, microsecond times)
    values = frame[[c for c in frame.columns if c not in (ENTITY, TIMESTAMP)]].astype("float64")
    values[TIMESTAMP] = pd.to_datetime(frame[TIMESTAMP], utc=True).astype("datetime64[ns, UTC]").astype("int64")
    digest = int(pd.util.hash_pandas_object(values, index=False).sum())  # the same rows, the same order
    return {"rows": len(transactions), "kept": len(frame), "import_s": round(import_s, 2), "read_s": round(read_s, 2),
            "ray_start_s": round(start_s, 2), "join_s": round(join_s, 2), "how": how, "digest": str(digest)}


def run(whole_sizes: list[int], join_sizes: list[int]) -> list[dict[str, Any]]:
    root = Path(tempfile.mkdtemp(prefix="mlops-pipeline-bench-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLOPS_REDIS_ADDRESS": REDIS,
           "RAY_AUTH_MODE": "disabled"}  # (offline reads never contact Redis; Ray in-process needs no token)
    env.pop("MLOPS_RAY_ADDRESS", None)
    rows: list[dict[str, Any]] = []
    try:
        for size in sorted(set(whole_sizes) | set(join_sizes)):
            repo = make_repo(root, size, env)
            digests = set()
            for engine in (*ENGINES, *(e for e, up_to in REFERENCES.items() if size <= up_to)):
                if size in join_sizes:
                    r = join(repo, engine, env)
                    digests.add(r.pop("digest"))
                    rows.append({"part": "join", "engine": engine, "transactions": size, **r})
                    print(f"  join   {engine:<10} {size:>11,} rows  {r['seconds']:7.1f} s  (join {r['join_s']:.1f} s, "
                          f"Ray start {r['ray_start_s']:.1f} s)  peak {r['peak_rss_mb']:,} MB", flush=True)
                if size in whole_sizes and engine in ENGINES:
                    r = whole(repo, engine, root, env)
                    rows.append({"part": "whole", "engine": engine, "transactions": size, **r})
                    print(f"  whole  {engine:<10} {size:>11,} rows  {r['seconds']:7.1f} s  {r['stage_seconds']}  "
                          f"peak {r['peak_rss_mb']:,} MB", flush=True)
            if len(digests) > 1:
                raise AssertionError(f"the engines joined different rows at {size:,} transactions")
            shutil.rmtree(repo, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for part in ("join", "whole"):
        for size in sorted({r["transactions"] for r in rows if r["part"] == part}):
            by = {r["engine"]: r for r in rows if r["part"] == part and r["transactions"] == size}
            for engine, r in by.items():
                if engine != "local":  # local's time over this one's: > 1 where it is faster
                    r["vs_local"] = round(by["local"]["seconds"] / r["seconds"], 2)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["join-once"]:
        p = argparse.ArgumentParser(prog="bench.pipeline join-once")
        p.add_argument("--repo", type=Path, required=True)
        p.add_argument("--engine", choices=(*ENGINES, *REFERENCES), required=True)
        args = p.parse_args(argv[1:])
        print(json.dumps(join_once(args.repo, args.engine)))
        return 0
    parser = argparse.ArgumentParser(prog="bench.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--whole", default="40000,200000", help="transactions, comma-separated: pipeline run")
    parser.add_argument("--join", default="40000,200000,1000000,4000000,10000000",
                        help="transactions, comma-separated: the point-in-time join alone")
    parser.add_argument("--name", default="pipeline", help="bench/results/<name>.json")
    args = parser.parse_args(argv)
    sizes = [[int(s) for s in value.split(",") if s] for value in (args.whole, args.join)]
    rows = run(*sizes)
    join_rows = [r for r in rows if r["part"] == "join"]
    whole_rows = [r for r in rows if r["part"] == "whole"]
    for title, chosen, columns in (
            ("point-in-time join alone (process start to exit)", join_rows,
             ["engine", "transactions", "seconds", "join_s", "ray_start_s", "peak_rss_mb", "vs_local"]),
            ("pipeline run, end to end", whole_rows,
             ["engine", "transactions", "seconds", "n_train", "peak_rss_mb", "vs_local"])):
        if chosen:
            print_table(title, chosen, columns)
    path = write_results(args.name, rows, {"whole": sizes[0], "join": sizes[1], "cpus": os.cpu_count()})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
