"""How every process connects to Kafka, Redis and MLflow: addresses plus credentials and TLS, in one place.

Each client library takes the same settings in its own words (librdkafka properties, redis-py keyword
arguments, a raw TLS context for the pipelined lookup, Feast's connection string, MLflow's environment, a
database URI). Building them here keeps the request path, the drift consumer, the lifecycle and the tools
from each growing their own half of it. Secrets are read from their files when a connection is built, so a
rotated Secret is picked up by the next connection; none of them is ever part of a message or a log line.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from mlops.settings import Settings, SettingsError


def kafka_config(settings: Settings) -> dict[str, Any]:
    """``bootstrap.servers`` and the security properties librdkafka needs for the configured listener."""
    config: dict[str, Any] = {"bootstrap.servers": settings.kafka_bootstrap}
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return config
    config["security.protocol"] = protocol.lower()
    if protocol.startswith("SASL"):
        username, password = settings.kafka_sasl_username, settings.secret("kafka_sasl_password")
        if not username or password is None:
            raise SettingsError(f"MLOPS_KAFKA_SECURITY_PROTOCOL={protocol} needs MLOPS_KAFKA_SASL_USERNAME and "
                             "MLOPS_KAFKA_SASL_PASSWORD_FILE (or MLOPS_KAFKA_SASL_PASSWORD)")
        config.update({"sasl.mechanisms": settings.kafka_sasl_mechanism, "sasl.username": username,
                       "sasl.password": password})
    if protocol.endswith("SSL"):
        for key, path in (("ssl.ca.location", settings.kafka_ssl_ca_file),
                          ("ssl.certificate.location", settings.kafka_ssl_cert_file),
                          ("ssl.key.location", settings.kafka_ssl_key_file)):
            if path is not None:
                config[key] = str(path)
    return config


def bootstrap_config(connection: str | Mapping[str, Any]) -> dict[str, Any]:
    """A client's connection properties from the bootstrap servers alone, or from :func:`kafka_config`'s result
    (credentials and TLS) as it is: what every Kafka client of the stack is built on."""
    return {"bootstrap.servers": connection} if isinstance(connection, str) else dict(connection)


def durable_producer_config(connection: str | Mapping[str, Any]) -> dict[str, Any]:
    """What every producer of the stack shares (the prediction log, alerts, dead letters): idempotent (a retry
    never duplicates, implies acks=all and no reordering), acknowledged by all in-sync replicas, and never
    expiring, so a message is delivered, or still held through an outage of any length, or purged on close.
    ``connection``: the bootstrap servers, or :func:`kafka_config`'s result (credentials and TLS)."""
    return {**bootstrap_config(connection), "enable.idempotence": True, "acks": "all", "message.timeout.ms": 0,
            "reconnect.backoff.ms": 100}


def redis_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of ``redis.Redis`` / ``redis.asyncio.Redis`` (host and port included)."""
    options: dict[str, Any] = {"host": settings.redis_host, "port": settings.redis_port}
    password = settings.secret("redis_password")
    if password is not None:
        options["password"] = password
        if settings.redis_username:
            options["username"] = settings.redis_username
    if settings.redis_tls:
        options["ssl"] = True
        options["ssl_ca_certs"] = str(settings.redis_ca_file) if settings.redis_ca_file else None
        if settings.redis_cert_file is not None:
            options["ssl_certfile"] = str(settings.redis_cert_file)
            options["ssl_keyfile"] = str(settings.redis_key_file) if settings.redis_key_file else None
    return options


def redis_pool_options(settings: Settings) -> dict[str, Any]:
    """The same for a connection pool made directly: the pool takes the connection class, not ``ssl=True``."""
    options = redis_options(settings)
    if options.pop("ssl", False):
        from redis.asyncio.connection import SSLConnection

        options["connection_class"] = SSLConnection
    return options


def redis_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """A TLS context for a raw connection to Redis (hostname and chain verified), or None without TLS."""
    if not settings.redis_tls:
        return None
    context = ssl.create_default_context(cafile=str(settings.redis_ca_file) if settings.redis_ca_file else None)
    if settings.redis_cert_file is not None:
        context.load_cert_chain(str(settings.redis_cert_file),
                                str(settings.redis_key_file) if settings.redis_key_file else None)
    return context


def redis_auth_command(settings: Settings) -> list[str] | None:
    """The ``AUTH`` command a raw connection sends first, or None when Redis takes no password."""
    password = settings.secret("redis_password")
    if password is None:
        return None
    return ["AUTH", settings.redis_username, password] if settings.redis_username else ["AUTH", password]


def feast_connection_string(settings: Settings) -> str:
    """Feast's Redis ``connection_string``: ``host:port`` then ``key=value`` options handed to redis-py."""
    options = redis_options(settings)
    parts = [settings.redis_address]
    for key in ("username", "password", "ssl", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        value = options.get(key)
        if value is None:
            continue
        text = "true" if value is True else str(value)
        if "," in text:
            raise SettingsError(f"Feast's Redis connection string cannot carry a comma (in the {key} setting)")
        parts.append(f"{key}={text}")
    return ",".join(parts)


def with_db_password(uri: str, settings: Settings) -> str:
    """``uri`` with the MLflow database password filled in, when it names a database without one."""
    password = settings.secret("mlflow_db_password")
    parts = urlsplit(uri)
    if password is None or parts.scheme in ("", "http", "https", "file", "sqlite") or not parts.username:
        return uri
    if parts.password is not None:
        return uri
    user, _, host = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}").geturl()


def redact_uri(uri: str) -> str:
    """The URI without its password, for messages."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    user, _, host = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"{user.split(':', 1)[0]}:***@{host}").geturl()


def check(settings: Settings) -> str | None:
    """Why the backends' connection settings cannot be used (one line), or None: run before a server starts,
    so a missing secret file stops it with a reason instead of a crash in every worker."""
    try:
        kafka_config(settings)
        redis_options(settings)
        redis_ssl_context(settings)
        settings.secret("api_token")
    except (SettingsError, OSError, ssl.SSLError) as exc:
        return str(exc) if isinstance(exc, SettingsError) else f"Redis TLS files: {exc}"
    return None


MLFLOW_AUTH_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def apply_mlflow_auth(settings: Settings) -> None:
    """Hand the tracking server's credentials to MLflow's client, which reads them from its own environment
    variables (a user's own MLFLOW_TRACKING_* win)."""
    values = {"MLFLOW_TRACKING_USERNAME": settings.mlflow_username,
              "MLFLOW_TRACKING_PASSWORD": settings.secret("mlflow_password"),
              "MLFLOW_TRACKING_TOKEN": settings.secret("mlflow_token")}
    for key, value in values.items():
        if value is not None and key not in os.environ:
            os.environ[key] = value
