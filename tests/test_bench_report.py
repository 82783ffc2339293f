"""The benchmark page's tables (docs/benchmarks.md) are the committed result files, rendered (never typed by hand)."""

from __future__ import annotations

import json

from bench import report
from bench.common import RESULTS


def test_benchmark_tables_are_generated_from_the_committed_results():
    assert report.main(["--check"]) == 0, f"{report.PAGE}'s serving tables differ: run `python -m bench.report --write`"


def test_the_committed_runs_name_a_clean_commit_and_lose_no_event():
    for name in report.DEFAULT_RUNS.split(","):
        run = json.loads((RESULTS / f"{name}.json").read_text())
        assert run["git"]["sha"] and not run["git"]["dirty"], f"{name}: measured on an uncommitted tree"
        kafka = [r for r in run["results"] if r["mode"] == "kafka"]
        assert kafka and all(r["lost"] == 0 for r in kafka), f"{name}: a 200 without its Kafka event"
        closed = [r for r in run["results"] if r["mode"] == "closed"]
        assert closed and all("cpu_ms_per_request" in r for r in closed if r["protocol"] == "http")
