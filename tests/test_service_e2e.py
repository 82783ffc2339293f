"""The whole request path against the live `bentoml serve`, real Feast/Redis and real Kafka."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from harness.kafka_read import read_events
from lifecycle import model_store
from mlops.onnx_contract import INPUT_NAME, positive_proba
from mlops.schema import MODEL_FEATURES
from tests.support import feast_features, metric_value

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
    stats = feast_features(workspace, customers)
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
    assert rows[2]["error"] == "unknown_entity" and "unknown customer_id 'ghost'" in rows[2]["detail"]
    assert "prediction" not in rows[2]
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
    ({"customer_id": "C000001"}, "missing required field `transaction_amount`"),
    ({"customer_id": "C000001", "transaction_amount": "12"}, "Expected `float`, got `str`"),
    ({"customer_id": "C000001", "transaction_amount": True}, "Expected `float`, got `bool`"),
    ({"customer_id": "C000001", "transaction_amount": -1}, "Expected `float` >= 0.0 - at `$.transaction_amount`"),
    ({"customer_id": "C000001", "transaction_amount": 1, "colour": "red"}, "unknown field `colour`"),
    ({"customer_id": "", "transaction_amount": 1}, "Expected `str` of length >= 1 - at `$.customer_id`"),
    ({"customer_id": 17, "transaction_amount": 1}, "got `int` - at `$.customer_id`"),
    ({"transaction_amount": 1}, "give customer_id, or all store features"),
    ({"transaction_amount": 1, "features": {"avg_order_value": 3}}, "missing"),
    ({"customer_id": "C000001", "transaction_amount": 1, "features": {"shoe_size": 3}}, "unknown field `shoe_size`"),
    ({"customer_id": "C000001", "transaction_amount": 1, "features": {"lifetime_value": -3}}, ">= 0.0"),
    ({"customer_id": "C000001", "transaction_amount": 1, "features": {"lifetime_value": 3.5e38}}, "<= 3.40282"),
    ({"customer_id": "C000001", "transaction_amount": 1e300}, "<= 1000000000.0"),
]


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error", "detail"} and isinstance(body["detail"], str), body
    return body


@pytest.mark.parametrize(("body", "message"), BAD_INPUTS)
def test_bad_input_is_a_400_with_a_message(server, body, message):
    r = predict(server, **body)
    assert r.status_code == 400, r.text
    assert error_of(r)["error"] == "invalid_request" and message in r.json()["detail"], r.text


@pytest.mark.parametrize("raw", ['{"customer_id": "C000001", "transaction_amount": NaN}',
                                 '{"customer_id": "C000001", "transaction_amount": Infinity}',
                                 '{"customer_id": "C000001", "transaction_amount": 1e999}',
                                 '{"customer_id": "C0000',
                                 "[1, 2]"])
def test_non_finite_and_malformed_json_are_400(server, raw):
    r = httpx.post(f"{server.url}/predict", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert error_of(r)["error"] == "invalid_request"


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
@pytest.mark.parametrize("path", ["/predict", "/predict_batch"])
def test_a_body_that_is_not_json_is_415_and_not_logged(server, path, content_type):
    body = '{"customer_id": "C000001", "transaction_amount": 1}'
    time.sleep(1.2)  # counters are exported once a second: let earlier tests' events settle
    before = metric_value(httpx.get(f"{server.url}/metrics").text, "mlops_kafka_accepted_total")
    headers = {"content-type": content_type} if content_type else {}
    r = httpx.post(f"{server.url}{path}", content=body, headers=headers)
    assert r.status_code == 415, r.text
    assert error_of(r)["error"] == "unsupported_media_type"
    time.sleep(1.2)  # counters are exported once a second
    assert metric_value(httpx.get(f"{server.url}/metrics").text, "mlops_kafka_accepted_total") == before


def test_unknown_fields_are_refused_on_both_endpoints(server):
    r = httpx.post(f"{server.url}/predict_batch", json={"requests": [{"customer_id": "C000001",
                                                                        "transaction_amount": 1}], "extra": 1})
    assert r.status_code == 400 and "unknown field `extra`" in error_of(r)["detail"]
    r = predict(server, customer_id="C000001", transaction_amount=1, extra=1)
    assert r.status_code == 400 and "unknown field `extra`" in error_of(r)["detail"]


def test_an_oversized_body_is_413(server, workspace):
    r = httpx.post(f"{server.url}/predict", content=b" " * (workspace.settings.max_body_bytes + 1),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and error_of(r)["error"] == "body_too_large"


def test_unknown_entity_is_404_with_message(server):
    r = predict(server, customer_id="nobody-here", transaction_amount=10.0)
    assert r.status_code == 404
    assert error_of(r) == {"error": "unknown_entity", "detail": "unknown customer_id 'nobody-here': no online features"}


def test_client_errors_log_a_line_per_code_per_period_never_a_traceback(server):
    """A flood of bad requests writes at most one line per error code per 10 s (with the count it stands for)."""
    def lines() -> int:
        return sum("invalid_request" in line for line in server.log_tail(5000).splitlines())

    before = lines()
    for _ in range(50):
        assert predict(server, customer_id="C000001", transaction_amount="oops").status_code == 400
    time.sleep(0.3)
    log = server.log_tail(5000)
    assert lines() - before <= 1 and "invalid_request" in log
    assert "Traceback" not in log


def test_openapi_documents_the_contract(server):
    spec = httpx.get(f"{server.url}/docs.json").json()
    request = spec["components"]["schemas"]["PredictRequest"]
    assert request["additionalProperties"] is False
    assert [branch["required"] for branch in request["anyOf"]] == [["customer_id"], ["features"]]
    responses = spec["paths"]["/predict"]["post"]["responses"]
    assert set(responses) == {"200", "400", "404", "413", "415", "503"}
    assert spec["components"]["schemas"]["ErrorBody"]["required"] == ["error", "detail"]
    outcomes = spec["paths"]["/outcomes"]["post"]
    assert set(outcomes["responses"]) == {"200", "400", "413", "415", "503"}
    row = spec["components"]["schemas"]["OutcomeIn"]
    assert row["required"] == ["request_id", "label"] and row["additionalProperties"] is False
    assert row["properties"]["timestamp"]["anyOf"][0] == {"type": "string", "format": "date-time"}


def test_oversized_and_empty_batches_are_400(server, workspace):
    limit = workspace.settings.max_request_rows
    too_many = {"requests": [{"customer_id": "C000001", "transaction_amount": 1.0}] * (limit + 1)}
    r = httpx.post(f"{server.url}/predict_batch", json=too_many, timeout=30)
    assert r.status_code == 400 and f"give 1 to {limit} rows, got {limit + 1}" in error_of(r)["detail"]
    r = httpx.post(f"{server.url}/predict_batch", json={"requests": []})
    assert r.status_code == 400


def test_probes_info_and_metrics(server):
    assert predict(server, customer_id="C000001", transaction_amount=5.0).status_code == 200
    time.sleep(1.2)  # log counters are exported once a second
    assert httpx.get(f"{server.url}/livez").status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    info = httpx.get(f"{server.url}/info").json()
    assert info["provider"] == "CPUExecutionProvider" and info["ready"] is True
    assert info["nodes_by_provider"] == {"CPUExecutionProvider": 1}  # where the graph ran, not what was asked
    assert info["model_version"] == "v1" and info["kafka"]["connected"] is True
    assert info["online_store"]["up"] is True and info["online_store"]["empty"] is False
    assert "address" not in info["online_store"] and "bootstrap" not in info["kafka"]  # MLOPS_INFO_ADDRESSES off
    assert info["kafka"]["durability"] == "ack" and info["auth"] is None
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("mlops_request_latency_seconds_bucket", "mlops_feature_lookup_latency_seconds_bucket",
                 "mlops_inference_latency_seconds_bucket", "mlops_batch_size_bucket", "mlops_predictions_total",
                 "mlops_errors_total", "mlops_kafka_delivered_total", "mlops_kafka_queue_depth",
                 "mlops_kafka_in_flight", "mlops_kafka_spool_events", "mlops_kafka_connected", "mlops_online_store_up",
                 "mlops_requests_total", "mlops_feature_age_seconds_bucket"):
        assert name in text, name
    info_line = 'mlops_model_info{model_name="fraud_detector",model_version="v1",provider="CPUExecutionProvider"} 1.0'
    assert info_line in text
