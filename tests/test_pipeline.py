"""The pipeline definition (ours and the reference's vocabulary), its validator's codes, and the runner with
its evaluation gate, tracked in MLflow, on the embedded SQLite store and on the MLflow server."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from lifecycle.pipeline import definition, runner
from lifecycle.pipeline.cli import main as pipeline_main
from lifecycle.pipeline.stages import StageFailed
from lifecycle.pipeline.validator import validate
from lifecycle.registry import Registry
from lifecycle.tracking import Backend

ROOT = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
SMALL_DATA = {"source": "synthetic", "customers": 200, "transactions": 3000, "seed": 42}


def write(tmp_path: Path, body: dict, suffix: str = ".yaml") -> Path:
    path = tmp_path / f"pipeline{suffix}"
    path.write_text(json.dumps(body) if suffix == ".json" else yaml.safe_dump(body))
    return path


def edited(change) -> dict:
    body = copy.deepcopy(BASE)
    change(body)
    return body


def codes(body: dict, tmp_path: Path, strict: bool = False) -> set[str]:
    return {f.code for f in validate(definition.load(write(tmp_path, body)), strict) if f.level == "error"}


def stage(body: dict, name: str) -> dict:
    return next(s for s in body["stages"] if s["name"] == name)


def test_shipped_pipelines_are_valid_even_strictly(tmp_path):
    assert validate(definition.load(ROOT / "pipeline.yaml"), strict=True) == []
    assert validate(definition.load(ROOT / "pipeline.json"), strict=True) == []


REFERENCE = json.loads((ROOT / "pipeline.json").read_text())


def test_reference_vocabulary_means_the_same_stages():
    pipe = definition.load(ROOT / "pipeline.json")
    assert [s.kind for s in pipe.execution_order()] == ["fetch-data", "validate", "preprocess", "train", "evaluate",
                                                         "register"]
    assert pipe.stage("register").name == "deploy" and pipe.stage("train").params["n_estimators"] == 150


@pytest.mark.parametrize(("change", "code"), [
    (lambda b: b["stages"][4]["depends_on"].append("tuning"), "UNKNOWN_DEPENDENCY"),
    (lambda b: b["stages"][0].update(depends_on=["deploy"]), "DEPENDENCY_CYCLE"),
    (lambda b: b["stages"][3].update(depends_on=["train"]), "DEPENDENCY_CYCLE"),
    (lambda b: b["stages"][4]["config"].clear(), "MISSING_GATE"),
    (lambda b: b["stages"][4]["config"].update(min_accuracy=2), "INVALID_THRESHOLD"),
    (lambda b: b["stages"][4]["config"].update(min_improvement=-0.1), "INVALID_THRESHOLD"),
    (lambda b: b["stages"].pop(5), "MISSING_STAGE"),
    (lambda b: b["rollback"].update(strategy="pray"), "INVALID_ROLLBACK"),
    (lambda b: b["stages"].append({"name": "register", "type": "deploy"}), "DUPLICATE_STAGE"),
])
def test_reference_vocabulary_errors(tmp_path, change, code):
    body = copy.deepcopy(REFERENCE)
    change(body)
    path = write(tmp_path, body, ".json")
    assert code in {f.code for f in validate(definition.load(path)) if f.level == "error"}


def test_dependencies_decide_the_order(tmp_path):
    body = copy.deepcopy(REFERENCE)
    body["stages"].insert(0, body["stages"].pop(3))  # train first in the file, but it depends on preprocess
    pipe = definition.load(write(tmp_path, body, ".json"))
    assert [s.kind for s in pipe.execution_order()][:4] == ["fetch-data", "validate", "preprocess", "train"]
    assert validate(pipe, strict=True) == []


@pytest.mark.parametrize(("change", "code"), [
    (lambda b: b["stages"].pop(0), "MISSING_STAGE"),
    (lambda b: b["stages"].insert(0, b["stages"].pop(3)), "STAGE_ORDER"),
    (lambda b: b["stages"].remove(stage(b, "gate")), "MISSING_GATE"),
    (lambda b: stage(b, "gate")["params"].clear(), "GATE_NO_THRESHOLD"),
    (lambda b: stage(b, "gate")["params"].update(min_auc=1.5), "INVALID_THRESHOLD"),
    (lambda b: b["stages"].append({"name": "train", "type": "train"}), "DUPLICATE_STAGE"),
    (lambda b: b["stages"].append({"name": "deploy-to-mars", "type": "deploy"}), "UNKNOWN_STAGE"),
    (lambda b: stage(b, "train").update(type="data"), "STAGE_TYPE_MISMATCH"),
    (lambda b: b["rollback"].update(strategy="pray"), "INVALID_ROLLBACK"),
    (lambda b: b.update(compute={"engine": "spark"}), "INVALID_COMPUTE"),
    (lambda b: b.update(compute={"engine": "ray", "partitions": -1}), "INVALID_COMPUTE"),
    (lambda b: b.update(compute={"engine": "ray", "workers": 4}), "INVALID_COMPUTE"),
    (lambda b: b.update(compute=["ray"]), "INVALID_COMPUTE"),
])
def test_errors_have_stable_codes(tmp_path, change, code):
    assert code in codes(edited(change), tmp_path)


@pytest.mark.parametrize(("change", "code"), [
    (lambda b: b.pop("rollback"), "MISSING_ROLLBACK"),
    (lambda b: b["rollback"].update(enabled=False), "ROLLBACK_DISABLED"),
    (lambda b: stage(b, "gate")["params"].update(min_auc=0.7), "LOW_THRESHOLD"),
    (lambda b: stage(b, "gate")["params"].update(compare_to_production=False), "NO_PRODUCTION_COMPARISON"),
    (lambda b: stage(b, "register")["params"].update(stage="production"), "REGISTER_TO_PRODUCTION"),
    (lambda b: b["stages"].remove(stage(b, "preprocess")), "MISSING_TRANSFORM"),
    (lambda b: b.update(owner="me"), "UNKNOWN_FIELD"),
])
def test_warnings_become_errors_with_strict(tmp_path, change, code):
    body = edited(change)
    assert code not in codes(body, tmp_path)
    warnings = {f.code for f in validate(definition.load(write(tmp_path, body))) if f.level == "warning"}
    assert code in warnings
    assert code in codes(body, tmp_path, strict=True)


def test_cli_exit_codes_and_json(tmp_path, capsys):
    good = write(tmp_path, BASE, ".json")
    assert pipeline_main(["validate", "--pipeline", str(good), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["valid"] is True
    # The reference's command line: no subcommand.
    assert pipeline_main(["--pipeline", str(ROOT / "pipeline.json"), "--strict", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["valid"] is True
    dangling = copy.deepcopy(REFERENCE)
    dangling["stages"][5]["depends_on"] = ["evaluate", "approval"]
    assert pipeline_main(["--pipeline", str(write(tmp_path, dangling, ".json")), "--strict", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["errors"][0]["code"] == "UNKNOWN_DEPENDENCY"
    soft = write(tmp_path, edited(lambda b: b.pop("rollback")))
    assert pipeline_main(["validate", "--pipeline", str(soft)]) == 0
    assert "WARNING MISSING_ROLLBACK" in capsys.readouterr().out
    assert pipeline_main(["validate", "--pipeline", str(soft), "--strict", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is False and report["errors"][0]["code"] == "MISSING_ROLLBACK"
    missing = tmp_path / "nope.yaml"
    assert pipeline_main(["validate", "--pipeline", str(missing)]) == 2
    (tmp_path / "bad.yaml").write_text("stages: [\n")
    assert pipeline_main(["validate", "--pipeline", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "not valid YAML" in err


def small(body: dict) -> dict:
    stage(body, "fetch-data")["params"] = dict(SMALL_DATA)
    stage(body, "train")["params"] = {"n_estimators": 40, "max_depth": 3}
    return body


def test_run_registers_a_gated_model_and_compares_with_production(tmp_path, mlflow_backend):
    reg = Registry(mlflow_backend)
    name = f"pipe_model_{tmp_path.name[-12:].replace('-', '_').lower()}"
    pipe = definition.load(write(tmp_path, small(copy.deepcopy(BASE))))
    summary = runner.run(pipe, reg, version="p1", model_name=name)
    assert [s["status"] for s in summary["stages"]] == ["ok"] * 7
    assert (summary["registered"]["version"], summary["registered"]["stage"]) == ("p1", "Staging")
    v = reg.get(name, "p1")
    assert v.metrics["auc"] >= 0.85 and v.metrics["onnx_parity_max_abs_diff"] <= 1e-5 and v.training_data_hash
    # The pipeline is one MLflow run: params, metrics, the gate's verdict, the registered model.
    run = reg.client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["gate"] == "passed"
    assert run.data.params["n_estimators"] == "40" and run.data.metrics["auc"] == pytest.approx(v.metrics["auc"])
    assert run.data.tags["registered_model_version"] == v.mlflow_version and v.run_id == run.info.run_id
    reg.promote(name, "p1", "production")
    # The same training again (identical data and params) does not beat Production by the minimum improvement.
    with pytest.raises(StageFailed, match=r"does not beat Production p1 .* by 0\.005 .*\(\+0\.0000\)"):
        runner.run(pipe, reg, version="p2", model_name=name)
    # A clearly weaker candidate on the same data is blocked too, and leaves a FAILED run saying why.
    weak = small(copy.deepcopy(BASE))
    stage(weak, "train")["params"] = {"n_estimators": 2, "max_depth": 1}
    stage(weak, "gate")["params"].update(min_auc=0.5, min_accuracy=0.5)
    with pytest.raises(StageFailed, match="does not beat Production p1") as info:
        runner.run(definition.load(write(tmp_path, weak)), reg, version="p3", model_name=name)
    assert info.value.stage == "gate"
    failed = reg.client.get_run(info.value.summary["mlflow_run_id"])
    assert failed.info.status == "FAILED" and failed.data.tags["failed_stage"] == "gate"
    assert [v.version for v in reg.list(name)] == ["p1"]  # nothing registered


def test_reference_pipeline_runs_with_its_gate_inside_evaluate(tmp_path):
    reg = Registry(Backend.for_uri(str(tmp_path / "m.db")))
    body = copy.deepcopy(REFERENCE)
    body["stages"][0]["config"] = dict(SMALL_DATA)
    body["stages"][3]["config"] = {"n_estimators": 40, "max_depth": 3}
    summary = runner.run(definition.load(write(tmp_path, body, ".json")), reg, version="j1", model_name="json_model")
    assert "gate passed" in summary["stages"][4]["outcome"] and summary["registered"]["stage"] == "Staging"
    body["stages"][4]["config"]["min_auc"] = 0.999
    with pytest.raises(StageFailed, match=r"auc 0\.\d+ is below the threshold 0\.9990"):
        runner.run(definition.load(write(tmp_path, body, ".json")), reg, model_name="json_model")


def test_absolute_threshold_blocks_registration(tmp_path):
    body = small(copy.deepcopy(BASE))
    stage(body, "gate")["params"].update(min_auc=0.999)
    with pytest.raises(StageFailed, match=r"auc 0\.\d+ is below the threshold 0\.9990"):
        runner.run(definition.load(write(tmp_path, body)), Registry(Backend.for_uri(str(tmp_path / "r.db"))),
                   model_name="gate_model")


def test_validate_stage_stops_on_bad_data(tmp_path):
    body = small(copy.deepcopy(BASE))
    stage(body, "validate")["params"]["ranges"]["transaction_amount"] = [0, 10]
    with pytest.raises(StageFailed, match=r"values of transaction_amount outside \[0, 10\]"):
        runner.run(definition.load(write(tmp_path, body)), Registry(Backend.for_uri(str(tmp_path / "r.db"))),
                   model_name="val_model")


def test_run_cli_fails_with_one_line_reason(tmp_path, capsys):
    body = small(copy.deepcopy(BASE))
    stage(body, "gate")["params"].update(min_auc=0.999)
    code = pipeline_main(["run", "--pipeline", str(write(tmp_path, body)), "--mlflow-uri",
                          Backend.for_uri(str(tmp_path / "r.db")).uri, "--name", "cli_gate_model"])
    assert code == 1
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pipeline:")]
    assert err_lines == [err_lines[0]] and "stage 'gate' failed" in err_lines[0]
    invalid = write(tmp_path, edited(lambda b: b["stages"].remove(stage(b, "gate"))))
    assert pipeline_main(["run", "--pipeline", str(invalid)]) == 1
    assert "MISSING_GATE" in capsys.readouterr().err


def test_where_the_heavy_stages_run_is_resolved_from_file_options_and_address():
    from lifecycle.pipeline.compute import Compute

    assert Compute.resolve() == Compute("local")  # auto, no address: this process
    assert Compute.resolve({"engine": "auto", "address": "ray://head:10001"}) == Compute("ray", "ray://head:10001")
    assert Compute.resolve({"engine": "ray", "partitions": 8}) == Compute("ray", None, 8)  # Ray in this process
    assert Compute.resolve({"engine": "local"}, address="ray://h:10001") == Compute("local")  # the file said local
    assert Compute.resolve({"engine": "local"}, engine="ray") == Compute("ray")  # the CLI's option wins
    assert Compute.resolve({}, address="auto").engine == "ray"  # MLOPS_RAY_ADDRESS alone turns Ray on


def test_run_cli_refuses_a_bad_engine_or_an_unreachable_ray_in_one_line(tmp_path, capsys):
    path = write(tmp_path, small(copy.deepcopy(BASE)))
    uri = Backend.for_uri(str(tmp_path / "r.db")).uri
    assert pipeline_main(["run", "--pipeline", str(path), "--mlflow-uri", uri, "--engine", "ray",
                          "--address", "nope://x"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pipeline:")]
    assert err == ["pipeline: no Ray at nope://x: RuntimeError: Module: nope does not exist."]
    client = Registry(Backend.for_uri(str(tmp_path / "r.db"))).client
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []  # no run started
    bad = write(tmp_path, edited(lambda b: b.update(compute={"engine": "spark"})))
    assert pipeline_main(["run", "--pipeline", str(bad)]) == 1
    assert "INVALID_COMPUTE" in capsys.readouterr().err
