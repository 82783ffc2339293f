"""Zero-downtime promotion and rollback on MLflow's registry under continuous traffic, canary routing, and two
replicas following one registry on the MLflow server (PostgreSQL)."""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest

from harness.kafka_read import read_events
from harness.traffic import Traffic
from lifecycle import model_store
from lifecycle.registry import Registry
from tests.support import follower_env, metric_value, server_backend, start_server, stored

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def takeover(traffic: Traffic, since: float, version: str) -> float:
    seconds = traffic.takeover(since, version)
    if seconds is None:
        pytest.fail(f"{version} never took over: {traffic.versions()}")
    return seconds


def test_promote_and_rollback_under_traffic_fail_no_request(workspace, trained):
    v1, v2 = "v1", "v2"
    reg = Registry(model_store.default_backend())  # the embedded SQLite store the workspace trained into
    name = stored(reg.backend, trained)
    reg.register(name, v1)
    reg.register(name, v2, stage="staging")
    reg.promote(name, v1, "production")
    server = start_server(workspace, follower_env(reg.backend, name))
    try:
        assert httpx.get(f"{server.url}/info/").json()["model_version"] == v1
        with Traffic(server.url) as traffic:
            time.sleep(2)
            promoted_at = time.monotonic()
            reg.promote(name, v2, "production")
            promote_s = takeover(traffic, promoted_at, v2)
            time.sleep(2)
            rolled_back_at = time.monotonic()
            reg.rollback(name)
            rollback_s = takeover(traffic, rolled_back_at, v1)
            time.sleep(2)
        statuses = traffic.statuses()
        assert statuses == Counter({200: len(traffic.results)}), statuses
        seen = traffic.versions()
        assert set(seen) == {v1, v2} and len(traffic.results) > 100, seen
        assert promote_s < 10 and rollback_s < 10, (promote_s, rollback_s)
        print(f"\npromotion took effect in {promote_s:.2f}s, rollback in {rollback_s:.2f}s, "
              f"{len(traffic.results)} requests, 0 failed, versions {dict(seen)}")
        info = httpx.get(f"{server.url}/info/").json()
        assert info["model_version"] == v1 and info["follows_registry"] is True
        # The prediction log names the version that produced each prediction.
        sample = {r[3]: r[2] for r in traffic.results[:: max(1, len(traffic.results) // 40)]}
        events = read_events(workspace.settings.kafka_bootstrap, "predictions", set(sample), timeout=60, settle=0.5)
        assert {e["request_id"]: e["model_version"] for e in events} == sample
        text = httpx.get(f"{server.url}/metrics").text
        assert metric_value(text, "mlops_model_swaps_total") == 2
        assert metric_value(text, "mlops_model_info", f'model_version="{v1}"') == 1
        assert metric_value(text, "mlops_model_info", f'model_version="{v2}"') == 0
    finally:
        server.stop()


def test_canary_share_goes_to_staging_with_per_version_metrics(workspace, trained):
    v1, v2 = "v1", "v2"
    reg = Registry(model_store.default_backend())
    name = stored(reg.backend, trained)
    reg.register(name, v1)
    reg.promote(name, v1, "production")
    reg.register(name, v2, stage="staging")
    server = start_server(workspace, follower_env(reg.backend, name, MLOPS_CANARY_SHARE="0.3"))
    try:
        info = httpx.get(f"{server.url}/info/").json()
        assert (info["model_version"], info["canary_version"], info["canary_share"]) == (v1, v2, 0.3)
        customers = [f"C{i:06d}" for i in range(250)]
        body = {"requests": [{"customer_id": c, "transaction_amount": 50.0} for c in customers]}
        first = [r["model_version"] for r in httpx.post(f"{server.url}/predict_batch", json=body, timeout=60).json()]
        again = [r["model_version"] for r in httpx.post(f"{server.url}/predict_batch", json=body, timeout=60).json()]
        assert first == again, "a customer must stay on one version"
        share = first.count(v2) / len(first)
        assert 0.2 < share < 0.4, share
        text = httpx.get(f"{server.url}/metrics").text
        assert metric_value(text, "mlops_predictions_total", f'model_version="{v2}"') == 2 * first.count(v2)
        assert metric_value(text, "mlops_predictions_total", f'model_version="{v1}"') == 2 * first.count(v1)
        # Promoting the canary ends the split: everything on v2.
        reg.promote(name, v2, "production")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            info = httpx.get(f"{server.url}/info/").json()
            if info["model_version"] == v2:
                break
            time.sleep(0.2)
        assert info["model_version"] == v2 and info["canary_version"] is None
    finally:
        server.stop()


def test_two_replicas_follow_one_registry_on_the_mlflow_server(workspace, trained, mlflow_server):
    """Many hosts: the registry is `mlflow server` on PostgreSQL; two replicas follow it, with no failed request."""
    backend = server_backend(mlflow_server)
    reg = Registry(backend)
    name = stored(backend, trained)
    reg.register(name, "v1")
    reg.register(name, "v2", stage="staging")
    reg.promote(name, "v1", "production")
    replicas = [start_server(workspace, follower_env(backend, name)) for _ in range(2)]
    try:
        with Traffic(replicas[0].url, clients=2) as first, Traffic(replicas[1].url, clients=2) as second:
            time.sleep(2)
            at = time.monotonic()
            reg.promote(name, "v2", "production", "two replicas")
            promote_s = [takeover(t, at, "v2") for t in (first, second)]
            time.sleep(1)
            at = time.monotonic()
            reg.rollback(name)
            rollback_s = [takeover(t, at, "v1") for t in (first, second)]
            time.sleep(1)
        for traffic in (first, second):
            assert traffic.statuses() == Counter({200: len(traffic.results)}), traffic.statuses()
            assert set(traffic.versions()) == {"v1", "v2"}
        assert max(promote_s + rollback_s) < 10, (promote_s, rollback_s)
        print(f"\ntwo replicas on the MLflow server: promotion took effect in {promote_s}, rollback in {rollback_s}, "
              f"{len(first.results) + len(second.results)} requests, 0 failed")
        for replica in replicas:
            assert httpx.get(f"{replica.url}/info/").json()["model_version"] == "v1"
    finally:
        for replica in replicas:
            replica.stop()
