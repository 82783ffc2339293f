"""Kafka goes down while requests flow: requests still succeed, events are spooled and later delivered."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from tests.harness import metric_value
from tools import services as svc
from tools.kafka_read import read_events

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_requests_succeed_while_kafka_is_down_and_events_arrive_after(server, workspace):
    tag = uuid.uuid4().hex[:8]
    metrics_before = httpx.get(f"{server.url}/metrics").text
    svc.down(workspace.env_file.parent, only="kafka")
    try:
        sent = []
        for i in range(30):
            request_id = f"{tag}-{i}"
            started = time.perf_counter()
            r = httpx.post(f"{server.url}/predict", timeout=30,
                           json={"customer_id": f"C{i:06d}", "transaction_amount": 20.0, "request_id": request_id})
            assert r.status_code == 200, r.text + "\n" + server.log_tail(80)
            assert time.perf_counter() - started < 1.0, "request path waited on the broker"
            sent.append(request_id)
            time.sleep(0.05)
        spooled_before = metric_value(metrics_before, "mlops_kafka_spooled_total")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # gauges refresh once a second
            text = httpx.get(f"{server.url}/metrics").text
            spooled = metric_value(text, "mlops_kafka_spooled_total") - spooled_before
            if spooled >= 30 and metric_value(text, "mlops_kafka_spool_bytes") > 0:
                break
            time.sleep(0.5)
        else:
            pytest.fail("events were not spooled while Kafka was down")
    finally:
        svc.up(workspace.env_file.parent, only="kafka")

    events = read_events(workspace.settings.kafka_bootstrap, "predictions", set(sent), timeout=90)
    assert {e["request_id"] for e in events} == set(sent)
    assert len(events) == len(sent), "replay delivered duplicates"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics").text
        if metric_value(text, "mlops_kafka_spool_bytes") == 0:
            break
        time.sleep(0.5)
    assert metric_value(text, "mlops_kafka_spool_bytes") == 0
    assert metric_value(text, "mlops_kafka_dropped_total") == 0
    assert httpx.get(f"{server.url}/info/").json()["kafka"]["connected"] is True
