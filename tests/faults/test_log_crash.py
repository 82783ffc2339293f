"""Process crashes against the prediction log's promise, on the real broker, counted by request id: a worker
SIGKILLed under load in ``ack`` mode loses no answered prediction; a server started on the spool another
left (a pod's kept volume) replays it, and a worker killed in the middle of that replay repeats part of it on
the topic while the drift consumer still counts each request once; a server on a spool in use is refused.
(A prediction log closed during an outage and opened again on its spool: tests/test_prediction_log.py.)"""

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

from harness.kafka_read import read_events
from harness.server_process import ROOT, SERVICE
from harness.traffic import Traffic
from mlops.events import PredictionEvent, encode
from mlops.schema import STORE_FEATURES
from service.spool import Spool, pending_on_disk
from tests.support import metric_value, start_consumer, start_server
from tools import services as svc

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


def _replay_killed(workspace, root: Path, n: int):
    """A spool of ``n`` events replayed into a new topic, the worker killed mid-replay and restarted; returns
    (topic, ids, how often each id is on the topic, spool bytes left at the kill, spool bytes at the start)."""
    from datetime import UTC, datetime

    topic = f"replay-{os.urandom(4).hex()}"
    svc.create_topics(workspace.settings.kafka_bootstrap, {topic: 3})
    folder = root / "kept-volume"
    spooled = Spool(folder / "predictions-w1.jsonl", 1 << 30, fsync=False)
    now = datetime.now(UTC)
    features = workspace.dataset.latest_customers().iloc[0]
    ids = [f"replayed-{i}-{os.urandom(3).hex()}" for i in range(n)]
    spooled.append([encode(PredictionEvent(
        request_id=rid, timestamp=now, model_name=workspace.settings.model_name,
        model_version=workspace.model.version, customer_id=f"C{i % 500:06d}", prediction=0.1, label=0,
        features={"transaction_amount": float(i % 300), **{k: float(features[k]) for k in STORE_FEATURES}},
        request_features=["transaction_amount"])) for i, rid in enumerate(ids)])
    full = spooled.pending_bytes
    spooled.close()
    env = {"MLOPS_WORKERS": "1", "MLOPS_PREDICTIONS_TOPIC": topic, "MLOPS_LOG_DURABILITY": "ack"}
    server = start_server(workspace, env, spool_path=folder / "predictions.jsonl")
    try:
        deadline = time.monotonic() + 120
        while pending_on_disk(folder / "predictions-w1.jsonl") in (full,) and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.3)  # between two cursor advances: what is acknowledged now is behind the cursor
        (worker,) = worker_pids(server)
        os.kill(worker, signal.SIGKILL)
        left = pending_on_disk(folder / "predictions-w1.jsonl")
        assert 0 < left < full, f"no kill in the middle of the replay ({left} of {full} bytes left)"
        deadline = time.monotonic() + 120
        while pending_on_disk(folder / "predictions-w1.jsonl") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pending_on_disk(folder / "predictions-w1.jsonl") == 0, "the restarted worker did not replay"
    finally:
        server.stop()
    counts = Counter(e["request_id"] for e in read_events(workspace.settings.kafka_bootstrap, topic, set(ids),
                                                          timeout=120, settle=2.0))
    return topic, ids, counts, left, full


def test_a_worker_killed_during_replay_repeats_events_that_consumers_count_once(workspace, tmp_path):
    """A spool of 60,000 answered predictions (what an outage left on a kept volume); the server replays it
    once the broker is up, and its worker is SIGKILLed after the replay's first cursor advance. The restarted
    worker replays from the cursor: nothing is lost, the events acknowledged after the last advance reach the
    topic twice, and the drift consumer counts each request once (its duplicates metric = the repeats).
    A kill that lands where nothing acknowledged lies past the cursor repeats nothing (and loses nothing:
    checked too); the scenario then runs again, up to three times, until a kill exercises the duplicate path."""
    n = 60_000
    for attempt in range(3):
        topic, ids, counts, left, full = _replay_killed(workspace, tmp_path / f"attempt-{attempt}", n)
        assert set(counts) == set(ids), f"{n - len(counts)} spooled predictions lost"
        repeats = sum(counts.values()) - n
        if repeats > 0:
            break
    consumer = start_consumer(workspace, {"MLOPS_PREDICTIONS_TOPIC": topic, "MLOPS_DRIFT_AUTO_OFFSET_RESET":
                                          "earliest", "MLOPS_DRIFT_GROUP_ID": f"replay-{os.urandom(3).hex()}"})
    try:
        deadline = time.monotonic() + 120
        consumed = duplicates = 0.0
        while time.monotonic() < deadline and consumed + duplicates < n + repeats:
            assert consumer.process.poll() is None, consumer.log()[-2000:]
            try:
                text = httpx.get(f"http://127.0.0.1:{consumer.metrics_port}/metrics", timeout=2).text
                consumed = metric_value(text, "mlops_drift_events_consumed_total")
                duplicates = metric_value(text, "mlops_drift_duplicate_events_total")
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    finally:
        consumer.stop()
    print(f"\nreplay killed with {left} of {full} bytes left: {repeats} events repeated on the topic, "
          f"consumer counted {consumed:.0f} and skipped {duplicates:.0f}")
    assert repeats > 0, "the kill repeated nothing: the test did not exercise the duplicate path"
    assert (consumed, duplicates) == (n, repeats)


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
