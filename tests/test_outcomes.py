"""POST /outcomes: the true labels of past predictions, validated all-or-nothing and published to the
outcomes topic, keyed by request id (the broker outage case is in tests/faults/test_serving_faults.py)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from harness.kafka_read import read_events
from mlops import outcomes
from service.contract import OutcomesInvalid, RequestError, decode_outcomes
from tests.support import metric_value

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def body(*rows: dict) -> bytes:
    return outcomes._encoder.encode({"outcomes": list(rows)})


def test_rows_become_outcome_events_with_a_default_time():
    events = decode_outcomes(body({"request_id": "a", "label": 1, "outcome_value": 120.5},
                                  {"request_id": "b", "label": 0, "timestamp": "2026-12-02T08:00:00+01:00"}),
                             10, now=NOW)
    assert [(e.request_id, e.label, e.outcome_value) for e in events] == [("a", 1, 120.5), ("b", 0, None)]
    assert events[0].timestamp == NOW and events[1].timestamp == datetime(2026, 12, 2, 7, tzinfo=UTC)
    assert outcomes.decode(outcomes.encode(events[1])) == events[1]
    assert outcomes.decode(b'{"request_id": "x", "label": 0, "timestamp": "2026-12-02T07:00:00Z"}').schema_version == 1


def test_the_same_outcome_twice_is_accepted_and_two_different_ones_for_one_request_are_not():
    same = {"request_id": "a", "label": 1, "timestamp": "2026-12-02T08:00:00Z"}
    assert [e.request_id for e in decode_outcomes(body(same, same), 10, now=NOW)] == ["a", "a"]  # joined once
    with pytest.raises(OutcomesInvalid, match=r"outcomes\[1\]: request_id 'a' repeats outcomes\[0\]'s with another"):
        decode_outcomes(body(same, {**same, "label": 0}), 10, now=NOW)


def test_any_bad_row_refuses_all_and_each_bad_row_is_named():
    rows = [{"request_id": "ok", "label": 1},
            {"request_id": "two", "label": 2},
            {"request_id": "naive", "label": 0, "timestamp": "2026-12-02T08:00:00"},
            {"request_id": "future", "label": 0, "timestamp": (NOW + timedelta(hours=1)).isoformat()},
            {"request_id": "ok", "label": 0},
            {"request_id": "extra", "label": 0, "amount": 3},
            {"label": 1},
            {"request_id": "bad id!", "label": 1},
            {"request_id": "v", "label": 1, "outcome_value": "12"},
            {"request_id": "old", "label": 1, "timestamp": "1969-12-31T23:59:59Z"},
            {"request_id": "year1", "label": 1, "timestamp": "0001-01-01T00:00:00+01:00"}]
    with pytest.raises(OutcomesInvalid) as refused:
        decode_outcomes(body(*rows), 100, now=NOW)
    assert [r.index for r in refused.value.rows] == list(range(1, len(rows)))
    assert str(refused.value).startswith(f"{len(rows) - 1} of {len(rows)} outcomes refused, none accepted")
    details = [r.detail for r in refused.value.rows]
    assert "time zone" in details[1] and "future" in details[2] and "repeats outcomes[0]" in details[3]
    assert "unknown field `amount`" in details[4] and "request_id" in details[5]
    assert "before 1970" in details[8] and "before 1970" in details[9]  # year 1 at +01:00 is before any UTC time


@pytest.mark.parametrize("raw, message", [
    (b"{", "malformed JSON"),
    (b'{"outcomes": []}', "give 1 to 3 rows"),
    (body(*({"request_id": f"r{i}", "label": 0} for i in range(4))), "give 1 to 3 rows, got 4"),
    (b'{"rows": []}', "unknown field `rows`"),
])
def test_a_bad_request_is_one_message(raw, message):
    with pytest.raises(RequestError, match=message):
        decode_outcomes(raw, 3, now=NOW)


@pytest.mark.integration
def test_accepted_outcomes_are_on_the_topic_keyed_by_request_id_and_refused_ones_are_not(server, workspace):
    tag = uuid.uuid4().hex[:8]
    good = [{"request_id": f"{tag}-{i}", "label": i % 2, "outcome_value": float(i)} for i in range(5)]
    r = httpx.post(f"{server.url}/outcomes", json={"outcomes": good}, timeout=30)
    assert r.status_code == 200 and r.json() == {"accepted": 5}, r.text

    refused = httpx.post(f"{server.url}/outcomes", timeout=30, json={"outcomes": [
        {"request_id": f"{tag}-kept-out", "label": 1}, {"request_id": f"{tag}-bad", "label": "yes"}]})
    assert refused.status_code == 400, refused.text
    answer = refused.json()
    assert answer["error"] == "invalid_request" and answer["rows"] == [
        {"index": 1, "detail": "Expected `int`, got `str` - at `$.label`"}]
    for status, kwargs in ((415, {"content": b"{}"}), (400, {"content": b"[", "headers": {
            "content-type": "application/json"}})):
        r = httpx.post(f"{server.url}/outcomes", timeout=30, **kwargs)
        assert r.status_code == status and set(r.json()) == {"error", "detail"}, r.text

    wanted = {row["request_id"] for row in good} | {f"{tag}-kept-out"}  # the refused request's good row: absent
    found = read_events(workspace.settings.kafka_bootstrap, workspace.settings.outcomes_topic, wanted, timeout=6,
                        message_key_as="_key")
    assert sorted(e["request_id"] for e in found) == sorted(row["request_id"] for row in good)
    for event in found:
        i = int(event["request_id"].rsplit("-", 1)[1])
        assert event["label"] == i % 2 and event["outcome_value"] == i and event["schema_version"] == 1
        assert event["_key"] == event["request_id"]
        assert datetime.fromisoformat(event["timestamp"]).tzinfo is not None
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert metric_value(metrics, "mlops_outcomes_accepted_total") >= 5
    info = httpx.get(f"{server.url}/info", timeout=10).json()["outcomes"]
    assert info["topic"] == "prediction-outcomes" and info["connected"] and info["dropped"] == {}


@pytest.mark.integration
def test_grpc_outcomes_use_the_same_checks_and_log(server, workspace):
    import grpc

    from service.proto import fraud_pb2 as pb
    from service.proto import fraud_pb2_grpc

    tag = uuid.uuid4().hex[:8]
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = fraud_pb2_grpc.FraudDetectorStub(channel)
        answer = stub.Outcomes(pb.OutcomesRequest(outcomes=[
            pb.Outcome(request_id=f"{tag}-g0", label=1, outcome_value=5.0),
            pb.Outcome(request_id=f"{tag}-g1", label=0, timestamp="2026-12-01T00:00:00Z")]), timeout=30)
        assert answer.accepted == 2
        with pytest.raises(grpc.RpcError) as refused:
            stub.Outcomes(pb.OutcomesRequest(outcomes=[pb.Outcome(request_id=f"{tag}-g2", label=1),
                                                       pb.Outcome(request_id=f"{tag}-g3", label=7),
                                                       pb.Outcome(request_id=f"{tag}-g4")]), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "2 of 3 outcomes refused" in refused.value.details() and "outcomes[2]" in refused.value.details()
    found = read_events(workspace.settings.kafka_bootstrap, workspace.settings.outcomes_topic,
                        {f"{tag}-g0", f"{tag}-g1", f"{tag}-g2"}, timeout=6)
    assert sorted((e["request_id"], e["label"]) for e in found) == [(f"{tag}-g0", 1), (f"{tag}-g1", 0)]
