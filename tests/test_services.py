"""The project's own Redis and Kafka: started, reachable, restartable on the same address."""

from __future__ import annotations

import json
import uuid

import pytest
import redis
from confluent_kafka import Producer

from harness.kafka_read import read_events
from tools import services as svc

pytestmark = pytest.mark.integration


def test_env_file_names_both_services(services):
    run_dir, state = services
    env = svc.RunDir(run_dir).env_file.read_text()
    assert f"MLOPS_REDIS_ADDRESS=127.0.0.1:{state['redis']['port']}" in env
    assert f"MLOPS_KAFKA_BOOTSTRAP=127.0.0.1:{state['kafka']['port']}" in env
    assert all(info["running"] for info in svc.status(run_dir).values())


def test_ports_lie_outside_the_ephemeral_range(services):
    """A port in the kernel's range for outgoing connections can be taken by any client socket meanwhile,
    and the service could not restart on its recorded port."""
    _, state = services
    ephemeral = svc.ephemeral_ports()
    recorded = [state["redis"]["port"], state["kafka"]["port"], state["kafka"]["controller_port"]]
    assert not [p for p in recorded + [svc.free_port() for _ in range(50)] if p in ephemeral], ephemeral


def test_redis_is_a_real_server(services):
    _, state = services
    client = redis.Redis(port=state["redis"]["port"])
    client.set("mlops:test", "1")
    assert client.get("mlops:test") == b"1"
    assert client.info("server")["redis_version"]


def test_kafka_round_trip_and_topics(services):
    _, state = services
    bootstrap = f"127.0.0.1:{state['kafka']['port']}"
    marker = uuid.uuid4().hex
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    producer.produce("predictions", json.dumps({"request_id": marker}).encode())
    assert producer.flush(30) == 0
    events = read_events(bootstrap, "predictions", {marker}, settle=0.5)
    assert [e["request_id"] for e in events] == [marker]


def test_up_is_idempotent_and_keeps_addresses(services):
    run_dir, _ = services
    state = svc.RunDir(run_dir).load()  # as now: the fault tests restart services (new pids, same ports)
    again = svc.up(run_dir)
    assert again["redis"]["pid"] == state["redis"]["pid"]
    assert again["kafka"]["port"] == state["kafka"]["port"]


def test_cli_status_reports_running(services, capsys):
    run_dir, _ = services
    assert svc.main(["status", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "redis: running" in out and "kafka: running" in out


def test_cluster_id_never_starts_with_a_dash(monkeypatch):
    """Kafka's storage tool reads an id starting with '-' as an option: such ids are drawn again."""
    draws = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\xfc" + bytes(15)), uuid.UUID(int=7)])
    monkeypatch.setattr(svc.uuid, "uuid4", lambda: next(draws))
    cluster_id = svc.new_cluster_id()
    assert cluster_id[0].isalnum() and cluster_id == svc.base64.urlsafe_b64encode(uuid.UUID(int=7).bytes).decode()[:22]


def test_up_stops_what_it_started_when_a_later_service_fails(tmp_path, monkeypatch):
    def broken_kafka(*args, **kwargs):
        raise svc.ServiceError("kafka failed on purpose")

    monkeypatch.setattr(svc, "start_kafka", broken_kafka)
    with pytest.raises(svc.ServiceError):
        svc.up(tmp_path / "run")
    state = svc.RunDir(tmp_path / "run").load()
    assert state["redis"]["pid"] == 0 and not svc.status(tmp_path / "run")["redis"]["running"]


def test_redis_keeps_its_data_across_a_restart(tmp_path):
    run_dir = tmp_path / "run"
    state = svc.up(run_dir, only="redis")
    try:
        client = redis.Redis(port=state["redis"]["port"])
        client.set("mlops:persisted", "yes")
        svc.down(run_dir, only="redis")  # SIGTERM: Redis fsyncs its append-only file on the way out
        again = svc.up(run_dir, only="redis")
        assert again["redis"]["port"] == state["redis"]["port"]
        assert redis.Redis(port=again["redis"]["port"]).get("mlops:persisted") == b"yes"
    finally:
        svc.down(run_dir, purge=True)
