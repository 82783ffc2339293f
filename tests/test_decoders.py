"""The request decoders, HTTP (JSON) and gRPC (protobuf), on whatever bytes a client may send.

Each decoder has exactly two outcomes: a valid request, or a client error (HTTP 400 / INVALID_ARGUMENT)
with a message. Anything else would be a 500. Hypothesis searches arbitrary bytes and near-valid bodies for
a third outcome.
"""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.contract import PredictRequest, RequestError, decode_batch, decode_request
from service.grpc_api import Malformed, to_request, tolerant
from service.http_api import ErrorLog
from service.proto import fraud_pb2

MAX_ROWS = 16
INVALID_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xe2\x82", b"\xc0\xaf", b"a\xfeb"]


def outcome(decode, body: bytes) -> str:
    try:
        decode(body)
    except RequestError as exc:
        assert str(exc), "a client error needs a message"
        return "400"
    return "ok"


@pytest.mark.parametrize("bad", INVALID_UTF8, ids=[b.hex() for b in INVALID_UTF8])
@pytest.mark.parametrize("where", ["value", "key", "request_id"])
def test_invalid_utf8_anywhere_is_a_client_error(bad, where):
    if where == "value":
        body = b'{"customer_id": "C' + bad + b'", "transaction_amount": 1}'
    elif where == "key":
        body = b'{"customer' + bad + b'_id": "C1", "transaction_amount": 1}'
    else:
        body = b'{"customer_id": "C1", "transaction_amount": 1, "request_id": "r' + bad + b'"}'
    with pytest.raises(RequestError, match="malformed JSON"):
        decode_request(body)
    with pytest.raises(RequestError, match="malformed JSON"):
        decode_batch(b'{"requests": [' + body + b"]}", MAX_ROWS)


@pytest.mark.parametrize("field", ["customer_id", "request_id"])
@pytest.mark.parametrize("value", ["C1\n", "C1\r\n", "\nC1", "C1\n\n", "C 1"])
def test_ids_are_refused_unless_wholly_made_of_id_characters(field, value):
    body = {"customer_id": "C1", "transaction_amount": 1.0, field: value}
    with pytest.raises(RequestError, match=field):
        decode_request(json.dumps(body).encode())
    assert decode_request(json.dumps({**body, field: "C1-x.y:z_0"}).encode())


def test_a_request_id_names_one_row_of_a_batch():
    rows = [{"customer_id": "C1", "transaction_amount": 1.0, "request_id": rid} for rid in ("a", "b", "a")]
    with pytest.raises(RequestError, match=r"requests\[2\]: request_id 'a' repeats requests\[0\]"):
        decode_batch(json.dumps({"requests": rows}).encode(), MAX_ROWS)
    rows[2]["request_id"] = "c"
    assert len(decode_batch(json.dumps({"requests": rows}).encode(), MAX_ROWS)) == 3
    anonymous = [{"customer_id": "C1", "transaction_amount": 1.0}] * 3  # ids are generated, one per row
    assert len(decode_batch(json.dumps({"requests": anonymous}).encode(), MAX_ROWS)) == 3


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
near_valid = st.fixed_dictionaries(
    {"transaction_amount": st.floats() | st.integers() | st.text(max_size=4)},
    optional={"customer_id": st.text(max_size=70) | json_scalars, "request_id": st.text(max_size=10) | json_scalars,
              "features": st.dictionaries(st.text(max_size=25), json_scalars, max_size=5) | json_scalars},
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_json_decoders_on_arbitrary_bytes(body):
    outcome(decode_request, body)
    outcome(lambda b: decode_batch(b, MAX_ROWS), body)
    outcome(lambda b: decode_batch(b, MAX_ROWS), b'{"requests": [' + body + b"]}")


@settings(max_examples=600, deadline=None)
@given(near_valid, st.integers(0, 40), st.binary(max_size=3))
def test_json_decoders_on_near_valid_bodies_with_corruption(body, at, noise):
    raw = json.dumps(body, allow_nan=True).encode()
    corrupted = raw[:at] + noise + raw[at:]
    for candidate in (raw, corrupted):
        outcome(decode_request, candidate)
        outcome(lambda b: decode_batch(b, MAX_ROWS), b'{"requests": [' + candidate + b"]}")


def grpc_outcome(data: bytes, parse) -> str:
    message = tolerant(parse)(data)
    if isinstance(message, Malformed):
        assert message.reason.startswith("malformed protobuf message")
        return "malformed"
    rows = message.requests if isinstance(message, fraud_pb2.PredictBatchRequest) else [message]
    for row in rows:
        try:
            assert isinstance(to_request(row), PredictRequest)
        except RequestError as exc:
            assert str(exc)
    return "ok"


@settings(max_examples=800, deadline=None)
@given(st.binary(max_size=200))
def test_grpc_decoders_on_arbitrary_bytes(data):
    grpc_outcome(data, fraud_pb2.PredictRequest.FromString)
    grpc_outcome(data, fraud_pb2.PredictBatchRequest.FromString)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=70), st.floats(), st.dictionaries(st.text(max_size=25), st.floats(), max_size=5),
       st.text(max_size=10))
def test_grpc_requests_with_any_field_values(customer, amount, features, request_id):
    message = fraud_pb2.PredictRequest(customer_id=customer, transaction_amount=amount, features=features,
                                       request_id=request_id)
    assert grpc_outcome(message.SerializeToString(), fraud_pb2.PredictRequest.FromString) == "ok"


def test_malformed_protobuf_and_bad_utf8_in_a_string_field():
    bad_utf8 = b"\x0a\x02\xff\xfe"  # field 1 (customer_id), 2 bytes that are not UTF-8
    for data in (bad_utf8, b"\xff\xff\xff", b"\x0a\x05ab"):
        assert grpc_outcome(data, fraud_pb2.PredictRequest.FromString) == "malformed"


def test_error_log_writes_one_line_per_code_per_period(caplog):
    errors = ErrorLog(every_s=3600)
    with caplog.at_level(logging.INFO, logger="service.http_api"):
        for _ in range(1000):
            errors.record(503, "/predict", "online_store_unavailable", "Redis down")
        errors.record(400, "/predict", "invalid_request", "bad")
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO]
    errors.every_s = 0  # the next line says how many it stood for
    with caplog.at_level(logging.INFO, logger="service.http_api"):
        errors.record(503, "/predict", "online_store_unavailable", "Redis down")
    assert "and 999 more online_store_unavailable" in caplog.records[-1].getMessage()
