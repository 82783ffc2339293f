"""The registry on MLflow: stages as aliases and tags, atomic promotion under concurrency, rollback, history,
immutability, and its CLI, each on the embedded SQLite store and on the MLflow server (PostgreSQL)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from lifecycle import data as datamod
from lifecycle import model_store
from lifecycle.registry import Registry, RegistryError, lock_name
from lifecycle.registry_cli import main as registry_main
from lifecycle.tracking import Backend
from lifecycle.train import train


@pytest.fixture(scope="module")
def onnx_bytes() -> bytes:
    return train(datamod.generate(150, 2_000, seed=9), params={"n_estimators": 10}).onnx_bytes


def unique(prefix: str = "m") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def store(backend: Backend, onnx: bytes, name: str, *versions: str, metrics: dict | None = None) -> None:
    for v in versions:
        model_store.save(name, v, onnx, {"metrics": metrics or {"auc": 0.9}, "params": {"depth": 3},
                                         "features": ["a"] * 5, "training_data_hash": "abc123"}, backend=backend)


@pytest.fixture
def reg(mlflow_backend) -> Registry:
    return Registry(mlflow_backend)


def test_register_records_metadata_and_refuses_duplicates(reg, onnx_bytes):
    name = unique()
    store(reg.backend, onnx_bytes, name, "v1", "v2", "v3")
    v = reg.register(name, "v1", {"auc": 0.9}, {"depth": 3}, "abc123", "deadbeef", stage="staging")
    assert (v.stage, v.metrics, v.params, v.training_data_hash, v.git_commit) == (
        "Staging", {"auc": 0.9}, {"depth": 3}, "abc123", "deadbeef")
    assert v.created_at and v.mlflow_version == "1" and v.aliases == ["staging"]
    with pytest.raises(RegistryError, match="already registered"):
        reg.register(name, "v1")
    with pytest.raises(RegistryError, match="then promote"):
        reg.register(name, "v2", stage="production")
    with pytest.raises(RegistryError, match="unknown stage"):
        reg.register(name, "v3", stage="prod-ish")
    with pytest.raises(RegistryError, match="no artifact"):
        reg.register(name, "v9")
    with pytest.raises(model_store.ModelStoreError, match="already exists"):
        store(reg.backend, onnx_bytes, name, "v1")


def test_promote_moves_the_alias_and_archives_previous_production(reg, onnx_bytes):
    name = unique()
    store(reg.backend, onnx_bytes, name, "v1", "v2", "v3")
    for v in ("v1", "v2", "v3"):
        reg.register(name, v, stage="staging")
    assert reg.latest(name, "staging").version == "v3"
    reg.promote(name, "v1", "production")
    reg.promote(name, "v2", "production")
    assert reg.production(name).version == "v2"
    assert reg.get(name, "v1").stage == "Archived"
    assert [v.version for v in reg.list(name, "production")] == ["v2"]
    # The alias is what `models:/name@production` resolves to, for MLflow's own clients too.
    assert reg.client.get_model_version_by_alias(name, "production").tags["version"] == "v2"
    assert model_store.load_uri(f"models:/{name}@production", reg.backend).version == "v2"
    assert reg.latest(name, "staging").version == "v3"  # @staging stays on the newest remaining Staging version
    with pytest.raises(RegistryError, match="already in Production"):
        reg.promote(name, "v2", "production")
    with pytest.raises(RegistryError, match="not registered"):
        reg.promote(name, "v9", "staging")


def test_rollback_restores_the_previous_production_or_a_named_version(reg, onnx_bytes):
    name = unique()
    store(reg.backend, onnx_bytes, name, "v1", "v2", "v3")
    for v in ("v1", "v2", "v3"):
        reg.register(name, v)
    with pytest.raises(RegistryError, match="no Production"):
        reg.rollback(name)
    reg.promote(name, "v1", "production")
    with pytest.raises(RegistryError, match="only version ever"):
        reg.rollback(name)
    reg.promote(name, "v2", "production")
    reg.promote(name, "v3", "production")
    restored, retired = reg.rollback(name)
    assert (restored.version, restored.stage, retired.version, retired.stage) == ("v2", "Production", "v3", "Archived")
    restored, _ = reg.rollback(name)  # again: back to the one before v2 that is not v2 → v3
    assert restored.version == "v3"
    restored, retired = reg.rollback(name, to="v1")
    assert (restored.version, retired.version, reg.production(name).version) == ("v1", "v3", "v1")
    with pytest.raises(RegistryError, match="already in Production"):
        reg.rollback(name, to="v1")
    history = reg.history(name)
    assert [h["to_stage"] for h in history if h["version"] == "v2"] == [
        "None", "Production", "Archived", "Production", "Archived"]
    assert all(h["at"] and h["reason"] for h in history)
    # The history survives the process: a new client on the same backend reads the same rows.
    fresh = Registry(Backend(reg.backend.uri, reg.backend.artifact_root))
    assert [(h["version"], h["to_stage"]) for h in fresh.history(name)] == [
        (h["version"], h["to_stage"]) for h in history]


def test_a_stale_lock_expires(reg, onnx_bytes):
    name = unique()
    store(reg.backend, onnx_bytes, name, "v1")
    reg.register(name, "v1")
    crashed = max(reg._lock_models(name)) + 1  # the generation after the registration's
    reg.client.create_registered_model(lock_name(name, crashed), tags={"owner": "crashed",
                                                                       "expires": str(time.time() - 1)})
    assert reg.promote(name, "v1", "production").stage == "Production"
    assert reg.history(name)[-1]["fence"] == crashed + 1


def test_compare_lists_metrics_and_differing_params(reg, onnx_bytes):
    name = unique()
    store(reg.backend, onnx_bytes, name, "v1", "v2")
    reg.register(name, "v1", {"auc": 0.90, "accuracy": 0.91}, {"depth": 3, "lr": 0.1})
    reg.register(name, "v2", {"auc": 0.92, "accuracy": 0.90}, {"depth": 4, "lr": 0.1})
    report = reg.compare(name, ["v1", "v2"])
    assert report["metrics"]["auc"] == {"v1": 0.90, "v2": 0.92}
    assert report["params"] == {"depth": {"v1": 3, "v2": 4}}


def cli(*args: str) -> int:
    try:
        return registry_main(list(args))
    except SystemExit as exc:  # argparse usage errors
        return int(exc.code or 0)


def test_cli_register_promote_list_compare_rollback_with_json(mlflow_backend, onnx_bytes, tmp_path, capsys):
    name = unique("cli")
    uri = ["--mlflow-uri", mlflow_backend.uri]
    model = tmp_path / "model.onnx"
    model.write_bytes(onnx_bytes)
    assert cli(*uri, "register", "--name", name, "--version", "r1", "--model-file", str(model), "--json") == 0
    assert json.loads(capsys.readouterr().out)["stage"] == "None"
    assert cli(*uri, "register", "--name", name, "--version", "r2", "--model-file", str(model), "--stage", "staging",
               "--metrics", '{"auc": 0.99}', "--params", '{"note": "x"}') == 0
    assert "registered" in capsys.readouterr().out
    assert cli(*uri, "promote", "--name", name, "--version", "r1", "--stage", "production", "--json") == 0
    assert json.loads(capsys.readouterr().out)["aliases"] == ["production"]
    assert cli(*uri, "promote", "--name", name, "--version", "r2", "--stage", "production") == 0
    capsys.readouterr()
    assert cli(*uri, "list", "--name", name, "--stage", "production", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(v["version"], v["stage"]) for v in listed] == [("r2", "Production")]
    assert listed[0]["metrics"] == {"auc": 0.99}
    assert cli(*uri, "compare", "--name", name, "--versions", "r1", "r2", "--json") == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["auc"]["r2"] == 0.99
    assert cli(*uri, "rollback", "--name", name, "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["restored"]["version"], out["retired"]["version"]) == ("r1", "r2")
    assert cli(*uri, "rollback", "--name", name, "--to", "r2") == 0
    assert "r2 is Production again" in capsys.readouterr().out
    assert cli(*uri, "history", "--name", name, "--json") == 0
    assert [h["to_stage"] for h in json.loads(capsys.readouterr().out)][-2:] == ["Archived", "Production"]
    assert cli(*uri, "list", "--name", name) == 0
    assert "production" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "code", "message"), [
    (["register", "--name", "NAME", "--version", "nope"], 2, "no artifact for NAME:nope"),
    (["register", "--name", "NAME", "--version", "r9", "--model-file", "TEXT"], 2, "not a loadable ONNX model"),
    (["register", "--name", "NAME", "--version", "r9", "--model-file", "/no/such.onnx"], 2, "does not exist"),
    (["register", "--name", "NAME", "--version", "r1", "--metrics", "{bad"], 2, "--metrics is not valid JSON"),
    (["register", "--name", "NAME", "--version", "Bad Version"], 2, "invalid version"),
    (["promote", "--name", "NAME", "--version", "zz", "--stage", "production"], 1, "is not registered"),
    (["promote", "--name", "NAME", "--version", "r1", "--stage", "gold"], 1, "unknown stage"),
    (["rollback", "--name", "NAME"], 1, "no Production version"),
    (["rollback", "--name", "NAME", "--to", "zz"], 1, "no Production version"),
    (["compare", "--name", "NAME", "--versions", "r1"], 2, "at least two"),
    (["promote", "--name", "NAME"], 2, "required"),
])
def test_cli_errors_are_one_line_with_exit_codes(tmp_path, onnx_bytes, capsys, args, code, message):
    backend = Backend.for_uri(str(tmp_path / "mlflow.db"))
    name = unique("cli")
    store(backend, onnx_bytes, name, "r1")
    uri = ["--mlflow-uri", backend.uri]
    assert cli(*uri, "register", "--name", name, "--version", "r1") == 0
    capsys.readouterr()
    text = tmp_path / "model.txt"
    text.write_text("this is not a model\n")
    args = [str(text) if a == "TEXT" else a.replace("NAME", name) for a in args]
    assert cli(*uri, *args) == code
    err = capsys.readouterr().err.strip()
    assert message.replace("NAME", name) in err and len(err.splitlines()) == 1, err


def test_register_refuses_an_onnx_model_with_the_wrong_inputs(tmp_path, capsys):
    from sklearn.linear_model import LogisticRegression

    from lifecycle.onnx_export import export

    x = [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.2, 0.9]]
    wrong = tmp_path / "two_features.onnx"
    wrong.write_bytes(export(LogisticRegression().fit(x, [0, 1, 1, 0]), 2))
    code = cli("--mlflow-uri", str(tmp_path / "m.db"), "register", "--name", "x", "--version", "v1",
               "--model-file", str(wrong))
    assert code == 2
    assert "must be a float tensor [N, 5]" in capsys.readouterr().err


def test_stored_version_is_an_mlflow_model_with_signature_and_profile(tmp_path):
    backend = Backend.for_uri(str(tmp_path / "mlflow.db"))
    from lifecycle.train import register

    trained = train(datamod.generate(150, 2_000, seed=4), params={"n_estimators": 10})
    stored = register(trained, "tracked", "v1", backend=backend)
    run = backend.client.get_run(stored.metadata["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["n_estimators"] == "10" and run.data.metrics["auc"] == pytest.approx(trained.metrics["auc"])
    assert run.data.tags["training_data_hash"] == trained.data_hash
    artifacts = {a.path for a in backend.client.list_artifacts(run.info.run_id, "model")}
    assert {"model/MLmodel", "model/model.onnx", "model/profile.json", "model/input_example.json"} <= artifacts
    mlmodel = (Path(stored.path) / "MLmodel").read_text()
    assert "onnx" in mlmodel and "signature" in mlmodel and "features" in mlmodel
    # A second load comes from the local cache, still checked against the registry.
    assert model_store.load("tracked", "v1", backend).path == stored.path


def test_register_refuses_an_onnx_model_with_a_fixed_batch_of_one(tmp_path, capsys):
    """It would load and score the service's one-row warm-up, then fail on every batch."""
    import onnx

    trained = train(datamod.generate(150, 2_000, seed=6), params={"n_estimators": 5})
    graph = onnx.load_from_string(trained.onnx_bytes)
    graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    fixed = tmp_path / "fixed_batch.onnx"
    fixed.write_bytes(graph.SerializeToString())
    code = cli("--mlflow-uri", str(tmp_path / "m.db"), "register", "--name", "x", "--version", "v1",
               "--model-file", str(fixed))
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "does not score a batch of rows" in err and len(err.splitlines()) == 1, err
