"""The streaming drift consumer against real Kafka and Redis (and the real serving path)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import httpx
import numpy as np
import pytest
import redis

from mlops.schema import MODEL_FEATURES, STORE_FEATURES
from streaming.state_store import PartitionCheckpoint, SaveResult, StateStore
from streaming.window import SlotHistograms
from tests.drift_support import (
    SHIFTED,
    WINDOW_ARGS,
    TopicReader,
    Topics,
    consumed,
    firing,
    make_events,
    new_topics,
    produce,
    producer,
    sample_rows,
    wait_assigned,
    wait_consumed,
)
from tests.support import Workspace, metric_value, start_consumer, start_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def topics(workspace: Workspace) -> Topics:
    return new_topics(workspace)


def test_serving_traffic_shift_alerts_once_then_resolves(workspace, topics):
    server = start_server(workspace, topics.env)
    consumer = start_consumer(workspace, {**topics.env}, "--group", topics.group, *WINDOW_ARGS)
    alerts = TopicReader(workspace.settings.kafka_bootstrap, topics.alerts)

    def send(rows: list[dict]) -> None:
        for i in range(0, len(rows), 200):
            body = {"requests": [{"customer_id": r["customer_id"], "transaction_amount": float(r["transaction_amount"])}
                                 for r in rows[i:i + 200]]}
            r = httpx.post(f"{server.url}/predict_batch", json=body, timeout=60)
            assert r.status_code == 200, r.text

    try:
        send(sample_rows(workspace, 1200, seed=1))
        wait_consumed(workspace, topics, 1200)
        assert alerts.poll(2.0) == [], "reference-like traffic raised an alert"

        send(sample_rows(workspace, 1200, seed=2, amount_factor=4.0))
        alert = alerts.wait_for(lambda a: a["feature"] == SHIFTED and a["status"] == "firing", 60, "firing alert")
        wait_consumed(workspace, topics, 2400)
        alerts.poll(3.0)
        assert len(firing(alerts.messages, SHIFTED)) == 1, alerts.messages
        unshifted_inputs = set(MODEL_FEATURES) - {SHIFTED}
        assert not [a for a in alerts.messages if a["feature"] in unshifted_inputs and a["type"] == "drift_alert"], \
            alerts.messages
        assert alert["model_name"] == "fraud_detector" and alert["model_version"] == "v1"
        assert alert["severity"] == "critical" and alert["metric"] == "psi" and alert["value"] > 0.2
        assert alert["threshold"] == 0.2 and alert["sample_size"] >= 500 and alert["previous_severity"] == "ok"
        assert alert["window_start"] < alert["window_end"] and alert["scores"]["ks"] > 0.15

        send(sample_rows(workspace, 1800, seed=3))
        resolved = alerts.wait_for(lambda a: a["feature"] == SHIFTED and a["status"] == "resolved", 60,
                                   "resolved alert")
        assert resolved["severity"] == "ok" and resolved["previous_severity"] in ("warning", "critical")
        assert len(firing(alerts.messages, SHIFTED)) == 1

        wait_consumed(workspace, topics, 4200)  # the window can resolve before the last events are checkpointed
        text = httpx.get(f"http://127.0.0.1:{consumer.metrics_port}/metrics").text
        assert metric_value(text, "mlops_drift_events_consumed_total") == 4200
        assert metric_value(text, "mlops_drift_score", f'feature="{SHIFTED}",metric="psi"') >= 0
        assert metric_value(text, "mlops_drift_alerts_emitted_total", 'status="firing"') >= 1
        assert "mlops_drift_consumer_lag" in text
    finally:
        alerts.close()
        consumer.stop()
        server.stop()
    assert consumer.process.returncode == 0, consumer.log()[-3000:]


def test_killed_consumer_resumes_without_losing_or_double_counting(workspace, topics):
    events = make_events(workspace, 1500, seed=4) + make_events(workspace, 1500, seed=5, amount_factor=4.0)
    first = start_consumer(workspace, topics.env, "--group", topics.group, *WINDOW_ARGS)
    wait_assigned(first)
    produce(workspace, topics.predictions, events[:1750], pause=0.2)
    wait_consumed(workspace, topics, 1)  # (its first poll loads the reference profile, which can take seconds)
    first.kill()  # SIGKILL mid-stream: no chance to checkpoint or commit
    reflected_at_kill = consumed(workspace, topics)
    produce(workspace, topics.predictions, events[1750:], pause=0.2)
    second = start_consumer(workspace, topics.env, "--group", topics.group, *WINDOW_ARGS)
    alerts = TopicReader(workspace.settings.kafka_bootstrap, topics.alerts)
    try:
        wait_consumed(workspace, topics, len(events), timeout=90)
        time.sleep(3)
        assert consumed(workspace, topics) == len(events), "events counted twice after the restart"
        assert 0 < reflected_at_kill < len(events)
        alerts.wait_for(lambda a: a["feature"] == SHIFTED and a["status"] == "firing", 30, "firing alert")
        alerts.poll(2.0)
        assert len(firing(alerts.messages, SHIFTED)) == 1, alerts.messages
        store = StateStore(redis.Redis(port=workspace.settings.redis_port), topics.group, topics.predictions)
        latest = [a for a in alerts.messages if a["feature"] == SHIFTED][-1]
        assert store.alerts.get(("fraud_detector", "v1", SHIFTED)) == latest["severity"]
        assert [a["severity"] for a in alerts.messages if a["feature"] == SHIFTED] in (["critical"],
                                                                                      ["warning", "critical"])
    finally:
        alerts.close()
        second.stop()


def test_poison_messages_go_to_the_dead_letter_topic(workspace, topics):
    consumer = start_consumer(workspace, topics.env, "--group", topics.group, *WINDOW_ARGS)
    dlq = TopicReader(workspace.settings.kafka_bootstrap, topics.dlq)
    try:
        wait_assigned(consumer)
        good = make_events(workspace, 50, seed=6)
        unknown = {**good[0], "model_version": "v999"}
        missing = {k: v for k, v in good[1].items() if k != "prediction"}
        lacking = {**good[2], "features": {f: 1.0 for f in STORE_FEATURES}}
        poison = producer(workspace)
        now = datetime.now(UTC).isoformat()
        for raw in (b"{oops", json.dumps({**unknown, "timestamp": now}).encode(),
                    json.dumps({**missing, "timestamp": now}).encode(),
                    json.dumps({**lacking, "timestamp": now}).encode()):
            poison.produce(topics.predictions, raw)
        assert poison.flush(30) == 0
        produce(workspace, topics.predictions, good)
        wait_consumed(workspace, topics, 50)
        deadline = time.monotonic() + 30
        while len(dlq.poll(0.5)) < 4 and time.monotonic() < deadline:
            pass
        reasons = sorted(m["reason"] for m in dlq.messages)
        assert reasons == ["bad_json", "missing_field", "missing_field", "unknown_model_version"], dlq.messages
        assert all(m["raw"] and m["topic"] == topics.predictions for m in dlq.messages)
        assert consumed(workspace, topics) == 50
        assert consumer.process.poll() is None, "a poison message crashed the consumer"
        text = httpx.get(f"http://127.0.0.1:{consumer.metrics_port}/metrics").text
        assert metric_value(text, "mlops_drift_dead_letters_total") == 4
    finally:
        dlq.close()
        consumer.stop()


def test_two_consumers_share_partitions_and_alert_once(workspace, topics):
    a = start_consumer(workspace, topics.env, "--group", topics.group, *WINDOW_ARGS)
    b = start_consumer(workspace, topics.env, "--group", topics.group, *WINDOW_ARGS)
    alerts = TopicReader(workspace.settings.kafka_bootstrap, topics.alerts)
    try:
        wait_assigned(a, b)
        time.sleep(3)  # let the group settle on its final assignment
        events = make_events(workspace, 1500, seed=7, amount_factor=4.0)
        produce(workspace, topics.predictions, events, pause=0.1)
        wait_consumed(workspace, topics, len(events))
        alerts.wait_for(lambda m: m["feature"] == SHIFTED and m["status"] == "firing", 30, "firing alert")
        alerts.poll(3.0)
        assert len(firing(alerts.messages, SHIFTED)) == 1, alerts.messages
        assert consumed(workspace, topics) == len(events)
        counts = [metric_value(httpx.get(f"http://127.0.0.1:{c.metrics_port}/metrics").text,
                               "mlops_drift_events_consumed_total") for c in (a, b)]
        assert sum(counts) == len(events) and min(counts) > 0, counts  # both consumers did part of the work
    finally:
        alerts.close()
        a.stop()
        b.stop()


def test_a_rise_of_the_score_is_one_change_point_event_for_the_group(workspace, topics):
    """Two consumers run their own Page-Hinkley detectors on the same topic-wide windows; the Redis claim lets
    one ``drift_change_point`` per feature through."""
    env = {**topics.env, "MLOPS_DRIFT_CHANGE_MIN_EVALUATIONS": "4", "MLOPS_DRIFT_CHANGE_COOLDOWN_S": "600"}
    a = start_consumer(workspace, env, "--group", topics.group, *WINDOW_ARGS)
    b = start_consumer(workspace, env, "--group", topics.group, *WINDOW_ARGS)
    alerts = TopicReader(workspace.settings.kafka_bootstrap, topics.alerts)
    try:
        wait_assigned(a, b)
        produce(workspace, topics.predictions, make_events(workspace, 900, seed=11))
        wait_consumed(workspace, topics, 900)
        time.sleep(4)  # >= 4 evaluations (every 0.5 s) of the steady window per consumer
        assert not [m for m in alerts.poll(0.5) if m["feature"] == SHIFTED], alerts.messages
        produce(workspace, topics.predictions, make_events(workspace, 900, seed=12, amount_factor=4.0), pause=0.2)
        event = alerts.wait_for(lambda m: m["type"] == "drift_change_point" and m["feature"] == SHIFTED, 30,
                                "change point")
        alerts.poll(3.0)
        changes = [m for m in alerts.messages if m["type"] == "drift_change_point" and m["feature"] == SHIFTED]
        assert len(changes) == 1, changes
        assert (event["detector"], event["metric"], event["status"]) == ("page_hinkley", "psi", "info")
        assert event["scaled_value"] == pytest.approx(event["value"] / 0.2) and event["sample_size"] >= 500
        texts = [httpx.get(f"http://127.0.0.1:{c.metrics_port}/metrics").text for c in (a, b)]
        label = f'feature="{SHIFTED}"'
        assert sum(metric_value(t, "mlops_drift_change_point_events_total", label) for t in texts) == 1
        assert sum(metric_value(t, "mlops_drift_change_points_total", label) for t in texts) >= 1
    finally:
        alerts.close()
        a.stop()
        b.stop()


def test_checkpoints_are_incremental_atomic_and_fenced(workspace):
    """Real Redis: a save writes only changed/expired slots with the offset; a taken-over owner is refused."""
    client = redis.Redis(port=workspace.settings.redis_port)
    store = StateStore(client, f"g-{time.monotonic_ns()}", "t")
    epoch, ckpt = store.claim(0)
    assert ckpt is None and epoch == 1
    windows = SlotHistograms()
    for slot in (100, 101):
        windows.add(("m", "v1", "x"), slot, np.array([0, 1, 1]), 3)
    mine = PartitionCheckpoint(offset=10, consumed=6, dead_lettered=1, windows=windows, epoch=epoch)
    assert store.save({0: mine}) == SaveResult() and not windows.dirty
    windows.add(("m", "v1", "x"), 102, np.array([2]), 3)
    windows.expire(101)
    mine.offset, mine.consumed = 11, 7
    assert store.save({0: mine}) == SaveResult()
    assert sorted(client.hkeys(f"{store.prefix}:p:0")) == [b"meta", b"s:101", b"s:102"]
    loaded = store.load(0)
    assert (loaded.offset, loaded.consumed, loaded.dead_lettered) == (11, 7, 1)
    assert {s: c.tolist() for s, c in loaded.windows.slots[("m", "v1", "x")].items()} == {101: [1, 2, 0],
                                                                                         102: [0, 0, 1]}
    epoch2, taken = store.claim(0)  # another consumer takes the partition over
    assert epoch2 == 2 and taken.consumed == 7
    mine.consumed = 99
    windows.add(("m", "v1", "x"), 102, np.array([2]), 3)
    assert store.save({0: mine}) == SaveResult(fenced=[0]), "a fenced owner's save must be refused"
    assert store.load(0).consumed == 7
    assert store.partitions() == [0] and list(store.load_all()) == [0]
    legacy = PartitionCheckpoint(offset=5, consumed=5, dead_lettered=0, windows=SlotHistograms())
    legacy.windows.add(("m", "v1", "x"), 7, np.array([0, 0]), 3)
    client.set(f"{store.prefix}:ckpt:1", legacy.to_json())  # written by the first (JSON) checkpoint format
    _, upgraded = store.claim(1)
    assert upgraded.offset == 5 and upgraded.windows.dirty == {7}
    assert store.save({1: upgraded}) == SaveResult()
    assert store.load(1).windows.slots[("m", "v1", "x")][7].tolist() == [2, 0, 0]


def test_a_flushed_store_is_told_from_a_takeover_and_reseeded(workspace):
    """Real Redis: once the keys are gone (as after FLUSHALL) a save reports the partition lost, not fenced, and
    writes nothing; the owner's re-seed writes its whole checkpoint. A consumer that claims after the flush starts
    the epochs again at 1, and the owner token still fences the old owner holding that same epoch number."""
    client = redis.Redis(port=workspace.settings.redis_port)
    group = f"g-{time.monotonic_ns()}"
    mine_store, other_store = StateStore(client, group, "t"), StateStore(client, group, "t")
    epoch, _ = mine_store.claim(0)
    windows = SlotHistograms()
    for slot in (100, 101):
        windows.add(("m", "v1", "x"), slot, np.array([0, 1, 1]), 3)
    mine = PartitionCheckpoint(offset=10, consumed=6, dead_lettered=0, windows=windows, epoch=epoch)
    assert mine_store.save({0: mine}) == SaveResult()
    mine_store.alerts.transition(("m", "v1", "x"), "critical")

    client.delete(*client.keys(f"{mine_store.prefix}:*"))  # the group's keys gone, as after a FLUSHALL
    windows.add(("m", "v1", "x"), 101, np.array([2]), 3)
    mine.offset, mine.consumed = 11, 7
    assert mine_store.save({0: mine}) == SaveResult(lost=[0]) and windows.dirty == {101}
    assert client.exists(f"{mine_store.prefix}:p:0") == 0, "nothing is written for a lost partition"
    assert mine_store.alerts.stored(("m", "v1", "x")) is None
    assert mine_store.alerts.restore({("m", "v1", "x"): "critical", ("m", "v1", "y"): "ok"}) == 1
    assert mine_store.alerts.restore({("m", "v1", "x"): "warning"}) == 0, "a state written since is kept"
    assert mine_store.alerts.get(("m", "v1", "x")) == "critical"
    windows.mark_all_dirty()
    assert mine_store.save({0: mine}, reseed={0}) == SaveResult()
    loaded = mine_store.load(0)
    assert (loaded.offset, loaded.consumed) == (11, 7) and mine_store.partitions() == [0]
    assert {s: c.tolist() for s, c in loaded.windows.slots[("m", "v1", "x")].items()} == {100: [1, 2, 0],
                                                                                         101: [1, 2, 1]}

    client.delete(*client.keys(f"{mine_store.prefix}:*"))  # flushed again, and this time another consumer
    assert other_store.claim(0) == (1, None)  # claims the partition first: epochs restart at 1
    mine.epoch = 1  # the old owner holds the same epoch number; the token still tells them apart
    assert mine_store.save({0: mine}, reseed={0}) == SaveResult(fenced=[0]), "a takeover is never re-seeded over"
    assert mine_store.load(0) is None
