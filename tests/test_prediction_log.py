"""The prediction log against the real broker: exactly once through a broker crash, the spool, its limits."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from harness.kafka_read import read_events
from mlops.settings import Settings
from service.prediction_log import PredictionLog
from service.spool import Spool
from tools import services as svc

pytestmark = pytest.mark.integration


def event(tag: str, i: int) -> tuple[bytes, bytes]:
    customer = f"C{i % 50:06d}"
    return customer.encode(), f'{{"request_id":"{tag}-{i}","customer_id":"{customer}","n":{i}}}'.encode()


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def open_log(bootstrap: str, spool_path: Path, **kwargs) -> PredictionLog:
    log = PredictionLog(bootstrap, "predictions", Spool(spool_path, kwargs.pop("max_bytes", 1 << 20)),
                        probe_interval_s=0.3, **kwargs).start()
    assert log.wait_connected(30), "never connected to the broker"
    return log


def settings(services) -> Settings:
    run_dir, _ = services
    return Settings.load(svc.RunDir(run_dir).env_file)


def test_every_event_once_in_the_topic(services, tmp_path):
    bootstrap = settings(services).kafka_bootstrap
    log = open_log(bootstrap, tmp_path / "spool.jsonl")
    tag = uuid.uuid4().hex[:8]
    assert all(log.publish(*event(tag, i)) for i in range(500))
    wait_for(lambda: log.stats().delivered == 500, 30, "500 acknowledgements")
    stats = log.stats()
    assert (stats.accepted, stats.in_flight, stats.spool_events, sum(stats.dropped.values())) == (500, 0, 0, 0)
    log.close()
    events = read_events(bootstrap, "predictions", {f"{tag}-{i}" for i in range(500)}, settle=1.0)
    assert len(events) == 500


def test_broker_crash_loses_and_repeats_nothing(services, tmp_path):
    """kill -9 the broker while events flow; publish never blocks; after the restart each event is there once."""
    run_dir, _ = services
    bootstrap = settings(services).kafka_bootstrap
    log = open_log(bootstrap, tmp_path / "spool.jsonl")
    tag = uuid.uuid4().hex[:8]
    sent = 0
    slowest = 0.0

    def publish(n: int) -> None:
        nonlocal sent, slowest
        for _ in range(n):
            started = time.perf_counter()
            assert log.publish(*event(tag, sent))
            slowest = max(slowest, time.perf_counter() - started)
            sent += 1
            time.sleep(0.002)

    publish(300)
    svc.down(run_dir, only="kafka", kill=True)
    try:
        publish(600)  # some reach the client before the outage is noticed, the rest go to the spool
        wait_for(lambda: not log.connected, 10, "the outage to be noticed")
        publish(300)
        wait_for(lambda: log.stats().spool_events > 0, 10, "events in the spool")
    finally:
        svc.up(run_dir, only="kafka")
    # The replay counter moves just after the spool's cursor (two steps, not one): wait for both.
    wait_for(lambda: (s := log.stats()).delivered >= sent and s.spool_events == 0 and s.replayed > 0, 90,
             "all events delivered, the spooled ones replayed")
    stats = log.stats()
    assert stats.connected and stats.in_flight == 0
    assert stats.accepted == sent and not stats.dropped
    assert stats.outages == 1, "one outage must be declared once, without flapping back up before it ends"
    assert slowest < 0.05, f"publish blocked for {slowest:.3f}s"
    log.close()
    events = read_events(bootstrap, "predictions", {f"{tag}-{i}" for i in range(sent)}, timeout=60, settle=2.0)
    ids = [e["request_id"] for e in events]
    assert len(ids) == sent and len(set(ids)) == sent, f"{len(ids)} events for {sent} published"


def test_a_quiet_spell_longer_than_the_stall_limit_is_not_an_outage(services, tmp_path):
    """No traffic for longer than ``stall_s``, then events again: the broker is up, nothing may be spooled.
    (A long linger keeps each new event held for most of a second, as a slow acknowledgement would.)"""
    log = open_log(settings(services).kafka_bootstrap, tmp_path / "spool.jsonl", stall_s=1.5, linger_ms=700)
    tag = uuid.uuid4().hex[:8]
    for i in range(3):
        assert log.publish(*event(tag, i))
        wait_for(lambda i=i: log.stats().delivered == i + 1, 30, "the acknowledgement")
        time.sleep(3.0)  # quiet: nothing held, nothing to acknowledge
    stats = log.stats()
    log.close()
    assert stats.connected and stats.outages == 0 and stats.spooled == 0, stats


def test_close_during_outage_keeps_events_for_the_next_start(services, tmp_path):
    run_dir, _ = services
    bootstrap = settings(services).kafka_bootstrap
    spool_path = tmp_path / "spool.jsonl"
    log = open_log(bootstrap, spool_path)
    tag = uuid.uuid4().hex[:8]
    svc.down(run_dir, only="kafka", kill=True)
    try:
        wait_for(lambda: not log.connected, 10, "the outage to be noticed")
        for i in range(200):
            assert log.publish(*event(tag, i))
        log.close(timeout_s=1.0)
        kept = Spool(spool_path, 1 << 20)
        assert kept.pending_events == 200
        kept.close()
    finally:
        svc.up(run_dir, only="kafka")
    again = open_log(bootstrap, spool_path)
    wait_for(lambda: again.stats().spool_events == 0, 60, "the spool to be replayed")
    again.close()
    events = read_events(bootstrap, "predictions", {f"{tag}-{i}" for i in range(200)}, settle=1.0)
    assert len(events) == 200


@pytest.mark.parametrize("policy", ["reject", "drop"])
def test_a_full_spool_rejects_or_counts(services, tmp_path, policy):
    run_dir, _ = services
    bootstrap = settings(services).kafka_bootstrap
    log = open_log(bootstrap, tmp_path / "spool.jsonl", max_bytes=4096, full_policy=policy)
    svc.down(run_dir, only="kafka", kill=True)
    try:
        wait_for(lambda: not log.connected, 10, "the outage to be noticed")
        results = [log.publish(*event("full", i)) for i in range(200)]
        time.sleep(0.5)
        stats = log.stats()
        if policy == "reject":
            assert not all(results) and stats.rejected == results.count(False) and not stats.dropped
            assert not log.accepting
        else:
            assert all(results) and stats.dropped["spool_full"] > 0 and log.accepting
        assert stats.spool_bytes <= 4096
        assert stats.accepted == stats.spool_events + stats.queue_depth + sum(stats.dropped.values()) + \
            stats.in_flight + stats.delivered
    finally:
        log.close(timeout_s=0.5)
        svc.up(run_dir, only="kafka")


def test_spool_cuts_a_torn_line_and_resumes_at_its_cursor(tmp_path):
    path = tmp_path / "spool.jsonl"
    spool = Spool(path, 1 << 20, fsync=False)
    assert spool.append([b'{"a":1}', b'{"a":2}', b'{"a":3}']) == 3
    chunk = spool.read(2)
    spool.advance(chunk.end, len(chunk.events))
    spool.close()
    with open(path, "ab") as f:
        f.write(b'{"torn"')  # a crash in the middle of a write
    again = Spool(path, 1 << 20)
    assert again.pending_events == 1 and again.read(10).events == [b'{"a":3}'] and again.skipped == 1
    chunk = again.read(10)
    again.advance(chunk.end, len(chunk.events))
    assert again.pending_events == 0 and path.stat().st_size == 0
