"""The demo's A/B experiment: a cheaper challenger (20 trees of depth 2, a tenth of Production's inference
work) against Production on accuracy, planned by the power analysis first, read out with the sequential and
Bayesian answers side by side as outcomes arrive, and concluded by the stopping rule."""

from __future__ import annotations

import time

import httpx

from harness.traffic import Traffic
from harness.workspace import Workspace
from lifecycle import data as datamod
from lifecycle.registry import Registry
from lifecycle.rollout import experiment as experiment_mod
from lifecycle.rollout import power
from lifecycle.rollout.cli import conclude, read_out, readout_lines, start_experiment
from lifecycle.rollout.state import Rollouts
from lifecycle.train import register as store_model
from lifecycle.train import train
from mlops.rollout import RolloutState
from mlops.schema import LABEL, STORE_FEATURES
from mlops.settings import Settings

CHALLENGER = {"n_estimators": 20, "max_depth": 2}
MDE = 0.02  # the smallest accuracy change worth acting on, absolute
CHUNK = 2_000  # requests between two looks
ROWS = 250  # per request (MLOPS_MAX_REQUEST_ROWS: 256)


def demo_experiment(registry: Registry, ws: Workspace, url: str, settings: Settings) -> bool:
    name = ws.model.name
    production = registry.production(name)
    if production is None:
        print("  no Production version to experiment against")
        return False
    baseline_accuracy = float(production.metrics.get("accuracy") or 0.9)
    p = power.plan(baseline_accuracy, MDE)
    print(f"  registry experiment plan --baseline-rate {baseline_accuracy:.3f} --mde {MDE}: {p.fixed_per_arm:,} "
          f"labelled predictions per arm read once, {p.sequential_per_arm:,} read at every look (sequential)")
    stored = store_model(train(ws.dataset, params=CHALLENGER), name, backend=registry.backend)
    registry.register(name, stored.version, stored.metadata["metrics"], stored.metadata["params"],
                      reason="challenger: 20 trees of depth 2 (demo)")
    state = start_experiment(registry, name, stored.version, p.sequential_per_arm, by="demo")  # 50 %, sequential
    print(f"  experiment {state.id}: {stored.version} (holdout accuracy {stored.metadata['metrics']['accuracy']:.3f}) "
          f"against {production.version} ({baseline_accuracy:.3f}) on {state.share:.0%} of customers")
    try:
        with Traffic(url) as traffic:
            readout = _looks(registry, ws, url, settings, state, 4 * p.sequential_per_arm)
    except BaseException:
        Rollouts(registry).abort(name, "demo", "the demo's experiment stopped half-way")
        raise
    print("\n".join(readout_lines(state, readout, indent="    ")))
    after, text = conclude(registry, state, readout, force=False, by="demo")
    print(f"  registry experiment conclude: {text}")
    failed = sum(n for status, n in traffic.statuses().items() if status != 200)
    print(f"  {len(traffic.results)} requests of background traffic during the experiment, {failed} failed")
    kept = registry.production(name)
    return (readout.verdict in ("baseline", "no_difference") and after.status == "rolled_back" and failed == 0
            and kept is not None and kept.version == production.version)


def _looks(registry: Registry, ws: Workspace, url: str, settings: Settings, state: RolloutState,
           most: int) -> experiment_mod.Readout:
    """Requests with their outcomes (true labels, here at once) in chunks, a read-out after each (as
    `registry experiment status` reads it), until the stopping rule gives a verdict."""
    _wait_split(url, state.candidate)
    frame = datamod.training_frame(ws.dataset)
    sent = 0
    while True:
        rows = frame.sample(CHUNK, replace=True, random_state=sent)
        outcomes = []
        for i in range(0, CHUNK, ROWS):
            chunk = rows.iloc[i:i + ROWS]
            # Each transaction with the customer's stats at its time (given, so no lookup), as the outcome's label
            # belongs to them: the arms are judged on what the models were trained to do.
            body = {"requests": [{"customer_id": r.customer_id, "transaction_amount": float(r.transaction_amount),
                                  "features": {f: float(getattr(r, f)) for f in STORE_FEATURES}}
                                 for r in chunk.itertuples()]}
            answers = httpx.post(f"{url}/predict_batch", json=body, timeout=60).raise_for_status().json()
            outcomes += [{"request_id": a["request_id"], "label": int(y)}
                         for a, y in zip(answers, chunk[LABEL], strict=True)]
        for i in range(0, len(outcomes), ROWS):
            httpx.post(f"{url}/outcomes", json={"outcomes": outcomes[i:i + ROWS]}, timeout=60).raise_for_status()
        sent += CHUNK
        time.sleep(0.5)  # the outcomes reach the topic
        readout = read_out(registry, state, settings)
        print(f"  look after {sent:,} requests: " + readout_lines(state, readout, indent="")[0].strip()
              + f" -> {readout.verdict}")
        if readout.verdict != "continue" or sent >= most:
            return readout


def _wait_split(url: str, version: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/info/").json().get("canary_version") == version:
            return
        time.sleep(0.2)
    raise RuntimeError(f"the service did not start the experiment's split to {version}")
