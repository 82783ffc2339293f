"""Batch scoring and backfills (`mlops-score`, issue 20) on the real Feast offline store, MLflow registry,
Kafka broker and serving API: the same score as /predict for the same row, the same output from Ray as from
the single process, a killed job resumed without redoing or duplicating a partition, every bad row counted in
the rejects, bad input refused in one line, and a time range of the prediction log read exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pandas as pd
import pytest

from harness.workspace import Workspace
from mlops import events
from mlops.schema import STORE_FEATURES

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def score(workspace: Workspace, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The command as a user runs it (Ray, kills, the exact stderr of a refusal)."""
    return subprocess.run([sys.executable, "-m", "lifecycle.batch.cli", "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=workspace.env)


@pytest.fixture
def score_here(workspace, monkeypatch, capsys):
    """The command in this process (no start-up to pay): (exit code, stdout, stderr)."""
    from lifecycle.batch.cli import main

    monkeypatch.setenv("MLOPS_FEATURE_REPO", str(workspace.feature_repo))

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            code = main(["--no-progress", *args])
        except SystemExit as exc:
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


def model_uri(workspace: Workspace) -> str:
    return f"models:/{workspace.model.name}/{workspace.model.version}"


def transactions(workspace: Workspace, n: int, at: datetime | None = None, seed: int = 0) -> pd.DataFrame:
    """``n`` transactions of known customers: at ``at`` (after every snapshot: the features /predict serves
    from the online store) or at the history's own times."""
    history = workspace.dataset.transactions.sample(n, replace=n > len(workspace.dataset.transactions),
                                                    random_state=seed).reset_index(drop=True)
    frame = history[["customer_id", "event_timestamp", "transaction_amount"]].copy()
    if at is not None:
        frame["event_timestamp"] = pd.Timestamp(at)
    frame["row"] = range(n)
    return frame


def score_frame(score_here, workspace: Workspace, rows: pd.DataFrame, folder: Path, *args: str) -> dict:
    """``rows`` written as Parquet in ``folder`` and scored into ``folder/out`` in this process; the summary."""
    rows.to_parquet(folder / "in.parquet")
    result = score_here("--input", str(folder / "in.parquet"), "--model", model_uri(workspace), "--output",
                        str(folder / "out"), "--json", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def scored(folder: Path) -> pd.DataFrame:
    return pd.read_parquet(folder).sort_values("row").reset_index(drop=True)


def test_a_batch_score_is_what_predict_answers_for_the_same_row(workspace, server, tmp_path, score_here):
    """Rows timed now get the newest snapshot, the one /predict reads online: equal scores, row by row — from
    the served trees compiled to C (the default where a compiler is), which /predict runs on onnxruntime."""
    rows = transactions(workspace, 2_000, at=datetime.now(UTC))
    summary = score_frame(score_here, workspace, rows, tmp_path, "--engine", "local")
    assert (summary["read"], summary["scored"], summary["rejected"]) == (2_000, 2_000, 0)
    assert (summary["runtime"], summary["partitions_by_runtime"]) == ("compiled", {"compiled": 1})
    out = scored(tmp_path / "out")
    assert set(out["model_version"]) == {workspace.model.version}
    for row in out.sample(40, random_state=1).itertuples():
        answer = httpx.post(f"{server.url}/predict", json={"customer_id": row.customer_id,
                                                           "transaction_amount": row.transaction_amount},
                            timeout=10).json()
        assert answer["model_version"] == row.model_version
        assert abs(answer["prediction"] - row.prediction) <= 1e-6, (row, answer)
        assert answer["label"] == row.label


def test_point_in_time_features_and_ray_gives_the_single_process_output(workspace, tmp_path, score_here, ray_turn):
    """Historical rows get the snapshot that was newest at their time (not today's), and Ray Data over many
    partitions writes what the single process writes."""
    from mlops.offline import features_as_of

    rows = transactions(workspace, 6_000, seed=2)
    rows.to_parquet(tmp_path / "in.parquet")
    common = ["--input", str(tmp_path / "in.parquet"), "--model", model_uri(workspace), "--partition-rows", "1000"]
    local = score_here(*common, "--output", str(tmp_path / "local"), "--engine", "local")
    assert local.returncode == 0, local.stderr[-3000:]
    ray = score(workspace, *common, "--output", str(tmp_path / "ray"), "--engine", "ray", "--workers", "2", "--json")
    assert ray.returncode == 0, ray.stderr[-3000:]
    assert json.loads(ray.stdout)["engine"] == "ray"
    # every Ray worker loaded the library the driver built and shipped
    assert json.loads(ray.stdout)["partitions_by_runtime"] == {"compiled": 6}
    a, b = scored(tmp_path / "local"), scored(tmp_path / "ray")
    assert len(a) == len(b) == 6_000 - json.loads(ray.stdout)["rejected"]
    # the same rows and values; scores within 1e-6 (one process runs the model on every core, a Ray task on
    # one: float32 sums in another order)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=0, atol=1e-6)
    expected = features_as_of(workspace.feature_repo, a[["customer_id", "event_timestamp"]],
                              workspace.settings.redis_address)
    pd.testing.assert_frame_equal(a[list(STORE_FEATURES)], expected, check_dtype=False)
    assert len(list((tmp_path / "ray").glob("part-*.parquet"))) == 6


def test_a_ray_cluster_by_address_scores_as_one_process(workspace, tmp_path, score_here, ray_cluster):
    """`--address`: the driver is a client of a running cluster; the cluster's own workers load the compiled
    trees the driver built and shipped, and write what the single process writes."""
    address = ray_cluster
    rows = transactions(workspace, 4_000, seed=4)
    rows.to_parquet(tmp_path / "in.parquet")
    common = ["--input", str(tmp_path / "in.parquet"), "--model", model_uri(workspace), "--partition-rows", "1000"]
    local = score_here(*common, "--output", str(tmp_path / "local"), "--engine", "local")
    assert local.returncode == 0, local.stderr[-3000:]
    job = score(workspace, *common, "--output", str(tmp_path / "cluster"), "--address", address, "--json")
    assert job.returncode == 0, job.stderr[-3000:]
    summary = json.loads(job.stdout)  # stdout holds the summary alone, whatever Ray prints on the way
    assert (summary["engine"], summary["partitions_by_runtime"]) == ("ray", {"compiled": 4})
    a, b = scored(tmp_path / "local"), scored(tmp_path / "cluster")
    assert len(a) + rejects(tmp_path / "local") == 4_000
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=0, atol=1e-6)


def test_a_killed_job_resumes_without_redoing_or_duplicating_a_partition(workspace, tmp_path, score_here):
    rows = transactions(workspace, 30_000, seed=3)
    rows.to_parquet(tmp_path / "in.parquet")
    args = ["-m", "lifecycle.batch.cli", "--no-progress", "--input", str(tmp_path / "in.parquet"), "--model",
            model_uri(workspace), "--output", str(tmp_path / "out"), "--engine", "local", "--partition-rows", "250",
            "--chunk-rows", "50", "--json"]
    job = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=workspace.env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    while len(list((tmp_path / "out").glob("part-*.parquet"))) < 3 and time.monotonic() < deadline:
        assert job.poll() is None, job.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("part-*.parquet")}
    assert 3 <= len(done_before) < 120, "the kill came too late to test a resume"
    again = score_here(*args[3:])
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout)
    assert summary["skipped_partitions"] >= len(done_before)
    for name, mtime in done_before.items():  # finished partitions were not written again
        assert (tmp_path / "out" / name).stat().st_mtime_ns == mtime
    out = scored(tmp_path / "out")
    assert out["row"].is_unique, "a partition's rows were written twice"
    assert len(out) + rejects(tmp_path / "out") == 30_000
    assert not list((tmp_path / "out").rglob("*.tmp")), "a half-written file was left beside the output"


def rejects(folder: Path) -> int:
    found = list((folder / "_rejects").glob("*.parquet"))
    return sum(len(pd.read_parquet(p)) for p in found)


def test_bad_rows_are_rejected_with_their_reason_and_counted(workspace, tmp_path, score_here):
    rows = transactions(workspace, 50, at=datetime.now(UTC), seed=4)
    rows["transaction_amount"] = rows["transaction_amount"].astype(str)  # (numbers as text, as from a CSV, pass)
    rows.loc[0, "customer_id"] = "C999999"  # no such customer in the store
    rows.loc[1, "customer_id"] = None
    rows.loc[2, "customer_id"] = "bad id\n"
    rows.loc[3, "transaction_amount"] = "-5.0"
    rows.loc[4, "transaction_amount"] = "12 dollars"
    rows.loc[5, "event_timestamp"] = pd.NaT
    # chunks of 3 rows: rejects of different checks in different chunks still make one file of one schema
    summary = score_frame(score_here, workspace, rows, tmp_path, "--chunk-rows", "3")
    assert (summary["read"], summary["scored"], summary["rejected"]) == (50, 44, 6)
    bad = pd.concat(pd.read_parquet(p) for p in (tmp_path / "out" / "_rejects").glob("*.parquet"))
    reasons = dict(zip(bad["row"].astype(int), bad["reject_reason"], strict=True))
    assert reasons == {0: "no store features for this customer at this time", 1: "no customer_id",
                       2: "customer_id is not 1-64 of A-Z a-z 0-9 _ . : -",
                       3: "transaction_amount is not a number from 0 to 1e+09",
                       4: "transaction_amount is not a number from 0 to 1e+09", 5: "no valid event_timestamp"}
    assert sum(summary["rejected_by_reason"].values()) == 6
    from lifecycle.batch.cli import _Summary

    assert "44 scored, 6 rejected" in _Summary.lines(summary)
    assert "1 no customer_id" in _Summary.lines(summary)


@pytest.mark.parametrize(("case", "expected"), [
    ("missing column", "lacks the column transaction_amount"),
    ("no input", "no input at"),
    ("not parquet", "is not a readable Parquet file"),
    ("unknown model", "is not in the MLflow registry"),
    ("other job's output", "holds the output of another job"),
    ("bad span", "is neither an ISO time nor a span"),
])
def test_bad_input_is_refused_in_one_line_before_any_work(workspace, tmp_path, case, expected, score_here):
    """In this process, but for the first case: run as a user runs it, its stderr is exactly one line."""
    rows = transactions(workspace, 10, at=datetime.now(UTC))
    path, output, model = tmp_path / "in.parquet", tmp_path / "out", model_uri(workspace)
    rows.to_parquet(path)
    if case == "missing column":
        rows.drop(columns=["transaction_amount"]).to_parquet(path)
    elif case == "no input":
        path = tmp_path / "nothing.parquet"
    elif case == "not parquet":
        path.write_text("customer_id,transaction_amount\nC1,2\n")
    elif case == "unknown model":
        model = f"models:/{workspace.model.name}/v999"
    elif case == "other job's output":
        output.mkdir()
        (output / "_job.json").write_text(json.dumps({"model_name": "x", "model_version": "v0"}))
    if case == "bad span":
        args = ["--log-since", "yesterday-ish", "--output", str(output)]
    else:
        args = ["--input", str(path), "--model", model, "--output", str(output)]
    result = score(workspace, *args) if case == "missing column" else score_here(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr[-3000:]
    assert not list(output.glob("part-*")), "bad input, yet something was written"


def test_a_time_range_of_the_prediction_log_is_backfilled_exactly(workspace, tmp_path, score_here):
    """Events before, inside and after the range on the real broker; the backfill reads exactly the inside
    ones (by the log's own timestamps), scores them with the logged features, and rejects an unreadable one."""
    from confluent_kafka import Producer

    from tools.services import create_topics

    topic = f"batch-log-{uuid.uuid4().hex[:8]}"
    create_topics(workspace.settings.kafka_bootstrap, {topic: 3})
    producer = Producer({"bootstrap.servers": workspace.settings.kafka_bootstrap})
    rows = transactions(workspace, 90, at=datetime.now(UTC), seed=5)
    from mlops.offline import features_as_of

    stats = features_as_of(workspace.feature_repo, rows[["customer_id", "event_timestamp"]],
                           workspace.settings.redis_address)

    def send(part: pd.DataFrame, garbage: bool = False) -> None:
        for i, row in part.iterrows():
            event = events.PredictionEvent(
                request_id=f"r{i}", timestamp=datetime.now(UTC), model_name=workspace.model.name,
                model_version=workspace.model.version, customer_id=row.customer_id, prediction=0.5,
                features={**stats.loc[i].to_dict(), "transaction_amount": float(row.transaction_amount)})
            producer.produce(topic, events.encode(event), key=row.customer_id.encode())
        if garbage:
            producer.produce(topic, b"{not json", key=b"x")
        assert producer.flush(30) == 0

    send(rows.iloc[:30])
    time.sleep(1.5)
    since = datetime.now(UTC)
    send(rows.iloc[30:60], garbage=True)
    time.sleep(1.5)
    until = datetime.now(UTC)
    send(rows.iloc[60:])
    result = score_here("--log-since", since.isoformat(), "--log-until", until.isoformat(), "--topic", topic,
                   "--model", model_uri(workspace), "--output", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert (summary["read"], summary["scored"], summary["rejected"]) == (31, 30, 1)
    out = pd.read_parquet(tmp_path / "out")
    assert sorted(out["request_id"]) == sorted(f"r{i}" for i in range(30, 60))
    assert (out["served_version"] == workspace.model.version).all()
    assert summary["rejected_by_reason"] == {"unreadable prediction-log event": 1}
    # The same rows through Feast's offline store score the same (the logged features are today's snapshot)
    offline = score_here("--log-since", since.isoformat(), "--log-until", until.isoformat(), "--topic",
                    topic, "--model", model_uri(workspace), "--output", str(tmp_path / "offline"), "--features",
                    "offline", "--json")
    assert offline.returncode == 0, offline.stderr[-3000:]
    again = pd.read_parquet(tmp_path / "offline").set_index("request_id").loc[out["request_id"]]
    assert (again["prediction"].to_numpy() - out["prediction"].to_numpy()).__abs__().max() <= 1e-6
    # A range before the log's data: nothing to do, said so, exit 0
    empty = score_here("--log-since", (since - timedelta(days=30)).isoformat(), "--log-until",
                  (since - timedelta(days=29)).isoformat(), "--topic", topic, "--model", model_uri(workspace),
                  "--output", str(tmp_path / "empty"), "--json")
    assert empty.returncode == 0 and json.loads(empty.stdout)["read"] == 0, empty.stderr[-3000:]


def test_store_features_in_the_input_are_used_as_given_as_predict_does(workspace, server, tmp_path, score_here):
    """All four given: no lookup (an unknown customer is scored); one given: it overrides the looked-up value.
    Both equal /predict with the same features in the request."""
    rows = transactions(workspace, 2, at=datetime.now(UTC), seed=6)
    rows.loc[0, "customer_id"] = "C999999"
    given = {"total_purchases": 3.0, "avg_order_value": 40.0, "days_since_last_order": 2.5, "lifetime_value": 120.0}
    for name, value in given.items():
        rows[name] = [value, None]
    rows.loc[1, "avg_order_value"] = 999.0
    assert score_frame(score_here, workspace, rows, tmp_path)["scored"] == 2
    out = scored(tmp_path / "out")
    assert out.loc[0, list(given)].to_dict() == given and out.loc[1, "avg_order_value"] == 999.0
    requests = [{"customer_id": "C999999", "features": given}, {"features": {"avg_order_value": 999.0}}]
    for row, extra in zip(out.itertuples(), requests, strict=True):
        answer = httpx.post(f"{server.url}/predict", json={"customer_id": row.customer_id, **extra,
                                                           "transaction_amount": row.transaction_amount},
                            timeout=10).json()
        assert abs(answer["prediction"] - row.prediction) <= 1e-6, (row, answer)
