"""The outcome join through the real broker and Redis: joined pairs per second and per CPU second (the
consumer's process and Redis's, where the join script runs), and Redis memory per pending prediction.

    python -m bench.join [--pairs 200000] [--pending 100000] [--name join]

One join consumer (`streaming.join.JoinConsumer`, checkpoint per poll) reads ``--pairs`` predictions and
their outcomes, already on 3-partition topics, to the end; CPU is read from /proc for both processes. Then
``--pending`` predictions without outcomes are joined and Redis's ``used_memory`` before and after gives the
bytes each pending prediction holds until its outcome comes or the horizon ends (and what 1,000 predictions/s
for 7 days would hold).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import redis
from confluent_kafka import Producer

from bench.common import print_table, write_results
from mlops import events, outcomes
from streaming.join import JoinConfig, JoinConsumer
from streaming.join_store import JoinSettings, JoinStore


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_pid(client: redis.Redis) -> int:
    return int(client.info("server")["process_id"])


def produce(bootstrap: str, topic: str, values: list[tuple[str, bytes]]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "lz4",
                  "queue.buffering.max.messages": 1_000_000, "acks": "all", "enable.idempotence": True})
    for key, value in values:
        while True:
            try:
                p.produce(topic, value, key=key.encode())
                break
            except BufferError:
                p.poll(0.1)
    assert p.flush(120) == 0


def prediction(rid: str, score: float, now: datetime) -> bytes:
    return events.encode(events.PredictionEvent(
        request_id=rid, timestamp=now, model_name="fraud_detector", model_version="v1", customer_id="C000001",
        features={"total_purchases": 3.0, "avg_order_value": 50.0, "days_since_last_order": 2.0,
                  "lifetime_value": 150.0, "transaction_amount": 40.0}, prediction=score, label=int(score >= 0.5)))


def join_until(consumer: JoinConsumer, store: JoinStore, target: int, counter: str) -> float:
    started = time.perf_counter()
    while store.counts().get(counter, 0) < target:
        for _ in range(20):
            consumer.step()
    return time.perf_counter() - started


def run(bootstrap: str, client: redis.Redis, pairs: int, pending: int) -> list[dict]:
    from tools.services import create_topics

    suffix = uuid.uuid4().hex[:8]
    preds, outs = f"bench-join-p-{suffix}", f"bench-join-o-{suffix}"
    create_topics(bootstrap, {preds: 3, outs: 3})
    now = datetime.now(UTC)
    ids = [uuid.uuid4().hex for _ in range(pairs)]
    produce(bootstrap, preds, [(r, prediction(r, (i % 100) / 100, now)) for i, r in enumerate(ids)])
    produce(bootstrap, outs, [(r, outcomes.encode(outcomes.OutcomeEvent(request_id=r, label=i % 2, timestamp=now)))
                              for i, r in enumerate(ids)])
    group = f"bench-join-{suffix}"
    settings = JoinSettings()
    store = JoinStore(client, group, settings)
    consumer = JoinConsumer(JoinConfig(bootstrap=bootstrap, predictions_topic=preds, outcomes_topic=outs,
                                       dlq_topic=f"{outs}-dlq", group_id=group, join=settings,
                                       eval_interval_s=5.0, poll_timeout_s=0.1), store)
    rpid = redis_pid(client)
    while not consumer.partitions:  # the group's first assignment
        consumer.step()
    cpu, rcpu = time.process_time(), proc_cpu_s(rpid)
    wall = join_until(consumer, store, pairs, "joined")
    cpu, rcpu = time.process_time() - cpu, proc_cpu_s(rpid) - rcpu
    rows = [{"measure": "join", "pairs": pairs, "events": 2 * pairs, "wall_s": round(wall, 2),
             "pairs_per_s": round(pairs / wall), "consumer_cpu_s": round(cpu, 2), "redis_cpu_s": round(rcpu, 2),
             "pairs_per_cpu_s": round(pairs / (cpu + rcpu)),
             "pairs_per_consumer_cpu_s": round(pairs / cpu)}]
    # Memory: predictions that wait for their outcome.
    client.execute_command("MEMORY", "PURGE")
    before = client.info("memory")["used_memory"]
    lonely = [uuid.uuid4().hex for _ in range(pending)]
    produce(bootstrap, preds, [(r, prediction(r, 0.3, now)) for r in lonely])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and sum(client.exists(f"{store.prefix}:x:{r}") for r in lonely[-10:]) < 10:
        for _ in range(20):
            consumer.step()
    for _ in range(50):
        consumer.step()
    after = client.info("memory")["used_memory"]
    per = (after - before) / pending
    sample = client.memory_usage(f"{store.prefix}:x:{lonely[0]}") or 0
    rows.append({"measure": "pending", "pending": pending, "bytes_per_pending": round(per, 1),
                 "memory_usage_one_key": sample,
                 "gib_for_1000_per_s_7_days": round(per * 1000 * 7 * 86400 / 2**30, 1)})
    consumer.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.join", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200_000)
    parser.add_argument("--pending", type=int, default=100_000)
    parser.add_argument("--name", default="join")
    args = parser.parse_args(argv)
    from tools import services as svc

    run_dir = Path(".run/bench-join")
    svc.up(run_dir)
    try:
        state = svc.RunDir(run_dir).load()
        rows = run(f"127.0.0.1:{state['kafka']['port']}", redis.Redis(port=state["redis"]["port"]), args.pairs,
                   args.pending)
    finally:
        svc.down(run_dir, purge=True)
    print_table("Outcome join through Kafka and Redis (one consumer)", rows[:1],
                ["pairs", "wall_s", "pairs_per_s", "consumer_cpu_s", "redis_cpu_s", "pairs_per_cpu_s"])
    print_table("Join state per pending prediction (Redis used_memory)", rows[1:],
                ["pending", "bytes_per_pending", "memory_usage_one_key", "gib_for_1000_per_s_7_days"])
    print(f"wrote {write_results(args.name, rows, vars(args))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
