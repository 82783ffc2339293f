"""`mlops-drift` usage and startup errors end with one line on stderr and exit code 2, never a traceback.

No Kafka or Redis is needed: each of these fails before the consumer connects to anything.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def mlops_drift(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    # Unreachable services: a command that got past its checks would only log retries until --max-seconds.
    base = {**os.environ, "MLOPS_ENV_FILE": "/nonexistent", "MLOPS_KAFKA_BOOTSTRAP": "127.0.0.1:1",
            "MLOPS_REDIS_ADDRESS": "127.0.0.1:1"}
    return subprocess.run([sys.executable, "-m", "streaming", *args], cwd=ROOT, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.fixture
def busy_port():
    """A port some other process listens on (here: this one), on all interfaces as the consumer would bind."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_busy_metrics_port_is_one_line_and_exit_2(busy_port):
    """Loopback by default; a pod sets MLOPS_DRIFT_METRICS_HOST=0.0.0.0."""
    result = mlops_drift("consume", "--metrics-port", str(busy_port), "--max-seconds", "5")
    assert_one_line(result, f"cannot serve metrics on 127.0.0.1:{busy_port}")
    assert "--metrics-port" in result.stderr
    result = mlops_drift("consume", "--metrics-port", str(busy_port), "--max-seconds", "5",
                         env={"MLOPS_DRIFT_METRICS_HOST": "0.0.0.0"})
    assert_one_line(result, f"cannot serve metrics on 0.0.0.0:{busy_port}")


def test_busy_metrics_port_from_the_environment(busy_port):
    result = mlops_drift("consume", "--metrics-local", "--max-seconds", "5",
                         env={"MLOPS_DRIFT_METRICS_PORT": str(busy_port), "MLOPS_DRIFT_METRICS_HOST": "0.0.0.0"})
    assert_one_line(result, f"cannot serve metrics on 127.0.0.1:{busy_port}")


@pytest.mark.parametrize(("args", "message"), [
    (("--slot-seconds", "0"), "--slot-seconds"),
    (("--slot-seconds", "nan"), "--slot-seconds"),
    (("--window-seconds", "inf"), "--window-seconds"),
    (("--window-seconds", "5", "--slot-seconds", "10"), "--window-seconds"),
    (("--max-events", "0"), "--max-events"),
    (("--metrics-port", "70000"), "--metrics-port"),
    (("--max-seconds", "nan"), "--max-seconds"),
    (("--bogus",), "unrecognized arguments"),
])
def test_bad_consume_options_are_one_line_and_exit_2(args, message):
    assert_one_line(mlops_drift("consume", *args, "--max-seconds", "5") if "--max-seconds" not in args
                    else mlops_drift("consume", *args), message)


def test_bad_setting_is_one_line_and_exit_2():
    result = mlops_drift("consume", "--max-seconds", "5", env={"MLOPS_DRIFT_SLOT_SECONDS": "-1"})
    assert_one_line(result, "MLOPS_DRIFT_SLOT_SECONDS")


def test_bad_report_window_is_one_line_and_exit_2(tmp_path):
    assert_one_line(mlops_drift("report", "--out", str(tmp_path / "r.html"), "--window", "nan"), "--window")


@pytest.mark.parametrize("threshold", [".nan", ".inf"])
def test_rules_file_with_a_non_finite_threshold_is_refused(tmp_path, threshold):
    """A NaN threshold never fires (every comparison with NaN is false): refused, like in `drift --threshold`."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"rules:\n  - {{metric: psi, threshold: {threshold}, severity: critical}}\n")
    assert_one_line(mlops_drift("consume", "--rules", str(rules), "--max-seconds", "5"), "finite")
