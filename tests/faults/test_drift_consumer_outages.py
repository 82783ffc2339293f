"""The drift consumer through outages, on the real broker and Redis: kill -9 Kafka for a minute (the outcome join
running through it too), kill -9 Redis, SIGKILL the consumer, FLUSHALL its Redis, each while events keep coming.
Each time the consumer (the one not killed) survives, and once everything is back every acknowledged event is
counted exactly once (per partition, in the checkpoint's counter and in its window histograms) and the drift
alert fired exactly once. A partition taken over in Redis (fenced) must show in the metrics, not hide behind a
healthy lag."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import httpx
import pytest
import redis

from mlops import outcomes
from mlops.connections import redis_options
from streaming.join_store import JoinSettings, JoinStore
from tests.drift_support import (
    PARTITIONS,
    SHIFTED,
    Feeder,
    TopicReader,
    Topics,
    checkpoints,
    consumed,
    firing,
    make_events,
    new_topics,
    producer,
    store,
    wait_assigned,
    wait_consumed,
)
from tests.support import Workspace, metric_value, start_consumer
from tools import services as svc
from tools.feast_cli import feast

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

# A window long enough to keep every event of a test in the stored slots, so the histograms can be summed
# against the number produced; min_samples 500 and amounts x4: the alert fires once early in each test.
ARGS = ("--slot-seconds", "1", "--window-seconds", "900", "--max-events", "600")
ENV = {"MLOPS_DRIFT_BACKOFF_MAX_S": "1", "MLOPS_DRIFT_BATCH_SIZE": "2000"}
RATE = 150.0  # events/s from the feeder


@pytest.fixture
def topics(workspace: Workspace) -> Topics:
    return new_topics(workspace)


@pytest.fixture(scope="module")
def shifted_events(workspace: Workspace) -> list[dict]:
    return make_events(workspace, 1500, seed=11, amount_factor=4.0)


def metrics_of(consumer) -> str:
    return httpx.get(f"http://127.0.0.1:{consumer.metrics_port}/metrics", timeout=5).text


def wait_metric(consumer, name: str, predicate, timeout: float, what: str, labels: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate(metric_value(metrics_of(consumer), name, labels)):
            return
        time.sleep(0.5)
    pytest.fail(f"{what}: {name} = {metric_value(metrics_of(consumer), name, labels)}\n{consumer.log()[-3000:]}")


def assert_exactly_once(ws: Workspace, topics: Topics, feeder: Feeder, timeout: float = 120) -> None:
    """Every acknowledged event is in the topic once, and each partition's checkpoint reflects exactly its
    events: the counter, the offset and the sum of the window histograms."""
    assert not feeder.failed, f"{len(feeder.failed)} events failed delivery"
    delivered = set(feeder.delivered)
    assert len(delivered) == len(feeder.delivered) == len(feeder.sent)
    wait_consumed(ws, topics, len(delivered), timeout=timeout)
    time.sleep(2)  # a double count would show up as more, a little later
    reader = TopicReader(ws.settings.kafka_bootstrap, topics.predictions, PARTITIONS)
    try:
        deadline = time.monotonic() + 60
        while len(reader.messages) < len(delivered) and time.monotonic() < deadline:
            reader.poll(0.5)
    finally:
        reader.close()
    in_topic = [m["request_id"] for m in reader.messages]
    assert len(in_topic) == len(set(in_topic)) and set(in_topic) == delivered
    ckpts = checkpoints(ws, topics)
    for p in range(PARTITIONS):
        n = len(reader.by_partition[p])
        ckpt = ckpts[p]
        window_total = int(sum(c.sum() for c in ckpt.windows.slots[("fraud_detector", "v1", SHIFTED)].values()))
        assert (ckpt.consumed, ckpt.offset, window_total) == (n, n, n), f"partition {p}"
    assert consumed(ws, topics) == len(delivered)


def assert_one_alert(ws: Workspace, topics: Topics) -> None:
    alerts = TopicReader(ws.settings.kafka_bootstrap, topics.alerts)
    try:
        alerts.wait_for(lambda a: a["feature"] == SHIFTED and a["status"] == "firing", 30, "firing alert")
        alerts.poll(2.0)
    finally:
        alerts.close()
    messages = [a for a in alerts.messages if a["type"] == "drift_alert"]  # not the change points beside them
    seen = [(a["feature"], a["status"], a["previous_severity"], a["severity"]) for a in messages]
    assert len(firing(messages, SHIFTED)) == 1, seen
    assert not [a for a in messages if a["feature"] == SHIFTED and a["status"] == "resolved"], seen
    for feature in {a["feature"] for a in messages}:  # no alert twice: each one leaves the last state
        states = ["ok"] + [a["severity"] for a in messages if a["feature"] == feature]
        previous = [a["previous_severity"] for a in messages if a["feature"] == feature]
        assert previous == states[:-1] and all(a != b for a, b in zip(states, states[1:], strict=False)), seen


def outcomes_of(ids: list[str]) -> list[tuple[str, bytes]]:
    """An outcome (label 1) for each prediction, keyed by its request id."""
    now = datetime.now(UTC)
    return [(rid, outcomes.encode(outcomes.OutcomeEvent(request_id=rid, label=1, timestamp=now))) for rid in ids]


def test_broker_killed_for_a_minute_under_the_drift_consumer_and_the_outcome_join(workspace, services, topics,
                                                                                   shifted_events):
    """Both stream consumers of the runtime through one outage: the drift consumer counts every event once and
    alerts once; the join, fed outcomes before the outage (they wait for their predictions, which the feeder
    keeps producing through it) and after, joins every pair exactly once."""
    run_dir, _ = services
    outcomes_topic, join_dlq, join_group = f"{topics.predictions}-outcomes", f"{topics.dlq}-join", f"{topics.group}-j"
    svc.create_topics(workspace.settings.kafka_bootstrap, {outcomes_topic: PARTITIONS, join_dlq: 1,
                                                           f"{topics.alerts}-join": 1})
    consumer = start_consumer(workspace, {**topics.env, **ENV}, "--group", topics.group, *ARGS)
    joiner = start_consumer(workspace, {**topics.env, **ENV, "MLOPS_OUTCOMES_TOPIC": outcomes_topic,
                                        "MLOPS_OUTCOMES_DLQ_TOPIC": join_dlq, "MLOPS_QUALITY_GROUP_ID": join_group,
                                        "MLOPS_QUALITY_EVAL_INTERVAL_S": "0.5",  # its performance alerts apart:
                                        "MLOPS_ALERTS_TOPIC": f"{topics.alerts}-join"}, command="join")
    outcomes_producer = producer(workspace)

    def send_outcomes(ids: list[str]) -> None:
        for key, value in outcomes_of(ids):
            outcomes_producer.produce(outcomes_topic, value, key=key.encode())
        assert outcomes_producer.flush(60) == 0

    try:
        wait_assigned(consumer, joiner)
        with Feeder(workspace, topics.predictions, shifted_events, RATE) as feeder:
            wait_consumed(workspace, topics, 700)  # past min_samples: the alert fires before the outage
            before = list(feeder.delivered)
            send_outcomes(before)
            svc.down(run_dir, only="kafka", kill=True)
            down_at = time.monotonic()
            wait_metric(consumer, "mlops_drift_broker_connected", lambda v: v == 0, 30, "outage not noticed")
            wait_metric(joiner, "mlops_quality_broker_connected", lambda v: v == 0, 30, "outage not noticed (join)")
            time.sleep(max(0.0, 60 - (time.monotonic() - down_at)))
            assert consumer.process.poll() is None, consumer.log()[-3000:]
            assert joiner.process.poll() is None, joiner.log()[-3000:]
            svc.up(run_dir, only="kafka")
            wait_metric(consumer, "mlops_drift_broker_connected", lambda v: v == 1, 60, "no reconnect")
            wait_metric(joiner, "mlops_quality_broker_connected", lambda v: v == 1, 60, "no reconnect (join)")
            time.sleep(3)  # events keep coming after the restart
        assert_exactly_once(workspace, topics, feeder)
        assert_one_alert(workspace, topics)
        send_outcomes(sorted(set(feeder.delivered) - set(before)))
        join_store = JoinStore(redis.Redis(**redis_options(workspace.settings)), join_group, JoinSettings())
        deadline = time.monotonic() + 60
        while join_store.counts().get("joined", 0) < len(feeder.delivered) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # a pair counted twice would show up as more, a little later
        counts = join_store.counts()  # "outcomes_waiting": outcomes that came before their prediction, then joined
        assert {k: v for k, v in counts.items() if k != "outcomes_waiting"} == {"joined": len(feeder.delivered)}
        assert consumer.process.poll() is None, "the consumer died during the broker outage"
        assert joiner.process.poll() is None, "the join died during the broker outage"
    finally:
        svc.up(run_dir)  # whatever happened, leave the session's services running
        consumer.stop()
        joiner.stop()
    assert consumer.process.returncode == 0, consumer.log()[-3000:]
    assert joiner.process.returncode == 0, joiner.log()[-3000:]


def test_redis_killed_and_restarted_with_a_rebalance_meanwhile(workspace, services, topics, shifted_events):
    """Redis dies; a second consumer joins while it is down, so partitions change hands with no checkpoint to
    save or load: both wait, paused, and resume exactly from the checkpoints once Redis is back."""
    run_dir, _ = services
    consumer = start_consumer(workspace, {**topics.env, **ENV}, "--group", topics.group, *ARGS)
    joiner = None
    try:
        wait_assigned(consumer)
        with Feeder(workspace, topics.predictions, shifted_events, RATE) as feeder:
            wait_consumed(workspace, topics, 700)
            svc.down(run_dir, only="redis", kill=True)
            wait_metric(consumer, "mlops_drift_paused", lambda v: v == 1, 30, "did not stop advancing")
            failures = metric_value(metrics_of(consumer), "mlops_drift_checkpoint_failures_total")
            assert failures >= 1 and metric_value(metrics_of(consumer), "mlops_drift_checkpoint_store_up") == 0
            joiner = start_consumer(workspace, {**topics.env, **ENV}, "--group", topics.group, *ARGS)
            wait_assigned(joiner)
            assert "waiting for Redis" in joiner.log(), joiner.log()[-3000:]
            time.sleep(2)
            assert consumer.process.poll() is None, consumer.log()[-3000:]
            svc.up(run_dir, only="redis")
            for c in (consumer, joiner):
                wait_metric(c, "mlops_drift_paused", lambda v: v == 0, 30, "did not resume")
            time.sleep(2)
        assert_exactly_once(workspace, topics, feeder)
        assert_one_alert(workspace, topics)
        assert consumer.process.poll() is None, "the consumer died during the Redis outage"
        assert joiner.process.poll() is None, "the joining consumer died during the Redis outage"
        done = [metric_value(metrics_of(c), "mlops_drift_events_consumed_total") for c in (consumer, joiner)]
        assert min(done) > 0, done  # both read part of the stream
    finally:
        svc.up(run_dir)
        consumer.stop()
        if joiner is not None:
            joiner.stop()
    assert consumer.process.returncode == 0, consumer.log()[-3000:]
    assert joiner.process.returncode == 0, joiner.log()[-3000:]


def test_consumer_killed_and_restarted(workspace, topics, shifted_events):
    first = start_consumer(workspace, {**topics.env, **ENV}, "--group", topics.group, *ARGS)
    second = None
    try:
        wait_assigned(first)
        with Feeder(workspace, topics.predictions, shifted_events, RATE) as feeder:
            wait_consumed(workspace, topics, 700)
            first.kill()  # SIGKILL mid-stream: no last checkpoint, no commit, no leaving the group
            at_kill = consumed(workspace, topics)
            time.sleep(2)
            second = start_consumer(workspace, {**topics.env, **ENV}, "--group", topics.group, *ARGS)
            wait_assigned(second)
            time.sleep(2)
        assert 700 <= at_kill < len(feeder.delivered)
        assert_exactly_once(workspace, topics, feeder)
        assert_one_alert(workspace, topics)
        assert second.process.poll() is None, second.log()[-3000:]
    finally:
        first.kill()
        if second is not None:
            second.stop()
    assert second.process.returncode == 0, second.log()[-3000:]


def restore_online_store(ws: Workspace) -> None:
    """A FLUSHALL also empties Feast's online store: load it again (the restore command of docs/faults.md) so the tests
    after this one find their customers."""
    fmt = "%Y-%m-%dT%H:%M:%S"
    now = time.time()
    feast(ws.feature_repo, ws.env, "materialize", time.strftime(fmt, time.gmtime(now - 2 * 86_400)),
          time.strftime(fmt, time.gmtime(now)))


def test_checkpoint_store_flushed_under_load(workspace, services, topics, shifted_events):
    """`FLUSHALL` on the consumer's Redis (what a Redis restarted without its data looks like): the consumer tells
    the lost store from a takeover by another consumer, re-seeds its checkpoints and alert state from memory and
    keeps consuming. Every event is counted once, the alert that fired before the flush is not sent again, and
    the metrics never claim health while it cannot advance."""
    consumer = start_consumer(workspace, {**topics.env, **ENV}, "--group", topics.group, *ARGS)
    client = redis.Redis(host=workspace.settings.redis_host, port=workspace.settings.redis_port)
    alerts = TopicReader(workspace.settings.kafka_bootstrap, topics.alerts)
    try:
        wait_assigned(consumer)
        with Feeder(workspace, topics.predictions, shifted_events, RATE) as feeder:
            wait_consumed(workspace, topics, 700)
            alerts.wait_for(lambda a: a["feature"] == SHIFTED and a["status"] == "firing", 30, "firing alert")
            before = consumed(workspace, topics)
            client.flushall()
            flushed_at = len(feeder.delivered)
            # It keeps consuming: the events produced since the flush land in the (re-seeded) checkpoints.
            wait_consumed(workspace, topics, max(before, flushed_at) + 300, timeout=60)
            wait_metric(consumer, "mlops_drift_checkpoint_store_resets_total", lambda v: v >= 1, 30,
                        "the lost store was not reported")
        assert_exactly_once(workspace, topics, feeder)
        # Flushed again with no traffic: the next evaluation notices and puts everything back by itself.
        client.flushall()
        wait_metric(consumer, "mlops_drift_checkpoint_store_resets_total", lambda v: v >= 2, 30,
                    "a flush while idle was not noticed")
        wait_consumed(workspace, topics, len(feeder.delivered), timeout=30)
        assert_exactly_once(workspace, topics, feeder)
        assert store(workspace, topics).alerts.get(("fraud_detector", "v1", SHIFTED)) == "critical"
        assert_one_alert(workspace, topics)
        text = metrics_of(consumer)
        health = {name: metric_value(text, name) for name in
                  ("mlops_drift_paused", "mlops_drift_assigned_partitions", "mlops_drift_fenced_partitions")}
        assert health == {"mlops_drift_paused": 0, "mlops_drift_assigned_partitions": PARTITIONS,
                          "mlops_drift_fenced_partitions": 0}, health
        assert "taken over" not in consumer.log() and "re-seeded" in consumer.log(), consumer.log()[-3000:]
        assert consumer.process.poll() is None, "the consumer died after the flush"
    finally:
        alerts.close()
        consumer.stop()
        restore_online_store(workspace)
    assert consumer.process.returncode == 0, consumer.log()[-3000:]


def test_a_partition_taken_over_in_redis_shows_in_the_metrics(workspace, topics, shifted_events):
    """A real takeover (another consumer claimed the partition in Redis; here the test claims it) stops this
    consumer reading the partition until the group revokes it. Its metrics must say so (fenced, paused, one
    partition fewer assigned, that partition's lag growing) instead of looking healthy."""
    consumer = start_consumer(workspace, {**topics.env, **ENV}, "--group", topics.group, *ARGS)
    try:
        wait_assigned(consumer)
        with Feeder(workspace, topics.predictions, shifted_events, RATE):
            wait_consumed(workspace, topics, 300)
            store(workspace, topics).claim(0)
            wait_metric(consumer, "mlops_drift_fenced_partitions", lambda v: v == 1, 30, "takeover not reported")
            text = metrics_of(consumer)
            health = {name: metric_value(text, name)
                      for name in ("mlops_drift_paused", "mlops_drift_assigned_partitions")}
            assert health == {"mlops_drift_paused": 1, "mlops_drift_assigned_partitions": PARTITIONS - 1}, health
            lag = metric_value(text, "mlops_drift_consumer_lag", 'partition="0"')
            wait_metric(consumer, "mlops_drift_consumer_lag", lambda v: v >= lag + 30, 30, "the lag hid the stall",
                        labels='partition="0"')
        assert f"partition {topics.predictions}[0] was taken over" in consumer.log(), consumer.log()[-3000:]
        assert consumer.process.poll() is None, consumer.log()[-3000:]
    finally:
        consumer.stop()
    assert consumer.process.returncode == 0, consumer.log()[-3000:]
