"""The gRPC port belongs to one server: another one, however it spells the host, or a process that is not
BentoML at all, makes `bentoml serve` exit at once with status 2 and one line, never share the port or
restart its workers forever."""

from __future__ import annotations

import os
import socket
import time

import grpc
import httpx
import pytest

from service import port_guard
from service.proto import fraud_pb2 as pb
from service.proto import fraud_pb2_grpc
from tests.support import start_server
from tools.services import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def refused(workspace, env: dict[str, str]) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        start_server(workspace, env, timeout=120)
    return str(err.value), time.monotonic() - started


def answered(target: str, calls: int = 40) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = fraud_pb2_grpc.FraudDetectorStub(channel)
        return sum(bool(stub.Predict(pb.PredictRequest(customer_id="C000001", transaction_amount=float(i)),
                                     timeout=10).request_id) for i in range(calls))


@pytest.mark.parametrize("host", ["localhost", "0.0.0.0", "127.0.0.1"])
def test_a_second_server_on_the_port_exits_2_whatever_the_host_spelling(server, workspace, host):
    why, seconds = refused(workspace, {"MLOPS_GRPC_PORT": str(server.grpc_port), "MLOPS_GRPC_HOST": host})
    assert "exited with 2" in why and "already in use" in why, why
    assert seconds < 60, f"took {seconds:.0f}s to refuse"
    assert answered(server.grpc_target) == 40
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_a_foreign_listener_on_the_port_is_refused_at_once(workspace):
    port = free_port()
    with socket.socket() as foreign:  # not BentoML, no SO_REUSEPORT: what `nc -l` would hold
        foreign.bind(("127.0.0.1", port))
        foreign.listen()
        why, seconds = refused(workspace, {"MLOPS_GRPC_PORT": str(port)})
    assert "exited with 2" in why and f"gRPC port 127.0.0.1:{port} is already in use" in why, why
    assert seconds < 60
    assert "Traceback" not in why


def test_the_port_table_names_the_live_server_only(server):
    with port_guard._locked_table() as table:
        entry = table["ports"][str(server.grpc_port)]
    assert entry["owner"] == server.process.pid  # the `bentoml serve` process, parent of the workers
    with pytest.raises(port_guard.PortInUse, match="already served by another server"):
        port_guard.claim("localhost", server.grpc_port, owner=os.getpid())
    gone = 2 ** 22 + 1  # no such pid: its entry is dropped at the next write
    with port_guard._locked_table() as table:
        table["ports"]["1"] = {"owner": gone, "host": "127.0.0.1"}
    with port_guard._locked_table() as table:
        assert "1" not in table["ports"] and str(server.grpc_port) in table["ports"]


def test_preflight_only_acts_in_the_bentoml_serve_process():
    assert port_guard.serving_cli_host(["/x/.venv/bin/bentoml", "serve", "svc:S", "--host", "10.1.2.3"]) == "10.1.2.3"
    assert port_guard.serving_cli_host(["/x/bin/bentoml", "serve", "svc:S", "--host=::1"]) == "::1"
    assert port_guard.serving_cli_host(["/x/bin/bentoml", "build"]) is None
    assert port_guard.serving_cli_host(["/x/bin/pytest", "serve"]) is None
