"""Seeded data, training, ONNX parity and the model store."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import GradientBoostingClassifier

from lifecycle import data as datamod
from lifecycle import model_store
from lifecycle.onnx_export import ParityError, check_parity, export
from lifecycle.train import main as train_main
from lifecycle.train import register, train


@pytest.fixture(scope="module")
def small_dataset():
    return datamod.generate(200, 3_000, seed=3)


def test_data_is_reproducible_from_the_seed():
    a, b = datamod.generate(50, 500, seed=11), datamod.generate(50, 500, seed=11)
    cols = ["total_purchases", "avg_order_value", "days_since_last_order", "lifetime_value"]
    assert a.customers[cols].equals(b.customers[cols])
    assert a.transactions["transaction_amount"].equals(b.transactions["transaction_amount"])
    assert not a.customers[cols].equals(datamod.generate(50, 500, seed=12).customers[cols])


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
