"""Access to the prediction routes: an optional bearer token (from a file, never shown), required on HTTP —
the fast protocol and BentoML's ASGI path alike — and on gRPC; /info without internal addresses unless
asked."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest

from mlops.settings import Settings
from service.http_api import HttpApi
from service.proto import fraud_pb2 as pb
from service.proto import fraud_pb2_grpc
from tests.support import start_server

TOKEN = "s3cret-token-for-tests"
BODY = {"customer_id": "C000001", "transaction_amount": 12.0}


def test_the_token_comes_from_its_file_and_an_unreadable_or_empty_file_is_an_error(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert Settings(api_token_file=path, api_token="ignored").api_token_value() == TOKEN
    assert Settings(api_token="from-env").api_token_value() == "from-env"
    assert Settings().api_token_value() is None
    assert "from-env" not in repr(Settings(api_token="from-env"))  # a secret, never printed
    path.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        Settings(api_token_file=path).api_token_value()
    with pytest.raises(ValueError, match="No such file"):
        Settings(api_token_file=tmp_path / "missing").api_token_value()


def test_the_linger_follows_the_durability_mode():
    assert Settings(log_durability="ack").linger_ms == 0.0
    assert Settings(log_durability="async").linger_ms == 5.0
    assert Settings(log_durability="ack", kafka_linger_ms=7).linger_ms == 7.0


def test_the_asgi_path_checks_the_token_before_anything_else():
    """BentoML's path (MLOPS_HTTP_FAST_PATH=false) runs the same endpoint as an ASGI app."""
    api = HttpApi(1 << 20, 100, {}, lambda: asyncio.sleep(0, {}), lambda: b"", token=TOKEN)

    async def post(headers: dict[str, str]) -> httpx.Response:
        transport = httpx.ASGITransport(app=api.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/predict", json=BODY, headers=headers)

    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
        r = asyncio.run(post(headers))
        assert r.status_code == 401 and r.json()["error"] == "unauthorized", r.text
        assert r.headers["www-authenticate"] == "Bearer"
    r = asyncio.run(post({"authorization": f"Bearer {TOKEN}"}))
    assert r.status_code == 503 and r.json()["error"] == "starting"  # past the check; no worker in this test


@pytest.mark.integration
def test_a_server_with_a_token_refuses_http_and_grpc_calls_without_it(workspace, tmp_path):
    """Also the server that asks /info for its addresses (off by default: see test_service_e2e)."""
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN)
    server = start_server(workspace, {"MLOPS_API_TOKEN_FILE": str(token_file), "MLOPS_WORKERS": "1",
                                      "MLOPS_INFO_ADDRESSES": "true"})
    try:
        r = httpx.post(f"{server.url}/predict", json=BODY)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        r = httpx.post(f"{server.url}/predict_batch", json={"requests": [BODY]},
                       headers={"authorization": "Bearer nope"})
        assert r.status_code == 401
        r = httpx.post(f"{server.url}/predict", json=BODY, headers={"authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200, r.text
        outcome = {"outcomes": [{"request_id": "r-access", "label": 0}]}
        assert httpx.post(f"{server.url}/outcomes", json=outcome).status_code == 401
        r = httpx.post(f"{server.url}/outcomes", json=outcome, headers={"authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200, r.text
        info = httpx.get(f"{server.url}/info").json()
        assert info["auth"] == "bearer" and info["http_fast_path"] is True
        assert info["online_store"]["address"] == workspace.settings.redis_address  # MLOPS_INFO_ADDRESSES asked
        assert info["kafka"]["bootstrap"] == workspace.settings.kafka_bootstrap
        assert info["grpc"] == f"127.0.0.1:{server.grpc_port}"
        assert TOKEN not in httpx.get(f"{server.url}/info").text
        assert TOKEN not in server.log_path.read_text()

        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = fraud_pb2_grpc.FraudDetectorStub(channel)
            request = pb.PredictRequest(customer_id="C000001", transaction_amount=12.0)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Predict(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as refused:
                stub.PredictBatch(pb.PredictBatchRequest(requests=[request]), timeout=10,
                                  metadata=[("authorization", "Bearer nope")])
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            answer = stub.Predict(request, timeout=10, metadata=[("authorization", f"Bearer {TOKEN}")])
            assert 0 <= answer.prediction <= 1
    finally:
        server.stop()
