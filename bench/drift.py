"""Drift consumer costs: events/s per core in process (decode + bin, no Kafka), memory per (feature, window),
and one PSI/KS evaluation against scipy's ks_2samp on raw arrays of the same window size (the baseline, same
run). Through the real broker (and the Kafka client comparison): :mod:`bench.kafka_clients`, run by
:func:`kafka_benchmark`.

    python -m bench.drift [--events 200000]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from scipy import stats as sps

from bench.common import print_table, write_results
from mlops import stats, stattests
from mlops.profile import build_profile
from streaming.absorb import Absorber
from streaming.events import decode_batch
from streaming.state_store import PartitionCheckpoint
from streaming.window import SlotHistograms, WindowSpec, merged_windows


def profile_and_events(n: int):
    """The benchmark's reference profile and ``n`` wire-format events (``mlops.events.encode``)."""
    from bench.kafka_clients import bench_profile, events
    from mlops.events import encode

    return bench_profile(), [encode(e) for e in events(n)]


def consumer_throughput(n: int, batch: int = 10_000) -> dict:
    """The consumer's work per poll (decode, check, bin, count) on one core, Kafka I/O excluded."""
    profile, raw = profile_and_events(n)
    absorber = Absorber(lambda name, version: profile, WindowSpec(10, 300))
    states = {p: PartitionCheckpoint(0, 0, 0, SlotHistograms()) for p in range(4)}
    parts = [i % 4 for i in range(batch)]
    now = time.time()
    started = time.process_time()
    for i in range(0, n, batch):
        chunk = raw[i:i + batch]
        absorber.absorb(chunk, parts[:len(chunk)], states, now)
    cpu = time.process_time() - started
    assert sum(s.consumed for s in states.values()) == n
    decode_only = time.process_time()
    for i in range(0, n, batch):
        decode_batch(raw[i:i + batch])
    decode_cpu = time.process_time() - decode_only
    return {"what": "consumer absorb (decode+bin+count), batches of 10k", "events": n, "cpu_s": cpu,
            "events_per_s_per_core": n / cpu, "decode_share": decode_cpu / cpu}


def memory_per_window() -> dict:
    spec = WindowSpec(slot_seconds=10, window_seconds=300)
    h = SlotHistograms()
    rng = np.random.default_rng(1)
    for second in range(0, 3_600, 1):  # one hour at 100 events/s
        h.add(("m", "v1", "x"), spec.slot_of(second), rng.integers(0, 40, 100), 40)
        h.expire(spec.first_slot(second))
    cells = h.cells()
    return {"what": "state per (feature, window)", "slots": spec.n_slots, "bins": 40, "cells": cells,
            "bytes_in_memory": cells * 8, "bytes_in_checkpoint": sum(len(h.slot_blob(s)) for s in h.slot_numbers()),
            "bytes_per_poll_checkpoint": len(h.slot_blob(max(h.slot_numbers()))), "events_seen": 360_000}


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
        stattests.score_column(profile, window.counts)
    ours = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        sps.ks_2samp(reference, current)
    scipy_raw = (time.perf_counter() - t0) / repeats
    return {"what": f"one evaluation, window of {window_events} events", "window_events": window_events,
            "score_column_ms": ours * 1e3, "scipy_ks_2samp_raw_ms": scipy_raw * 1e3,
            "speedup_vs_scipy": scipy_raw / ours}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.drift")
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args(argv)
    throughput = consumer_throughput(args.events)
    memory = memory_per_window()
    evals = [evaluation_cost(n) for n in (1_000, 10_000, 100_000)]
    print_table("Drift consumer throughput (one core)", [throughput],
                ["what", "events", "cpu_s", "events_per_s_per_core", "decode_share"])
    print_table("Memory per (feature, window), 1 h of traffic at 100 ev/s", [memory],
                ["what", "slots", "bins", "cells", "bytes_in_memory", "bytes_in_checkpoint",
                 "bytes_per_poll_checkpoint", "events_seen"])
    print_table("PSI+KS from the histogram window vs scipy ks_2samp on raw values (baseline)", evals,
                ["what", "score_column_ms", "scipy_ks_2samp_raw_ms", "speedup_vs_scipy"])
    path = write_results("drift", [throughput, memory, *evals])
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def kafka_benchmark(settings) -> list[dict]:
    """The Kafka client comparison and the drift consumer through the real broker with Redis checkpoints
    (1 and 2 processes), on the broker and Redis that ``settings`` name; writes bench/results/drift_kafka.json."""
    from bench import kafka_clients

    return kafka_clients.run(settings.kafka_bootstrap, settings.redis_address)
