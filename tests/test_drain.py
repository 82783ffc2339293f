"""The preStop drain (service/drain.py): it waits while any worker's spool holds events, and says what it
left when the time runs out. The spool on a kept volume being replayed by the next server is
tests/faults/test_log_crash.py (a server killed and started again on the same spool: 0 lost)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from service import drain
from service.spool import Spool, pending_on_disk

ROOT = Path(__file__).resolve().parents[1]


def spool_with(path: Path, n: int) -> Spool:
    spool = Spool(path, 1 << 20, fsync=False)
    spool.append([b'{"request_id": "r%d"}' % i for i in range(n)])
    return spool


def test_pending_is_read_from_the_files_while_the_owner_holds_the_spool(tmp_path):
    base = tmp_path / "predictions.jsonl"
    w1, w2 = spool_with(tmp_path / "predictions-w1.jsonl", 3), spool_with(tmp_path / "predictions-w2.jsonl", 2)
    assert drain.spool_files(base) == [w1.path, w2.path]
    assert drain.pending([base]) == w1.pending_bytes + w2.pending_bytes > 0
    chunk = w1.read(10)
    w1.advance(chunk.end, len(chunk.events))
    assert pending_on_disk(w1.path) == 0 and drain.pending([base]) == w2.pending_bytes
    assert pending_on_disk(tmp_path / "absent.jsonl") == 0


def test_the_wait_ends_when_the_spools_empty_or_at_the_timeout(tmp_path):
    spool = spool_with(tmp_path / "predictions-w1.jsonl", 5)
    base = tmp_path / "predictions.jsonl"
    started = time.monotonic()
    assert drain.wait_empty([base], 0.3, poll_s=0.05) == spool.pending_bytes
    assert time.monotonic() - started < 2

    def replay() -> None:
        time.sleep(0.3)
        chunk = spool.read(10)
        spool.advance(chunk.end, len(chunk.events))

    threading.Thread(target=replay).start()
    started = time.monotonic()
    assert drain.wait_empty([base], 10, poll_s=0.05) == 0
    assert time.monotonic() - started < 5


def hook(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """`python -m service.drain` on the spools under ``tmp_path`` (predictions.jsonl as the configured path)."""
    env = {"MLOPS_SPOOL_PATH": str(tmp_path / "predictions.jsonl"), "MLOPS_ENV_FILE": str(tmp_path / "none.env"),
           "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "service.drain", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_the_hook_exits_1_with_one_line_naming_what_is_left(tmp_path):
    spool_with(tmp_path / "predictions-w1.jsonl", 4)
    run = hook(tmp_path, "--settle", "0", "--timeout", "0.2")
    assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "still spooled" in run.stderr and "replays them" in run.stderr
    bad = hook(tmp_path, "--timeout", "-1")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr


def test_the_hook_waits_for_the_outcomes_spool_too(tmp_path):
    spool_with(tmp_path / "outcomes-w1.jsonl", 2)
    run = hook(tmp_path, "--settle", "0", "--timeout", "0.2")
    assert run.returncode == 1 and "outcome" in run.stderr, run.stderr
