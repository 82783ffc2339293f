"""The drift consumer counts each request_id once within its window (the prediction log delivers at least once).

A duplicate is the same event again: same bytes, so same key (partition) and same timestamp (slot); it can
arrive minutes later (a spooled copy replayed by a new producer). On the real broker and Redis: duplicates at
other offsets of the same partition, duplicates after a SIGKILLed consumer's partitions were resumed by another,
and after a rebalance moved partitions to a new consumer, are all counted once; distinct ids are all counted.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import pytest
import redis
from prometheus_client import REGISTRY

from mlops.profile import build_profile
from streaming.absorb import Absorber
from streaming.dedupe import request_hashes
from streaming.state_store import PartitionCheckpoint, SaveResult, StateStore
from streaming.window import SlotHistograms, WindowSpec
from tests.drift_support import (
    PARTITIONS,
    SHIFTED,
    TopicReader,
    Topics,
    checkpoints,
    consumed,
    make_events,
    new_topics,
    producer,
    wait_assigned,
)
from tests.support import Workspace, metric_value, start_consumer

KEY = ("fraud_detector", "v1", SHIFTED)


# -- the hash and the absorber, in process ----------------------------------------------------------------


def test_request_hashes_are_pinned_and_independent_of_the_batch():
    """The hashes are stored in checkpoints: a change would make every resumed consumer count its window twice."""
    pinned = {"": 0, "a": 0xA684059F2C86B622, "req-1": 0x67554DFD31403555, "é✓": 0x8316B29E986AD414}
    assert [int(h) for h in request_hashes(list(pinned))] == list(pinned.values())
    ids = [f"{i:032x}" for i in range(20_000)]
    alone = request_hashes(ids)
    padded = request_hashes([*ids, "x" * 300])  # a longer id in the batch widens the padding of every other
    assert alone.dtype == np.uint64 and (padded[:-1] == alone).all()
    assert len(np.unique(alone)) == len(ids)
    assert request_hashes(["ab"])[0] != request_hashes(["ba"])[0]


def _counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def _encoded(event: dict) -> bytes:
    return json.dumps(event).encode()


def test_absorber_counts_each_request_id_once_within_the_window():
    rng = np.random.default_rng(0)
    profile = build_profile("m", "v1", {"x": rng.normal(size=2000)}, rng.random(2000))
    spec = WindowSpec(slot_seconds=10, window_seconds=300)
    absorber = Absorber(lambda name, version: profile if (name, version) == ("m", "v1") else None, spec)
    now = time.time()

    def event(rid: str, age_s: float) -> bytes:
        ts = datetime.fromtimestamp(now - age_s, UTC).isoformat()
        return _encoded({"request_id": rid, "timestamp": ts, "model_name": "m", "model_version": "v1",
                         "features": {"x": 0.5}, "prediction": 0.3})

    states = {p: PartitionCheckpoint(0, 0, 0, SlotHistograms()) for p in (0, 1)}
    dups, late = _counter("mlops_drift_duplicate_events_total"), _counter("mlops_drift_late_events_total")
    first = [event(f"r{i}", 200) for i in range(100)]  # 200 s old: inside the 300 s window
    absorber.absorb([*first, first[0], first[1]], [0] * 102, states, now)  # two repeated within the poll
    absorber.absorb(first[50:] + [event(f"n{i}", 0) for i in range(30)], [0] * 80, states, now)
    absorber.absorb([event("r7", 0)], [0], states, now)  # same id, newer timestamp (a client's retry)
    absorber.absorb(first[:10], [1] * 10, states, now)  # another partition: its own ids
    absorber.absorb([event("old", 400)] * 2, [0, 0], states, now)  # late: not counted at all, nor remembered

    def total(p: int) -> int:
        return int(sum(c.sum() for c in states[p].windows.slots[("m", "v1", "x")].values()))

    assert (total(0), total(1)) == (130, 10)
    assert (states[0].consumed, states[1].consumed) == (132, 10)  # consumed includes the two late copies
    assert states[0].windows.id_count() == 130
    assert _counter("mlops_drift_duplicate_events_total") - dups == 2 + 50 + 1
    assert _counter("mlops_drift_late_events_total") - late == 2
    states[0].windows.expire(spec.first_slot(now + 150))  # the 200 s old slot leaves the window, with its ids
    assert states[0].windows.id_count() == 30


# -- the checkpoint in Redis ------------------------------------------------------------------------------


@pytest.mark.integration
def test_request_ids_are_checkpointed_appended_and_expired_with_their_slot(workspace):
    client = redis.Redis(port=workspace.settings.redis_port)
    store = StateStore(client, f"g-{time.monotonic_ns()}", "t")
    epoch, _ = store.claim(0)
    windows = SlotHistograms()
    mine = PartitionCheckpoint(offset=1, consumed=0, dead_lettered=0, windows=windows, epoch=epoch)

    def count(slot: int, ids: list[str]) -> None:
        windows.add(("m", "v1", "x"), slot, np.zeros(len(ids), dtype=np.int64), 3)
        windows.add_ids(slot, request_hashes(ids))

    count(100, ["a", "b"])
    count(101, ["c"])
    assert store.save({0: mine}) == SaveResult() and not windows.new_ids
    count(101, ["d", "e"])
    stored = f"{store.prefix}:ids:0"
    assert store.save({0: mine}) == SaveResult()
    assert len(client.hget(stored, "s:101")) == 3 * 8, "a save appends only the ids added since the last one"
    windows.expire(101)
    assert store.save({0: mine}) == SaveResult() and client.hkeys(stored) == [b"s:101"]
    _, resumed = store.claim(0)  # another consumer takes the partition over: it knows the ids counted
    names = np.array(["a", "c", "d", "e", "f"])
    hashes = request_hashes(names.tolist())
    order = np.argsort(hashes)
    seen = resumed.windows.seen(hashes[order], first_slot=0)
    assert sorted(names[order][seen].tolist()) == ["c", "d", "e"], "a expired with slot 100; f never counted"
    assert resumed.windows.id_count() == 3 and store.load(0).windows.id_count() == 3
    client.delete(*client.keys(f"{store.prefix}:*"))  # flushed: the re-seed writes the ids whole
    resumed.windows.mark_all_dirty()
    assert store.save({0: resumed}, reseed={0}) == SaveResult()
    assert len(client.hget(stored, "s:101")) == 3 * 8 and store.load(0).windows.id_count() == 3


# -- through the real broker ------------------------------------------------------------------------------


@pytest.fixture
def topics(workspace: Workspace) -> Topics:
    return new_topics(workspace)


def stamped_at(event: dict, age_s: float) -> bytes:
    """The event as the service wrote it, answered ``age_s`` seconds ago: a duplicate is these same bytes."""
    return json.dumps({**event, "timestamp": (datetime.now(UTC) - timedelta(seconds=age_s)).isoformat()}).encode()


def produce_raw(ws: Workspace, topic: str, raws: list[bytes]) -> None:
    p = producer(ws)
    for raw in raws:
        p.produce(topic, raw, key=json.loads(raw)["customer_id"].encode())
    assert p.flush(60) == 0


def read_through(ws: Workspace, topics: Topics, offsets: int, timeout: float = 90) -> None:
    """Until the checkpoints have read ``offsets`` messages in all."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(c.offset or 0 for c in checkpoints(ws, topics).values()) >= offsets:
            return
        time.sleep(0.3)
    pytest.fail(f"checkpoints at {sum(c.offset or 0 for c in checkpoints(ws, topics).values())} of {offsets}")


def window_total(ws: Workspace, topics: Topics) -> int:
    """Events in the histograms of one column, all partitions and slots."""
    return int(sum(c.sum() for ckpt in checkpoints(ws, topics).values()
                   for c in ckpt.windows.slots.get(KEY, {}).values()))


def scrape(consumer, name: str) -> float:
    return metric_value(httpx.get(f"http://127.0.0.1:{consumer.metrics_port}/metrics").text, name)


WIDE = ("--slot-seconds", "1", "--window-seconds", "600")


@pytest.mark.integration
@pytest.mark.slow
def test_duplicates_minutes_later_at_other_offsets_are_counted_once(workspace, topics):
    consumer = start_consumer(workspace, topics.env, "--group", topics.group, *WIDE)
    reader = TopicReader(workspace.settings.kafka_bootstrap, topics.predictions, PARTITIONS)
    try:
        wait_assigned(consumer)
        events = make_events(workspace, 650, seed=21)
        originals = [stamped_at(e, 300) for e in events[:200]] + [stamped_at(e, 0) for e in events[200:400]]
        between = [stamped_at(e, 0) for e in events[400:600]]
        late = [stamped_at(e, 700) for e in events[600:]]  # older than the 600 s window
        produce_raw(workspace, topics.predictions, originals)
        produce_raw(workspace, topics.predictions, between)
        produce_raw(workspace, topics.predictions, originals + late + late)  # the replayed copies
        read_through(workspace, topics, 1100)
        assert consumed(workspace, topics) == 600 + 100, "consumed: distinct in-window events, and late ones"
        assert window_total(workspace, topics) == 600
        assert scrape(consumer, "mlops_drift_duplicate_events_total") == 400
        assert scrape(consumer, "mlops_drift_late_events_total") == 100
        assert scrape(consumer, "mlops_drift_events_consumed_total") == 700
        ids = {p: sum(store_ids(workspace, topics, p)) for p in range(PARTITIONS)}
        assert sum(ids.values()) == 600, ids

        reader.poll(3.0)  # each duplicate sits in its original's partition, at a later offset
        for rid in (json.loads(raw)["request_id"] for raw in originals):
            where = [(p, i) for p, bodies in reader.by_partition.items() for i, b in enumerate(bodies)
                     if b["request_id"] == rid]
            assert len(where) == 2 and where[0][0] == where[1][0] and where[1][1] - where[0][1] >= 100, where
    finally:
        reader.close()
        consumer.stop()
    assert consumer.process.returncode == 0, consumer.log()[-3000:]


def store_ids(ws: Workspace, topics: Topics, partition: int) -> list[int]:
    """Ids held in the partition's Redis checkpoint, per slot."""
    ckpt = StateStore(redis.Redis(port=ws.settings.redis_port), topics.group, topics.predictions).load(partition)
    return [] if ckpt is None else [len(held) for held in ckpt.windows.ids.values()]


@pytest.mark.integration
@pytest.mark.slow
def test_duplicates_after_a_restart_and_a_takeover_are_counted_once(workspace, topics):
    events = make_events(workspace, 450, seed=22)
    first_sent = [stamped_at(e, 0) for e in events[:300]]
    more = [stamped_at(e, 0) for e in events[300:]]
    first = start_consumer(workspace, topics.env, "--group", topics.group, *WIDE)
    second = third = None
    try:
        wait_assigned(first)
        produce_raw(workspace, topics.predictions, first_sent)
        read_through(workspace, topics, 300)
        first.kill()  # SIGKILL: its partitions resume elsewhere from their Redis checkpoints, ids included
        assert sum(sum(store_ids(workspace, topics, p)) for p in range(PARTITIONS)) == 300

        produce_raw(workspace, topics.predictions, first_sent + more)
        second = start_consumer(workspace, topics.env, "--group", topics.group, *WIDE)
        read_through(workspace, topics, 750)
        assert (consumed(workspace, topics), window_total(workspace, topics)) == (450, 450)
        assert scrape(second, "mlops_drift_duplicate_events_total") == 300

        third = start_consumer(workspace, topics.env, "--group", topics.group, *WIDE)  # takes partitions over
        wait_assigned(third)
        time.sleep(3)  # let the group settle on its final assignment
        produce_raw(workspace, topics.predictions, first_sent + more)  # everything once more
        read_through(workspace, topics, 1200)
        assert (consumed(workspace, topics), window_total(workspace, topics)) == (450, 450)
        by_consumer = [scrape(c, "mlops_drift_duplicate_events_total") for c in (second, third)]
        assert sum(by_consumer) == 300 + 450 and by_consumer[1] > 0, by_consumer
        assert scrape(third, "mlops_drift_events_consumed_total") == 0
    finally:
        for c in (first, second, third):
            if c is not None:
                c.stop()
