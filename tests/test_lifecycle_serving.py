"""Zero-downtime promotion and rollback under continuous traffic, and canary routing."""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest

from lifecycle.registry import Registry
from lifecycle.train import register as store_model
from lifecycle.train import train
from tests.harness import metric_value, start_server
from tools.kafka_read import read_events
from tools.traffic import Traffic

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def versions(workspace):
    """v1 (from the workspace) and a visibly different v2, both in the model store."""
    from lifecycle import model_store

    if not model_store.exists("fraud_detector", "v2"):
        store_model(train(workspace.dataset, params={"n_estimators": 30, "max_depth": 2}), "fraud_detector", "v2")
    return "v1", "v2"


def follower_env(registry_path, **extra: str) -> dict[str, str]:
    return {"MLOPS_MODEL_VERSION": "", "MLOPS_REGISTRY_PATH": str(registry_path), "MLOPS_REGISTRY_POLL_S": "0.5",
            **extra}


def takeover(traffic: Traffic, since: float, version: str) -> float:
    seconds = traffic.takeover(since, version)
    if seconds is None:
        pytest.fail(f"{version} never took over: {traffic.versions()}")
    return seconds


def test_promote_and_rollback_under_traffic_fail_no_request(workspace, versions, tmp_path):
    v1, v2 = versions
    reg = Registry(tmp_path / "registry.db")
    reg.register("fraud_detector", v1)
    reg.register("fraud_detector", v2, stage="staging")
    reg.promote("fraud_detector", v1, "production")
    server = start_server(workspace, follower_env(reg.path))
    try:
        assert httpx.get(f"{server.url}/info/").json()["model_version"] == v1
        with Traffic(server.url) as traffic:
            time.sleep(2)
            promoted_at = time.monotonic()
            reg.promote("fraud_detector", v2, "production")
            promote_s = takeover(traffic, promoted_at, v2)
            time.sleep(2)
            rolled_back_at = time.monotonic()
            reg.rollback("fraud_detector")
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


def test_canary_share_goes_to_staging_with_per_version_metrics(workspace, versions, tmp_path):
    v1, v2 = versions
    reg = Registry(tmp_path / "registry.db")
    reg.register("fraud_detector", v1)
    reg.promote("fraud_detector", v1, "production")
    reg.register("fraud_detector", v2, stage="staging")
    server = start_server(workspace, follower_env(reg.path, MLOPS_CANARY_SHARE="0.3"))
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
        reg.promote("fraud_detector", v2, "production")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            info = httpx.get(f"{server.url}/info/").json()
            if info["model_version"] == v2:
                break
            time.sleep(0.2)
        assert info["model_version"] == v2 and info["canary_version"] is None
    finally:
        server.stop()
