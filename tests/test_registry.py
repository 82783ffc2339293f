"""The registry: stages, atomic promotion, rollback, immutability, concurrency, and its CLI."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3

import pytest

from lifecycle import data as datamod
from lifecycle.registry import Registry, RegistryError
from lifecycle.registry_cli import main as registry_main
from lifecycle.train import register as store_model
from lifecycle.train import train


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(tmp_path / "registry.db")


def test_register_records_metadata_and_refuses_duplicates(reg):
    v = reg.register("m", "v1", {"auc": 0.9}, {"depth": 3}, "abc123", "deadbeef", stage="staging")
    assert (v.stage, v.metrics, v.params, v.training_data_hash, v.git_commit) == (
        "Staging", {"auc": 0.9}, {"depth": 3}, "abc123", "deadbeef")
    assert v.created_at
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("m", "v1")
    with pytest.raises(RegistryError, match="then promote"):
        reg.register("m", "v2", stage="production")
    with pytest.raises(RegistryError, match="unknown stage"):
        reg.register("m", "v3", stage="prod-ish")


def test_promote_archives_previous_production(reg):
    for v in ("v1", "v2", "v3"):
        reg.register("m", v)
    reg.promote("m", "v1", "production")
    reg.promote("m", "v2", "production")
    assert reg.production("m").version == "v2"
    assert reg.get("m", "v1").stage == "Archived"
    assert [v.version for v in reg.list("m", "production")] == ["v2"]
    with pytest.raises(RegistryError, match="already in Production"):
        reg.promote("m", "v2", "production")
    with pytest.raises(RegistryError, match="not registered"):
        reg.promote("m", "v9", "staging")


def test_rollback_restores_the_previous_production(reg):
    for v in ("v1", "v2", "v3"):
        reg.register("m", v)
    with pytest.raises(RegistryError, match="no Production"):
        reg.rollback("m")
    reg.promote("m", "v1", "production")
    with pytest.raises(RegistryError, match="only version ever"):
        reg.rollback("m")
    reg.promote("m", "v2", "production")
    reg.promote("m", "v3", "production")
    restored, retired = reg.rollback("m")
    assert (restored.version, restored.stage, retired.version, retired.stage) == ("v2", "Production", "v3", "Archived")
    restored, _ = reg.rollback("m")  # again: back to the one before v2 that is not v2 → v3
    assert restored.version == "v3"
    assert [h["to_stage"] for h in reg.history("m") if h["version"] == "v2"] == [
        "None", "Production", "Archived", "Production", "Archived"]


def test_database_refuses_two_production_versions_even_without_the_api(reg):
    reg.register("m", "v1")
    reg.register("m", "v2")
    reg.promote("m", "v1", "production")
    conn = sqlite3.connect(reg.path)
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE model_versions SET stage='Production' WHERE version='v2'")
    conn.close()


def _promote_many(path: str, versions: list[str]) -> None:
    r = Registry(path)
    for v in versions:
        r.promote("m", v, "production")


def test_concurrent_promotions_leave_exactly_one_production(reg):
    versions = [f"v{i}" for i in range(20)]
    for v in versions:
        reg.register("m", v)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_promote_many, args=(str(reg.path), versions[i::4])) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    stages = [v.stage for v in reg.list("m")]
    assert stages.count("Production") == 1
    assert stages.count("Archived") == 19


def test_compare_lists_metrics_and_differing_params(reg):
    reg.register("m", "v1", {"auc": 0.90, "accuracy": 0.91}, {"depth": 3, "lr": 0.1})
    reg.register("m", "v2", {"auc": 0.92, "accuracy": 0.90}, {"depth": 4, "lr": 0.1})
    report = reg.compare("m", ["v1", "v2"])
    assert report["metrics"]["auc"] == {"v1": 0.90, "v2": 0.92}
    assert report["params"] == {"depth": {"v1": 3, "v2": 4}}


@pytest.fixture(scope="module")
def stored_versions():
    trained = train(datamod.generate(150, 2_000, seed=9))
    for version in ("r1", "r2"):
        store_model(trained, "cli_model", version)
    return trained


def cli(*args: str) -> int:
    try:
        return registry_main(list(args))
    except SystemExit as exc:  # argparse usage errors
        return int(exc.code or 0)


def test_cli_register_promote_list_compare_rollback(tmp_path, stored_versions, capsys):
    db = ["--registry", str(tmp_path / "r.db")]
    assert registry_main([*db, "register", "--name", "cli_model", "--version", "r1"]) == 0
    assert registry_main([*db, "register", "--name", "cli_model", "--version", "r2", "--stage", "staging",
                          "--metrics", '{"auc": 0.99}', "--params", '{"note": "x"}']) == 0
    assert registry_main([*db, "promote", "--name", "cli_model", "--version", "r1", "--stage", "production"]) == 0
    assert registry_main([*db, "promote", "--name", "cli_model", "--version", "r2", "--stage", "production"]) == 0
    capsys.readouterr()
    assert registry_main([*db, "list", "--stage", "production", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(v["version"], v["stage"]) for v in listed] == [("r2", "Production")]
    assert listed[0]["metrics"] == {"auc": 0.99} and listed[0]["training_data_hash"] == stored_versions.data_hash
    assert registry_main([*db, "compare", "--name", "cli_model", "--versions", "r1", "r2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["auc"]["r2"] == 0.99
    assert registry_main([*db, "rollback", "--name", "cli_model"]) == 0
    assert "r1 is Production again" in capsys.readouterr().out
    assert registry_main([*db, "list"]) == 0
    assert "Production" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "code", "message"), [
    (["register", "--name", "cli_model", "--version", "nope"], 2, "no artifact for cli_model:nope"),
    (["register", "--name", "cli_model", "--version", "r1", "--metrics", "{bad"], 2, "--metrics is not valid JSON"),
    (["promote", "--name", "cli_model", "--version", "zz", "--stage", "production"], 1, "is not registered"),
    (["promote", "--name", "cli_model", "--version", "r1", "--stage", "gold"], 1, "unknown stage"),
    (["rollback", "--name", "cli_model"], 1, "no Production version"),
    (["compare", "--name", "cli_model", "--versions", "r1"], 2, "at least two"),
    (["promote", "--name", "cli_model"], 2, "required"),
])
def test_cli_errors_are_one_line_with_exit_codes(tmp_path, stored_versions, capsys, args, code, message):
    db = ["--registry", str(tmp_path / "r.db")]
    registry_main([*db, "register", "--name", "cli_model", "--version", "r1"])
    capsys.readouterr()
    assert cli(*db, *args) == code
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
