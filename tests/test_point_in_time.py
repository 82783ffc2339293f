"""Point-in-time-correct training from Feast's offline store: the same rows as the pandas join, no leakage of
a later snapshot, and the pipeline's data stage on the real Feast repo."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from harness import workspace as wsmod
from lifecycle import data as datamod
from lifecycle.pipeline import definition, runner
from lifecycle.registry import Registry
from lifecycle.tracking import Backend
from mlops import offline
from mlops.schema import STORE_FEATURES
from tests.support import feast_pipeline
from tests.test_training import _history_case
from tools import feast_cli

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def test_feast_historical_features_equal_the_point_in_time_join(workspace):
    data = datamod.read(workspace.feature_repo / "data")
    sample = data.transactions.sample(2_000, random_state=1).reset_index(drop=True)
    from_feast = offline.training_frame(workspace.feature_repo, sample, workspace.settings.redis_address)
    expected = datamod.training_frame(datamod.Dataset(data.customers, sample))
    assert len(from_feast) == len(expected) == len(sample)
    for column in STORE_FEATURES:
        assert from_feast[column].to_numpy() == pytest.approx(expected[column].to_numpy()), column
    # and not the latest snapshot: the history matters for a good share of rows
    latest = sample.merge(data.latest_customers().drop(columns="event_timestamp"), on="customer_id")
    assert (latest["total_purchases"].to_numpy() != from_feast["total_purchases"].to_numpy()).mean() > 0.3


def test_a_snapshot_written_after_a_transaction_never_reaches_its_row(workspace, tmp_path):
    repo = wsmod.copy_feature_repo(tmp_path / "repo")
    case = _history_case()
    datamod.write(case, repo / "data")
    feast_cli.feast(repo, workspace.env, "apply")
    frame = offline.training_frame(repo, case.transactions, workspace.settings.redis_address)
    by_amount = frame.set_index("transaction_amount")["total_purchases"].to_dict()
    assert by_amount == {5.0: 1, 6.0: 999, 7.0: 999}  # t1 sees t0's snapshot only; 8.0 has none within the ttl
    assert by_amount == datamod.training_frame(case).set_index("transaction_amount")["total_purchases"].to_dict()


def test_two_transactions_of_a_customer_at_the_same_time_are_two_training_rows(workspace, tmp_path):
    """Feast's join answers a repeated (customer, time) pair once: the training set must not lose the second
    transaction (it did through Feast's file store before)."""
    repo = wsmod.copy_feature_repo(tmp_path / "repo")
    case = _history_case()
    twice = pd.concat([case.transactions, case.transactions.iloc[[1, 1]]], ignore_index=True)
    twice.loc[len(case.transactions):, "transaction_amount"] = [60.0, 61.0]  # (told apart by their amounts)
    datamod.write(datamod.Dataset(case.customers, twice), repo / "data")
    feast_cli.feast(repo, workspace.env, "apply")
    frame = offline.training_frame(repo, twice, workspace.settings.redis_address)
    by_amount = frame.set_index("transaction_amount")["total_purchases"].to_dict()
    assert by_amount == {5.0: 1, 6.0: 999, 7.0: 999, 60.0: 999, 61.0: 999}
    assert frame["transaction_amount"].tolist() == [5.0, 6.0, 7.0, 60.0, 61.0]  # the transactions' order


def test_offline_store_without_feast_apply_is_a_clear_error(tmp_path):
    repo = wsmod.copy_feature_repo(tmp_path / "repo")
    with pytest.raises(offline.OfflineStoreError, match="run `feast apply`"):
        offline.training_frame(repo, _history_case().transactions)


def test_pipeline_trains_from_feast(workspace, tmp_path):
    path = feast_pipeline(workspace.feature_repo, tmp_path)
    reg = Registry(Backend.for_uri(str(tmp_path / "mlflow.db")))
    summary = runner.run(definition.load(path), reg, version="f1", model_name="feast_model",
                         settings=workspace.settings)
    assert "features joined point-in-time by Feast" in summary["stages"][0]["outcome"]
    assert summary["registered"]["stage"] == "Staging"
    run = reg.client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["point_in_time_join"] == "feast"
    n = len(pd.read_parquet(workspace.feature_repo / "data" / datamod.TRANSACTIONS_FILE))
    assert run.data.metrics["n_train"] + run.data.metrics["n_holdout"] == n
