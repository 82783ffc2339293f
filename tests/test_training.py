"""Seeded data, training, ONNX parity and the model store."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.isotonic import IsotonicRegression

from lifecycle import data as datamod
from lifecycle import model_store
from lifecycle.onnx_export import ParityError, check_parity, export, onnx_positive_proba
from lifecycle.train import main as train_main
from lifecycle.train import register, train
from mlops.calibration import CALIBRATION_FILE, Calibration


@pytest.fixture(scope="module")
def small_dataset():
    return datamod.generate(200, 3_000, seed=3)


def test_data_is_reproducible_from_the_seed():
    a, b = datamod.generate(50, 500, seed=11), datamod.generate(50, 500, seed=11)
    cols = ["total_purchases", "avg_order_value", "days_since_last_order", "lifetime_value"]
    assert a.customers[cols].equals(b.customers[cols])
    assert a.transactions["transaction_amount"].equals(b.transactions["transaction_amount"])
    assert not a.customers[cols].equals(datamod.generate(50, 500, seed=12).customers[cols])


def test_labels_arrive_late_most_within_hours_a_tail_to_days_some_never():
    delays = datamod.label_delays(20_000, seed=1)
    known = delays[~np.isnan(delays)]
    assert 0.04 < 1 - len(known) / len(delays) < 0.06  # never
    assert 2 * 3600 < np.median(known) < 4 * 3600 and np.percentile(known, 99) > 4 * 86400 and known.min() > 0


def test_label_is_learnable(small_dataset):
    trained = train(small_dataset)
    assert trained.metrics["auc"] > 0.8
    assert 0.02 < small_dataset.transactions["is_fraud"].mean() < 0.3


def test_onnx_matches_sklearn_within_tolerance(small_dataset):
    trained = train(small_dataset)
    assert trained.metrics["onnx_parity_max_abs_diff"] <= 1e-5
    assert check_parity(trained.onnx_bytes, trained.estimator, trained.x_holdout) <= 1e-5


def test_parity_check_fails_loudly_for_a_different_model(small_dataset):
    trained = train(small_dataset)
    other = GradientBoostingClassifier(n_estimators=5, max_depth=1, random_state=1)
    other.fit(trained.x_holdout, trained.y_holdout)
    with pytest.raises(ParityError, match="differs from sklearn"):
        check_parity(export(other, trained.x_holdout.shape[1]), trained.estimator, trained.x_holdout)


def test_store_keeps_metadata_and_refuses_overwrite(small_dataset):
    trained = train(small_dataset)
    stored = register(trained, "store_test", "v7")
    meta = stored.metadata
    assert meta["version"] == "v7" and meta["training_data_hash"] == trained.data_hash
    assert meta["features"][-1] == "transaction_amount" and "auc" in meta["metrics"]
    assert stored.onnx_path.read_bytes() == trained.onnx_bytes
    assert {"auc", "accuracy", "precision", "recall", "f1", "brier"} <= set(meta["metrics"])  # the holdout's
    # The calibration beside it equals an isotonic regression of the holdout labels on the served scores.
    calibration = Calibration.from_bytes((stored.path / CALIBRATION_FILE).read_bytes())
    scores = onnx_positive_proba(trained.onnx_bytes, trained.x_holdout)
    iso = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(scores, trained.y_holdout)
    probe = np.linspace(-0.1, 1.1, 500)
    np.testing.assert_allclose(calibration.apply(probe), iso.predict(probe), atol=1e-12)
    assert model_store.load("store_test").version == "v7"
    assert model_store.next_version("store_test") == "v8"
    with pytest.raises(model_store.ModelStoreError, match="already exists"):
        register(trained, "store_test", "v7")
    with pytest.raises(model_store.ModelStoreError, match="invalid version"):
        model_store.save("store_test", "Bad Version!", b"", {})


def test_data_hash_tracks_content(small_dataset):
    a, b = train(small_dataset), train(small_dataset)
    assert a.data_hash == b.data_hash
    x = np.zeros((2, 2))
    from lifecycle.train import data_hash

    assert data_hash(x, np.array([0, 1])) != data_hash(x, np.array([1, 0]))


def test_train_cli_without_data_exits_2(tmp_path, capsys):
    assert train_main(["--data-dir", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mlops-train: no data at") and "\n" not in err


def _history_case():
    """Customer C1: a snapshot at t0, a transaction at t1, a snapshot written at t2 (after it), a transaction at t3;
    a transaction exactly at t2; and one a day and a half after t0 for C2 (older than the ttl)."""
    import pandas as pd

    t0 = pd.Timestamp("2026-01-01T00:00:00Z")
    hours = [t0 + pd.Timedelta(hours=h) for h in range(5)]
    customers = pd.DataFrame({
        "customer_id": ["C1", "C1", "C2"],
        "total_purchases": [1, 999, 5],
        "avg_order_value": [10.0, 99.0, 20.0],
        "days_since_last_order": [1.0, 2.0, 3.0],
        "lifetime_value": [10.0, 9999.0, 100.0],
        "event_timestamp": [hours[0], hours[2], hours[0]],
    })
    transactions = pd.DataFrame({
        "customer_id": ["C1", "C1", "C1", "C2"],
        "transaction_amount": [5.0, 6.0, 7.0, 8.0],
        "is_fraud": [0, 1, 0, 1],
        "event_timestamp": [hours[1], hours[3], hours[2], t0 + pd.Timedelta(hours=36)],
    })
    return datamod.Dataset(customers, transactions)


def test_point_in_time_join_never_leaks_a_later_snapshot():
    frame = datamod.training_frame(_history_case())
    by_amount = frame.set_index("transaction_amount")["total_purchases"].to_dict()
    assert by_amount == {5.0: 1, 6.0: 999, 7.0: 999}  # 8.0: C2's only snapshot is older than the ttl


def test_history_and_latest_snapshot(small_dataset):
    counts = small_dataset.customers.groupby("customer_id").size()
    assert (counts == datamod.SNAPSHOTS).all()
    latest = small_dataset.latest_customers()
    assert len(latest) == small_dataset.customers["customer_id"].nunique()
    newest = small_dataset.customers.groupby("customer_id")["event_timestamp"].max()
    assert (latest.set_index("customer_id")["event_timestamp"] == newest).all()
    # Every transaction has a snapshot in force (none older than the ttl).
    assert len(datamod.training_frame(small_dataset)) == len(small_dataset.transactions)


def test_train_cli_outside_a_git_checkout_tracks_the_run_without_a_commit(tmp_path):
    """No git (a tarball, a container): the run has no commit tag, and nothing crashes."""
    import os
    import subprocess
    import sys

    datamod.write(datamod.generate(150, 2_000, seed=5), tmp_path / "data")
    env = {**os.environ, "GIT_DIR": str(tmp_path / "no-git"), "MLOPS_MLFLOW_DIR": str(tmp_path / "mlflow"),
           "BENTOML_HOME": str(tmp_path / "bentoml")}
    out = subprocess.run([sys.executable, "-m", "lifecycle.train", "--data-dir", str(tmp_path / "data"),
                          "--name", "nogit"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "stored nogit:v1" in out.stdout
    from lifecycle.tracking import Backend

    backend = Backend.for_uri(str(tmp_path / "mlflow" / "mlflow.db"))
    run_id = model_store.find(backend, "nogit", "v1").run_id
    tags = backend.client.get_run(run_id).data.tags
    assert "git_commit" not in tags and tags["training_data_hash"]
