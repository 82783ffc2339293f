"""Serving side by side: the project's service against the services a user would write instead.

    python -m bench.serving [--seconds 10] [--connections 1,8,32,128] [--rates 250,500,1000,2000,4000]
                            [--workers 1,2] [--quick] [--profile]

One system at a time on the same box, the same Redis (Feast's keys), ONNX file and Kafka topic: the project
(`bentoml serve`), the `textbook` FastAPI peer and the `tuned` one (bench/peers/), each with 1 and 2 worker
processes. Closed loop with `wrk` (Lua body script drawing random materialised customers) at each
connection count; open loop with `vegeta` at fixed rates, free of coordinated omission, to find the
highest rate each system sustains with P99 < 50 ms and no error; gRPC with `ghz`. Also the project with
adaptive batching off and with the prediction log off (what batching buys, what logging costs). Answers of
the peers are checked equal to the project's before any load. Rows go to bench/results/serving.json.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.common import print_table, write_results
from tools.readiness import wait_ready

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlops-stack" / "bin"
LUA = ROOT / "bench" / "load" / "predict.lua"
SUSTAINED_P99_MS = 50.0
PEER_APPS = {"textbook": "bench.peers.textbook:app", "tuned": "bench.peers.tuned:app"}


@dataclass
class System:
    """One configuration to measure: the project (with env overrides) or a peer, with a worker count."""

    name: str
    workers: int
    env: dict[str, str] = field(default_factory=dict)
    peer: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name} x{self.workers}"


@dataclass
class Running:
    url: str
    process: subprocess.Popen
    grpc_port: int = 0
    log_path: Path | None = None

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def tools() -> dict[str, str]:
    found = {"wrk": shutil.which("wrk"), "vegeta": str(BIN / "vegeta"), "ghz": str(BIN / "ghz")}
    if not found["wrk"] or not all(Path(p).exists() for p in found.values() if p):
        print("bench: installing the load generators (scripts/install-bench-tools.sh)", flush=True)
        subprocess.run(["bash", str(ROOT / "scripts" / "install-bench-tools.sh")], check=True)
        found["wrk"] = shutil.which("wrk")
    return {k: str(v) for k, v in found.items()}


def start(system: System, ws, port: int) -> Running:
    from tools import server_process
    from tools.services import free_port

    env = {**ws.env, "MLOPS_WORKERS": str(system.workers), **system.env}
    if system.peer is None:
        server = server_process.start(port, env, ws.root / f"server-{system.name}-{port}.log", timeout=300)
        return Running(server.url, server.process, server.grpc_port, server.log_path)
    log_path = ws.root / f"peer-{system.name}-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", PEER_APPS[system.peer], "--host", "127.0.0.1", "--port", str(port),
         "--workers", str(system.workers), "--http", "httptools", "--loop", "uvloop", "--no-access-log",
         "--log-level", "warning"],
        cwd=ROOT, env={**os.environ, **env}, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    running = Running(f"http://127.0.0.1:{port}", process, free_port(), log_path)
    why_not = wait_ready(process, lambda: httpx.post(f"{running.url}/predict", json={
        "customer_id": "C000001", "transaction_amount": 1.0}, timeout=2).status_code == 200, timeout=180)
    if why_not is None:
        return running
    running.stop()
    raise RuntimeError(f"{system.label} {why_not}: {log_path.read_text()[-2000:]}")


def check_answers(url: str, reference: dict[str, float], customers: list[str]) -> None:
    """The peer must give the project's answers (same features, same model) before its speed means anything."""
    for customer in customers:
        got = httpx.post(f"{url}/predict", json={"customer_id": customer, "transaction_amount": 123.0},
                         timeout=10).json()["prediction"]
        if abs(got - reference[customer]) > 1e-6:
            raise AssertionError(f"{url}: prediction {got} for {customer}, the project says {reference[customer]}")


def provider(url: str, system: System) -> str:
    """The ONNX Runtime provider that really served (the project says in /info; the peers run on CPU)."""
    if system.peer is not None:
        return "CPUExecutionProvider"
    return httpx.get(f"{url}/info", timeout=10).json()["provider"]


def wrk(tool: str, url: str, connections: int, seconds: float, customers: int) -> dict:
    threads = max(1, min(connections, 2))
    env = {**os.environ, "CUSTOMERS": str(customers)}
    cmd = [tool, f"-t{threads}", f"-c{connections}", f"-d{max(1, int(seconds))}s", "--latency", "-s", str(LUA), url]
    subprocess.run([*cmd[:3], "-d1s", *cmd[4:]], env=env, capture_output=True, check=False)  # warm-up
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
    r = json.loads(line.removeprefix("WRK_JSON "))
    errors = sum(r[k] for k in ("errors_connect", "errors_read", "errors_write", "errors_status", "errors_timeout"))
    return {"rps": r["requests"] / (r["duration_us"] / 1e6), "p50_ms": r["p50_us"] / 1000,
            "p99_ms": r["p99_us"] / 1000, "errors": errors, "requests": r["requests"]}


def vegeta_targets(path: Path, url: str, customers: int, n: int = 5000) -> Path:
    rng = random.Random(5)
    with path.open("w") as f:
        for _ in range(n):
            body = json.dumps({"customer_id": f"C{rng.randrange(customers):06d}",
                               "transaction_amount": round(rng.uniform(5, 505), 2)})
            f.write(json.dumps({"method": "POST", "url": f"{url}/predict", "body": base64.b64encode(body.encode())
                                .decode(), "header": {"Content-Type": ["application/json"]}}) + "\n")
    return path


def vegeta(tool: str, targets: Path, rate: int, seconds: float) -> dict:
    attack = subprocess.Popen([tool, "attack", "-format=json", f"-targets={targets}", f"-rate={rate}",
                               f"-duration={max(1, int(seconds))}s", "-timeout=5s", "-max-workers=512"],
                              stdout=subprocess.PIPE)
    report = subprocess.run([tool, "report", "-type=json"], stdin=attack.stdout, capture_output=True, text=True,
                            check=True)
    attack.wait()
    r = json.loads(report.stdout)
    errors = r["requests"] - round(r["success"] * r["requests"])
    return {"rps": r["throughput"], "p50_ms": r["latencies"]["50th"] / 1e6, "p99_ms": r["latencies"]["99th"] / 1e6,
            "errors": errors, "requests": r["requests"]}


def protoset(out: Path) -> Path:
    """ghz's own .proto parser predates proto3 `optional`: hand it the compiled descriptors instead."""
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}", "--include_imports",
                    f"--descriptor_set_out={out}", "service/proto/fraud.proto"], cwd=ROOT, check=True)
    return out


def ghz(tool: str, descriptors: Path, port: int, connections: int, seconds: float, customers: int) -> dict:
    data = '{"customer_id": "C{{printf `%06d` (randomInt 0 ' + str(customers) + ')}}", "transaction_amount": 42.5}'
    cmd = [tool, "--insecure", "--protoset", str(descriptors),
           "--call", "mlops.fraud.v1.FraudDetector.Predict", "-d", data, "-c", str(connections),
           "--connections", str(min(connections, 8)), "-z", f"{max(1, int(seconds))}s", "--format", "json",
           f"127.0.0.1:{port}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    r = json.loads(out)
    dist = {d["percentage"]: d["latency"] for d in r.get("latencyDistribution") or []}
    # ghz closes its connections when the duration is up: the calls still in flight then fail with
    # "transport is closing" on the client side. They are the run's end, not server errors.
    failed = {message: n for message, n in (r.get("errorDistribution") or {}).items()
              if "transport is closing" not in message}
    return {"rps": r["rps"], "p50_ms": dist.get(50, 0) / 1e6, "p99_ms": dist.get(99, 0) / 1e6,
            "errors": sum(failed.values()), "error_messages": failed, "requests": r["count"]}


def profile(pid: int, seconds: float, out: Path) -> dict[str, float]:
    """py-spy samples of one worker under load, folded into shares by package."""
    exe = Path(sys.executable).with_name("py-spy")
    subprocess.run([str(exe), "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "250", "-f", "raw", "-o",
                    str(out), "--nonblocking"], capture_output=True, check=False)
    shares: dict[str, float] = {}
    total = 0
    for line in out.read_text().splitlines() if out.exists() else []:
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        leaf = frames[-1]
        where = leaf.split("(")[-1].split(":")[0] if "(" in leaf else leaf
        package = where.split("site-packages/")[-1].split("/")[0] if "site-packages/" in where else \
            where.replace(str(ROOT) + "/", "").split("/")[0]
        shares[package] = shares.get(package, 0) + int(count)
        total += int(count)
    return {k: v / total for k, v in sorted(shares.items(), key=lambda kv: -kv[1])} if total else {}


def worker_pids(running: Running) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(running.process.pid)], capture_output=True, text=True).stdout
    return [int(p) for p in children.split()]


def run(ws, args) -> list[dict]:
    tool = tools()
    customers = sorted(ws.dataset.latest_customers()["customer_id"])  # one row per customer (the history has several)
    n_customers = len(customers)
    workers = [int(w) for w in args.workers.split(",")]
    systems = [System("project", w) for w in workers]
    systems += [System(peer, w, peer=peer) for peer in ("tuned", "textbook") for w in workers]
    top = max(workers)
    systems += [System("project, batching off", top, {"MLOPS_ADAPTIVE_BATCHING": "false"}),
                System("project, log off", top, {"MLOPS_PREDICTION_LOG": "false"})]
    connections = [int(c) for c in args.connections.split(",")]
    rates = [int(r) for r in args.rates.split(",")]
    rows: list[dict] = []
    reference: dict[str, float] = {}
    sample = customers[:20]
    from tools.services import free_port

    for system in systems:
        if args.quick and system.name == "textbook" and system.workers != top:
            continue
        running = start(system, ws, free_port())
        try:
            if not reference:
                reference = {c: httpx.post(f"{running.url}/predict", json={"customer_id": c,
                                                                            "transaction_amount": 123.0}).json()[
                    "prediction"] for c in sample}
            check_answers(running.url, reference, sample)
            base = {"system": system.name, "workers": system.workers, "provider": provider(running.url, system)}
            for c in connections if not system.name.startswith("project,") else [32]:
                r = wrk(tool["wrk"], running.url, c, args.seconds, n_customers)
                rows.append({**base, "protocol": "http", "mode": "closed", "connections": c, **r})
                print(f"  {system.label:<26} http closed c={c:<4} {r['rps']:8.0f} req/s  p50 {r['p50_ms']:7.2f} ms"
                      f"  p99 {r['p99_ms']:7.2f} ms  errors {r['errors']}", flush=True)
            if system.name in ("project", "tuned") and system.workers == top and not args.quick:
                targets = vegeta_targets(ws.root / f"targets-{system.name}.jsonl", running.url, n_customers)
                for rate in rates:
                    r = vegeta(tool["vegeta"], targets, rate, args.seconds)
                    rows.append({**base, "protocol": "http", "mode": "open", "connections": None, "rate": rate, **r})
                    print(f"  {system.label:<26} http open  {rate:>5}/s {r['rps']:8.0f} req/s  p50 {r['p50_ms']:7.2f}"
                          f" ms  p99 {r['p99_ms']:7.2f} ms  errors {r['errors']}", flush=True)
                    if r["errors"] or r["p99_ms"] > 4 * SUSTAINED_P99_MS:
                        break  # past its limit: higher rates only overload it more
            if system.name == "project" and running.grpc_port:
                for c in (1, 32):
                    r = ghz(tool["ghz"], protoset(ws.root / "fraud.protoset"), running.grpc_port, c, args.seconds,
                            n_customers)
                    rows.append({**base, "protocol": "grpc", "mode": "closed", "connections": c, **r})
                    print(f"  {system.label:<26} grpc closed c={c:<4} {r['rps']:8.0f} req/s  p50 {r['p50_ms']:7.2f}"
                          f" ms  p99 {r['p99_ms']:7.2f} ms  errors {r['errors']}", flush=True)
            if args.profile and system.name == "project" and system.workers == top:
                pids = worker_pids(running)
                load = subprocess.Popen([tool["wrk"], "-t2", "-c32", f"-d{int(args.seconds) + 4}s", "-s", str(LUA),
                                         running.url], env={**os.environ, "CUSTOMERS": str(n_customers)},
                                        stdout=subprocess.DEVNULL)
                time.sleep(2)
                shares = profile(pids[-1], args.seconds, ws.root / "profile.txt") if pids else {}
                load.wait()
                rows.append({**base, "protocol": "http", "mode": "profile", "connections": 32,
                             "profile": {k: round(v, 4) for k, v in list(shares.items())[:15]}})
                print("  profile (share of samples by package): " +
                      ", ".join(f"{k} {v:.0%}" for k, v in list(shares.items())[:10]), flush=True)
        finally:
            running.stop()
    add_ratios(rows)
    print_table(f"Serving, side by side ({args.seconds:.0f} s per point; load generator on the same cores)",
                [r for r in rows if r["mode"] != "profile"],
                ["system", "workers", "protocol", "mode", "connections", "rate", "rps", "p50_ms", "p99_ms", "errors",
                 "ratio_vs_peer"])
    summary = sustained(rows)
    if summary:
        print_table(f"Highest open-loop rate with P99 < {SUSTAINED_P99_MS:.0f} ms and no error", summary,
                    ["system", "workers", "sustained_rate", "p99_ms"])
    print(f"wrote {write_results('serving', rows + summary)}")
    return rows


def add_ratios(rows: list[dict]) -> None:
    """The project's req/s over the tuned peer's at the same protocol, mode, connections and workers."""
    peer = {(r["protocol"], r["mode"], r.get("connections"), r.get("rate"), r["workers"]): r["rps"]
            for r in rows if r["system"] == "tuned" and "rps" in r}
    for r in rows:
        if r["system"].startswith("project") and "rps" in r:
            other = peer.get((r["protocol"], r["mode"], r.get("connections"), r.get("rate"), r["workers"]))
            r["ratio_vs_peer"] = round(r["rps"] / other, 3) if other else None
    base = {(r["workers"], r.get("connections")): r["rps"] for r in rows
            if r["system"] == "project" and r["mode"] == "closed" and r["protocol"] == "http"}
    for r in rows:
        if r["system"] in ("project, batching off", "project, log off"):
            ours = base.get((r["workers"], r["connections"]))
            r["project_vs_this"] = round(ours / r["rps"], 3) if ours and r["rps"] else None


def sustained(rows: list[dict]) -> list[dict]:
    out = []
    for system in ("project", "tuned"):
        ok = [r for r in rows if r["system"] == system and r["mode"] == "open" and not r["errors"]
              and r["p99_ms"] < SUSTAINED_P99_MS and r["rps"] >= 0.95 * r["rate"]]
        if ok:
            best = max(ok, key=lambda r: r["rate"])
            out.append({"system": system, "workers": best["workers"], "mode": "open-sustained",
                        "sustained_rate": best["rate"], "p99_ms": best["p99_ms"]})
    return out


@contextlib.contextmanager
def bench_workspace() -> Iterator:
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.serving", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0, help="load duration per point")
    p.add_argument("--connections", default="1,8,32,128", help="closed-loop connection counts (wrk)")
    p.add_argument("--rates", default="250,500,1000,2000,4000,6000", help="open-loop rates, req/s (vegeta)")
    p.add_argument("--workers", default="1,2", help="worker processes per system")
    p.add_argument("--quick", action="store_true", help="skip the open-loop sweep and the 1-worker textbook peer")
    p.add_argument("--profile", action="store_true", help="py-spy profile of a project worker at 32 connections")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with bench_workspace() as ws:
        run(ws, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
