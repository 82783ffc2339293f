"""How each client is told the credentials and TLS settings (mlops/connections.py), and that no secret shows
in a repr, a message or the env file. The real connections are in tests/test_secured_stack.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mlops import connections
from mlops.settings import Settings, SettingsError
from streaming.consumer import ConsumerConfig

SECRET = "s3cr3t-Value_9"


def secret_file(tmp_path: Path, name: str, value: str = SECRET) -> Path:
    path = tmp_path / name
    path.write_text(value + "\n")
    return path


def test_plaintext_by_default(tmp_path):
    s = Settings(kafka_bootstrap="k:9092", redis_address="r:6379")
    assert connections.kafka_config(s) == {"bootstrap.servers": "k:9092"}
    assert connections.redis_options(s) == {"host": "r", "port": 6379}
    assert connections.redis_ssl_context(s) is None and connections.redis_auth_command(s) is None
    assert connections.feast_connection_string(s) == "r:6379"
    assert connections.check(s) is None


def test_kafka_sasl_ssl_from_a_password_file(tmp_path):
    s = Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_username="mlops", kafka_sasl_password="ignored",
                 kafka_sasl_password_file=secret_file(tmp_path, "kafka"), kafka_ssl_ca_file=tmp_path / "ca.pem")
    assert connections.kafka_config(s) == {
        "bootstrap.servers": "127.0.0.1:9092", "security.protocol": "sasl_ssl", "sasl.mechanisms": "SCRAM-SHA-512",
        "sasl.username": "mlops", "sasl.password": SECRET, "ssl.ca.location": str(tmp_path / "ca.pem")}
    assert "sasl.password" not in connections.kafka_config(Settings(kafka_security_protocol="SSL"))


def test_half_given_credentials_are_an_error_not_an_open_connection(tmp_path):
    with pytest.raises(SettingsError, match="MLOPS_KAFKA_SASL_USERNAME"):
        connections.kafka_config(Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_password="x"))
    empty = secret_file(tmp_path, "empty", "")
    s = Settings(redis_password_file=empty)
    with pytest.raises(SettingsError, match=f"MLOPS_REDIS_PASSWORD_FILE {empty} is empty"):
        connections.redis_options(s)
    assert connections.check(s) == f"MLOPS_REDIS_PASSWORD_FILE {empty} is empty"
    missing = tmp_path / "missing"
    assert connections.check(Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_username="u",
                                      kafka_sasl_password_file=missing)) == \
        f"MLOPS_KAFKA_SASL_PASSWORD_FILE {missing}: No such file or directory"


def test_redis_acl_user_over_tls(tmp_path):
    from tools import certs

    tls = certs.make(tmp_path / "tls")
    s = Settings(redis_address="127.0.0.1:6380", redis_username="mlops", redis_password_file=secret_file(tmp_path, "r"),
                 redis_tls=True, redis_ca_file=tls.ca)
    assert connections.redis_options(s) == {"host": "127.0.0.1", "port": 6380, "password": SECRET,
                                            "username": "mlops", "ssl": True, "ssl_ca_certs": str(tls.ca)}
    assert connections.redis_auth_command(s) == ["AUTH", "mlops", SECRET]
    assert connections.redis_ssl_context(s).check_hostname
    assert connections.feast_connection_string(s) == \
        f"127.0.0.1:6380,username=mlops,password={SECRET},ssl=true,ssl_ca_certs={tls.ca}"
    pool = connections.redis_pool_options(s)
    assert pool["connection_class"].__name__ == "SSLConnection" and "ssl" not in pool
    assert connections.redis_auth_command(Settings(redis_password=SECRET)) == ["AUTH", SECRET]


def test_database_password_goes_into_the_uri_and_never_into_messages(tmp_path):
    s = Settings(mlflow_db_password_file=secret_file(tmp_path, "pg", "p@ss:w/rd"))
    uri = connections.with_db_password("postgresql+psycopg2://mlflow@127.0.0.1:5432/mlflow", s)
    assert uri == "postgresql+psycopg2://mlflow:p%40ss%3Aw%2Frd@127.0.0.1:5432/mlflow"
    assert connections.redact_uri(uri) == "postgresql+psycopg2://mlflow:***@127.0.0.1:5432/mlflow"
    for untouched in ("http://127.0.0.1:5000", "sqlite:///x.db", "postgresql://u:given@h/db", "postgresql://h/db"):
        assert connections.with_db_password(untouched, s) == untouched

    from lifecycle.tracking import Backend

    backend = Backend.for_uri(uri)
    assert "p%40ss" not in backend.display_uri and "p%40ss" not in repr(backend)


def test_mlflow_credentials_reach_mlflows_own_variables_without_overriding_the_users(tmp_path, monkeypatch):
    for key in connections.MLFLOW_AUTH_VARIABLES:  # set then removed, so monkeypatch restores what was there
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "users-own")
    connections.apply_mlflow_auth(Settings(mlflow_username="admin", mlflow_password_file=secret_file(tmp_path, "m"),
                                           mlflow_token="ours"))
    import os

    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "admin" and os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == "users-own"


def test_no_secret_in_a_repr_or_a_log_line(tmp_path, caplog):
    s = Settings(kafka_sasl_password=SECRET, redis_password=SECRET, mlflow_password=SECRET, mlflow_token=SECRET,
                 mlflow_db_password=SECRET, api_token=SECRET, kafka_security_protocol="SASL_SSL",
                 kafka_sasl_username="u")
    config = ConsumerConfig(bootstrap=connections.kafka_config(s))
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("settings %s %r config %r", s, s, config)
    for text in (repr(s), str(s), repr(config), caplog.text, s.model_dump_json()):
        assert SECRET not in text


def test_every_producer_of_the_stack_is_durable_and_carries_the_credentials(tmp_path):
    from service.prediction_log import producer_config as log_producer
    from streaming.kafka_io import producer_config as alert_producer

    s = Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_username="u", kafka_sasl_password=SECRET)
    durable = {"enable.idempotence": True, "acks": "all", "message.timeout.ms": 0}
    for config in (log_producer(connections.kafka_config(s), 10, 0, "lz4"),
                   alert_producer(connections.kafka_config(s))):
        assert durable.items() <= config.items()
        assert config["sasl.password"] == SECRET and config["security.protocol"] == "sasl_ssl"


def test_the_feast_wrapper_runs_feast_and_stops_on_a_missing_secret_with_one_line(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MLOPS_ENV_FILE": str(tmp_path / "none.env")}
    ok = subprocess.run([sys.executable, "-m", "tools.feast_cli", "--repo", "feature_repo", "version"], cwd=root,
                        env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "Feast SDK Version" in ok.stdout, ok.stderr
    missing = tmp_path / "missing"
    bad = subprocess.run([sys.executable, "-m", "tools.feast_cli", "--repo", "feature_repo", "version"], cwd=root,
                         env={**env, "MLOPS_REDIS_PASSWORD_FILE": str(missing)}, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"feast_cli: MLOPS_REDIS_PASSWORD_FILE {missing}: No such file or directory"
