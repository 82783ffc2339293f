"""Process crashes against the prediction log's promise, on the real broker, counted by request id: a worker
SIGKILLed under load in ``ack`` mode loses no answered prediction; a server restarted on the same spool
folder replays what the last one left; a server on a spool in use is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from service.spool import Spool
from tests.harness import start_server
from tools import services as svc
from tools.kafka_read import read_events
from tools.server_process import ROOT, SERVICE
from tools.traffic import Traffic

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with open(task / "children") as f:
            found += [int(child) for child in f.read().split()]
    return found


def worker_pids(server) -> list[int]:
    """The serving workers: processes under `bentoml serve` whose command line runs a BentoML worker."""
    workers, todo = [], [server.process.pid]
    while todo:
        pid = todo.pop()
        for child in children(pid):
            todo.append(child)
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"worker" in cmdline and b"service" in cmdline:
                workers.append(child)
    return workers


def logged(workspace, ids: set[str]) -> Counter:
    events = read_events(workspace.settings.kafka_bootstrap, "predictions", ids, timeout=120, settle=2.0)
    return Counter(e["request_id"] for e in events)


def test_a_worker_killed_under_load_loses_no_answered_prediction(workspace):
    """``ack`` mode (the default): every request answered 200 before, during and after a SIGKILL of its
    worker has its event in the topic (at least once; consumers de-duplicate on request_id)."""
    server = start_server(workspace, {"MLOPS_LOG_DURABILITY": "ack", "MLOPS_WORKERS": "1"})
    try:
        (worker,) = worker_pids(server)
        with Traffic(server.url, clients=8) as traffic:
            time.sleep(3)
            os.kill(worker, signal.SIGKILL)
            killed_at = time.monotonic()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any(
                    r.status == 200 and r.at > killed_at + 0.5 for r in list(traffic.results)):
                time.sleep(0.2)
            time.sleep(2)
        before = [r for r in traffic.results if r.status == 200 and r.at < killed_at]
        after = [r for r in traffic.results if r.status == 200 and r.at > killed_at + 0.5]
        assert len(before) > 100 and after, "the worker was not restarted, or no load before the kill"
        accepted = traffic.accepted()
        counts = logged(workspace, accepted)
        missing = accepted - set(counts)
        assert not missing, f"{len(missing)} of {len(accepted)} answered predictions not in the topic"
    finally:
        server.stop()


def test_a_restarted_server_replays_the_spool_the_last_one_left(workspace, tmp_path):
    """The broker down, events spooled, the server stopped (a pod deleted) and started again on the same spool
    folder (the volume kept): the new server replays them once the broker is back."""
    run_dir = workspace.env_file.parent
    spool = tmp_path / "kept-volume" / "predictions.jsonl"
    env = {"MLOPS_KAFKA_RETRY_INTERVAL_S": "0.5", "MLOPS_WORKERS": "1"}
    server = start_server(workspace, env, spool_path=spool)
    ids = [f"kept-{i}-{os.urandom(3).hex()}" for i in range(30)]
    try:
        svc.down(run_dir, only="kafka", kill=True)
        deadline = time.monotonic() + 15
        while httpx.get(f"{server.url}/info", timeout=5).json()["kafka"]["connected"]:
            assert time.monotonic() < deadline, "the outage was not noticed"
            time.sleep(0.2)
        for rid in ids:
            r = httpx.post(f"{server.url}/predict", json={"customer_id": "C000001", "transaction_amount": 5.0,
                                                         "request_id": rid}, timeout=10)
            assert r.status_code == 200, r.text
        server.stop()
    finally:
        svc.up(run_dir, only="kafka")
    again = start_server(workspace, env, spool_path=spool)
    try:
        counts = logged(workspace, set(ids))
        assert set(counts) == set(ids)
    finally:
        again.stop()


def test_a_second_server_on_a_spool_in_use_is_refused_with_one_line(workspace, tmp_path):
    """The spool of worker 1 held (by this test, as a running server's worker would hold it): `bentoml serve`
    on that folder exits 2 before starting any worker, with one line naming the holder."""
    spool = tmp_path / "shared" / "predictions.jsonl"
    held = Spool(spool.with_name("predictions-w1.jsonl"), 1 << 20)
    try:
        env = {**os.environ, **workspace.env, "MLOPS_SPOOL_PATH": str(spool),
               "MLOPS_GRPC_PORT": str(svc.free_port()), "MLOPS_WORKERS": "1"}
        second = subprocess.run([str(Path(sys.executable).with_name("bentoml")), "serve", SERVICE, "--port",
                                 str(svc.free_port()), "--host", "127.0.0.1"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use (held by pid {os.getpid()})" in second.stderr and "MLOPS_SPOOL_PATH" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        held.close()
