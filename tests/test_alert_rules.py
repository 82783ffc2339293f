"""The alert rules load in Prometheus (`promtool check rules`), and their unit tests pass (`promtool test rules`).

The unit tests (deploy/prometheus/tests/*.yaml) say, per alert, when it fires and when it stays quiet; these
tests run them with Debian's promtool, prove they bite (a rule changed on purpose fails them), and check that
every alert has both a firing and a quiet case and uses only metrics that exist or are agreed to exist.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "alerts.yaml"
UNIT_TESTS = sorted((PROM / "tests").glob("*.yaml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "fraud-detector.json"
# Series that exist only once something happened (a labelled series is born with its first sample): rules may
# use them; the real-scrape test only requires series that exist from the start.
AGREED_METRICS = {"mlops_kafka_in_flight", "mlops_kafka_delivered_total", "mlops_kafka_dropped_total",
                  "mlops_kafka_connected", "mlops_online_store_up", "mlops_drift_checkpoint_failures_total"}


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    assert exe, "promtool not found: run scripts/install.sh (Debian package prometheus)"
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def alert_rules() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}


def declared_metrics() -> set[str]:
    from lifecycle.rollout import metrics as rollout_metrics
    from service import metrics as serving_metrics
    from streaming import metrics as drift_metrics

    names = set()
    for module in (serving_metrics, drift_metrics, rollout_metrics):
        names |= {m._name for m in vars(module).values() if hasattr(m, "_name")}
    return names | {f"{n}_total" for n in names}  # prometheus_client keeps counters' names without _total


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(mlops_[a-z_]+?)(?:_bucket|_count|_sum)?\b(?=\s*[{\[)]|\s)", expr + " "))


def test_promtool_accepts_the_rules():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass():
    result = promtool("test", "rules", *map(str, UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(UNIT_TESTS)


@pytest.mark.parametrize(("alert", "change"), [
    ("PredictionLatencyP99High", lambda r: r["labels"].update(severity="critical")),  # the old, wrong severity
    ("FeatureDriftPSICritical", lambda r: r.update(expr=r["expr"].replace("> 0.2", "> 0.7"))),
    ("DriftConsumerLagGrowing", lambda r: r.update(expr=r["expr"].split(" and ")[0])),  # any big lag, even steady
    ("PredictionErrorRateHigh", lambda r: r.update(expr=r["expr"].replace('code=~"5.."', 'code!="200"'))),
    ("DriftPartitionFenced", lambda r: r.pop("for")),  # a fence a rebalance revokes at once would page
    ("DriftConsumerPaused", lambda r: r.update(expr=r["expr"].replace("max(", "min("))),  # one paused of two
    ("DriftCheckpointStoreReset", lambda r: r.update(expr="max(mlops_drift_checkpoint_store_resets_total) > 0")),
    ("OnlineStoreEmpty", lambda r: r.update(expr=r["expr"].replace("max(", "min("))),  # one empty pod of two
    ("OnlineStoreEmpty", lambda r: r.pop("for")),  # an empty reading restored within the minute would page
    ("ModelQualityDrop", lambda r: r.update(expr=r["expr"].replace("0.95 *", "0.90 *"))),  # a 10 % drop
    ("ModelQualityDrop", lambda r: r.update(expr=r["expr"].replace(">= 200", ">= 100"))),  # a handful of labels
    ("ModelQualityEstimateDrop", lambda r: r.update(expr=r["expr"].replace('kind="estimated", metric=~',
                                                                           'kind="realised", metric=~'))),
    ("TrainingServingSkew", lambda r: r.update(expr=r["expr"].split(" and ")[0])),  # skew of a handful of rows
    ("TrainingServingSkew", lambda r: r.pop("for")),  # one check's sample would page
    ("RolloutRolledBack", lambda r: r.update(expr=r["expr"].replace("[15m]", "[1h]"))),  # pages for an hour
    ("RolloutStuck", lambda r: r.pop("for")),  # a step that catches up within minutes would page
    ("RolloutPausedForAnHour", lambda r: r.update(expr=r["expr"].replace('status="paused"', 'status=~".+"'))),
])
def test_the_unit_tests_catch_a_broken_rule(tmp_path, alert, change):
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                change(rule)
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    tests_dir = tmp_path / "tests"
    tests_dir.mkdir()
    name = ("model_quality_test.yaml" if alert.startswith("ModelQuality")
            else "skew_test.yaml" if alert.startswith("TrainingServing")
            else "rollout_test.yaml" if alert.startswith("Rollout") else "alerts_test.yaml")
    unit_tests = PROM / "tests" / name
    (tests_dir / unit_tests.name).write_text(unit_tests.read_text())
    result = promtool("test", "rules", str(tests_dir / unit_tests.name))
    output = result.stdout + result.stderr
    assert result.returncode != 0 and f"alertname: {alert}" in output, output[-2000:]


def test_every_alert_has_a_firing_and_a_quiet_case():
    firing: set[str] = set()
    quiet: set[str] = set()
    for f in UNIT_TESTS:
        for group in yaml.safe_load(f.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    rules = set(alert_rules())
    assert rules - firing == set(), "alerts never shown to fire"
    assert rules - quiet == set(), "alerts never shown to stay quiet"


def test_severities_and_thresholds_match_the_reference_rule_set():
    rules = alert_rules()
    expected = {"PredictionLatencyP99High": ("warning", "> 0.2"), "PredictionLatencyP95High": ("warning", "> 0.1"),
                "PredictionLatencyP50High": ("warning", "> 0.05"), "PredictionErrorRateHigh": ("critical", "> 0.01"),
                "FeatureDriftPSICritical": ("critical", "> 0.2"), "FeatureDriftKSWarning": ("warning", "> 0.15"),
                "ModelOverloaded": ("warning", "> 0"), "PredictionLogDropping": ("critical", "> 0"),
                "DriftPartitionFenced": ("warning", "> 0"), "DriftConsumerPaused": ("warning", "== 1"),
                "DriftCheckpointStoreReset": ("warning", "> 0"), "OnlineStoreEmpty": ("critical", "== 1"),
                "PredictionLogSpoolFailing": ("critical", "== 1"), "ModelQualityDrop": ("critical", "0.95 *"),
                "ModelQualityEstimateDrop": ("warning", "0.95 *"), "TrainingServingSkew": ("warning", "> 0.01")}
    for alert, (severity, threshold) in expected.items():
        assert rules[alert]["labels"]["severity"] == severity, alert
        assert threshold in rules[alert]["expr"], alert
    assert 'metric="psi"' in rules["FeatureDriftPSICritical"]["expr"]
    assert 'metric="ks"' in rules["FeatureDriftKSWarning"]["expr"]
    assert all(r["labels"]["severity"] in ("warning", "critical") for r in rules.values())


def test_rules_and_dashboard_use_only_metrics_that_exist_or_are_agreed():
    declared = declared_metrics()
    used = set().union(*(metric_names(r["expr"]) for r in alert_rules().values()))
    unknown = {m for m in used if m not in declared and m not in AGREED_METRICS}
    assert not unknown, unknown
    dashboard = json.loads(DASHBOARD.read_text())
    queries = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    unknown = {m for m in metric_names(queries) if m not in declared | AGREED_METRICS}
    assert not unknown, unknown  # test_prometheus_scrape.py proves every query returns data today


def test_cluster_scrape_config_is_valid(tmp_path):
    """deploy/prometheus/prometheus.yml discovers pods with kubernetes_sd, which Debian's Prometheus build
    leaves out; promtool checks the rest of it (relabelling, rule files) with the discovery swapped for a
    static target, and the relabelling keeps the job names the rules match on."""
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    relabel = {tuple(r.get("source_labels", [])): r for r in job["relabel_configs"]}
    assert relabel[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)]["action"] == "keep"
    assert relabel[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)]["target_label"] == "job"
    address = relabel[("__address__", "__meta_kubernetes_pod_annotation_prometheus_io_port")]
    assert re.fullmatch(address["regex"], "10.1.2.3:8080;9108").expand(
        address["replacement"].replace("$", "\\")) == "10.1.2.3:9108"
    job["static_configs"] = [{"targets": ["127.0.0.1:3000"]}]
    del job["kubernetes_sd_configs"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    (tmp_path / "alerts.yaml").write_text(RULES.read_text())
    result = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_layout_and_its_drift_consumer_health_row():
    """Unique panel ids, no two panels on the same grid cell, every panel on the chosen data source; and a
    "Drift consumer health" row showing every series the consumer-health alerts read (resets as an increase,
    since the counter restarts with each consumer)."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), ids
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for cell in ((x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                     for y in range(grid["y"], grid["y"] + grid["h"])):
            assert cell not in cells, (panel["title"], cells[cell])
            cells[cell] = panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    rows = sorted((p["gridPos"]["y"], p["title"]) for p in panels if p["type"] == "row")
    assert "Drift consumer health" in [title for _, title in rows], rows
    start = next(y for y, title in rows if title == "Drift consumer health")
    end = min([y for y, _ in rows if y > start], default=float("inf"))
    in_row = [p for p in panels if p["type"] != "row" and start < p["gridPos"]["y"] < end]
    queries = [t["expr"] for p in in_row for t in p["targets"]]
    rules = alert_rules()
    health = set().union(*(metric_names(rules[a]["expr"]) for a in (
        "DriftConsumerPaused", "DriftPartitionFenced", "DriftCheckpointStoreReset", "DriftCheckpointStoreDown",
        "DriftConsumerKafkaDisconnected")))
    assert health == {"mlops_drift_paused", "mlops_drift_fenced_partitions",
                      "mlops_drift_checkpoint_store_resets_total", "mlops_drift_checkpoint_store_up",
                      "mlops_drift_broker_connected"}, health
    assert health <= metric_names(" ".join(queries)), queries
    assert any("increase(mlops_drift_checkpoint_store_resets_total[" in q for q in queries), queries
