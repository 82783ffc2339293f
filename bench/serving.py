"""Serving latency and throughput under load, adaptive batching vs. no batching (the baseline, same run).

    python -m bench.serving [--seconds 10] [--concurrency 1,8,32]

Starts its own Redis/Kafka (tools.services, in .run/bench), workspace and `bentoml serve`, then drives
closed-loop load (N clients, each sending its next request when the last one answered) from a separate
process, and reports client-side P50/P95/P99 against the SLOs (50/100/200 ms). Also measures the
in-process floor: one Feast lookup + one ONNX call per request, without HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench.common import print_table, write_results

SLO_MS = {"p50": 50.0, "p95": 100.0, "p99": 200.0}


def load_worker(url: str, customers: list[str], concurrency: int, seconds: float, queue) -> None:
    """Runs in its own process so the client does not share the server's interpreter."""

    async def client(deadline: float, latencies: list[float], errors: list[int], rng: random.Random) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            while time.perf_counter() < deadline:
                body = {"customer_id": rng.choice(customers), "transaction_amount": round(rng.uniform(5, 500), 2)}
                started = time.perf_counter()
                try:
                    r = await http.post("/predict", json=body)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                (latencies if ok else errors).append(time.perf_counter() - started)

    async def run() -> tuple[list[float], list[int]]:
        latencies: list[float] = []
        errors: list[int] = []
        deadline = time.perf_counter() + seconds
        await asyncio.gather(*[client(deadline, latencies, errors, random.Random(i)) for i in range(concurrency)])
        return latencies, errors

    latencies, errors = asyncio.run(run())
    queue.put((latencies, len(errors)))


def drive(url: str, customers: list[str], concurrency: int, seconds: float) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    warm = ctx.Process(target=load_worker, args=(url, customers, concurrency, 2.0, queue))
    warm.start()
    queue.get()
    warm.join()
    proc = ctx.Process(target=load_worker, args=(url, customers, concurrency, seconds, queue))
    proc.start()
    latencies, errors = queue.get()
    proc.join()
    ms = np.array(latencies) * 1e3
    row = {"concurrency": concurrency, "requests": len(ms), "errors": errors, "rps": len(ms) / seconds,
           "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
           "p99_ms": float(np.percentile(ms, 99))}
    row["slo_met"] = all(row[f"{k}_ms"] < v for k, v in SLO_MS.items())
    return row


def in_process_floor(ws, repeats: int = 300) -> dict:
    from service.feature_lookup import FeatureLookup, open_store
    from service.onnx_predictor import OnnxPredictor

    lookup = FeatureLookup(open_store(ws.settings))
    predictor = OnnxPredictor.load(ws.model, "cpu")
    ids = list(ws.dataset.customers["customer_id"][:repeats])
    times = []
    for customer in ids:
        started = time.perf_counter()
        row = lookup.fetch([customer])[0]
        x = np.array([[*row.values(), 50.0]], dtype=np.float32)
        predictor.predict(x)
        times.append(time.perf_counter() - started)
    ms = np.array(times) * 1e3
    return {"config": "in-process floor (1 Feast lookup + 1 ONNX call)", "concurrency": 1, "requests": repeats,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "rps": repeats / ms.sum() * 1e3}


def run(ws, levels: list[int], seconds: float) -> list[dict]:
    """The floor, then each configuration at each concurrency level; adds ratios to the baseline."""
    from tools import server_process
    from tools import services as svc

    customers = list(ws.dataset.customers["customer_id"])
    rows = [in_process_floor(ws)]
    configs = {"adaptive batching (max_batch_size=64)": {},
               "baseline: no batching": {"MLOPS_ADAPTIVE_BATCHING": "false"}}
    for name, extra in configs.items():
        port = svc.free_port()
        server = server_process.start(port, {**ws.env, **extra}, ws.root / f"server-{port}.log")
        try:
            for level in levels:
                rows.append({"config": name, **drive(server.url, customers, level, seconds)})
        finally:
            server.stop()
    batched = {r["concurrency"]: r for r in rows if r["config"].startswith("adaptive")}
    for r in rows:
        if r["config"].startswith("baseline") and r["concurrency"] in batched:
            b = batched[r["concurrency"]]
            b["rps_vs_baseline"] = b["rps"] / r["rps"]
            b["p99_vs_baseline"] = b["p99_ms"] / r["p99_ms"]
    print_table(f"Serving under closed-loop load, {seconds:.0f} s per level (SLO: p50<50 p95<100 p99<200 ms)",
                rows, ["config", "concurrency", "requests", "errors", "rps", "p50_ms", "p95_ms", "p99_ms",
                       "slo_met", "rps_vs_baseline", "p99_vs_baseline"])
    print(f"wrote {write_results('serving', rows)}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.serving")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", default="1,8,32")
    args = parser.parse_args(argv)
    with bench_workspace() as ws:
        run(ws, [int(c) for c in args.concurrency.split(",")], args.seconds)
    return 0


@contextlib.contextmanager
def bench_workspace():
    """Own Redis/Kafka (.run/bench), BentoML home and Feast repo; all stopped afterwards."""
    root = Path(tempfile.mkdtemp(prefix="mlops-bench-"))
    os.environ["BENTOML_HOME"] = str(root / "bentoml")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    from tools import services as svc
    from tools import workspace

    run_dir = Path(".run/bench")
    svc.up(run_dir)
    try:
        ws = workspace.prepare(root, svc.RunDir(run_dir).env_file, workspace.copy_feature_repo(root / "feature_repo"))
        ws.env["BENTOML_HOME"] = str(root / "bentoml")
        yield ws
    finally:
        svc.down(run_dir, purge=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
