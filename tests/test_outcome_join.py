"""The outcome join (streaming/join.py, join_store.py, quality.py) on the real Redis and Kafka: outcomes early,
late, twice or never; a retried save and a zombie consumer applying nothing; realised metrics equal to
scikit-learn's on the same joined rows; the consumer end to end, and killed with -9 in the middle."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

import httpx
import numpy as np
import pytest
import redis
from sklearn.metrics import accuracy_score, brier_score_loss, f1_score, precision_score, recall_score, roc_auc_score

from mlops import outcomes
from mlops.connections import redis_options
from streaming import quality
from streaming.join import JoinConfig, JoinConsumer, judge, window_metrics
from streaming.join_store import JoinSettings, JoinStore
from streaming.model_files import ProfileCache
from tests.drift_support import TopicReader, producer
from tests.support import metric_value, start_consumer
from tools.services import create_topics

pytestmark = pytest.mark.integration
PREDS, OUTS = ("predictions", 0), ("prediction-outcomes", 0)
T0 = 1_790_000_000.0  # prediction times of the store tests (any fixed time: the slots are by prediction time)
VERSION = "fraud_detector:v1"


@pytest.fixture
def client(services, workspace):
    return redis.Redis(**redis_options(workspace.settings))


def new_store(client, group: str | None = None) -> JoinStore:
    return JoinStore(client, group or f"join-{uuid.uuid4().hex[:8]}", JoinSettings(slot_s=3600))


def pred(offset: int, rid: str, score: float, t: float = T0, calibrated: float | None = None,
         version: str = VERSION) -> list:
    return [offset, "P", rid, version, score, t, calibrated]


def outcome(offset: int, rid: str, label: int, t: float = T0 + 3600, value: float | None = None) -> list:
    return [offset, "O", rid, label, t, value]


def save(store: JoinStore, parts: dict, items: dict) -> None:
    for part, ckpt in parts.items():
        ckpt.items = list(items.get(part, []))
        if ckpt.items:
            ckpt.offset = ckpt.items[-1][0] + 1
    assert store.save({p: c for p, c in parts.items() if c.items}).fenced == []


def totals(store: JoinStore) -> tuple[dict, dict]:
    return store.counts(), quality.merge(store.slots().values())


def test_outcomes_early_late_twice_or_never_are_joined_once(client):
    store = new_store(client)
    parts = {PREDS: store.claim(PREDS), OUTS: store.claim(OUTS)}
    save(store, parts, {PREDS: [pred(0, "late", 0.9), pred(1, "never", 0.2), pred(2, "dup", 0.4)],
                        OUTS: [outcome(0, "early", 1)]})  # the outcome of "early" comes before its prediction
    save(store, parts, {PREDS: [pred(3, "early", 0.7), pred(4, "dup", 0.4)],  # a repeat of a prediction
                        OUTS: [outcome(1, "late", 1, value=80.0), outcome(2, "late", 0), outcome(3, "dup", 0)]})
    counts, sums = totals(store)
    assert counts == {"joined": 3, "duplicate_predictions": 1, "duplicate_outcomes": 1, "outcomes_waiting": 1}
    assert (sums["n"], sums["predictions"], sums["tp"], sums["tn"]) == (3, 4, 2, 1)  # "never" waits, unlabelled
    assert sums["value_tp"] == 80.0  # the first outcome of "late" counts; its repeat (label 0) does not
    assert client.ttl(f"{store.prefix}:x:never") > 6 * 86400  # the horizon: pending items expire


def test_a_retried_save_and_a_zombie_apply_nothing_twice(client):
    store = new_store(client)
    ckpt = store.claim(PREDS)
    items = [pred(0, "a", 0.9), outcome(1, "a", 1)]
    save(store, {PREDS: ckpt}, {PREDS: items})
    # The reply of that save was lost (the script ran): the consumer sends the same items again.
    save(store, {PREDS: ckpt}, {PREDS: items})
    assert store.counts() == {"joined": 1}
    # Another consumer takes the partition over; the old one (a zombie) is refused and writes nothing.
    store2 = JoinStore(client, store.prefix.rsplit(":", 1)[1], store.settings)
    assert store2.claim(PREDS).offset == 2  # the new owner resumes after what was saved
    ckpt.items, ckpt.offset = [pred(2, "b", 0.1), outcome(3, "b", 0)], 4
    assert store.save({PREDS: ckpt}).fenced == [PREDS] and store.counts() == {"joined": 1}


def test_realised_metrics_equal_scikit_learn_on_the_same_rows(client):
    rng = np.random.default_rng(7)
    n = 3000
    scores = np.clip(rng.beta(0.6, 3.0, n), 1e-6, 1 - 1e-6)
    labels = (rng.random(n) < np.clip(scores * 1.3, 0, 1)).astype(int)
    store = new_store(client)
    parts = {PREDS: store.claim(PREDS), OUTS: store.claim(OUTS)}
    offset = 0
    for start in range(0, n, 500):  # alternately the outcomes first and the predictions first
        rows = range(start, min(n, start + 500))
        p_items = [pred(offset + k, f"r{i}", float(scores[i]), T0 + i) for k, i in enumerate(rows)]
        o_items = [outcome(offset + k, f"r{i}", int(labels[i]), T0 + i + 60.0 * i) for k, i in enumerate(rows)]
        offset += len(rows)
        if start % 1000:
            save(store, parts, {OUTS: o_items})
            save(store, parts, {PREDS: p_items})
        else:
            save(store, parts, {PREDS: p_items, OUTS: o_items})
    got = window_metrics(store.slots(), store.settings.bins)[VERSION]["realised"]
    predicted = (scores >= 0.5).astype(int)
    assert got["labelled"] == got["predictions"] == n and got["label_coverage"] == 1.0
    for name, expected in (("accuracy", accuracy_score(labels, predicted)),
                           ("precision", precision_score(labels, predicted)),
                           ("recall", recall_score(labels, predicted)), ("f1", f1_score(labels, predicted)),
                           ("brier", brier_score_loss(labels, scores))):
        assert got[name] == pytest.approx(expected, abs=1e-9), name
    exact_auc = roc_auc_score(labels, scores)
    assert abs(got["auc"] - exact_auc) <= got["auc_error_bound"] + 1e-12 and got["auc_error_bound"] < 0.01
    bins = np.minimum(np.floor(scores * 10), 9)
    ece = sum(abs(scores[bins == b].sum() - labels[bins == b].sum()) for b in range(10)) / n
    assert got["ece"] == pytest.approx(ece, abs=1e-9)
    delays = 60.0 * np.arange(n)
    p50 = got["label_delay_p50_s"]
    assert p50 / 2 <= np.percentile(delays, 50) <= p50  # log2 bins: within a factor 2, reported as the upper edge


def test_the_estimate_tracks_a_covariate_shift_and_is_blind_to_a_concept_shift(client):
    """CBPE with calibrated scores: where the inputs move (scores towards the decision threshold, the labels
    still following the scores), the estimate falls with the realised accuracy, before any label; where only
    the relation of labels to inputs changes (labels flipped for the same scores), the estimate cannot see it
    and the realised accuracy does."""
    rng = np.random.default_rng(11)
    n = 4000
    phases = {"reference": rng.beta(0.5, 4.0, n), "covariate": rng.beta(2.0, 2.5, n),
              "concept": rng.beta(0.5, 4.0, n)}
    store = new_store(client)
    parts = {PREDS: store.claim(PREDS), OUTS: store.claim(OUTS)}
    offset = 0
    for phase, scores in phases.items():
        truth = 1 - scores if phase == "concept" else scores
        labels = (rng.random(n) < truth).astype(int)
        version = f"fraud_detector:{phase}"
        items_p = [pred(offset + i, f"{phase}{i}", float(s), T0, calibrated=float(s), version=version)
                   for i, s in enumerate(scores)]
        items_o = [outcome(offset + i, f"{phase}{i}", int(y)) for i, y in enumerate(labels)]
        offset += n
        save(store, parts, {PREDS: items_p})
        estimated_before_labels = window_metrics(store.slots(), store.settings.bins)[version]["estimated"]
        assert estimated_before_labels["predictions"] == n
        save(store, parts, {OUTS: items_o})
    table = window_metrics(store.slots(), store.settings.bins)
    real = {phase: table[f"fraud_detector:{phase}"]["realised"]["accuracy"] for phase in phases}
    est = {phase: table[f"fraud_detector:{phase}"]["estimated"]["accuracy"] for phase in phases}
    for phase in ("reference", "covariate"):
        assert est[phase] == pytest.approx(real[phase], abs=0.02), (phase, est, real)
    assert est["covariate"] < est["reference"] - 0.1  # the shift shows in the estimate
    assert est["concept"] == pytest.approx(est["reference"], abs=0.02)  # blind to the concept shift...
    assert real["concept"] < real["reference"] - 0.3  # ...which the realised accuracy shows
    auc = {phase: table[f"fraud_detector:{phase}"]["estimated"]["auc"] for phase in phases}
    real_auc = {phase: table[f"fraud_detector:{phase}"]["realised"]["auc"] for phase in phases}
    assert auc["reference"] == pytest.approx(real_auc["reference"], abs=0.03) and real_auc["concept"] < 0.5


def prediction_event(rid: str, score: float) -> bytes:
    return json.dumps({"request_id": rid, "timestamp": datetime.now(UTC).isoformat(), "model_name": "fraud_detector",
                       "model_version": "v1", "features": {"transaction_amount": 1.0}, "prediction": score,
                       "label": int(score >= 0.5)}).encode()


def outcome_event(rid: str, label: int) -> bytes:
    return outcomes.encode(outcomes.OutcomeEvent(request_id=rid, label=label, timestamp=datetime.now(UTC)))


def join_topics(workspace) -> tuple[str, str, str, str]:
    suffix = uuid.uuid4().hex[:8]
    names = (f"predictions-{suffix}", f"outcomes-{suffix}", f"outcomes-dlq-{suffix}", f"join-{suffix}")
    create_topics(workspace.settings.kafka_bootstrap, {names[0]: 3, names[1]: 3, names[2]: 1})
    return names


def send(workspace, topic: str, messages: list[tuple[str, bytes]]) -> None:
    p = producer(workspace)
    for key, value in messages:
        p.produce(topic, value, key=key.encode())
    assert p.flush(60) == 0


def wait_joined(store: JoinStore, n: int, timeout: float, step=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if step is not None:
            step()
        else:
            time.sleep(0.2)
        if store.counts().get("joined", 0) >= n:
            return store.counts()
    pytest.fail(f"joined {store.counts()} of {n} within {timeout:.0f}s")


def test_the_consumer_joins_across_topics_and_dead_letters_what_it_cannot_read(workspace, client):
    preds, outs, dlq, group = join_topics(workspace)
    rng = np.random.default_rng(3)
    ids = [uuid.uuid4().hex for _ in range(600)]
    scores = rng.random(600)
    labelled = [(r, outcome_event(r, int(s > 0.4))) for r, s in zip(ids[:500], scores, strict=False)]
    send(workspace, outs, labelled[:200])  # before their predictions
    send(workspace, preds, [(r, prediction_event(r, float(s))) for r, s in zip(ids, scores, strict=True)])
    send(workspace, outs, labelled[200:]
         + [(ids[0], outcome_event(ids[0], 0))]  # a repeat
         + [("bad", b"not json"), ("bad", b'{"request_id": "x", "label": 3, "timestamp": "2026-12-03T00:00:00Z"}')])
    settings = JoinSettings()
    consumer = JoinConsumer(JoinConfig(bootstrap=workspace.settings.kafka_bootstrap, predictions_topic=preds,
                                       outcomes_topic=outs, dlq_topic=dlq, group_id=group, join=settings,
                                       eval_interval_s=0.5, poll_timeout_s=0.2), JoinStore(client, group, settings))
    try:
        wait_joined(consumer.store, 500, 60, step=consumer.step)
        for _ in range(10):
            consumer.step()
    finally:
        consumer.close()
    counts = consumer.store.counts()
    assert counts["joined"] == 500 and counts["duplicate_outcomes"] == 1, counts
    got = consumer.last[VERSION]["realised"]
    assert got["labelled"] == 500 and got["predictions"] == 600
    labels, predicted = (scores[:500] > 0.4).astype(int), (scores[:500] >= 0.5).astype(int)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, predicted), abs=1e-9)
    reader = TopicReader(workspace.settings.kafka_bootstrap, dlq)
    deadline = time.monotonic() + 30
    while len(reader.poll(0.5)) < 2 and time.monotonic() < deadline:
        pass
    reader.close()
    letters = reader.messages
    assert {m["reason"] for m in letters} == {"bad_json", "bad_field"} and {m["topic"] for m in letters} == {outs}


def test_a_join_consumer_killed_mid_join_loses_nothing_and_counts_nothing_twice(workspace, client):
    preds, outs, dlq, group = join_topics(workspace)
    n = 10_000
    ids = [uuid.uuid4().hex for _ in range(n)]
    env = {"MLOPS_PREDICTIONS_TOPIC": preds, "MLOPS_OUTCOMES_TOPIC": outs, "MLOPS_OUTCOMES_DLQ_TOPIC": dlq,
           "MLOPS_QUALITY_GROUP_ID": group, "MLOPS_QUALITY_EVAL_INTERVAL_S": "0.5", "MLOPS_DRIFT_BATCH_SIZE": "500"}
    send(workspace, preds, [(r, prediction_event(r, 0.7)) for r in ids])
    send(workspace, outs, [(r, outcome_event(r, 1)) for r in ids])
    store = new_store(client, group)
    first = start_consumer(workspace, env, command="join")
    try:
        assert first.wait_assigned(60), first.log()[-2000:]
        deadline = time.monotonic() + 60
        while store.counts().get("joined", 0) < n // 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        first.kill()  # SIGKILL in the middle: saves done, offsets maybe not committed
        killed_at = store.counts().get("joined", 0)
        assert 0 < killed_at < n, f"the kill came too late to test anything ({killed_at} of {n} joined)"
    finally:
        first.kill()
    second = start_consumer(workspace, env, command="join")
    try:
        wait_joined(store, n, 120)
        time.sleep(2)  # anything counted twice would show now
        text = httpx.get(f"http://127.0.0.1:{second.metrics_port}/metrics", timeout=10).text
    finally:
        second.stop()
    counts = store.counts()  # "outcomes_waiting": outcomes read before their predictions (both topics are full
    # when the consumer starts; which one it fetches first is the broker's), then joined: neither lost nor twice
    assert {k: v for k, v in counts.items() if k != "outcomes_waiting"} == {"joined": n}, counts
    sums = quality.merge(store.slots().values())
    assert sums["n"] == sums["predictions"] == sums["tp"] == n
    assert second.process.returncode == 0, second.log()[-3000:]
    assert metric_value(text, "mlops_quality_join_totals", 'kind="joined"') == n


def test_a_second_join_consumer_takes_partitions_over_and_nothing_is_joined_twice(workspace, client):
    """The runtime's rebalance on the join: a second consumer of the group arrives mid-stream, partitions move
    to it with their checkpoints, both join part of the rest, and every pair is joined exactly once."""
    preds, outs, dlq, group = join_topics(workspace)
    env = {"MLOPS_PREDICTIONS_TOPIC": preds, "MLOPS_OUTCOMES_TOPIC": outs, "MLOPS_OUTCOMES_DLQ_TOPIC": dlq,
           "MLOPS_QUALITY_GROUP_ID": group, "MLOPS_QUALITY_EVAL_INTERVAL_S": "0.5", "MLOPS_DRIFT_BATCH_SIZE": "500"}
    first_half, second_half = [uuid.uuid4().hex for _ in range(3000)], [uuid.uuid4().hex for _ in range(3000)]
    store = new_store(client, group)
    first = start_consumer(workspace, env, command="join")
    second = None
    try:
        assert first.wait_assigned(60), first.log()[-2000:]
        send(workspace, preds, [(r, prediction_event(r, 0.7)) for r in first_half])
        send(workspace, outs, [(r, outcome_event(r, 1)) for r in first_half])
        wait_joined(store, len(first_half), 60)
        second = start_consumer(workspace, env, command="join")
        assert second.wait_assigned(60), second.log()[-2000:]
        time.sleep(3)  # let the group settle on its final assignment
        send(workspace, preds, [(r, prediction_event(r, 0.7)) for r in second_half])
        send(workspace, outs, [(r, outcome_event(r, 1)) for r in second_half])
        wait_joined(store, len(first_half) + len(second_half), 120)
        time.sleep(2)  # anything counted twice would show now
        texts = [httpx.get(f"http://127.0.0.1:{c.metrics_port}/metrics", timeout=10).text for c in (first, second)]
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert store.counts() == {"joined": 6000}, store.counts()
    reads = [metric_value(t, "mlops_quality_events_total", 'kind="prediction"') for t in texts]
    assert reads[0] >= len(first_half) and reads[1] > 0, reads  # both did part of it
    assert metric_value(texts[0], "mlops_quality_rebalances_total") >= 2  # assigned, then revoked/reassigned
    assert first.process.returncode == 0 and second.process.returncode == 0, (first.log()[-2000:],
                                                                              second.log()[-2000:])


def test_the_alert_state_enters_below_the_threshold_and_leaves_only_well_above_it():
    assert judge("ok", 0.86, 0.9, 0.05, "critical") is None  # 4.4 % below: not yet
    assert judge("ok", 0.85, 0.9, 0.05, "critical") == "critical"  # 5.6 % below
    assert judge("critical", 0.87, 0.9, 0.05, "critical") is None  # back within 5 %, not within 2.5 %: stays
    assert judge("critical", 0.88, 0.9, 0.05, "critical") == "ok"
    assert judge("ok", None, 0.9, 0.05, "warning") is None and judge("ok", 0.1, None, 0.05, "warning") is None


def test_a_performance_alert_fires_below_the_holdout_and_resolves_on_the_alerts_topic(workspace, client):
    preds, outs, dlq, group = join_topics(workspace)
    alerts = f"alerts-{group}"
    create_topics(workspace.settings.kafka_bootstrap, {alerts: 1})
    baseline = {"accuracy": 0.9, "auc": 0.9}
    consumer = JoinConsumer(
        JoinConfig(bootstrap=workspace.settings.kafka_bootstrap, predictions_topic=preds, outcomes_topic=outs,
                   dlq_topic=dlq, group_id=group, alerts_topic=alerts, min_labels=200),
        JoinStore(client, group, JoinSettings()), baselines=ProfileCache(lambda name, version: baseline))
    part = ("feed", 0)
    ckpt = consumer.store.claim(part)
    offset = 0
    now = time.time()

    def pairs(correct: int, wrong: int) -> None:
        nonlocal offset
        items = []
        for i in range(correct + wrong):
            rid = f"{group}-{offset}"
            items += [pred(offset, rid, 0.9, now), outcome(offset + 1, rid, int(i < correct), now + 60)]
            offset += 2
        save(consumer.store, {part: ckpt}, {part: items})

    reader = TopicReader(workspace.settings.kafka_bootstrap, alerts)
    try:
        def accuracy_alerts() -> list[dict]:
            consumer.evaluate()
            assert consumer.producer.flush(30) == 0
            return [m for m in reader.poll(1.0) if m["metric"] == "accuracy" and m["kind"] == "realised"]

        pairs(100, 90)  # 190 labels, accuracy 0.53: under the 200 the rule waits for
        assert accuracy_alerts() == []
        pairs(50, 60)  # 300 labels, accuracy 0.5
        fired = accuracy_alerts()
        assert [(a["status"], a["severity"], a["previous_severity"]) for a in fired] == [("firing", "critical", "ok")]
        assert fired[0]["value"] == pytest.approx(0.5) and fired[0]["baseline"] == 0.9
        assert fired[0]["sample_size"] == 300
        pairs(820, 0)  # 0.866: above the 5 % line, not above the 2.5 % one: still firing, nothing sent
        assert len(accuracy_alerts()) == 1
        pairs(2000, 0)  # 0.95
        resolved = accuracy_alerts()[1:]
        assert [(a["status"], a["severity"], a["previous_severity"]) for a in resolved] == [
            ("resolved", "ok", "critical")]
        assert len(accuracy_alerts()) == 2  # resolved once
    finally:
        reader.close()
        consumer.close()


def test_the_quality_command_shows_realised_estimated_and_holdout_per_version(workspace, client):
    """`mlops-drift quality --json` over the join's store: the window's pairs, the version's holdout metrics
    from its training run, and the table's columns."""
    import subprocess
    import sys

    group = f"join-{uuid.uuid4().hex[:8]}"
    store = JoinStore(client, group, JoinSettings())  # the command's own slot width
    parts = {PREDS: store.claim(PREDS), OUTS: store.claim(OUTS)}
    now = time.time()
    save(store, parts, {PREDS: [pred(i, f"r{i}", 0.9 if i % 2 else 0.1, now - 60) for i in range(10)],
                        OUTS: [outcome(i, f"r{i}", i % 2, now) for i in range(10)]})
    env = {**workspace.env, "MLOPS_QUALITY_GROUP_ID": group}
    run = subprocess.run([sys.executable, "-m", "streaming", "quality", "--json"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    versions = json.loads(run.stdout)["versions"]
    realised, holdout = versions[VERSION]["realised"], versions[VERSION]["holdout"]
    assert (realised["labelled"], realised["accuracy"]) == (10, 1.0)
    assert 0.5 < holdout["accuracy"] <= 1 and 0.5 < holdout["auc"] <= 1  # fraud_detector v1's training run
    table = subprocess.run([sys.executable, "-m", "streaming", "quality"], capture_output=True, text=True, env=env,
                           timeout=120).stdout
    assert "holdout accuracy" in table and "skew share" in table and VERSION in table
