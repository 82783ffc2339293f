"""The project's own Redis and Kafka: started, reachable, restartable on the same address."""

from __future__ import annotations

import json
import uuid

import pytest
import redis
from kafka import KafkaProducer

from tools import services as svc
from tools.kafka_read import read_events

pytestmark = pytest.mark.integration


def test_env_file_names_both_services(services):
    run_dir, state = services
    env = svc.RunDir(run_dir).env_file.read_text()
    assert f"MLOPS_REDIS_ADDRESS=127.0.0.1:{state['redis']['port']}" in env
    assert f"MLOPS_KAFKA_BOOTSTRAP=127.0.0.1:{state['kafka']['port']}" in env
    assert all(info["running"] for info in svc.status(run_dir).values())


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
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    producer.send("predictions", json.dumps({"request_id": marker}).encode()).get(timeout=30)
    producer.close()
    events = read_events(bootstrap, "predictions", {marker}, settle=0.5)
    assert [e["request_id"] for e in events] == [marker]


def test_up_is_idempotent_and_keeps_addresses(services):
    run_dir, state = services
    again = svc.up(run_dir)
    assert again["redis"]["pid"] == state["redis"]["pid"]
    assert again["kafka"]["port"] == state["kafka"]["port"]


def test_cli_status_reports_running(services, capsys):
    run_dir, _ = services
    assert svc.main(["status", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "redis: running" in out and "kafka: running" in out
