"""The demo's quality step: outcomes arriving late, live realised and estimated quality, a covariate shift the
estimate sees before the labels, a concept shift only the labels show, a performance alert and its resolution.

Time is compressed: 2 s slots and a 20 s window (production: 5-minute slots, 24 h); the outcomes arrive in the
order of the synthetic delays (median 3 h, a tail to days, 5 % never: ``lifecycle.data.label_delays``), an hour
of them replayed as 0.1 s.
"""

from __future__ import annotations

import random
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import redis

from harness.workspace import Workspace
from lifecycle import data as datamod
from mlops.connections import redis_options
from streaming import process as consumer_process
from streaming.join import window_metrics
from streaming.join_store import JoinSettings, JoinStore

SLOT_S, WINDOW_S = 2, 20
DEMO_ENV = {"MLOPS_QUALITY_SLOT_SECONDS": str(SLOT_S), "MLOPS_QUALITY_WINDOW_SECONDS": str(WINDOW_S),
            "MLOPS_QUALITY_EVAL_INTERVAL_S": "0.5", "MLOPS_QUALITY_MIN_LABELS": "100",
            "MLOPS_QUALITY_MIN_PREDICTIONS": "100"}


def demo_quality(ws: Workspace, url: str, run_dir: Path, alerts: Callable[[], list[dict]]) -> list[dict]:
    """``alerts``: a callable returning the new messages of the alerts topic. Returns the performance alerts."""
    group = f"demo-join-{uuid.uuid4().hex[:8]}"
    joiner = consumer_process.start({**ws.env, **DEMO_ENV, "MLOPS_QUALITY_GROUP_ID": group}, run_dir / "join.log",
                                    0, command="join")
    store = JoinStore(redis.Redis(**redis_options(ws.settings)), group,
                      JoinSettings(slot_s=SLOT_S, window_slots=WINDOW_S // SLOT_S))
    frame = datamod.training_frame(ws.dataset)
    rng = random.Random(5)
    seen: list[dict] = []
    try:
        if not joiner.wait_assigned():
            print(joiner.log()[-2000:], file=sys.stderr)
            return []

        def send(n: int, seed: int, amount_factor: float = 1.0) -> list[tuple[str, int]]:
            rows = frame.sample(n, replace=True, random_state=seed)
            sent = []
            for i in range(0, n, 200):
                chunk = rows.iloc[i:i + 200]
                body = {"requests": [{"customer_id": c, "transaction_amount": round(float(a) * amount_factor, 2)}
                                     for c, a in zip(chunk["customer_id"], chunk["transaction_amount"], strict=True)]}
                answers = httpx.post(f"{url}/predict_batch", json=body, timeout=60).raise_for_status().json()
                sent += [(a["request_id"], int(y)) for a, y in zip(answers, chunk["is_fraud"], strict=True)]
            return sent

        def label(sent: list[tuple[str, int]], flip: bool = False) -> int:
            """The outcomes in the order they would arrive (the generator's delays: median 3 h, a tail to days,
            5 % never), replayed with 1 h of their time as 0.1 s of the demo's, at most 3 s."""
            delays = datamod.label_delays(len(sent), seed=rng.randrange(1 << 30))
            known = sorted((d, rid, 1 - y if flip else y) for (rid, y), d in zip(sent, delays, strict=True)
                           if d == d)  # NaN: never
            started = time.monotonic()
            while known:
                due = min(known[0][0] / 36_000, 3.0)
                time.sleep(max(0.0, started + due - time.monotonic()))
                batch = [k for k in known[:200] if min(k[0] / 36_000, 3.0) <= due + 0.25]
                known = known[len(batch):]
                rows = [{"request_id": rid, "label": y} for _, rid, y in batch]
                httpx.post(f"{url}/outcomes", json={"outcomes": rows}, timeout=60).raise_for_status()
            return int(np.sum(~np.isnan(delays)))

        def show(title: str) -> None:
            time.sleep(1.5)  # the join's next poll and evaluation
            first = int(time.time() // SLOT_S) - WINDOW_S // SLOT_S + 1
            table = window_metrics(store.slots(first), store.settings.bins)
            for version, kinds in table.items():
                r, e = kinds["realised"], kinds["estimated"]
                print(f"  {title:<44} {version}: predictions {r['predictions']:>5}, labelled {r['labelled']:>5} | "
                      f"accuracy realised {_f(r['accuracy'])} estimated {_f(e['accuracy'])} | "
                      f"AUC realised {_f(r['auc'])} estimated {_f(e['auc'])}")
            seen.extend(a for a in alerts() if a.get("type") == "performance_alert" and a["consumer_group"] == group)

        holdout = ws.model.metadata["metrics"]
        print(f"  holdout of {ws.model.tag}: accuracy {holdout['accuracy']:.3f}, AUC {holdout['auc']:.3f} "
              f"(the baseline; an alert when realised accuracy or AUC falls 5 % below it)")
        sent = send(1200, 11)
        show("reference traffic, no label yet")
        print(f"  {label(sent)} of {len(sent)} outcomes arrived, late (the others never will)")
        show("reference traffic, labelled")
        time.sleep(WINDOW_S)
        sent = send(1200, 12, amount_factor=4.0)
        show("covariate shift (amounts x4), before labels")
        label(sent)
        show("covariate shift, labelled")
        time.sleep(WINDOW_S)
        sent = send(1200, 13)
        show("concept shift (labels flipped), before labels")
        label(sent, flip=True)
        show("concept shift, labelled")
        time.sleep(WINDOW_S)
        label(send(1200, 14))
        show("back to normal, labelled")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(a["status"] == "resolved" for a in seen):
            time.sleep(1)
            seen.extend(a for a in alerts() if a.get("type") == "performance_alert" and a["consumer_group"] == group)
        for a in seen:
            print(f"  ALERT {a['status']:<8} {a['severity']:<8} {a['model_name']}:{a['model_version']} {a['kind']} "
                  f"{a['metric']}={a['value']:.3f} (holdout {a['baseline']:.3f}, threshold {a['threshold']:.3f}) "
                  f"n={a['sample_size']}")
        return seen
    finally:
        joiner.stop()


def _f(value: float | None) -> str:
    return "  -  " if value is None else f"{value:.3f}"


def demo_skew(ws: Workspace, url: str, alerts: Callable[[], list[dict]]) -> list[str]:
    """Training/serving skew injected and caught: 20 customers' online rows overwritten with an avg_order_value
    the offline store never had (as a broken writer would), predictions for 200 customers, then `mlops-drift
    skew --publish`'s check over them (a skew alert on the alerts topic); the online rows are put back after.
    Returns the skewed features."""
    import pandas as pd

    from mlops.connections import kafka_config
    from mlops.schema import ENTITY, FEATURE_VIEW, STORE_FEATURES, TIMESTAMP
    from service.online_store import open_feature_store
    from streaming import skew

    customers = sorted(ws.dataset.latest_customers()[ENTITY])[:200]
    store = open_feature_store(ws.settings)
    current = store.get_online_features(features=[f"{FEATURE_VIEW}:{f}" for f in STORE_FEATURES],
                                        entity_rows=[{ENTITY: c} for c in customers[:20]]).to_df()

    def write(frame: pd.DataFrame) -> None:
        store.write_to_online_store(FEATURE_VIEW, frame.assign(**{TIMESTAMP: pd.Timestamp.now(tz="UTC")}))

    write(current.assign(avg_order_value=current["avg_order_value"] * 3))
    try:
        body = {"requests": [{"customer_id": c, "transaction_amount": 60.0} for c in customers]}
        httpx.post(f"{url}/predict_batch", json=body, timeout=60).raise_for_status()
        time.sleep(1)
        result = skew.check(kafka_config(ws.settings), ws.settings.predictions_topic, ws.feature_repo,
                            ws.settings.redis_address, 400, ws.settings.skew_tolerance, ws.settings.skew_threshold)
    finally:
        time.sleep(1.1)  # Feast's Redis store keeps a row only over an older one (by the second)
        write(current)  # the original values, newer: the online store is whole again
    for f in result.features:
        print(f"  {f.feature:<24} {f.differing:>4} of {f.rows} rows differ from the offline store "
              f"(share {f.share:.3f}, max abs diff {f.max_abs_diff:.4g})")
    print(f"  {result.sampled} predictions checked; skewed: {', '.join(result.skewed) or 'none'} "
          "(the newest 400: 20 of the 200 just sent were broken)")
    recorder = skew.SkewRecorder(redis.Redis(**redis_options(ws.settings)), ws.settings.predictions_topic,
                                 kafka_config(ws.settings), ws.settings.alerts_topic, ws.settings.skew_min_rows)
    recorder.record(result)
    deadline = time.monotonic() + 15
    seen: list[dict] = []
    while time.monotonic() < deadline and not seen:
        seen = [a for a in alerts() if a.get("type") == "skew_alert"]
    for a in seen:
        print(f"  ALERT {a['status']:<8} skew of {a['feature']}: share {a['share']:.3f} > {a['threshold']:g} "
              f"over {a['rows']} rows (max abs diff {a['max_abs_diff']:.4g})")
    return result.skewed
