"""Buffered metrics add up to exactly what observing each value on the shared metric would have."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram

from service import metrics


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect() for s in family.samples if not s.name.endswith("_created")}


def test_buffered_histogram_and_counter_equal_direct_observation():
    direct, buffered = CollectorRegistry(), CollectorRegistry()
    h_direct = Histogram("lat_seconds", "x", ["e"], buckets=metrics.LATENCY_BUCKETS, registry=direct).labels("p")
    c_direct = Counter("req_total", "x", ["e"], registry=direct).labels("p")
    h = metrics.BufferedHistogram(
        Histogram("lat_seconds", "x", ["e"], buckets=metrics.LATENCY_BUCKETS, registry=buffered).labels("p"))
    c = metrics.BufferedCounter(Counter("req_total", "x", ["e"], registry=buffered).labels("p"))
    assert h.bulk
    rng = random.Random(3)
    values = [rng.choice([0.0005, 0.001, 5.0, 7.5]) for _ in range(50)] + [rng.expovariate(200) for _ in range(2000)]
    for i, value in enumerate(values):
        h_direct.observe(value)
        h.observe(value)
        c_direct.inc()
        c.inc()
        if i % 333 == 0:
            metrics.flush()
    metrics.flush()
    got, want = samples(buffered), samples(direct)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert abs(got[key] - value) < 1e-9, key
