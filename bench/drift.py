"""Drift consumer costs: events/s per core, memory per (feature, window), and one PSI/KS evaluation
against scipy's ks_2samp on raw arrays of the same window size (the baseline, same run).

    python -m bench.drift [--events 200000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime

import numpy as np
from scipy import stats as sps

from bench.common import print_table, write_results
from streaming import stats
from streaming.consumer import DriftConsumer, column_scores
from streaming.events import parse
from streaming.profile import build_profile
from streaming.state_store import PartitionCheckpoint
from streaming.window import SlotHistograms, WindowSpec, merged_windows

FEATURES = ["total_purchases", "avg_order_value", "days_since_last_order", "lifetime_value", "transaction_amount"]


class Record:
    __slots__ = ("value", "offset", "topic", "partition")

    def __init__(self, value: bytes, offset: int) -> None:
        self.value, self.offset, self.topic, self.partition = value, offset, "predictions", 0


def profile_and_events(n: int):
    rng = np.random.default_rng(0)
    ref = {f: rng.lognormal(3, 0.7, 20_000) for f in FEATURES}
    profile = build_profile("fraud_detector", "v1", ref, rng.random(20_000))
    now = datetime.now(UTC).isoformat()
    raw = [json.dumps({"request_id": str(i), "timestamp": now, "model_name": "fraud_detector", "model_version": "v1",
                       "features": {f: float(rng.lognormal(3, 0.7)) for f in FEATURES},
                       "prediction": float(rng.random()), "label": 0}).encode() for i in range(n)]
    return profile, raw


def consumer_throughput(n: int) -> dict:
    """The consumer's per-event work (parse, validate, bin, count) on one core, Kafka I/O excluded."""
    profile, raw = profile_and_events(n)
    consumer = DriftConsumer.__new__(DriftConsumer)  # the absorb path only: no broker connections
    consumer.config = type("C", (), {"window": WindowSpec(10, 300)})()
    consumer.profiles = type("P", (), {"get": staticmethod(lambda name, version: profile)})()
    consumer.partitions = {0: PartitionCheckpoint(0, 0, 0, SlotHistograms())}
    batch = 2_000
    started = time.process_time()
    for i in range(0, n, batch):
        consumer._absorb(0, [Record(v, i + k) for k, v in enumerate(raw[i:i + batch])])
    cpu = time.process_time() - started
    parse_only = time.process_time()
    for v in raw:
        parse(v)
    parse_cpu = time.process_time() - parse_only
    return {"what": "consumer absorb (parse+bin+count)", "events": n, "cpu_s": cpu,
            "events_per_s_per_core": n / cpu, "json_parse_share": parse_cpu / cpu}


def memory_per_window() -> dict:
    spec = WindowSpec(slot_seconds=10, window_seconds=300)
    h = SlotHistograms()
    rng = np.random.default_rng(1)
    for second in range(0, 3_600, 1):  # one hour at 100 events/s
        h.add(("m", "v1", "x"), spec.slot_of(second), rng.integers(0, 40, 100), 40)
        h.expire(spec.first_slot(second))
    cells = h.cells()
    return {"what": "state per (feature, window)", "slots": spec.n_slots, "bins": 40, "cells": cells,
            "bytes_in_memory": cells * 8, "bytes_in_checkpoint": len(json.dumps(h.to_json())),
            "events_seen": 360_000}


def evaluation_cost(window_events: int, repeats: int = 200) -> dict:
    rng = np.random.default_rng(2)
    reference = rng.lognormal(3, 0.7, 20_000)
    current = rng.lognormal(3.1, 0.7, window_events)
    profile = build_profile("m", "v1", {"x": reference}, rng.random(20_000)).columns["x"]
    h = SlotHistograms()
    spec = WindowSpec(10, 300)
    for k, chunk in enumerate(np.array_split(current, spec.n_slots)):
        h.add(("m", "v1", "x"), k, stats.bin_index(profile.edges, chunk), profile.n_bins)
    t0 = time.perf_counter()
    for _ in range(repeats):
        window = merged_windows([h], spec, now=(spec.n_slots - 1) * 10 + 1)[("m", "v1", "x")]
        column_scores(profile, window.counts)
    ours = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        sps.ks_2samp(reference, current)
    scipy_raw = (time.perf_counter() - t0) / repeats
    return {"what": f"one evaluation, window of {window_events} events", "window_events": window_events,
            "histogram_psi_ks_ms": ours * 1e3, "scipy_ks_2samp_raw_ms": scipy_raw * 1e3,
            "speedup_vs_scipy": scipy_raw / ours}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.drift")
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args(argv)
    throughput = consumer_throughput(args.events)
    memory = memory_per_window()
    evals = [evaluation_cost(n) for n in (1_000, 10_000, 100_000)]
    print_table("Drift consumer throughput (one core)", [throughput],
                ["what", "events", "cpu_s", "events_per_s_per_core", "json_parse_share"])
    print_table("Memory per (feature, window), 1 h of traffic at 100 ev/s", [memory],
                ["what", "slots", "bins", "cells", "bytes_in_memory", "bytes_in_checkpoint", "events_seen"])
    print_table("PSI+KS from the histogram window vs scipy ks_2samp on raw values (baseline)", evals,
                ["what", "histogram_psi_ks_ms", "scipy_ks_2samp_raw_ms", "speedup_vs_scipy"])
    path = write_results("drift", [throughput, memory, *evals])
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def kafka_end_to_end(ws, n: int = 20_000) -> dict:
    """The real consumer on a real topic: fetch, decode, absorb, checkpoint to Redis, commit."""
    import uuid

    import redis
    from kafka import KafkaProducer

    from streaming.consumer import ConsumerConfig, ProfileCache, load_profile_from_store
    from streaming.rules import RuleSet
    from streaming.state_store import StateStore
    from tools.services import create_topics

    topic = f"bench-{uuid.uuid4().hex[:8]}"
    create_topics(ws.settings.kafka_bootstrap, {topic: 3, f"{topic}-alerts": 1, f"{topic}-dlq": 1})
    rng = np.random.default_rng(3)
    producer = KafkaProducer(bootstrap_servers=ws.settings.kafka_bootstrap, linger_ms=20, batch_size=256_000)
    sample = ws.dataset.customers.sample(n, replace=True, random_state=1)
    now = datetime.now(UTC).isoformat()
    for i, row in enumerate(sample.itertuples(index=False)):
        event = {"request_id": str(i), "timestamp": now, "model_name": ws.model.name,
                 "model_version": ws.model.version, "customer_id": row.customer_id,
                 "features": {f: float(getattr(row, f)) for f in FEATURES[:-1]}
                 | {"transaction_amount": float(rng.lognormal(4, 0.5))},
                 "prediction": float(rng.random() * 0.2), "label": 0}
        producer.send(topic, key=row.customer_id.encode(), value=json.dumps(event).encode())
    producer.flush()
    producer.close()
    config = ConsumerConfig(bootstrap=ws.settings.kafka_bootstrap, topic=topic, alerts_topic=f"{topic}-alerts",
                            dlq_topic=f"{topic}-dlq", group_id=f"{topic}-group", window=WindowSpec(10, 300))
    client = redis.Redis(host=ws.settings.redis_host, port=ws.settings.redis_port)
    store = StateStore(client, config.group_id, topic)
    consumer = DriftConsumer(config, RuleSet.default(), store, ProfileCache(load_profile_from_store))
    wall, cpu = time.perf_counter(), time.process_time()
    while sum(c.consumed for c in consumer.partitions.values()) < n:
        consumer.step()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    consumer.close()
    return {"what": "consumer via Kafka + Redis checkpoints", "events": n, "cpu_s": cpu, "wall_s": wall,
            "events_per_s_per_core": n / cpu, "events_per_s_wall": n / wall}
