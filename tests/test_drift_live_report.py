"""`mlops-drift report`: the consumer group's live window as an HTML report, from its Redis checkpoints."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.drift_support import SHIFTED, WINDOW_ARGS, make_events, new_topics, produce, wait_assigned, wait_consumed
from tests.support import start_consumer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def report(workspace, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streaming", "report", *args], env={**workspace.env, **env},
                          capture_output=True, text=True, timeout=120)


def test_live_window_report_shows_the_shifted_feature_first(workspace, tmp_path):
    topics = new_topics(workspace)
    env = {**topics.env, "MLOPS_DRIFT_SLOT_SECONDS": "1"}
    consumer = start_consumer(workspace, topics.env, "--group", topics.group, *WINDOW_ARGS)
    try:
        wait_assigned(consumer)
        produce(workspace, topics.predictions, make_events(workspace, 900, seed=21, amount_factor=4.0))
        wait_consumed(workspace, topics, 900)
        out = tmp_path / "live.html"
        result = report(workspace, env, "--group", topics.group, "--window", "120", "--out", str(out))
    finally:
        consumer.stop()
    assert result.returncode == 0, result.stderr
    assert "fraud_detector:v1" in result.stdout and "worst verdict critical" in result.stdout
    page = out.read_text()
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # self-contained
    assert page.count("<svg") >= 5 and "fraud_detector" in page and "v1" in page
    verdicts = re.findall(r'<h2>([^<]+)</h2><span class="badge (\w+)">', page)
    order = [name for name, _ in verdicts]
    assert dict(verdicts)[SHIFTED] == "critical"
    assert dict(verdicts)["total_purchases"] == "ok"  # an input that did not move
    ranks = [{"critical": 0, "warning": 1, "ok": 2}[v] for _, v in verdicts]
    assert ranks == sorted(ranks) and order.index(SHIFTED) < order.index("total_purchases"), verdicts


def test_report_without_checkpoints_is_a_one_line_error(workspace, tmp_path):
    result = report(workspace, {}, "--group", "nobody-consumes", "--out", str(tmp_path / "x.html"))
    assert result.returncode == 2 and "no checkpoints for consumer group 'nobody-consumes'" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
