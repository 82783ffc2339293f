"""The prediction log's durability promises, each against what could break it: the spool's ownership, fsync
and failed writes (a real full disk: a small tmpfs), garbled lines, the ack mode's confirmation (after the
broker's acknowledgement, or after the spool's fsync while the broker is down, or a timeout while it stalls),
a request's events taken all or none, and a replay chunk never larger than the client's queue."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from harness.kafka_read import read_events
from service.prediction_log import LogRefused, PredictionLog
from service.spool import Spool, SpoolInUse, SpoolWriteFailed, in_use
from tests.test_prediction_log import event, settings, wait_for
from tools import services as svc

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def small_disk(path: Path, size: str = "64k"):
    """A real filesystem that fills up: a tmpfs of ``size``."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): the disk-full tests need root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Fill the disk to the last byte; the filler is returned so a test can free the space again."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"x" * size)
    finally:
        os.close(fd)
    return filler


# -- the spool on its own ---------------------------------------------------------------------------------


def test_a_second_process_cannot_open_a_spool_in_use(tmp_path):
    path = tmp_path / "spool.jsonl"
    spool = Spool(path, 1 << 20)
    code = (f"from pathlib import Path; from service.spool import Spool, SpoolInUse\n"
            f"try:\n    Spool(Path({str(path)!r}), 1 << 20)\n"
            f"except SpoolInUse as e:\n    print(e); raise SystemExit(3)")
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert other.returncode == 3 and f"pid {os.getpid()}" in other.stdout, other.stdout + other.stderr
    assert in_use(path) is not None
    with pytest.raises(SpoolInUse):
        Spool(path, 1 << 20)  # another open in the same process too
    spool.close()
    assert in_use(path) is None
    Spool(path, 1 << 20).close()


def test_the_lock_dies_with_its_process(tmp_path):
    """A SIGKILLed owner leaves no lock behind: the restarted worker opens its spool at once."""
    path = tmp_path / "spool.jsonl"
    code = (f"from pathlib import Path; from service.spool import Spool; import time\n"
            f"s = Spool(Path({str(path)!r}), 1 << 20); s.append([b'{{\"a\":1}}'])\n"
            f"print('ok', flush=True); time.sleep(60)")
    owner = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "ok"
        assert in_use(path) is not None
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        again = Spool(path, 1 << 20)
        assert again.pending_events == 1  # fsynced before append returned
        again.close()
    finally:
        owner.kill()


def test_garbled_lines_anywhere_are_skipped_and_counted(tmp_path):
    path = tmp_path / "spool.jsonl"
    path.write_bytes(b'{"a":1}\n\x00\x00\x00\n{"a":2}\nnot json\n{"a":3}\n\n{"a":4}\n')
    spool = Spool(path, 1 << 20)
    chunk = spool.read(2)
    assert chunk.events == [b'{"a":1}', b'{"a":2}'] and chunk.garbled == 2  # and the one after {"a":2}
    spool.advance(chunk.end, 2, chunk.garbled)
    chunk = spool.read(10)
    assert chunk.events == [b'{"a":3}', b'{"a":4}'] and chunk.garbled == 1
    spool.advance(chunk.end, 2, chunk.garbled)
    assert spool.skipped == 3 and spool.pending_events == 0 and path.stat().st_size == 0


def test_a_write_the_disk_refuses_leaves_the_file_as_it_was(tmp_path):
    with small_disk(tmp_path / "disk") as disk:
        spool = Spool(disk / "spool.jsonl", 1 << 20)
        assert spool.append([b'{"a":1}']) == 1
        filler = fill(disk)
        before = (disk / "spool.jsonl").read_bytes()
        with pytest.raises(SpoolWriteFailed):
            spool.append([b'{"big":"' + b"y" * 9000 + b'"}'] * 3)
        assert (disk / "spool.jsonl").read_bytes() == before  # no torn line mid-file
        assert spool.pending_events == 1
        filler.unlink()
        assert spool.append([b'{"a":2}']) == 1
        spool.close()
        again = Spool(disk / "spool.jsonl", 1 << 20)
        assert again.read(10).events == [b'{"a":1}', b'{"a":2}'] and again.skipped == 0
        again.close()


def test_exported_counters_never_go_down():
    """A `delivered` reading one event behind (the client's queue length while a report is served) must not
    make the metrics export fail (prometheus refuses a negative increment) nor count twice."""
    from service.prediction_log import LogStats

    zero = LogStats(False, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, {})
    first = dataclasses.replace(zero, accepted=10, delivered=10)
    dip = dataclasses.replace(zero, accepted=12, delivered=9)
    grown, seen = first.increments_since(zero, ["accepted", "delivered"])
    assert grown == {"accepted": 10, "delivered": 10}
    grown, seen = dip.increments_since(seen, ["accepted", "delivered"])
    assert grown == {"accepted": 2} and seen.delivered == 10
    grown, _ = dataclasses.replace(zero, accepted=12, delivered=12).increments_since(seen, ["accepted", "delivered"])
    assert grown == {"delivered": 2}


# -- the log, on the real broker ------------------------------------------------------------------------


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def open_log(bootstrap: str, spool: Spool, **kwargs) -> PredictionLog:
    log = PredictionLog(bootstrap, "predictions", spool, probe_interval_s=0.3, **kwargs).start()
    assert log.wait_connected(30), "never connected to the broker"
    return log


def test_ack_mode_answers_only_after_the_broker_has_the_events(services, tmp_path):
    bootstrap = settings(services).kafka_bootstrap
    log = open_log(bootstrap, Spool(tmp_path / "spool.jsonl", 1 << 20), durability="ack", linger_ms=50)
    tag = uuid.uuid4().hex[:8]

    async def one_batch():
        confirm = log.confirmation()
        assert log.publish_all([event(tag, i) for i in range(20)], confirm)
        started = time.monotonic()
        ready = confirm.seal()
        assert not ready.done()  # linger 50 ms: nothing can be acknowledged yet
        await ready
        assert confirm.confirmed == confirm.handed == 20  # every event's acknowledgement arrived first
        return time.monotonic() - started

    try:
        waited = run(one_batch())
        assert waited >= 0.03
        wait_for(lambda: log.stats().in_flight == 0 and log.stats().delivered == 20, 2, "the counters")
    finally:
        log.close()
    assert len(read_events(bootstrap, "predictions", {f"{tag}-{i}" for i in range(20)}, settle=0.5)) == 20


def test_ack_mode_with_the_broker_down_answers_once_the_spool_has_them_on_disk(services, tmp_path):
    run_dir, _ = services
    bootstrap = settings(services).kafka_bootstrap
    spool = Spool(tmp_path / "spool.jsonl", 1 << 20)
    log = open_log(bootstrap, spool, durability="ack", ack_timeout_s=3.0)
    tag = uuid.uuid4().hex[:8]
    svc.down(run_dir, only="kafka", kill=True)
    try:
        wait_for(lambda: not log.connected, 15, "the outage noticed")

        async def one_batch():
            confirm = log.confirmation()
            assert log.publish_all([event(tag, i) for i in range(10)], confirm)
            await confirm.seal()

        run(one_batch())
        assert spool.pending_events == 10  # on disk, fsynced, when the requests were answered
        assert (tmp_path / "spool.jsonl").read_bytes().count(tag.encode()) == 10
    finally:
        svc.up(run_dir, only="kafka")
    wait_for(lambda: log.connected and log.stats().spool_events == 0, 90, "the spool replayed")
    log.close()
    assert len(read_events(bootstrap, "predictions", {f"{tag}-{i}" for i in range(10)}, settle=0.5)) >= 10


def test_ack_mode_times_out_on_a_stalled_broker_with_a_retryable_refusal(services, tmp_path):
    """A broker that keeps its connections but answers nothing (SIGSTOP): the request is refused after the
    timeout instead of hanging; its events stay held and arrive once the broker resumes."""
    run_dir, _ = services
    bootstrap = settings(services).kafka_bootstrap
    log = open_log(bootstrap, Spool(tmp_path / "spool.jsonl", 1 << 20), durability="ack", ack_timeout_s=0.5)
    tag = uuid.uuid4().hex[:8]
    pid = svc.RunDir(run_dir).load()["kafka"]["pid"]
    os.killpg(pid, signal.SIGSTOP)
    try:
        async def one_batch():
            confirm = log.confirmation()
            assert log.publish_all([event(tag, i) for i in range(5)], confirm)
            started = time.monotonic()
            with pytest.raises(LogRefused) as refused:
                await confirm.seal()
            return refused.value, time.monotonic() - started

        error, waited = run(one_batch())
        assert error.code == "prediction_log_timeout" and "same request_id" in str(error)
        assert 0.4 < waited < 1.5
    finally:
        os.killpg(pid, signal.SIGCONT)
    wait_for(lambda: log.stats().in_flight == 0, 60, "the held events delivered")
    log.close()
    assert len(read_events(bootstrap, "predictions", {f"{tag}-{i}" for i in range(5)}, settle=0.5)) >= 5


def test_a_request_is_taken_whole_or_not_at_all(services, tmp_path):
    run_dir, _ = services
    bootstrap = settings(services).kafka_bootstrap
    spool = Spool(tmp_path / "spool.jsonl", 4096)
    log = open_log(bootstrap, spool)
    svc.down(run_dir, only="kafka", kill=True)
    try:
        wait_for(lambda: not log.connected, 15, "the outage noticed")
        big = [event("whole", i) for i in range(200)]  # ~60 bytes each: more than the 4 KiB spool
        assert not log.publish_all(big)
        small = [event("whole", i) for i in range(3)]
        assert log.publish_all(small)
        wait_for(lambda: log.stats().queue_depth == 0, 5, "the spool written")
        stats = log.stats()
        assert stats.spool_events == 3 and stats.rejected == 200 and stats.dropped == {}
    finally:
        log.close(timeout_s=0.5)
        svc.up(run_dir, only="kafka")


def test_a_full_disk_keeps_events_in_memory_refuses_new_ones_and_recovers(services, tmp_path):
    run_dir, _ = services
    bootstrap = settings(services).kafka_bootstrap
    tag = uuid.uuid4().hex[:8]
    with small_disk(tmp_path / "disk", "256k") as disk:
        log = open_log(bootstrap, Spool(disk / "spool.jsonl", 1 << 20))
        filler = fill(disk)
        svc.down(run_dir, only="kafka", kill=True)
        try:
            wait_for(lambda: not log.connected, 15, "the outage noticed")
            assert log.publish_all([event(tag, i) for i in range(50)])
            wait_for(lambda: log.stats().spool_failing, 5, "the failed write noticed")
            stats = log.stats()
            assert stats.queue_depth == 50 and stats.spool_events == 0 and stats.dropped == {}
            assert not log.accepting and not log.publish_all([event(tag, 999)])  # refused: a 503, not a loss
            filler.unlink()
            wait_for(lambda: log.stats().spool_events == 50 and not log.stats().spool_failing, 10,
                     "the spool written once the disk has room")
            assert log.accepting
        finally:
            svc.up(run_dir, only="kafka")
        wait_for(lambda: log.connected and log.stats().spool_events == 0, 90, "the spool replayed")
        log.close()
    assert len(read_events(bootstrap, "predictions", {f"{tag}-{i}" for i in range(50)}, settle=0.5)) == 50


def test_a_replay_chunk_is_never_larger_than_the_clients_queue(services, tmp_path):
    bootstrap = settings(services).kafka_bootstrap
    tag = uuid.uuid4().hex[:8]
    spool = Spool(tmp_path / "spool.jsonl", 1 << 22)
    spool.append([event(tag, i)[1] for i in range(1000)])
    log = PredictionLog(bootstrap, "predictions", spool, queue_size=100, replay_chunk=5000, probe_interval_s=0.3)
    assert log.replay_chunk == 50
    log.start()
    wait_for(lambda: log.stats().spool_events == 0, 60, "1,000 events replayed through a queue of 100")
    started = time.monotonic()
    log.close()
    assert time.monotonic() - started < 5
    assert len(read_events(bootstrap, "predictions", {f"{tag}-{i}" for i in range(1000)}, settle=0.5)) == 1000
