"""Where a worker's time goes per answered request: the project beside the hand-written batching peer.

    python -m bench.where_time_goes [--seconds 10] [--connections 32,128] [--name where-time-goes]

Both run side by side (2 workers each) on the bench's own Redis/Kafka/model, are measured in turn under the
same closed-loop load, and while each is measured `py-spy` samples every worker, only while it holds the
GIL (`--gil`: the event loop's thread doing Python work, what bounds a worker's throughput). Each sample
is put in one category by its innermost recognisable frame, and a category's microseconds per request are
its samples x the sampling period / the 2xx answers of that run. The CPU per request from /proc is printed
beside it (that one also counts librdkafka's threads and the time outside the GIL). Rows go to
bench/results/<name>.json; `python -m bench.report` turns them into the benchmark page's table (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
from pathlib import Path

from bench.common import print_table, write_results
from bench.serving import (
    PROJECT_ENV,
    System,
    bench_workspace,
    start,
    tools,
    warm_up,
    worker_pids,
    wrk,
)

RATE_HZ = 200
# First match wins, from the innermost frame outwards: a sample is charged to the work it was doing.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("kafka hand-off (produce)", ("PredictionLog.publish", "Log.publish")),
    ("metrics", ("prometheus_client", "service/metrics.py")),
    ("registry follower", ("sqlalchemy", "mlflow", "ModelSelector", "model_store")),
    ("grpc threads", ("grpc/",)),
    ("onnxruntime", ("onnxruntime", "OnnxPredictor", "positive_proba")),
    ("redis client", ("redis/", "hmget.py", "OnlineStore.fetch", "hiredis")),
    ("feature decode", ("_decode (service", "_decode_stored", "number (bench")),
    ("http response write (uvicorn)", ("RequestResponseCycle.send",)),
    ("http parse, ASGI task (uvicorn)", ("httptools_impl", "proxy_headers", "uvicorn/")),
    ("request decode + validate", ("contract.py", "read_json_body", "parse (bench", "read_body (bench")),
    ("batcher", ("service/batching.py", "Batcher.submit", "Batcher._drain")),
    ("scoring, answers, event encode", ("prediction_service.py", "scoring.py", "events.py", "Batcher._score",
                                        "orjson")),
    ("endpoint + response", ("http_api.py", "fast_path.py", "app (bench", "respond (bench")),
    ("bentoml / starlette layers", ("bentoml", "starlette", "opentelemetry")),
    ("event loop (asyncio, uvloop)", ("asyncio/", "Runner.run")),
]


def category(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, keys in CATEGORIES:
            if any(key in frame for key in keys):
                return name
    return "other"


def categorize(files: list[Path]) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for path in files:
        for line in path.read_text().splitlines() if path.exists() else []:
            stack, n = line.rsplit(" ", 1)
            counts[category(stack.split(";"))] += int(n)
    return counts


def measure(ws, tool: dict[str, str], system: System, connections: int, seconds: float, customers: int,
            root: Path) -> dict:
    from tools.services import free_port

    server = start(system, ws, free_port())
    try:
        wrk(tool["wrk"], server.url, connections, 3, customers)
        exe = Path(sys.executable).with_name("py-spy")
        files = [root / f"spy-{system.name}-{connections}-{pid}.txt" for pid in worker_pids(server)]
        spies = [subprocess.Popen([str(exe), "record", "-p", str(pid), "-d", str(int(seconds) - 1), "-r", str(RATE_HZ),
                                   "--gil", "-f", "raw", "-o", str(path), "--nonblocking"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for pid, path in zip(worker_pids(server), files, strict=True)]
        r = wrk(tool["wrk"], server.url, connections, seconds, customers, server.process.pid)
        for spy in spies:
            spy.wait()
    finally:
        server.stop()
    answered_while_sampled = r["rps"] * (int(seconds) - 1)
    counts = categorize(files)
    per_request = {name: round(n * 1e6 / RATE_HZ / answered_while_sampled, 2) for name, n in counts.items()}
    return {"system": system.name, "workers": system.workers, "connections": connections, "rps": r["rps"],
            "cpu_ms_per_request": r["cpu_ms_per_request"], "gil_us_per_request": per_request,
            "gil_us_total": round(sum(per_request.values()), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.where_time_goes", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", default="32,128")
    parser.add_argument("--name", default="where-time-goes")
    args = parser.parse_args(argv)
    rows = []
    with bench_workspace() as ws:
        tool = tools()
        customers = len(ws.dataset.latest_customers())
        warm_up(ws, tool, customers, 20)
        for connections in [int(c) for c in args.connections.split(",")]:
            for system in (System("project", 2, dict(PROJECT_ENV)), System("batching", 2, peer="batching")):
                row = measure(ws, tool, system, connections, args.seconds, customers, ws.root)
                rows.append(row)
                print(f"  {system.label} c={connections}: {row['rps']:.0f} 2xx/s, {row['gil_us_total']} µs/request "
                      f"under the GIL, {row['cpu_ms_per_request']} ms CPU/request", flush=True)
    names = sorted({k for r in rows for k in r["gil_us_per_request"]},
                   key=lambda k: -max(r["gil_us_per_request"].get(k, 0) for r in rows))
    table = [{"category": name, **{f"{r['system']} c={r['connections']}": r["gil_us_per_request"].get(name, 0.0)
                                   for r in rows}} for name in names]
    print_table("µs per answered request, GIL held", table, ["category", *[k for k in table[0] if k != "category"]])
    print(f"wrote {write_results(args.name, rows, vars(args))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
