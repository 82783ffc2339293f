"""Every failure the live server gives has the one error body, ``{"error", "detail"}``, whatever layer answers:
our routes, the router (no such route, wrong method, a trailing slash), uvicorn's HTTP parser, gRPC's
deserialisation."""

from __future__ import annotations

import socket
import uuid

import grpc
import httpx
import pytest

from harness.kafka_read import read_events
from service.proto import fraud_pb2

pytestmark = pytest.mark.integration


def assert_error_body(r: httpx.Response, status: int, error: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] == error and body["detail"], body
    return body


@pytest.mark.parametrize("body", [
    b'{"customer_id": "C\xff", "transaction_amount": 1}',
    b'{"custo\xffmer_id": "C000001", "transaction_amount": 1}',
    b'{"customer_id": "\xed\xa0\x80", "transaction_amount": 1}',
    b'{"customer_id": "C000001", "transaction_amount": 1, "request_id": "r\xc3"}',
], ids=["value", "key", "surrogate", "truncated"])
def test_invalid_utf8_is_a_400(server, body):
    headers = {"content-type": "application/json"}
    r = httpx.post(f"{server.url}/predict", content=body, headers=headers)
    assert "UTF-8" in assert_error_body(r, 400, "invalid_request")["detail"]
    r = httpx.post(f"{server.url}/predict_batch", content=b'{"requests": [' + body + b"]}", headers=headers)
    assert_error_body(r, 400, "invalid_request")


def test_routing_errors_use_the_error_body(server):
    assert_error_body(httpx.get(f"{server.url}/nothing-here"), 404, "not_found")
    assert_error_body(httpx.post(f"{server.url}/predict/", json={}, follow_redirects=False), 404, "not_found")
    r = httpx.get(f"{server.url}/predict")
    assert_error_body(r, 405, "method_not_allowed")
    assert "POST" in r.headers["allow"]


def test_an_unparseable_http_request_gets_the_error_body(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), reply
    assert b"content-type: application/json" in head.lower()
    assert body == b'{"error":"invalid_request","detail":"malformed HTTP request"}'


def test_ids_with_a_trailing_newline_are_refused_and_never_logged(server, workspace):
    rid = f"nl-{uuid.uuid4().hex[:8]}"
    for body in ({"customer_id": "C000001\n", "transaction_amount": 1.0},
                 {"customer_id": "C000001", "transaction_amount": 1.0, "request_id": rid + "\n"}):
        assert_error_body(httpx.post(f"{server.url}/predict", json=body), 400, "invalid_request")
    assert read_events(workspace.settings.kafka_bootstrap, "predictions", {rid, rid + "\n"}, timeout=3) == []


def test_a_repeated_request_id_in_a_batch_is_refused(server):
    rows = [{"customer_id": "C000001", "transaction_amount": 1.0, "request_id": "same"}] * 2
    body = assert_error_body(httpx.post(f"{server.url}/predict_batch", json={"requests": rows}), 400,
                             "invalid_request")
    assert "repeats" in body["detail"]


def test_malformed_protobuf_is_invalid_argument(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        for method in ("Predict", "PredictBatch"):
            call = channel.unary_unary(f"/mlops.fraud.v1.FraudDetector/{method}")  # raw bytes in and out
            for data in (b"\xff\xff\xff", b"\x0a\x02\xff\xfe"):
                with pytest.raises(grpc.RpcError) as err:
                    call(data, timeout=10)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, data, err.value)
                assert "malformed protobuf" in err.value.details()
        stub_reply = channel.unary_unary("/mlops.fraud.v1.FraudDetector/Predict",
                                         request_serializer=fraud_pb2.PredictRequest.SerializeToString,
                                         response_deserializer=fraud_pb2.Prediction.FromString)
        with pytest.raises(grpc.RpcError) as err:
            stub_reply(fraud_pb2.PredictRequest(customer_id="C1\n", transaction_amount=1.0), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        batch = channel.unary_unary("/mlops.fraud.v1.FraudDetector/PredictBatch",
                                    request_serializer=fraud_pb2.PredictBatchRequest.SerializeToString,
                                    response_deserializer=fraud_pb2.PredictBatchResponse.FromString)
        row = fraud_pb2.PredictRequest(customer_id="C000001", transaction_amount=1.0, request_id="twice")
        with pytest.raises(grpc.RpcError) as err:
            batch(fraud_pb2.PredictBatchRequest(requests=[row, row]), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "repeats" in err.value.details()


def test_prediction_routes_are_served_by_the_fast_protocol_and_pipelining_keeps_order(server):
    """`/info` says the worker's connections go through service.fast_http; two requests sent back to back on
    one connection (HTTP/1.1 pipelining: the second is parsed while the first waits for its batch) are
    answered in order, the second through the ASGI path behind the first."""
    assert httpx.get(f"{server.url}/info").json()["http_fast_path"] is True
    host, port = server.url.removeprefix("http://").split(":")
    bodies = [b'{"customer_id":"C000001","transaction_amount":1.0,"request_id":"pipe-a"}',
              b'{"customer_id":"C000002","transaction_amount":2.0,"request_id":"pipe-b"}',
              b'{"customer_id":"C000003","transaction_amount":3.0,"request_id":"pipe-c"}']
    wire = b"".join(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                    b"\r\n%s" % (len(body), body) for body in bodies)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(wire)
        reply = b""
        while reply.count(b"pipe-") < 3:
            chunk = sock.recv(65536)
            assert chunk, reply
            reply += chunk
    positions = [reply.index(f"pipe-{x}".encode()) for x in "abc"]
    assert positions == sorted(positions)
    assert reply.count(b"HTTP/1.1 200 OK") == 3
