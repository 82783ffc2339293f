"""Kafka clients on the real broker: kafka-python against confluent-kafka (librdkafka), for the prediction log's
producer and the drift consumer, and the drift consumer scaling from one process to two.

    python -m bench.kafka_clients [--events 200000] [--partitions 4]

Every measurement runs in a fresh process of its own, so "per core" is that process's events per CPU second
(``time.process_time``: all its threads, librdkafka's included), which stays honest on a busy machine; wall
events/s are reported beside it. Rows (``bench/results/drift_kafka.json``): ``client``, ``stage``
(``produce``: encode with ``mlops.events.encode`` and publish, acks=all; ``raw``: consume, touch the bytes;
``decode``: consume and decode with the drift consumer's batch decoder; ``full``: the drift consumer itself,
decode + numpy binning + a Redis checkpoint and an offset commit every poll + evaluations), ``consumers``,
``events_per_s``, ``events_per_s_per_core``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import uuid
from datetime import UTC, datetime

import numpy as np

from bench.common import print_table, write_results

MODEL = ("bench_model", "v1")
FEATURES = ["total_purchases", "avg_order_value", "days_since_last_order", "lifetime_value", "transaction_amount"]
COLUMNS = ["client", "stage", "consumers", "events", "cpu_s", "wall_s", "events_per_s", "events_per_s_per_core",
           "librdkafka_threads_share"]


def bench_profile():
    """The reference profile the synthetic events are judged against (same seed in every process)."""
    from mlops.profile import build_profile

    rng = np.random.default_rng(0)
    return build_profile(*MODEL, {f: rng.lognormal(3, 0.7, 20_000) for f in FEATURES}, rng.random(20_000))


def events(n: int, seed: int = 1) -> list:
    """``n`` prediction events as the service builds them (typed structs; encoding is part of what is timed)."""
    from mlops.events import PredictionEvent

    rng = np.random.default_rng(seed)
    values = rng.lognormal(3, 0.7, (n, len(FEATURES)))
    scores = rng.random(n)
    now = datetime.now(UTC)
    return [PredictionEvent(request_id=uuid.uuid4().hex, timestamp=now, model_name=MODEL[0], model_version=MODEL[1],
                            customer_id=f"C{i % 2000:06d}", features=dict(zip(FEATURES, row.tolist(), strict=True)),
                            request_features=["transaction_amount"], prediction=float(s), label=int(s >= 0.5),
                            latency_ms=1.0) for i, (row, s) in enumerate(zip(values, scores, strict=True))]


def thread_cpu_s() -> tuple[float, float]:
    """CPU seconds of this process's main thread and of all its other threads (librdkafka's, for one)."""
    tick = os.sysconf("SC_CLK_TCK")
    main = other = 0.0
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tick
        if int(tid) == os.getpid():
            main += cpu
        else:
            other += cpu
    return main, other


def _measured(fn):
    """Runs ``fn() -> events`` and returns events, CPU seconds and wall seconds of this process."""
    cpu, wall = time.process_time(), time.perf_counter()
    n = fn()
    return {"events": n, "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}


# --- producers ----------------------------------------------------------------------------------------


def produce_kafka_python(bootstrap: str, topic: str, n: int) -> dict:
    from kafka import KafkaProducer

    from mlops.events import encode

    batch = events(n)
    producer = KafkaProducer(bootstrap_servers=bootstrap.split(","), acks="all", linger_ms=5)

    def run() -> int:
        for event in batch:
            producer.send(topic, key=event.customer_id.encode(), value=encode(event))
        producer.flush()
        return n

    row = _measured(run)
    producer.close()
    return {"client": "kafka-python", "stage": "produce", "consumers": 0, **row}


def produce_confluent(bootstrap: str, topic: str, n: int) -> dict:
    from confluent_kafka import Producer

    from mlops.events import encode

    batch = events(n)
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                         "linger.ms": 5})

    def run() -> int:
        for event in batch:
            while True:
                try:
                    producer.produce(topic, encode(event), key=event.customer_id.encode())
                    break
                except BufferError:  # local queue full: let deliveries drain
                    producer.poll(0.05)
        assert producer.flush(60) == 0
        return n

    return {"client": "confluent-kafka", "stage": "produce", "consumers": 0, **_measured(run)}


# --- plain consumers ----------------------------------------------------------------------------------


def consume_kafka_python(bootstrap: str, topic: str, n: int, decode: bool) -> dict:
    from kafka import KafkaConsumer

    from streaming.events import decode_batch

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap.split(","), group_id=f"bench-{uuid.uuid4().hex[:8]}",
                             auto_offset_reset="earliest", enable_auto_commit=False, max_poll_records=10_000)

    def run() -> int:
        seen = 0
        while seen < n:
            for records in consumer.poll(timeout_ms=500, max_records=10_000).values():
                values = [r.value for r in records]
                if decode:
                    decode_batch(values)
                seen += len(values)
        return seen

    row = _measured(run)
    consumer.close()
    return {"client": "kafka-python", "stage": "decode" if decode else "raw", "consumers": 1, **row}


def consume_confluent(bootstrap: str, topic: str, n: int, decode: bool) -> dict:
    from confluent_kafka import Consumer

    from streaming.events import decode_batch

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])

    def run() -> int:
        seen = 0
        while seen < n:
            values = [m.value() for m in consumer.consume(10_000, 0.5) if m.error() is None]
            if decode:
                decode_batch(values)
            seen += len(values)
        return seen

    row = _measured(run)
    consumer.close()
    return {"client": "confluent-kafka", "stage": "decode" if decode else "raw", "consumers": 1, **row}


# --- the drift consumer, one or more processes ---------------------------------------------------------


def drift_consumer(bootstrap: str, redis_address: str, topic: str, group: str, go, report) -> None:
    """One drift consumer process of the group: holds its partitions paused until ``go``, then reads them to
    their end (checkpoint + commit every poll) and reports its own CPU and wall time."""
    import redis
    from confluent_kafka import TopicPartition

    from streaming.consumer import ConsumerConfig, DriftConsumer
    from streaming.model_files import ProfileCache
    from streaming.rules import RuleSet
    from streaming.state_store import StateStore
    from streaming.window import WindowSpec

    class Held(DriftConsumer):
        hold = True

        def _on_assign(self, consumer, assigned) -> None:
            super()._on_assign(consumer, assigned)
            if self.hold:
                consumer.pause(assigned)

    profile = bench_profile()
    host, port = redis_address.rsplit(":", 1)
    # A short poll timeout: the last poll of the backlog would otherwise wait out the timeout for a full batch.
    config = ConsumerConfig(bootstrap=bootstrap, topic=topic, alerts_topic=f"{topic}-alerts",
                            dlq_topic=f"{topic}-dlq", group_id=group, window=WindowSpec(10, 300), poll_timeout_s=0.1)
    consumer = Held(config, RuleSet.default(), StateStore(redis.Redis(host=host, port=int(port)), group, topic),
                    ProfileCache(lambda name, version: profile if (name, version) == MODEL else None))
    while not go.is_set():
        consumer.step()
        report.put(("assigned", os.getpid(), sorted(p for _, p in consumer.partitions)))
        time.sleep(0.2)
    consumer.hold = False
    owned = sorted(consumer.partitions)  # (topic, partition)
    ends = {p: consumer.consumer.get_watermark_offsets(TopicPartition(*p), timeout=10)[1] for p in owned}
    consumer.consumer.resume([TopicPartition(*p) for p in owned])
    cpu, wall, threads = time.process_time(), time.perf_counter(), thread_cpu_s()
    before = sum(consumer.partitions[p].consumed for p in owned)
    while any(consumer.partitions[p].offset is None or consumer.partitions[p].offset < ends[p] for p in owned):
        consumer.step()
    n = sum(consumer.partitions[p].consumed for p in owned) - before
    main, other = (after - start for after, start in zip(thread_cpu_s(), threads, strict=True))
    report.put(("done", os.getpid(), {"events": n, "cpu_s": time.process_time() - cpu,
                                      "wall_s": time.perf_counter() - wall, "partitions": [p for _, p in owned],
                                      "other_threads_cpu_s": other, "main_thread_cpu_s": main}))
    consumer.close()


def drift_group(bootstrap: str, redis_address: str, topic: str, partitions: int, consumers: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    go, report = ctx.Event(), ctx.Queue()
    group = f"bench-drift-{uuid.uuid4().hex[:8]}"
    procs = [ctx.Process(target=drift_consumer, args=(bootstrap, redis_address, topic, group, go, report))
             for _ in range(consumers)]
    for p in procs:
        p.start()
    try:
        assigned: dict[int, list[int]] = {}
        stable_since = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until the group settled: every partition owned once
            kind, pid, parts = report.get(timeout=60)
            assigned[pid] = parts
            owned = sorted(p for ps in assigned.values() for p in ps)
            if len(assigned) == consumers and owned == list(range(partitions)):
                stable_since = stable_since or time.monotonic()
                if time.monotonic() - stable_since > 3:
                    break
            else:
                stable_since = None
        else:
            raise RuntimeError(f"drift consumers never split the partitions: {assigned}")
        started = time.perf_counter()
        go.set()
        results = []
        while len(results) < consumers:
            kind, pid, body = report.get(timeout=300)
            if kind == "done":
                results.append(body)
        wall = time.perf_counter() - started
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    n, cpu = sum(r["events"] for r in results), sum(r["cpu_s"] for r in results)
    other = sum(r["other_threads_cpu_s"] for r in results)
    return {"client": "confluent-kafka", "stage": "full", "consumers": consumers, "events": n, "cpu_s": cpu,
            "wall_s": wall, "split": [len(r["partitions"]) for r in results],
            "librdkafka_threads_share": other / max(1e-9, other + sum(r["main_thread_cpu_s"] for r in results))}


def _in_child(target, *args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(target, args)


STAGES = ("produce", "raw", "decode", "full")


def run(bootstrap: str, redis_address: str, n: int = 200_000, partitions: int = 4,
        stages: tuple[str, ...] = STAGES, consumer_counts: tuple[int, ...] = (1, 2)) -> list[dict]:
    """The whole comparison on an existing broker and Redis; prints the table and writes drift_kafka.json.
    (The confluent-kafka producer always runs: it fills the topic the consumers read.)"""
    from tools.services import create_topics

    topic = f"bench-clients-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, {topic: partitions, f"{topic}-scratch": partitions, f"{topic}-alerts": 1,
                              f"{topic}-dlq": 1})
    rows = [_in_child(produce_kafka_python, bootstrap, f"{topic}-scratch", n)] if "produce" in stages else []
    rows.append(_in_child(produce_confluent, bootstrap, topic, n))
    for decode in (False, True):
        if ("decode" if decode else "raw") in stages:
            rows.append(_in_child(consume_kafka_python, bootstrap, topic, n, decode))
            rows.append(_in_child(consume_confluent, bootstrap, topic, n, decode))
    for consumers in consumer_counts if "full" in stages else ():
        rows.append(drift_group(bootstrap, redis_address, topic, partitions, consumers))
    for r in rows:
        r["events_per_s"] = r["events"] / r["wall_s"]
        r["events_per_s_per_core"] = r["events"] / r["cpu_s"]
        r["partitions"] = partitions
        r["load_avg_1m"] = os.getloadavg()[0]
    print_table(f"Kafka clients on the real broker, {n} prediction events, {partitions} partitions "
                f"(per core = events / CPU s of the measured process)", rows, COLUMNS)
    print(f"wrote {write_results('drift_kafka', rows)}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.kafka_clients")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--stages", default=",".join(STAGES), help="of: produce,raw,decode,full")
    parser.add_argument("--consumers", default="1,2", help="drift consumer processes for the full stage")
    args = parser.parse_args(argv)
    from pathlib import Path

    from tools import services as svc

    run_dir = Path(".run/bench-kafka")
    svc.up(run_dir)
    try:
        state = svc.RunDir(run_dir).load()
        run(f"127.0.0.1:{state['kafka']['port']}", f"127.0.0.1:{state['redis']['port']}", args.events,
            args.partitions, tuple(args.stages.split(",")), tuple(int(c) for c in args.consumers.split(",")))
    finally:
        svc.down(run_dir, purge=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
