"""A real Prometheus scrapes the running service and a drift consumer; its query API shows the key series.

Prometheus (Debian's package, harness.prometheus) runs on a free loopback port with a 1 s scrape interval and
the project's alert rules; after real traffic through `bentoml serve` (reference-like, then shifted so the
consumer's drift alert fires; the outcome join and the skew check running too) every series the operator
relies on must exist with a sane value, every rule must evaluate without error, and every query of the Grafana
dashboard must return data.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path

import httpx
import pytest

from harness import prometheus
from lifecycle import data as datamod
from tests.support import Workspace, start_consumer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "fraud-detector.json"
SINGLE_REQUESTS = 120
SHIFTED_ROWS = 800


def rows(ws: Workspace, n: int, seed: int, amount_factor: float = 1.0) -> list[dict]:
    frame = datamod.training_frame(ws.dataset).sample(n, replace=True, random_state=seed)
    return [{"customer_id": r.customer_id, "transaction_amount": float(r.transaction_amount) * amount_factor}
            for r in frame.itertuples()]


def wait_for(prom: prometheus.PrometheusProcess, expr: str, at_least: float, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    value = math.nan
    while time.monotonic() < deadline:
        value = prom.value(expr)
        if value >= at_least:
            return value
        time.sleep(0.5)
    pytest.fail(f"{expr} = {value}, expected >= {at_least} within {timeout:.0f}s")


@pytest.fixture
def stack(workspace: Workspace, server, tmp_path):
    consumer = start_consumer(workspace, {"MLOPS_DRIFT_EVAL_INTERVAL_S": "0.5"}, "--group",
                              f"scrape-{uuid.uuid4().hex[:8]}", "--slot-seconds", "1", "--window-seconds", "120")
    joiner = start_consumer(workspace, {"MLOPS_QUALITY_EVAL_INTERVAL_S": "0.5",
                                        "MLOPS_QUALITY_GROUP_ID": f"scrape-{uuid.uuid4().hex[:8]}"}, command="join")
    skew_check = start_consumer(workspace, {}, "--every", "2", command="skew")
    prom = None
    try:
        assert consumer.wait_assigned(60), consumer.log()[-2000:]
        assert joiner.wait_assigned(60), joiner.log()[-2000:]
        server_address = server.url.removeprefix("http://")
        prom = prometheus.start({"fraud-detector": [server_address],
                                 "drift-consumer": [f"127.0.0.1:{consumer.metrics_port}"],
                                 "outcome-join": [f"127.0.0.1:{joiner.metrics_port}"],
                                 "skew-check": [f"127.0.0.1:{skew_check.metrics_port}"]},
                                tmp_path / "prometheus", scrape_interval="1s")
        yield server, consumer, prom, skew_check
    finally:
        if prom is not None:
            prom.stop()
        consumer.stop()
        joiner.stop()
        skew_check.stop()


def scrapes(prom: prometheus.PrometheusProcess, job: str) -> float:
    value = prom.value(f'count_over_time(up{{job="{job}"}}[10m])')
    return 0 if math.isnan(value) else value


def wait_scrapes(prom: prometheus.PrometheusProcess, more_than: dict[str, float], timeout: float = 30) -> None:
    """Until every job has been scraped more often than given (a rate needs two samples around the traffic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(scrapes(prom, job) > n for job, n in more_than.items()):
            return
        time.sleep(0.2)
    pytest.fail(f"Prometheus scraped {[scrapes(prom, j) for j in more_than]} times, wanted > {more_than}")


def post(client: httpx.Client, path: str, body: dict) -> httpx.Response:
    """As a client of the error contract does: a 503 is retryable (here: the broker's acknowledgement slower than
    `MLOPS_LOG_ACK_TIMEOUT_MS` while the other test worker loads the machine), so try it again a few times."""
    for _ in range(5):
        r = client.post(path, json=body)
        if r.status_code != 503:
            return r
        time.sleep(0.5)
    return r


def send_traffic(ws: Workspace, url: str) -> None:
    """Single predictions spread over several scrapes, two client errors, and shifted batches in the middle;
    then the outcomes of the single predictions (the join's quality series)."""
    singles = rows(ws, SINGLE_REQUESTS, seed=11)
    shifted = rows(ws, SHIFTED_ROWS, seed=12, amount_factor=4.0)
    with httpx.Client(base_url=url, timeout=60) as client:
        answered = []
        for n, row in enumerate(singles):
            r = post(client, "/predict", row)
            assert r.status_code == 200, r.text
            answered.append(r.json())
            time.sleep(0.04)
            if n == len(singles) // 2:
                for i in range(0, len(shifted), 200):
                    assert post(client, "/predict_batch", {"requests": shifted[i:i + 200]}).status_code == 200
        assert client.post("/predict", json={"customer_id": "nobody", "transaction_amount": 1.0}).status_code == 404
        assert client.post("/predict", json={"customer_id": "C000001"}).status_code == 400
        outcomes = [{"request_id": a["request_id"], "label": (a["label"] + i) % 2 if i % 7 == 0 else a["label"]}
                    for i, a in enumerate(answered)]
        assert post(client, "/outcomes", {"outcomes": outcomes}).status_code == 200


def test_prometheus_scrapes_the_stack_and_every_dashboard_query_has_data(workspace, stack):
    server, consumer, prom, skew_check = stack
    jobs = ("fraud-detector", "drift-consumer", "outcome-join")
    wait_scrapes(prom, dict.fromkeys(jobs, 1))  # both targets seen before the traffic starts
    send_traffic(workspace, server.url)
    wait_scrapes(prom, {job: scrapes(prom, job) + 3 for job in jobs})  # and a few times after it
    total = SINGLE_REQUESTS + SHIFTED_ROWS
    # The consumer judges the shifted window and publishes its own alert; Prometheus sees the counter.
    wait_for(prom, 'sum(mlops_drift_alerts_emitted_total{status="firing"})', 1, timeout=90)
    wait_for(prom, "sum(mlops_kafka_delivered_total)", total)
    wait_for(prom, "sum(mlops_drift_events_consumed_total)", total)
    # This model's series: the join reads the worker's shared topics, where other tests' models have outcomes too.
    model = f'model_name="{workspace.model.name}"'
    wait_for(prom, f'max(mlops_quality{{kind="realised", metric="labelled", {model}}})', SINGLE_REQUESTS)
    assert 0.5 < prom.value(f'max(mlops_quality{{kind="realised", metric="accuracy", {model}}})') < 1  # 1/7 flipped
    assert prom.value('max(mlops_quality_baseline{metric="auc"})') > 0.8  # the holdout's, from MLflow
    try:  # the skew check compared served rows with the offline store
        wait_for(prom, "min(mlops_skew_rows)", 1)
    except BaseException:
        print(skew_check.log()[-5000:])
        raise
    assert skew_check.process.poll() is None, skew_check.log()[-3000:]

    assert prom.value('up{job="fraud-detector"}') == 1 and prom.value('up{job="drift-consumer"}') == 1
    assert prom.value("sum(mlops_predictions_total)") >= total
    p99 = prom.value('histogram_quantile(0.99, sum by (le) (rate(mlops_request_latency_seconds_bucket'
                     '{endpoint="predict"}[5m])))')
    assert 0 < p99 < 5, p99
    assert prom.value('sum(mlops_requests_total{endpoint="predict",code="200"})') >= SINGLE_REQUESTS
    assert prom.value('sum(mlops_requests_total{endpoint="predict",code="404"})') >= 1
    assert prom.value('sum(mlops_errors_total{kind="unknown_entity"})') >= 1
    assert prom.value('max(mlops_model_info{model_name="fraud_detector"})') == 1
    assert prom.value("max(mlops_kafka_spool_bytes)") == 0
    psi = prom.value('max(mlops_drift_score{feature="transaction_amount",metric="psi"})')
    assert psi > 0.2, psi  # amounts x4 on a window of >= 500 events
    assert prom.value('max(mlops_drift_state{feature="transaction_amount"})') == 2  # critical
    lag = prom.query("mlops_drift_consumer_lag")
    assert lag and all(0 <= value < 10_000 for _, value in lag), lag
    # The series the consumer-health rules read exist from the start, so those rules judge data, not silence.
    health = {name: prom.value(f"max({name})") for name in (
        "mlops_drift_paused", "mlops_drift_fenced_partitions", "mlops_drift_checkpoint_store_resets_total",
        "mlops_drift_checkpoint_store_up", "mlops_drift_broker_connected")}
    assert health == {"mlops_drift_paused": 0, "mlops_drift_fenced_partitions": 0,
                      "mlops_drift_checkpoint_store_resets_total": 0, "mlops_drift_checkpoint_store_up": 1,
                      "mlops_drift_broker_connected": 1}, health

    rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    assert len(rules) >= 18
    assert [r["name"] for r in rules if r["health"] != "ok"] == [], rules

    dashboard = json.loads(DASHBOARD.read_text())
    empty, not_finite = [], []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            result = prom.query(target["expr"])
            if not result:
                empty.append(f"{panel['title']}: {target['expr']}")
            elif not all(math.isfinite(v) for _, v in result):
                not_finite.append(f"{panel['title']}: {target['expr']} = {result}")
    assert skew_check.process.poll() is None, skew_check.log()[-3000:]
    assert not empty, f"dashboard queries without data: {empty}"
    assert not not_finite, not_finite
