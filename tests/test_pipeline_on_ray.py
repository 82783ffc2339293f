"""The training pipeline's heavy stages on Ray (a real Ray in this process, the real Feast repo): the same rows
as Feast's own point-in-time join, no leakage across the parts, and `pipeline run --engine ray` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from harness import workspace as wsmod
from lifecycle import data as datamod
from lifecycle import ray_runtime
from lifecycle.pipeline.cli import main as pipeline_main
from lifecycle.pipeline.compute import Compute
from lifecycle.registry import Registry
from lifecycle.tracking import Backend
from mlops import offline
from tests.support import feast_pipeline, ray_turn_held
from tests.test_training import _history_case
from tools import feast_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def on_ray():
    """One Ray for the module (each join and run below uses it as it is, as on a cluster), in its turn."""
    with ray_turn_held(), ray_runtime.session(workers=2):
        yield


def test_pipeline_run_by_address_joins_and_trains_on_a_running_cluster(workspace, tmp_path, ray_cluster):
    """`--address`: the driver is a client of a cluster started as an operator starts one; the join's parts
    and the training run in the cluster's own workers (which import the project from their PYTHONPATH)."""
    import subprocess
    import sys

    path = feast_pipeline(workspace.feature_repo, tmp_path)
    uri = Backend.for_uri(str(tmp_path / "mlflow.db")).uri
    done = subprocess.run([sys.executable, "-m", "lifecycle.pipeline", "run", "--pipeline", str(path),
                           "--mlflow-uri", uri, "--name", "cluster_model"], cwd=ROOT, capture_output=True, text=True,
                          env={**workspace.env, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
                               "MLOPS_RAY_ADDRESS": ray_cluster}, timeout=300)  # the address alone: engine auto
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["registered"]["stage"] == "Staging"
    run = Registry(Backend.for_uri(uri)).client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["compute"] == "ray" and run.data.tags["point_in_time_join.how"].endswith("on Ray")


def test_a_join_on_ray_gives_the_rows_of_feasts_own_join(workspace, on_ray):
    data = datamod.read(workspace.feature_repo / "data")
    sample = data.transactions.sample(3_000, random_state=3)
    sample = pd.concat([sample, sample.head(50)], ignore_index=True)  # a customer twice at one time: two rows
    redis = workspace.settings.redis_address
    by_feast = offline.training_frame(workspace.feature_repo, sample, redis)
    local, how_local = Compute("local").join(workspace.feature_repo, sample, redis)
    on_parts, how_ray = Compute("ray", partitions=5).join(workspace.feature_repo, sample, redis)
    assert how_local == "one as-of join in this process"
    assert how_ray == "as-of join in 5 parts by customer on Ray"
    assert len(by_feast) == len(sample) == 3_050
    pd.testing.assert_frame_equal(local, by_feast, check_dtype=False)
    pd.testing.assert_frame_equal(on_parts, by_feast, check_dtype=False)  # the transactions' order kept


def test_a_snapshot_written_after_a_transaction_never_reaches_its_row_on_ray(workspace, tmp_path, on_ray):
    repo = wsmod.copy_feature_repo(tmp_path / "repo")
    case = _history_case()
    datamod.write(case, repo / "data")
    feast_cli.feast(repo, workspace.env, "apply")
    frame, _ = Compute("ray", partitions=3).join(repo, case.transactions, workspace.settings.redis_address)
    by_amount = frame.set_index("transaction_amount")["total_purchases"].to_dict()
    assert by_amount == {5.0: 1, 6.0: 999, 7.0: 999}  # t1 sees t0's snapshot only; 8.0 has none within the ttl


def test_pipeline_run_on_ray_trains_gates_and_registers(workspace, tmp_path, on_ray, capsys):
    path = feast_pipeline(workspace.feature_repo, tmp_path)
    uri = Backend.for_uri(str(tmp_path / "mlflow.db")).uri
    code = pipeline_main(["run", "--pipeline", str(path), "--mlflow-uri", uri, "--name", "ray_model",
                          "--engine", "ray"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    outcomes = {s["stage"]: s["outcome"] for s in summary["stages"]}
    assert "parts by customer on Ray" in outcomes["fetch-data"]
    assert outcomes["train"].endswith("(a Ray task)")
    assert summary["registered"]["stage"] == "Staging"
    run = Registry(Backend.for_uri(uri)).client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["compute"] == "ray"
    assert run.data.tags["point_in_time_join.how"].endswith("on Ray")


def test_scoring_on_ray_gives_the_graphs_answers_in_order(workspace, on_ray, monkeypatch):
    from lifecycle.onnx_export import onnx_positive_proba
    from lifecycle.pipeline import compute
    from mlops.schema import MODEL_FEATURES

    monkeypatch.setattr(compute, "SCORE_ROWS", 700)  # several tasks, the last one short
    frame = datamod.training_frame(workspace.dataset).head(3_000)
    x = frame[list(MODEL_FEATURES)].to_numpy("float32")
    onnx = workspace.model.onnx_path.read_bytes()
    assert Compute("ray").score(onnx, x) == pytest.approx(onnx_positive_proba(onnx, x), abs=0)


def test_the_retraining_controller_trains_and_judges_on_ray(tmp_path, on_ray):
    """A pipeline whose compute: says ray: the retrain's training and its window gate's scoring run on Ray
    (one Ray for both), and the candidate that beats the weak Production on the window rolls out, as in
    tests/test_retrain.py's one-process case."""
    from lifecycle.retrain.policy import RetrainPolicy
    from mlops.settings import Settings
    from tests.test_retrain import GivenWindow, alert, pipeline_file, recent, weak_production

    name = "retrain_on_ray"
    registry = weak_production(tmp_path, name)
    pipeline = pipeline_file(tmp_path, name)
    pipeline.raw["compute"] = {"engine": "ray", "partitions": 3}
    ctl = GivenWindow(Settings(), registry, pipeline, RetrainPolicy(cooldown_s=0), name)
    ctl.window = recent(2_000, seed=11)
    got = ctl.handle(alert(model=name), "t:0:1")
    assert (got["action"], got["outcome"]) == ("retrain", "rollout_started"), got
    assert got["window_gate"].startswith("accuracy ") and "on 1000 labelled rows" in got["window_gate"]
    training = registry.client.get_run(got["training_run_id"])
    assert training.data.tags["compute"] == "ray"
