"""The gRPC API (service/proto/fraud.proto) against the live server: same answers and log as HTTP."""

from __future__ import annotations

import math
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import httpx
import pytest

from harness.kafka_read import read_events
from service.proto import fraud_pb2 as pb
from service.proto import fraud_pb2_grpc
from tests.support import LOOPBACK, listening_addresses

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.grpc_target)
    grpc.channel_ready_future(channel).result(timeout=30)
    yield fraud_pb2_grpc.FraudDetectorStub(channel)
    channel.close()


def test_predict_matches_http_and_is_logged(stub, server, workspace):
    request_id = f"grpc-{uuid.uuid4().hex[:8]}"
    answer = stub.Predict(pb.PredictRequest(customer_id="C000007", transaction_amount=321.0, request_id=request_id))
    http = httpx.post(f"{server.url}/predict", json={"customer_id": "C000007", "transaction_amount": 321.0}).json()
    assert answer.request_id == request_id and answer.customer_id == "C000007"
    assert answer.prediction == pytest.approx(http["prediction"], abs=1e-9)
    assert answer.label == http["label"] and answer.model_version == http["model_version"] == "v1"
    assert answer.latency_ms > 0
    (event,) = read_events(workspace.settings.kafka_bootstrap, "predictions", {request_id}, settle=0.5)
    assert event["prediction"] == pytest.approx(answer.prediction)


def test_raw_features_and_batch_with_unknown_row(stub):
    features = {"total_purchases": 3, "avg_order_value": 50.0, "days_since_last_order": 2.0, "lifetime_value": 150.0}
    answer = stub.Predict(pb.PredictRequest(transaction_amount=40.0, features=features))
    assert not answer.HasField("customer_id") and 0 <= answer.prediction <= 1
    batch = stub.PredictBatch(pb.PredictBatchRequest(requests=[
        pb.PredictRequest(customer_id="C000001", transaction_amount=10.0),
        pb.PredictRequest(customer_id="ghost", transaction_amount=10.0),
        pb.PredictRequest(customer_id="C000002", transaction_amount=10.0),
    ]))
    kinds = [r.WhichOneof("outcome") for r in batch.results]
    assert kinds == ["prediction", "error", "prediction"]
    assert "unknown customer_id 'ghost'" in batch.results[1].error and batch.results[1].customer_id == "ghost"
    assert batch.results[1].error_code == "unknown_entity"


@pytest.mark.parametrize(("request_", "code", "message"), [
    (pb.PredictRequest(customer_id="C000001"), grpc.StatusCode.INVALID_ARGUMENT,
     "missing required field `transaction_amount`"),
    (pb.PredictRequest(customer_id="C000001", transaction_amount=-2), grpc.StatusCode.INVALID_ARGUMENT,
     "Expected `float` >= 0.0 - at `$.transaction_amount`"),
    (pb.PredictRequest(customer_id="C000001", transaction_amount=math.nan), grpc.StatusCode.INVALID_ARGUMENT,
     "transaction_amount is not a number (NaN)"),
    (pb.PredictRequest(customer_id="C000001", transaction_amount=1.0, features={"lifetime_value": 1e39}),
     grpc.StatusCode.INVALID_ARGUMENT, "<= 3.40282"),
    (pb.PredictRequest(transaction_amount=1.0), grpc.StatusCode.INVALID_ARGUMENT, "give customer_id"),
    (pb.PredictRequest(customer_id="C000001", transaction_amount=1.0, features={"shoe_size": 4.0}),
     grpc.StatusCode.INVALID_ARGUMENT, "unknown field `shoe_size`"),
    (pb.PredictRequest(customer_id="nobody", transaction_amount=1.0), grpc.StatusCode.NOT_FOUND,
     "unknown customer_id 'nobody'"),
])
def test_errors_map_to_status_codes(stub, request_, code, message):
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request_)
    assert info.value.code() == code and message in info.value.details()


def test_batch_size_limits(stub, workspace):
    with pytest.raises(grpc.RpcError) as info:
        stub.PredictBatch(pb.PredictBatchRequest(requests=[]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    too_many = [pb.PredictRequest(customer_id="C000001", transaction_amount=1.0)] * (
        workspace.settings.max_request_rows + 1)
    with pytest.raises(grpc.RpcError) as info:
        stub.PredictBatch(pb.PredictBatchRequest(requests=too_many))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "give 1 to" in info.value.details()


def test_generated_code_matches_the_proto(tmp_path):
    """service/proto/*_pb2*.py are generated; they must be regenerated when fraud.proto changes."""
    pytest.importorskip("grpc_tools")
    out = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}", f"--python_out={tmp_path}",
                          f"--grpc_python_out={tmp_path}", "service/proto/fraud.proto"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in ("fraud_pb2.py", "fraud_pb2_grpc.py"):
        assert (tmp_path / "service" / "proto" / name).read_text() == (ROOT / "service" / "proto" / name).read_text(), (
            f"{name} is stale: run bash scripts/gen_proto.sh")


def test_health_service_says_serving(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "mlops.fraud.v1.FraudDetector"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_binds_the_http_host_only(server):
    """`bentoml serve --host 127.0.0.1` (the harness does so): gRPC must not listen on other interfaces."""
    info = httpx.get(f"{server.url}/info").json()
    assert info["grpc"] is None and info["grpc_port"] == server.grpc_port  # addresses only when asked
    listening = listening_addresses(server.grpc_port)
    assert listening and listening <= LOOPBACK, listening
