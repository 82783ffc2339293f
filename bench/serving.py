"""Serving side by side: the project's service against the services a user would write instead.

    python -m bench.serving [--seconds 10] [--connections 1,8,32,128] [--rates 250,500,1000,2000,4000]
                            [--workers 1,2] [--peers batching,tuned,textbook] [--name serving] [--quick] [--profile]

One system measured at a time on the same box, the same Redis (Feast's keys), ONNX file and Kafka topic: the project
(`bentoml serve`) and the services a user would write instead (bench/peers/): `batching`, the strongest a top
engineer writes by hand (raw ASGI, an asyncio micro-batcher, pipelined HMGET, librdkafka), which the project
must beat; `tuned` (FastAPI, one lookup per request, hand-optimised) and `textbook` (FastAPI as the tutorials
write it), each with 1 and 2 worker processes. Only 2xx answers count as throughput; the server's CPU time
per answered request is measured from /proc; every system that logs is checked to have put at least one
Kafka event on the topic per 200 it answered (`lost` must be 0). Closed loop with `wrk` (Lua body script
drawing random materialised customers) at each connection count; open loop with `vegeta` at fixed rates, free
of coordinated omission, to find the highest rate each system sustains with P99 < 50 ms and no error; gRPC
with `ghz`. Also the project with adaptive batching off and with the prediction log off (what batching buys,
what logging costs). Answers of the peers are checked equal to the project's before any load. Rows go to
bench/results/<name>.json with the git commit, the settings and the machine.
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
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.common import print_table, write_results
from harness.readiness import wait_ready

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlops-stack" / "bin"
LUA = ROOT / "bench" / "load" / "predict.lua"
SUSTAINED_P99_MS = 50.0
PEER_APPS = {"batching": "bench.peers.batching:app", "tuned": "bench.peers.tuned:app",
             "textbook": "bench.peers.textbook:app"}
RATIO_PEER = "batching"  # the ratio column: the project over the strongest peer
# Up to this many connections a point is latency-bound, and on a shared 2-core VM one 10 s sample swings by a
# third for identical code (where the scheduler puts the server beside wrk, Redis and the broker): these points
# are measured --repeats times, alternating the systems, and the median sample is reported (all in rps_samples).
REPEAT_UP_TO = 8
# A rollout held at its first step (no controller runs, so it stays there), beside the same model with none:
# what routing costs end to end. Each system follows a model name of its own in the registry.
ROLLOUT_STEPS = {"project, shadow": (0, 5, 25, 50, 100), "project, split 5 %": (5, 25, 50, 100)}
ROLLOUT_POINTS = (1, 32, 128)
VARIANTS = ("project, batching off", "project, log off", "project, BentoML path", "project, ack", *ROLLOUT_STEPS)
# The project as users run it: following the registry's production alias (the workspace pins a version for
# the peers, which load that one file).
# The project doing the peers' work: every 200 handed to librdkafka, answered without waiting for the broker
# (the peers do the same). Its default, MLOPS_LOG_DURABILITY=ack, waits for the acknowledgement: measured
# beside it as "project, ack" at every connection count.
PROJECT_ENV = {"MLOPS_MODEL_VERSION": "", "MLOPS_LOG_DURABILITY": "async"}


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
    from harness import server_process
    from tools.services import free_port

    env = {**ws.env, "MLOPS_WORKERS": str(system.workers), **system.env}
    if system.peer is None:
        for attempt in range(3):
            try:
                server = server_process.start(port, env, ws.root / f"server-{system.name}-{port}.log", timeout=300)
                return Running(server.url, server.process, server.grpc_port, server.log_path)
            except RuntimeError as exc:  # a free port taken by another process before the server bound it
                if attempt == 2 or not any(s in str(exc) for s in ("could not bind", "Address already in use")):
                    raise
                print(f"bench: {system.label} could not bind its ports, started again on others", flush=True)
                port = free_port()
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


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and every live descendant (a server's workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        stats[int(proc.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    total, frontier = 0.0, {pid}
    while frontier:
        total += sum(stats[p][1] for p in frontier if p in stats)
        frontier = {child for child, (parent, _) in stats.items() if parent in frontier}
    return total


def topic_events(bootstrap: str, topic: str) -> int:
    """Messages on the topic so far (sum of the partitions' high watermarks)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-watermarks", "log_level": 2})
    try:
        partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in partitions)
    finally:
        consumer.close()


def wrk(tool: str, url: str, connections: int, seconds: float, customers: int, pid: int | None = None,
        script: Path = LUA, env: dict[str, str] | None = None) -> dict:
    """One closed-loop point after a 1 s warm-up. ``ok`` counts the 2xx answers of both (for the Kafka check);
    ``rps`` is 2xx answers per second of the measured run only."""
    threads = max(1, min(connections, 2))
    env = {**os.environ, "CUSTOMERS": str(customers), **(env or {})}
    cmd = [tool, f"-t{threads}", f"-c{connections}", f"-d{max(1, int(seconds))}s", "--latency", "-s", str(script),
           url]
    warm = _wrk_json(subprocess.run([*cmd[:3], "-d1s", *cmd[4:]], env=env, capture_output=True, text=True,
                                    check=False).stdout)
    cpu_before = tree_cpu_s(pid) if pid else 0.0
    r = _wrk_json(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)
    cpu = tree_cpu_s(pid) - cpu_before if pid else None
    assert r is not None
    errors = sum(r[k] for k in ("errors_connect", "errors_read", "errors_write", "errors_status", "errors_timeout"))
    answered = r["requests"] - r["errors_status"]
    seconds_run = r["duration_us"] / 1e6
    return {"rps": answered / seconds_run, "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000,
            "errors": errors, "requests": r["requests"],
            "cpu_ms_per_request": round(1000 * cpu / answered, 4) if cpu is not None and answered else None,
            "cpu_cores_used": round(cpu / seconds_run, 3) if cpu is not None else None,
            "ok": answered + (warm["requests"] - warm["errors_status"] if warm else 0)}


def _wrk_json(out: str) -> dict | None:
    line = next((x for x in out.splitlines() if x.startswith("WRK_JSON ")), None)
    return json.loads(line.removeprefix("WRK_JSON ")) if line else None


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
    ok = round(r["success"] * r["requests"])
    return {"rps": r["throughput"], "p50_ms": r["latencies"]["50th"] / 1e6, "p99_ms": r["latencies"]["99th"] / 1e6,
            "errors": r["requests"] - ok, "requests": r["requests"], "ok": ok}


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
    closing = sum(n for message, n in (r.get("errorDistribution") or {}).items() if message not in failed)
    return {"rps": r["rps"], "p50_ms": dist.get(50, 0) / 1e6, "p99_ms": dist.get(99, 0) / 1e6,
            "errors": sum(failed.values()), "error_messages": failed, "requests": r["count"],
            "ok": r["count"] - sum(failed.values()) - closing}


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
    """Systems are measured in small groups that run side by side (idle while another is measured): the
    project beside the batching peer, then the other peers, then the project beside its own variants. Every
    load point is taken on each system of a group in turn, the starting system rotating: slow drifts of a
    shared, noisy box (the broker's JIT, steal time) hit all of them alike instead of whichever ran last. Each
    logging system has a topic of its own, so its events can be counted against its 2xx answers."""
    tool = tools()
    customers = sorted(ws.dataset.latest_customers()["customer_id"])  # one row per customer (the history has several)
    n_customers = len(customers)
    workers = [int(w) for w in args.workers.split(",")]
    peers = [p for p in args.peers.split(",") if p]
    top = max(workers)
    # Only the two systems a ratio compares are up while it is measured (the other peers after, beside each
    # other): nothing else on the two cores while the ratio's points are taken.
    groups: list[list[System]] = []
    kinds: list[str] = []
    for w in workers:
        groups.append([System("project", w, PROJECT_ENV)] + [System(RATIO_PEER, w, peer=RATIO_PEER)] * (
            RATIO_PEER in peers))
        kinds.append("peers")
        others = [System(peer, w, peer=peer) for peer in peers
                  if peer != RATIO_PEER and (peer != "textbook" or w == top)]
        if others:
            groups.append(others)
            kinds.append("others")
    kinds += ["durability", "variants", "rollout"]
    groups.append([System("project", top, PROJECT_ENV),
                   System("project, ack", top, {**PROJECT_ENV, "MLOPS_LOG_DURABILITY": "ack"})])
    groups.append([System("project", top, PROJECT_ENV),
                   System("project, batching off", top, {**PROJECT_ENV, "MLOPS_ADAPTIVE_BATCHING": "false"}),
                   System("project, log off", top, {**PROJECT_ENV, "MLOPS_PREDICTION_LOG": "false"}),
                   System("project, BentoML path", top, {**PROJECT_ENV, "MLOPS_HTTP_FAST_PATH": "false"})])
    wanted = set(args.groups.split(",")) if args.groups else set(kinds)
    groups.append([System(name, top, {**PROJECT_ENV, "MLOPS_MODEL_NAME": model})
                   for name, model in rollout_models(ws).items()] if "rollout" in wanted else [])
    groups, kinds = [g for g, k in zip(groups, kinds, strict=True) if k in wanted], [k for k in kinds if k in wanted]
    connections = [int(c) for c in args.connections.split(",")]
    rates = [int(r) for r in args.rates.split(",")]
    rows: list[dict] = []
    reference: dict[str, float] = {}
    sample = customers[:20]
    warm_up(ws, tool, n_customers, args.warmup)
    for g, group in enumerate(groups):
        variants = kinds[g] != "peers"  # no open loop, gRPC or profile: only the ratio's pair gets those
        points = {"variants": [32], "rollout": list(ROLLOUT_POINTS)}.get(kinds[g], connections)
        running: dict[str, Running] = {}
        topics = {system.label: f"bench-{g}-{i}" for i, system in enumerate(group)}
        from tools.services import create_topics, free_port

        create_topics(ws.settings.kafka_bootstrap, {topic: 3 for topic in topics.values()})
        answered = dict.fromkeys(topics, 0)
        try:
            for system in group:
                system.env = {**system.env, "MLOPS_PREDICTIONS_TOPIC": topics[system.label]}
                running[system.label] = start(system, ws, free_port())
            for system in group:
                url = running[system.label].url
                if system.name in ROLLOUT_STEPS:
                    wait_rollout(url, system.name)
                if system.name == "project, split 5 %":
                    continue  # a twentieth of the customers get the candidate's answer
                if not reference:
                    reference = {c: httpx.post(f"{url}/predict", json={"customer_id": c, "transaction_amount": 123.0})
                                 .json()["prediction"] for c in sample}
                    answered[system.label] += len(sample)
                check_answers(url, reference, sample)
                answered[system.label] += len(sample)
            turn = 0
            for c in points:
                samples: dict[str, list[dict]] = {system.label: [] for system in group}
                for _ in range(args.repeats if c <= REPEAT_UP_TO else 1):
                    for system in group[turn % len(group):] + group[:turn % len(group)]:
                        server = running[system.label]
                        r = wrk(tool["wrk"], server.url, c, args.seconds, n_customers, server.process.pid)
                        answered[system.label] += r.pop("ok")
                        samples[system.label].append(r)
                        print(f"  {system.label:<26} http closed c={c:<4} {r['rps']:8.0f} req/s  p50 "
                              f"{r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  errors {r['errors']}  cpu "
                              f"{r['cpu_ms_per_request']} ms/req", flush=True)
                    turn += 1
                for system in group:
                    runs = sorted(samples[system.label], key=lambda r: r["rps"])
                    r = runs[len(runs) // 2]  # the median sample (the only one above REPEAT_UP_TO connections)
                    rows.append({"system": system.name, "workers": system.workers, "group": g,
                                 "provider": provider(running[system.label].url, system), "protocol": "http",
                                 "mode": "closed", "connections": c, **r,
                                 **({"rps_samples": [round(x["rps"]) for x in samples[system.label]]}
                                    if len(runs) > 1 else {})})
            if not variants and group[0].workers == top and not args.quick:
                rows += [{**r, "group": g} for r in open_loop(
                    ws, tool, [s for s in group if s.name in ("project", RATIO_PEER)], running, rates, args.seconds,
                    n_customers, answered)]
            project = group[0]
            if not variants and project.workers == top and running[project.label].grpc_port:
                server = running[project.label]
                for c in (1, 32):
                    r = ghz(tool["ghz"], protoset(ws.root / "fraud.protoset"), server.grpc_port, c, args.seconds,
                            n_customers)
                    answered[project.label] += r.pop("ok")
                    rows.append({"system": project.name, "workers": project.workers, "group": g, "protocol": "grpc",
                                 "mode": "closed", "connections": c, **r})
                    print(f"  {project.label:<26} grpc closed c={c:<4} {r['rps']:8.0f} req/s  p50 {r['p50_ms']:7.2f}"
                          f" ms  p99 {r['p99_ms']:7.2f} ms  errors {r['errors']}", flush=True)
            if args.profile and not variants and group[0].workers == top:
                for system in group:
                    if system.name in ("project", RATIO_PEER):
                        shares, ok = profile_under_load(tool["wrk"], running[system.label], args.seconds,
                                                        n_customers, ws.root)
                        answered[system.label] += ok
                        rows.append({"system": system.name, "workers": system.workers, "protocol": "http",
                                     "mode": "profile", "connections": 32, "profile": shares})
        finally:
            for server in running.values():
                server.stop()
        for system in group:
            if system.env.get("MLOPS_PREDICTION_LOG") == "false" or answered[system.label] < 0:
                continue
            logged = settle_topic(ws.settings.kafka_bootstrap, topics[system.label], answered[system.label])
            rows.append({"system": system.name, "workers": system.workers, "mode": "kafka",
                         "answered_2xx": answered[system.label], "logged": logged,
                         "lost": max(0, answered[system.label] - logged)})
            print(f"  {system.label:<26} kafka: {answered[system.label]} answered 200, {logged} events logged",
                  flush=True)
    rows += outcomes_ingest(ws, tool, args.seconds)
    add_ratios(rows)
    print_table(f"Serving, side by side ({args.seconds:.0f} s per point; load generator on the same cores)",
                [r for r in rows if r["mode"] in ("closed", "open")],
                ["system", "workers", "protocol", "mode", "connections", "rate", "rps", "p50_ms", "p99_ms", "errors",
                 "cpu_ms_per_request", "ratio_vs_peer"])
    print_table("Prediction log: every 200 answered is an event on the topic",
                [r for r in rows if r["mode"] == "kafka"], ["system", "workers", "answered_2xx", "logged", "lost"])
    summary = sustained(rows)
    if summary:
        print_table(f"Highest open-loop rate with P99 < {SUSTAINED_P99_MS:.0f} ms and no error", summary,
                    ["system", "workers", "sustained_rate", "p99_ms"])
    print(f"wrote {write_results(args.name, rows + summary, vars(args))}")
    return rows


def rollout_models(ws) -> dict[str, str]:
    """A model name per system of the rollout group, each with the same v1 in Production; v2 (another model of
    the same size: a shadow doubles the model's work) under a rollout at its first step where the system has one."""
    from lifecycle.registry import Registry
    from lifecycle.rollout.state import Rollouts
    from lifecycle.train import register, train

    registry = Registry.from_settings(ws.settings)
    production, candidate = train(ws.dataset), train(ws.dataset, params={"learning_rate": 0.05})
    names, run = {}, uuid.uuid4().hex[:6]  # (the registry outlives a run)
    for system in ("project", *ROLLOUT_STEPS):
        name = f"bench_rollout_{run}_{len(names)}"
        for version, model in (("v1", production), ("v2", candidate)):
            stored = register(model, name, version, backend=registry.backend)
            registry.register(name, version, stored.metadata["metrics"], stored.metadata["params"])
        registry.promote(name, "v1", "production", "benchmark")
        if system in ROLLOUT_STEPS:
            Rollouts(registry).start(name, "v2", ROLLOUT_STEPS[system], actor="benchmark", reason="routing cost")
        names[system] = name
    return names


def wait_rollout(url: str, system: str, timeout: float = 60.0) -> None:
    """Every worker serves the rollout (each polls the registry; /info answers from one of them)."""
    shadow = system == "project, shadow"
    deadline, seen = time.monotonic() + timeout, 0
    while seen < 20:
        info = httpx.get(f"{url}/info", timeout=10).json()
        ok = info["shadow_version"] == "v2" if shadow else (info["canary_version"] == "v2"
                                                              and info["canary_share"] == 0.05)
        seen = seen + 1 if ok else 0
        if time.monotonic() > deadline:
            raise RuntimeError(f"{system}: the rollout is not served after {timeout:.0f} s: {info}")
        time.sleep(0.05)


def outcomes_ingest(ws, tool: dict[str, str], seconds: float, rows_per_request: int = 256) -> list[dict]:
    """POST /outcomes on one worker with its default durability (ack), 8 connections: rows accepted per second,
    and every accepted row counted on the topic."""
    from tools.services import create_topics, free_port

    topic = f"bench-outcomes-{free_port()}"
    create_topics(ws.settings.kafka_bootstrap, {topic: 3})
    system = System("project", 1, {"MLOPS_MODEL_VERSION": "", "MLOPS_OUTCOMES_TOPIC": topic})
    server = start(system, ws, free_port())
    try:
        r = wrk(tool["wrk"], f"{server.url}/outcomes", 8, seconds, 0, server.process.pid,
                script=ROOT / "bench" / "load" / "outcomes.lua", env={"ROWS": str(rows_per_request)})
    finally:
        server.stop()
    accepted = r.pop("ok") * rows_per_request
    logged = settle_topic(ws.settings.kafka_bootstrap, topic, accepted)
    row = {"system": "project, /outcomes", "workers": 1, "protocol": "http", "mode": "outcomes", "connections": 8,
           "rows_per_request": rows_per_request, "rows_per_s": round(r["rps"] * rows_per_request), **r,
           "accepted_rows": accepted, "logged": logged, "lost": max(0, accepted - logged)}
    print(f"  /outcomes x1 (ack)          {row['rows_per_s']:8.0f} rows/s  p50 {r['p50_ms']:7.2f} ms  p99 "
          f"{r['p99_ms']:7.2f} ms  errors {r['errors']}  cpu {r['cpu_ms_per_request']} ms/request; "
          f"{accepted} accepted, {logged} on the topic", flush=True)
    return [row]


def warm_up(ws, tool: dict[str, str], customers: int, seconds: float) -> None:
    """Load before measuring: the broker's JVM compiles its hot paths and the page cache fills, which made the
    first system measured in a fresh workspace up to 2x slower than the same system measured later."""
    if seconds <= 0:
        return
    from tools.services import free_port

    server = start(System("warm-up", 2, peer="batching"), ws, free_port())
    try:
        wrk(tool["wrk"], server.url, 32, seconds, customers)
    finally:
        server.stop()


def open_loop(ws, tool: dict[str, str], systems: list[System], running: dict[str, Running], rates: list[int],
              seconds: float, customers: int, answered: dict[str, int]) -> list[dict]:
    """Fixed rates (vegeta: no coordinated omission), each rate on each system in turn, until a system fails it."""
    rows: list[dict] = []
    targets = {s.label: vegeta_targets(ws.root / f"targets-{s.name}-{s.workers}.jsonl", running[s.label].url,
                                       customers) for s in systems}
    live = list(systems)
    for rate in rates:
        for system in list(live):
            r = vegeta(tool["vegeta"], targets[system.label], rate, seconds)
            answered[system.label] += r.pop("ok")
            rows.append({"system": system.name, "workers": system.workers, "protocol": "http", "mode": "open",
                         "connections": None, "rate": rate, **r})
            print(f"  {system.label:<26} http open  {rate:>5}/s {r['rps']:8.0f} req/s  p50 {r['p50_ms']:7.2f}"
                  f" ms  p99 {r['p99_ms']:7.2f} ms  errors {r['errors']}", flush=True)
            if r["errors"] or r["p99_ms"] > 4 * SUSTAINED_P99_MS:
                live.remove(system)  # past its limit: higher rates only overload it more
    return rows


def settle_topic(bootstrap: str, topic: str, at_least: int, timeout: float = 60.0) -> int:
    """The topic's size once it reaches ``at_least`` or stops growing (a server flushes its log on stop)."""
    deadline = time.monotonic() + timeout
    size, stable_since = topic_events(bootstrap, topic), time.monotonic()
    while size < at_least and time.monotonic() < deadline and time.monotonic() - stable_since < 10:
        time.sleep(0.5)
        now = topic_events(bootstrap, topic)
        if now != size:
            size, stable_since = now, time.monotonic()
    return size


def profile_under_load(wrk_tool: str, running: Running, seconds: float, customers: int,
                       root: Path) -> tuple[dict, int]:
    """py-spy shares by package of one worker under 32 connections, and the 2xx answers of that load."""
    pids = worker_pids(running) or [running.process.pid]
    load = subprocess.Popen([wrk_tool, "-t2", "-c32", f"-d{int(seconds) + 4}s", "-s", str(LUA), running.url],
                            env={**os.environ, "CUSTOMERS": str(customers)}, stdout=subprocess.PIPE, text=True)
    time.sleep(2)
    shares = profile(pids[-1], seconds, root / f"profile-{running.process.pid}.txt")
    out, _ = load.communicate()
    r = _wrk_json(out) or {"requests": 0, "errors_status": 0}
    print("  profile (share of samples by package): " + ", ".join(f"{k} {v:.0%}" for k, v in list(shares.items())[:10]),
          flush=True)
    return {k: round(v, 4) for k, v in list(shares.items())[:15]}, r["requests"] - r["errors_status"]


def add_ratios(rows: list[dict]) -> None:
    """The project's 2xx/s over the strongest peer's, and over its own variants (batching off, log off), at
    the same protocol, mode, connections and workers, measured side by side in the same group."""
    def key(r: dict) -> tuple:
        return r.get("group"), r.get("protocol"), r["mode"], r.get("connections"), r.get("rate"), r["workers"]

    peer = {key(r): r["rps"] for r in rows if r["system"] == RATIO_PEER and "rps" in r}
    project = {key(r): r["rps"] for r in rows if r["system"] == "project" and "rps" in r}
    for r in rows:
        if "rps" not in r:
            continue
        if r["system"] == "project" and peer.get(key(r)):
            r["ratio_vs_peer"] = round(r["rps"] / peer[key(r)], 3)
        if r["system"] in VARIANTS and r["rps"]:
            ours = project.get(key(r))
            r["project_vs_this"] = round(ours / r["rps"], 3) if ours else None


def sustained(rows: list[dict]) -> list[dict]:
    out = []
    for system in ("project", RATIO_PEER):
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
    from harness import workspace
    from tools import services as svc

    run_dir = Path(".run/bench")
    svc.up(run_dir)
    try:
        ws = workspace.prepare(root, svc.RunDir(run_dir).env_file, workspace.copy_feature_repo(root / "feature_repo"))
        ws.env["BENTOML_HOME"] = str(root / "bentoml")
        from lifecycle.registry import Registry

        # Production in the registry, as the demo leaves it: the project follows the alias, as users run it.
        registry, meta = Registry.from_settings(ws.settings), ws.model.metadata
        registry.register(ws.model.name, ws.model.version, meta["metrics"], meta["params"],
                          meta.get("training_data_hash"), meta.get("git_commit"))
        registry.promote(ws.model.name, ws.model.version, "production", "benchmark")
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
    p.add_argument("--peers", default="batching,tuned,textbook", help="peers to measure (bench/peers/)")
    p.add_argument("--name", default="serving", help="results file: bench/results/<name>.json")
    p.add_argument("--warmup", type=float, default=20.0, help="seconds of load on a throwaway server first")
    p.add_argument("--repeats", type=int, default=3, help=f"samples of each point up to {REPEAT_UP_TO} connections "
                                                          "(the median is reported)")
    p.add_argument("--quick", action="store_true", help="skip the open-loop sweep and the 1-worker textbook peer")
    p.add_argument("--profile", action="store_true", help="py-spy profile of a project worker at 32 connections")
    p.add_argument("--groups", default="", help="measure only these groups (peers, others, durability, variants, "
                                                   "rollout), comma-separated; default: all")
    p.add_argument("--outcomes-only", action="store_true", help="only POST /outcomes (rows/s on one worker)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with bench_workspace() as ws:
        if args.outcomes_only:
            rows = outcomes_ingest(ws, tools(), args.seconds)
            print(f"wrote {write_results(args.name, rows, vars(args))}")
        else:
            run(ws, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
