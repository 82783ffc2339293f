"""The stack on secured services, once: `mlops-services up --secure` starts Redis with TLS only and an ACL
user, Kafka with SASL_SSL (SCRAM-SHA-512) only, certificates made at start-up (tools/certs.py), and every
part connects with the settings alone — serving (Feast materialisation, lookups, the prediction log), the
drift consumer (events in, checkpoints out) and the lifecycle (the registry on MLflow's basic-auth server on
PostgreSQL with passwords: conftest's ``mlflow_server`` is that server for every lifecycle test).

A client without the credentials, or without TLS, gets nothing; a missing secret file stops a process at
start with one line instead of a crash in every worker.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from redis.backoff import NoBackoff
from redis.retry import Retry

from harness.kafka_read import read_events
from harness.workspace import Workspace
from mlops.connections import kafka_config, redis_auth_command, redis_options, redis_ssl_context
from mlops.settings import Settings
from service.hmget import LookupFailed, PipelinedHmget
from tests.support import LOOPBACK, listening_addresses, metric_value, start_consumer, start_server
from tools import services as svc
from tools.feast_cli import apply_and_materialize, feast_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NO_RETRY = Retry(NoBackoff(), 0)  # a refusal at once (redis-py retries a connection error 3 times by default)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def secured(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run-secure")
    try:
        svc.up(run_dir, secure=True)
        yield run_dir
    finally:
        svc.down(run_dir, purge=True)


@pytest.fixture(scope="module")
def secure_ws(workspace: Workspace, secured: Path, tmp_path_factory) -> Workspace:
    """The session's model and data, its features materialised into the secured Redis (Feast over TLS)."""
    root = tmp_path_factory.mktemp("secure-ws")
    repo = root / "feature_repo"
    shutil.copytree(workspace.feature_repo, repo, ignore=shutil.ignore_patterns("__pycache__", "online_store.db"))
    env_file = svc.RunDir(secured).env_file
    env = feast_env(env_file)
    env.update({"MLOPS_ENV_FILE": str(env_file), "MLOPS_FEATURE_REPO": str(repo),
                "MLOPS_MODEL_VERSION": workspace.model.version, "PYTHONUNBUFFERED": "1"})
    apply_and_materialize(repo, env)
    settings = Settings.load(env_file).model_copy(update={"feature_repo": repo})
    return Workspace(root, env_file, repo, settings, workspace.model, workspace.dataset, env)


def test_env_file_names_the_secrets_by_file_only(secured: Path):
    text = svc.RunDir(secured).env_file.read_text()
    sec = svc.Security(secured / "secrets")
    for name in sec.NAMES:
        assert sec.password(name) not in text
        assert sec.file(name).stat().st_mode & 0o077 == 0, f"{name} password readable by others"
    assert "MLOPS_KAFKA_SECURITY_PROTOCOL=SASL_SSL" in text and "MLOPS_REDIS_TLS=true" in text
    assert sec.password("redis") not in (secured / "redis" / "secure.conf").read_text()  # kept as its SHA-256


def test_clients_without_credentials_or_tls_get_nothing(secure_ws: Workspace):
    s = secure_ws.settings
    assert redis.Redis(**redis_options(s), socket_timeout=5).ping()
    with pytest.raises(redis.ConnectionError):  # plaintext on the TLS port
        redis.Redis(host=s.redis_host, port=s.redis_port, socket_timeout=1, retry=NO_RETRY).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(**{**redis_options(s), "password": "wrong"}, socket_timeout=1, retry=NO_RETRY).ping()
    with pytest.raises(redis.AuthenticationError):  # the default user is off
        redis.Redis(**{k: v for k, v in redis_options(s).items() if k not in ("username", "password")},
                    socket_timeout=1, retry=NO_RETRY).ping()

    assert s.predictions_topic in AdminClient(kafka_config(s)).list_topics(timeout=20).topics
    for config in ({"bootstrap.servers": s.kafka_bootstrap},  # plaintext
                   {**kafka_config(s), "sasl.password": "wrong"},
                   {k: v for k, v in kafka_config(s).items() if k != "ssl.ca.location"}):  # an unknown CA
        with pytest.raises(KafkaException):
            AdminClient({**config, "log_level": 0}).list_topics(timeout=2)

    async def lookups() -> None:
        good = PipelinedHmget(s.redis_host, s.redis_port, ["x"], 5, tls=redis_ssl_context(s),
                              auth=redis_auth_command(s))
        assert await good.fetch([b"no-such-key"]) == [[None]]
        await good.close()
        bad = PipelinedHmget(s.redis_host, s.redis_port, ["x"], 5, tls=redis_ssl_context(s),
                             auth=["AUTH", "mlops", "wrong"])
        with pytest.raises(LookupFailed, match="refused the credentials"):
            await bad.fetch([b"no-such-key"])
        plain = PipelinedHmget(s.redis_host, s.redis_port, ["x"], 5)
        with pytest.raises(LookupFailed):
            await plain.fetch([b"no-such-key"])

    asyncio.run(lookups())


def test_serving_and_drift_run_on_the_secured_services(secure_ws: Workspace):
    """Features over TLS with the ACL user, every answered prediction on the SASL_SSL topic once, and the drift
    consumer reading them back and checkpointing into the secured Redis."""
    s = secure_ws.settings
    customers = list(secure_ws.dataset.latest_customers()["customer_id"][:40])
    server = start_server(secure_ws)
    ids: set[str] = set()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            assert client.get("/readyz").status_code == 200
            for i, customer in enumerate(customers):
                request_id = f"secure-{uuid.uuid4().hex}"
                r = client.post("/predict", json={"customer_id": customer, "transaction_amount": 10.0 + i,
                                                  "request_id": request_id})
                assert r.status_code == 200, r.text
                ids.add(request_id)
    finally:
        server.stop()
    events = read_events(kafka_config(s), s.predictions_topic, ids, timeout=60, settle=0.5)
    assert sorted(e["request_id"] for e in events) == sorted(ids)  # each once

    group = f"secure-drift-{uuid.uuid4().hex[:8]}"
    consumer = start_consumer(secure_ws, {"MLOPS_DRIFT_GROUP_ID": group, "MLOPS_DRIFT_AUTO_OFFSET_RESET": "earliest"})
    try:
        deadline = time.monotonic() + 90
        consumed = 0.0
        while time.monotonic() < deadline and consumed < len(ids):
            assert consumer.process.poll() is None, consumer.log()[-2000:]
            try:
                text = httpx.get(f"http://127.0.0.1:{consumer.metrics_port}/metrics", timeout=2).text
                consumed = metric_value(text, "mlops_drift_events_consumed_total")
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert consumed >= len(ids), consumer.log()[-2000:]
        checkpoints = redis.Redis(**redis_options(s), socket_timeout=5).keys(f"mlops:drift:{group}:*")
        assert checkpoints, "no checkpoint in the secured Redis"
    finally:
        consumer.stop()


def test_mlflow_server_refuses_a_client_without_credentials(mlflow_server: str):
    assert httpx.get(f"{mlflow_server}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                     timeout=10).status_code == 401


def test_a_missing_secret_file_stops_each_process_with_one_line(secure_ws: Workspace, tmp_path: Path):
    env = {**secure_ws.env, "MLOPS_REDIS_PASSWORD_FILE": str(tmp_path / "missing")}
    drift = subprocess.run([sys.executable, "-m", "streaming", "consume", "--metrics-port", "0"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=60)
    assert drift.returncode == 2 and "Traceback" not in drift.stderr, drift.stderr
    assert drift.stderr.strip() == f"mlops-drift: MLOPS_REDIS_PASSWORD_FILE {tmp_path / 'missing'}: " \
                                   "No such file or directory"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(RuntimeError) as err:
        start_server(secure_ws, {"MLOPS_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "empty")}, timeout=120)
    why = str(err.value)
    assert "exited with 2" in why and "Traceback" not in why, why
    assert f"bentoml serve: MLOPS_KAFKA_SASL_PASSWORD_FILE {tmp_path / 'empty'} is empty" in why, why


def test_every_service_listens_on_loopback_only(secured: Path, mlflow_server: str):
    from tests.conftest import WORKSPACE

    assert mlflow_server  # started: PostgreSQL and MLflow are in its run folder
    states = [svc.RunDir(secured).load(), svc.RunDir(WORKSPACE / "run-mlflow").load()]
    ports = {f"{name}:{key}": entry[key] for state in states for name, entry in state.items()
             if isinstance(entry, dict) for key in ("port", "controller_port") if entry.get(key)}
    assert {"redis:port", "kafka:port", "kafka:controller_port", "postgres:port", "mlflow:port"} <= set(ports)
    for name, port in ports.items():
        addresses = listening_addresses(port)
        assert addresses and addresses <= LOOPBACK, (name, addresses)
