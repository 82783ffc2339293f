"""The whole request path against the live `bentoml serve`, real Feast/Redis and real Kafka."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from lifecycle import model_store
from mlops.onnx_contract import INPUT_NAME, positive_proba
from mlops.schema import MODEL_FEATURES
from service.feature_lookup import FeatureLookup, open_store
from tests.harness import metric_value
from tools.kafka_read import read_events

pytestmark = pytest.mark.integration


def ids(n: int, start: int = 0) -> list[str]:
    return [f"C{i:06d}" for i in range(start, start + n)]


def predict(server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/predict", json=body, timeout=30)


def test_predictions_equal_onnx_on_feast_features_and_each_is_logged_once(server, workspace):
    tag = uuid.uuid4().hex[:8]
    customers = ids(20, start=10)
    amounts = [float(10 + 37 * i) for i in range(len(customers))]
    answers = []
    for i, (customer, amount) in enumerate(zip(customers, amounts, strict=True)):
        r = predict(server, customer_id=customer, transaction_amount=amount, request_id=f"{tag}-{i}")
        assert r.status_code == 200, r.text
        answers.append(r.json())

    # Expected: the stored ONNX model on the same features, fetched from Feast by this test.
    stats = FeatureLookup(open_store(workspace.settings)).fetch(customers)
    vectors = [{**s, "transaction_amount": a} for s, a in zip(stats, amounts, strict=True)]
    x = np.array([[v[f] for f in MODEL_FEATURES] for v in vectors], dtype=np.float32)
    stored = model_store.load("fraud_detector", "v1")
    expected = positive_proba(ort.InferenceSession(str(stored.onnx_path)).run(None, {INPUT_NAME: x}))
    got = np.array([a["prediction"] for a in answers])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    for answer in answers:
        assert answer["model_name"] == "fraud_detector" and answer["model_version"] == "v1"
        assert answer["label"] == int(answer["prediction"] >= 0.5)
        assert 0 < answer["latency_ms"] < 5_000

    wanted = {a["request_id"] for a in answers}
    events = read_events(workspace.settings.kafka_bootstrap, "predictions", wanted)
    assert sorted(e["request_id"] for e in events) == sorted(wanted)  # exactly one each
    by_id = {e["request_id"]: e for e in events}
    for answer, s, amount in zip(answers, stats, amounts, strict=True):
        event = by_id[answer["request_id"]]
        assert event["prediction"] == pytest.approx(answer["prediction"])
        assert event["model_version"] == "v1" and event["customer_id"] == answer["customer_id"]
        assert event["features"] == pytest.approx({**s, "transaction_amount": amount})
        assert event["latency_ms"] == answer["latency_ms"] and event["timestamp"]


def test_raw_features_without_entity(server):
    features = {"total_purchases": 3, "avg_order_value": 50.0, "days_since_last_order": 2.0, "lifetime_value": 150.0}
    r = predict(server, transaction_amount=40.0, features=features)
    assert r.status_code == 200, r.text
    assert r.json()["customer_id"] is None and 0 <= r.json()["prediction"] <= 1


def test_batch_endpoint_keeps_order_and_flags_unknown(server):
    body = {"requests": [{"customer_id": c, "transaction_amount": 25.0} for c in ids(5)]}
    body["requests"].insert(2, {"customer_id": "ghost", "transaction_amount": 1.0})
    r = httpx.post(f"{server.url}/predict_batch", json=body, timeout=30)
    assert r.status_code == 200, r.text
    rows = r.json()
    assert [row.get("customer_id") for row in rows] == [*ids(2), "ghost", *ids(3, start=2)]
    assert "unknown customer_id 'ghost'" in rows[2]["error"] and "prediction" not in rows[2]
    assert all("prediction" in row for i, row in enumerate(rows) if i != 2)


def test_concurrent_requests_are_batched(server):
    before = httpx.get(f"{server.url}/metrics").text

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            calls = [client.post("/predict", json={"customer_id": c, "transaction_amount": 12.5}) for c in ids(96)]
            return [r.status_code for r in await asyncio.gather(*calls)]

    assert asyncio.run(burst()) == [200] * 96
    after = httpx.get(f"{server.url}/metrics").text
    batches = metric_value(after, "mlops_batch_size_count") - metric_value(before, "mlops_batch_size_count")
    rows = metric_value(after, "mlops_batch_size_sum") - metric_value(before, "mlops_batch_size_sum")
    assert rows == 96
    assert batches < 96, f"{batches} batches for 96 concurrent requests: no adaptive batching"


BAD_INPUTS = [
    ({"customer_id": "C000001"}, "transaction_amount"),
    ({"customer_id": "C000001", "transaction_amount": "12"}, "valid number"),
    ({"customer_id": "C000001", "transaction_amount": True}, "valid number"),
    ({"customer_id": "C000001", "transaction_amount": -1}, "greater than or equal to 0"),
    ({"customer_id": "C000001", "transaction_amount": 1, "colour": "red"}, "Extra inputs"),
    ({"customer_id": "", "transaction_amount": 1}, "at least 1 character"),
    ({"customer_id": 17, "transaction_amount": 1}, "valid string"),
    ({"transaction_amount": 1}, "give customer_id, or all store features"),
    ({"transaction_amount": 1, "features": {"avg_order_value": 3}}, "missing"),
    ({"customer_id": "C000001", "transaction_amount": 1, "features": {"shoe_size": 3}}, "unknown features"),
    ({"customer_id": "C000001", "transaction_amount": 1, "features": {"lifetime_value": -3}}, "negative"),
]


@pytest.mark.parametrize(("body", "message"), BAD_INPUTS)
def test_bad_input_is_a_400_with_a_message(server, body, message):
    r = predict(server, **body)
    assert r.status_code == 400, r.text
    assert message in r.text


@pytest.mark.parametrize("raw", ['{"customer_id": "C000001", "transaction_amount": NaN}',
                                 '{"customer_id": "C000001", "transaction_amount": Infinity}',
                                 '{"customer_id": "C000001", "transaction_amount": 1e999}',
                                 '{"customer_id": "C0000',
                                 "[1, 2]"])
def test_non_finite_and_malformed_json_are_400(server, raw):
    r = httpx.post(f"{server.url}/predict", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text


def test_unknown_entity_is_404_with_message(server):
    r = predict(server, customer_id="nobody-here", transaction_amount=10.0)
    assert r.status_code == 404
    assert "unknown customer_id 'nobody-here'" in r.text


def test_oversized_and_empty_batches_are_400(server, workspace):
    limit = workspace.settings.max_request_rows
    too_many = {"requests": [{"customer_id": "C000001", "transaction_amount": 1.0}] * (limit + 1)}
    r = httpx.post(f"{server.url}/predict_batch", json=too_many, timeout=30)
    assert r.status_code == 400 and f"at most {limit} items" in r.text
    r = httpx.post(f"{server.url}/predict_batch", json={"requests": []})
    assert r.status_code == 400


def test_probes_info_and_metrics(server):
    assert httpx.get(f"{server.url}/livez").status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    info = httpx.get(f"{server.url}/info/").json()
    assert info["provider"] == "CPUExecutionProvider"
    assert info["model_version"] == "v1" and info["kafka"]["connected"] is True
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("mlops_request_latency_seconds_bucket", "mlops_feature_lookup_latency_seconds_bucket",
                 "mlops_inference_latency_seconds_bucket", "mlops_batch_size_bucket", "mlops_predictions_total",
                 "mlops_errors_total", "mlops_kafka_publish_failures_total", "mlops_kafka_queue_depth"):
        assert name in text, name
    info_line = 'mlops_model_info{model_name="fraud_detector",model_version="v1",provider="CPUExecutionProvider"} 1.0'
    assert info_line in text
