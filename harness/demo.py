"""The whole path once, for real: services → data → train → store → Feast → serve → predict → Kafka → drift →
outcomes and live quality → skew → pipeline, promotion and rollback → rollouts judged by the controller →
experiment → batch scoring → the closed loop (drift alert → retrain → gate → rollout → Production).

    python -m harness.demo [--keep-running] [--closed-loop [--closed-loop-result FILE]]

``--closed-loop`` runs the set-up and the closed loop alone (a few minutes).

Stops what it started unless ``--keep-running`` is given (then `mlops-services down` and Ctrl+C on the
printed server pid clean up).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import uuid
from pathlib import Path

import httpx

from harness import server_process, workspace
from harness.demo_batch import demo_batch
from harness.demo_experiment import demo_experiment
from harness.demo_quality import demo_quality, demo_skew
from harness.demo_retrain import demo_retrain
from harness.demo_rollout import demo_rollout
from harness.kafka_read import new_events, read_events, tail
from harness.traffic import Traffic
from lifecycle import data as datamod
from lifecycle.registry import Registry
from lifecycle.rollout.state import Rollouts
from lifecycle.tracking import Backend
from mlops.connections import kafka_config
from mlops.settings import Settings
from streaming import process as consumer_process
from tools import services as svc

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_REQUESTS = [
    {"customer_id": "C000001", "transaction_amount": 42.0},
    {"customer_id": "C000002", "transaction_amount": 1250.0},
    {"customer_id": "C000003", "transaction_amount": 18.5},
    {"customer_id": "C000004", "transaction_amount": 980.0},
    {"customer_id": "C000005", "transaction_amount": 77.3},
]


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlops-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=svc.DEFAULT_RUN_DIR)
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--keep-running", action="store_true")
    parser.add_argument("--closed-loop", action="store_true", help="the set-up, then the closed loop alone")
    parser.add_argument("--closed-loop-result", type=Path, help="write the closed loop's timeline as JSON here")
    args = parser.parse_args(argv)
    # SIGTERM (a CI runner's stop, `kill`) unwinds like Ctrl+C, so what the demo started is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    step("starting Redis and Kafka")
    started_services = not all(i["running"] for i in svc.status(args.run_dir).values())
    svc.up(args.run_dir)
    env_file = svc.RunDir(args.run_dir).env_file
    print(env_file.read_text().strip())
    settings = Settings.load(env_file)
    server = None
    try:
        backend = Backend.from_settings(settings)
        step(f"data (customer_stats history) → training, an MLflow run ({backend.display_uri}) → ONNX "
             "(parity-checked) → MLflow registry → feast apply + feast materialize")
        # The first version is a quick baseline (60 shallow trees), so the pipeline's candidate has one to beat.
        ws = workspace.prepare(args.run_dir.resolve(), env_file, settings.feature_repo.resolve(),
                               params=BASELINE_PARAMS)
        m = ws.model.metadata["metrics"]
        print(f"data in {ws.feature_repo / 'data'}; stored {ws.model.tag}: auc={m['auc']:.4f} "
              f"accuracy={m['accuracy']:.4f} onnx parity max diff={m['onnx_parity_max_abs_diff']:.2e}; "
              f"MLflow run {ws.model.metadata.get('mlflow_run_id')}, model version "
              f"{ws.model.metadata.get('mlflow_model_version')}; latest customer_stats materialized to Redis")

        step(f"registry: {ws.model.tag} registered and promoted: models:/{ws.model.name}@production")
        registry = Registry(backend, settings.registry_lock_timeout_s)
        meta = ws.model.metadata
        registry.register(ws.model.name, ws.model.version, meta["metrics"], meta["params"],
                          meta.get("training_data_hash"), meta.get("git_commit"))
        registry.promote(ws.model.name, ws.model.version, "production", "demo")
        leftover = registry.rollout(ws.model.name)
        if leftover is not None and leftover.active:  # an earlier run stopped half-way: start from Production
            Rollouts(registry).abort(ws.model.name, "demo", "left running by an earlier demo run")
            print(f"  aborted {leftover.kind} {leftover.id} ({leftover.candidate}), left running by an earlier run")

        step(f"bentoml serve on port {args.port} (following models:/{ws.model.name}@production)")
        serve_env = {**ws.env, "MLOPS_MODEL_VERSION": "", "MLOPS_MLFLOW_DIR": str(settings.mlflow_dir.resolve()),
                     "MLOPS_MLFLOW_URI": settings.mlflow_uri}
        server = server_process.start(args.port, serve_env, args.run_dir / "server.log")
        print(f"ready at {server.url} (pid {server.process.pid}); info: {httpx.get(server.url + '/info/').text}")
        print(f"gRPC at {server.grpc_target} (a free port the demo picked; `bentoml serve` alone uses 3001)")

        if args.closed_loop:
            step(CLOSED_LOOP)
            if not demo_retrain(registry, ws, server.url, args.run_dir, args.closed_loop_result):
                print("the closed loop did not end as expected", file=sys.stderr)
                return 1
            step("done: a drift alert closed by a retrained model in Production, a bad candidate blocked, the "
                 "circuit breaker open, no failed request")
            return 0
        step("sending predictions")
        ids = set()
        for body in SAMPLE_REQUESTS:
            body = {**body, "request_id": f"demo-{uuid.uuid4().hex[:12]}"}
            answer = httpx.post(f"{server.url}/predict", json=body, timeout=30).raise_for_status().json()
            ids.add(answer["request_id"])
            print(f"{answer['customer_id']} amount={body['transaction_amount']:>8} -> "
                  f"p(fraud)={answer['prediction']:.4f} label={answer['label']} "
                  f"model={answer['model_name']}:{answer['model_version']} latency={answer['latency_ms']:.1f}ms")

        step(f"reading the prediction events back from Kafka topic '{settings.predictions_topic}'")
        events = read_events(kafka_config(settings), settings.predictions_topic, ids, timeout=60, settle=0.5)
        for event in events:
            print(json.dumps(event, sort_keys=True))
        if {e["request_id"] for e in events} != ids:
            print("some prediction events did not arrive", file=sys.stderr)
            return 1
        step("streaming drift: a consumer group on the prediction log, alerts on '"
             f"{settings.alerts_topic}'")
        alerts = demo_drift(ws, server.url, args.run_dir)
        step("quality: outcomes (true labels, late) joined to predictions by request_id; realised and estimated "
             "accuracy and AUC; a covariate shift, a concept shift, a performance alert")
        quality_reader = tail(kafka_config(settings), settings.alerts_topic)
        try:
            performance = demo_quality(ws, server.url, args.run_dir, lambda: new_events(quality_reader, 0.2))
        finally:
            quality_reader.close()
        if not any(a["status"] == "firing" for a in performance):
            print("the concept shift raised no performance alert", file=sys.stderr)
            return 1
        step("training/serving skew: 20 customers' online rows broken (avg_order_value x3), predictions logged "
             "with them compared with Feast's offline store at their time (`mlops-drift skew`)")
        skew_reader = tail(kafka_config(settings), settings.alerts_topic)
        try:
            skewed = demo_skew(ws, server.url, lambda: new_events(skew_reader, 0.2))
        finally:
            skew_reader.close()
        if skewed != ["avg_order_value"]:
            print("the injected skew was not caught as avg_order_value alone", file=sys.stderr)
            return 1
        step("lifecycle: pipeline (Feast point-in-time training set, gate) → Staging → promote under traffic → "
             "rollback under traffic")
        if not demo_lifecycle(registry, ws.model.name, server.url, settings):
            return 1
        step("rollouts: the controller (`mlops-rollout`) judges each step on the prediction log; a candidate "
             "trained on flipped labels, then a retrained one, under traffic")
        if not demo_rollout(registry, ws, server.url, settings):
            print("the rollouts did not end as expected (flipped: rolled back; retrained: completed)", file=sys.stderr)
            return 1
        step("A/B experiment: a cheaper challenger against Production on accuracy, planned by power analysis, "
             "outcomes joined as they arrive, sequential and Bayesian read-outs, concluded by the stopping rule")
        if not demo_experiment(registry, ws, server.url, settings):
            print("the experiment did not end as expected (Production kept by the stopping rule)", file=sys.stderr)
            return 1
        step("batch scoring (`mlops-score`): the demo's transactions with Production, features point-in-time from "
             "Feast's offline store; a backfill of the last hour of logged traffic with another version")
        if not demo_batch(registry, ws.model.name, ws.feature_repo, serve_env, args.run_dir):
            print("batch scoring or the backfill failed", file=sys.stderr)
            return 1
        step(CLOSED_LOOP)
        if not demo_retrain(registry, ws, server.url, args.run_dir, args.closed_loop_result):
            print("the closed loop did not end as expected (retrained candidate in Production, a bad one blocked, "
                  "the circuit breaker open)", file=sys.stderr)
            return 1
        step(f"done: {len(ids)} predictions served, {len(events)} events read back from Kafka, "
             f"{len(alerts)} drift alerts, {len(performance)} performance alerts, promotion and rollback with no "
             "failed request, a bad candidate rolled back and a good one rolled out by the controller, an A/B "
             "experiment concluded, a batch scored and a backfill, a drift alert closed by a retrain in Production")
        print(f"browse the training runs and the registry: .venv/bin/mlflow ui --backend-store-uri "
              f"{backend.display_uri} --port 5000   (then http://127.0.0.1:5000)")
        if args.keep_running:
            print(f"left running: server pid {server.process.pid}, services in {args.run_dir}")
            server = None
        return 0
    finally:
        if server is not None:
            server.stop()
        if started_services and not args.keep_running:
            svc.down(args.run_dir)


BASELINE_PARAMS = {"n_estimators": 60, "max_depth": 2}
CLOSED_LOOP = ("closed loop (`mlops-retrain`): drift alert → wait for labels → retrain on fresh data → gate on recent "
               "labelled traffic → rollout → Production; then a bad training change blocked, the circuit breaker")


def demo_lifecycle(registry: Registry, name: str, url: str, settings: Settings) -> bool:
    from lifecycle.pipeline import definition, runner

    summary = runner.run(definition.load(ROOT / "pipeline.yaml"), registry, model_name=name, settings=settings)
    for stage in summary["stages"]:
        print(f"  {stage['stage']:<11} {stage['outcome']}")
    print(f"  MLflow run {summary['mlflow_run_id']} (experiment {registry.backend.experiment})")
    candidate = summary["registered"]["version"]
    production = registry.production(name)
    assert production is not None
    with Traffic(url) as traffic:
        time.sleep(1.5)
        at = time.monotonic()
        registry.promote(name, candidate, "production", "demo")
        promote_s = traffic.takeover(at, candidate)
        time.sleep(1.5)
        at = time.monotonic()
        restored, _ = registry.rollback(name)
        rollback_s = traffic.takeover(at, restored.version)
        time.sleep(1.0)
    failed = sum(n for status, n in traffic.statuses().items() if status != 200)
    print(f"promote {production.version} → {candidate}: took effect in {_seconds(promote_s)}; "
          f"rollback → {restored.version}: {_seconds(rollback_s)}")
    print(f"{len(traffic.results)} requests during the switch, {failed} failed, versions seen: "
          f"{dict(traffic.versions())}")
    for row in registry.list(name)[-3:]:
        print(f"  {row.name}:{row.version:<5} {row.stage:<10} auc={row.metrics.get('auc', 0):.4f} "
              f"aliases={','.join(row.aliases) or '-'}")
    print("  history (MLflow experiment 'model-registry-history'):")
    for row in registry.history(name)[-4:]:
        print(f"    {row['at'][:19]} {row['version']:<4} {row['from_stage']:>10} -> {row['to_stage']:<10} "
              f"{row['reason']}")
    return failed == 0 and promote_s is not None and rollback_s is not None


def _seconds(value: float | None) -> str:
    return "NOT within 30 s" if value is None else f"{value:.2f}s"


def demo_drift(ws: workspace.Workspace, url: str, run_dir: Path) -> list[dict]:
    """Reference-like traffic (no alert), then transaction amounts x4 (alert), read from the alerts topic."""
    group = f"demo-{uuid.uuid4().hex[:8]}"
    consumer = consumer_process.start(
        {**ws.env, "MLOPS_DRIFT_EVAL_INTERVAL_S": "0.5"}, run_dir / "drift-consumer.log", 0,
        "--group", group, "--slot-seconds", "1", "--window-seconds", "60", "--max-events", "600",
    )
    alerts_reader = tail(kafka_config(ws.settings), ws.settings.alerts_topic)
    frame = datamod.training_frame(ws.dataset)
    try:
        if not consumer.wait_assigned():
            print(consumer.log()[-2000:], file=sys.stderr)
            return []
        for label, factor, seed in (("reference-like", 1.0, 1), ("amounts x4", 4.0, 2)):
            rows = frame.sample(1200, replace=True, random_state=seed)
            for i in range(0, len(rows), 200):
                chunk = rows.iloc[i:i + 200]
                body = {"requests": [{"customer_id": c, "transaction_amount": round(float(a) * factor, 2)}
                                     for c, a in zip(chunk["customer_id"], chunk["transaction_amount"], strict=True)]}
                httpx.post(f"{url}/predict_batch", json=body, timeout=60).raise_for_status()
            print(f"sent 1200 {label} transactions")
            time.sleep(4)
        received = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(a["feature"] == "transaction_amount" for a in received):
            received.extend(new_events(alerts_reader))
        for a in received:
            if a.get("consumer_group") == group and a.get("type") == "drift_alert":
                print(f"ALERT {a['status']:<8} {a['severity']:<8} {a['model_name']}:{a['model_version']} "
                      f"feature={a['feature']:<20} {a['metric']}={a['value']:.3f} (threshold {a['threshold']}) "
                      f"n={a['sample_size']}")
        return [a for a in received if a.get("consumer_group") == group and a.get("type") == "drift_alert"]
    finally:
        alerts_reader.close()
        consumer.stop()


if __name__ == "__main__":
    sys.exit(main())
