"""The demo's rollout step: a candidate trained on flipped labels and a good one, each rolled out against
Production by the controller under traffic; prints each rollout's timeline from its decision record."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from datetime import datetime

from harness.traffic import Traffic
from harness.workspace import Workspace
from lifecycle.registry import Registry
from lifecycle.rollout.controller import Controller
from lifecycle.rollout.state import Rollouts
from lifecycle.train import register as store_model
from lifecycle.train import train
from mlops.rollout import Policy
from mlops.schema import LABEL
from mlops.settings import Settings

POLICY = Policy(min_samples=200, min_step_s=2, max_step_s=300)


def _candidate(registry: Registry, ws: Workspace, corrupted: bool) -> str:
    dataset = ws.dataset
    if corrupted:
        dataset = dataclasses.replace(dataset, transactions=dataset.transactions.assign(
            **{LABEL: 1 - dataset.transactions[LABEL]}))
    stored = store_model(train(dataset), ws.model.name, backend=registry.backend)
    meta = stored.metadata
    registry.register(ws.model.name, stored.version, meta["metrics"], meta["params"],
                      reason="flipped labels (demo)" if corrupted else "retrained (demo)")
    return stored.version


def timeline(registry: Registry, name: str, rollout_id: str, since: float | None = None) -> None:
    """A rollout's decisions from its record (holds left out), as seconds after ``since`` (epoch seconds;
    default: the rollout's start)."""
    record = [r for r in registry.rollout_decisions(name, rollout_id) if r["action"] != "hold"]
    start = datetime.fromisoformat(record[0]["at"]).timestamp() if since is None else since
    for r in record:
        step = "shadow" if r["step"] == 0 else f"{r['step']} %"
        offset = datetime.fromisoformat(r["at"]).timestamp() - start
        print(f"    +{offset:5.1f}s  {r['action']:<8} -> {step:<7} {r['status']:<11} {r['reason'][:90]}")


def demo_rollout(registry: Registry, ws: Workspace, url: str, settings: Settings) -> bool:
    name = ws.model.name
    bad, good = _candidate(registry, ws, corrupted=True), _candidate(registry, ws, corrupted=False)
    rollouts = Rollouts(registry)
    controller = Controller(settings, registry, name, record_every_s=600)
    thread = threading.Thread(target=controller.run, args=(0.5,), daemon=True)
    logging.getLogger("lifecycle.rollout.controller").setLevel(logging.ERROR)  # the timelines below say it
    thread.start()
    ended: dict[str, str] = {}
    try:
        with Traffic(url) as traffic:
            for version in (bad, good):
                baseline = registry.production(name)
                state = rollouts.start(name, version, policy=POLICY, actor="demo")
                print(f"  rollout {state.id}: {version}{' (trained on flipped labels)' if version == bad else ''} "
                      f"against {baseline.version if baseline else '?'}, steps shadow → 5 → 25 → 50 → 100 %")
                deadline = time.monotonic() + 240
                while time.monotonic() < deadline and (current := registry.rollout(name)) and current.active:
                    time.sleep(0.5)
                ended[version] = registry.rollout(name).status  # type: ignore[union-attr]
                timeline(registry, name, state.id)
            time.sleep(1.5)  # the replicas follow the last change under traffic
    finally:
        controller.stop()
        thread.join(30)
    failed = sum(n for status, n in traffic.statuses().items() if status != 200)
    production = registry.production(name)
    print(f"  {len(traffic.results)} requests during both rollouts, {failed} failed, versions seen: "
          f"{dict(traffic.versions())}; Production now {production.version if production else None}")
    print(f"  the record: registry rollout history --name {name}")
    return (ended == {bad: "rolled_back", good: "completed"} and failed == 0
            and production is not None and production.version == good)
