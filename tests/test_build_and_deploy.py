"""`bentoml build` on bentofile.yaml, and the deploy manifests users apply."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
@pytest.mark.slow
def test_bentoml_build_packs_service_code_and_model(workspace):
    bentoml = Path(sys.executable).with_name("bentoml")
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    result = subprocess.run([str(bentoml), "build", "-o", "tag"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    info = subprocess.run([str(bentoml), "get", tag, "-o", "json"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    bento = json.loads(info.stdout)
    from lifecycle import model_store

    assert [m["tag"] for m in bento["models"]] == [model_store.load("fraud_detector").tag]  # :latest
    bento_dir = Path(os.environ["BENTOML_HOME"]) / "bentos" / tag.replace(":", "/")
    assert (bento_dir / "src" / "service" / "service.py").exists()
    assert (bento_dir / "src" / "feature_repo" / "feature_store.yaml").exists()
    assert (bento_dir / "env" / "docker" / "Dockerfile").exists()
    requirements = (bento_dir / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime==1.32.0" in requirements and "feast" in requirements


def test_kubernetes_manifests_have_probes_resources_and_autoscaling():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "fraud-detector.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "PodDisruptionBudget"} <= set(kinds)
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert kinds["Deployment"]["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    config = kinds["ConfigMap"]["data"]
    from mlops.settings import Settings

    assert all(k.removeprefix("MLOPS_").lower() in Settings.model_fields for k in config), config


def test_alert_rules_and_dashboard_use_metrics_that_exist():
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text())
    exprs = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "fraud-detector.json").read_text())
    queries = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    from service import metrics as serving_metrics
    from streaming import metrics as drift_metrics

    declared = {m._name for m in vars(serving_metrics).values() if hasattr(m, "_name")}
    declared |= {m._name for m in vars(drift_metrics).values() if hasattr(m, "_name")}
    import re

    used = set(re.findall(r"\b(mlops_[a-z_]+?)(?:_bucket|_count|_sum|_total)?\b", exprs + " " + queries))
    unknown = {u for u in used if u not in declared and u.removesuffix("_total") not in declared}
    assert not unknown, unknown
    assert "0.2" in exprs and "0.1" in exprs and "0.05" in exprs  # the P99/P95/P50 SLOs
