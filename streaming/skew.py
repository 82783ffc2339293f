"""Row-level training/serving skew: the features a prediction was scored with (logged in its event) against
what Feast's offline store returns for the same customer at the same time — what training would have used.

A stale or broken materialisation, an online store written by something else, or a serving-side transform
that differs from training all show here row by row, where a drift test on distributions can miss them (the
values can be wrong and still look like the reference). Per store feature: the share of sampled rows that
differ beyond the tolerance, the largest absolute difference, and the rows the offline store has no value for.

    mlops-drift skew [--sample 500] [--tolerance 1e-6] [--threshold 0.01] [--json] [--publish]
    mlops-drift skew --every 300 [--metrics-port 9110]

Exit codes: 0 no feature skewed (share of differing rows <= --threshold), 1 some feature skewed, 2 bad usage,
no events, or an unreachable broker or feature repo (one line on stderr).

``--publish`` (and every round of ``--every``) records the check (:class:`SkewRecorder`): the latest result in
Redis, read by ``mlops-drift report`` and ``mlops-drift quality``; the ``mlops_skew_*`` metrics; and a
``skew_alert`` on the alerts topic when a feature enters skew (share above the threshold over at least
``min_rows`` compared rows) or leaves it (share at most half the threshold), with the drift alerts' shared
compare-and-set state, so repeated or concurrent checks announce each change once.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pandas as pd
import redis
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from mlops.connections import bootstrap_config
from mlops.schema import ENTITY, STORE_FEATURES, TIMESTAMP
from streaming import metrics
from streaming.alert_state import AlertStates

log = logging.getLogger(__name__)


class Served(msgspec.Struct):
    """The part of a prediction event (mlops/events.py) the check reads."""

    timestamp: datetime
    features: dict[str, float]
    customer_id: str | None = None
    model_name: str = ""
    model_version: str = ""


_decoder = msgspec.json.Decoder(Served)


class SkewError(RuntimeError):
    """The check cannot run (no events, the broker or the feature repo unreachable): one line, exit 2."""


@dataclass
class FeatureSkew:
    feature: str
    rows: int  # sampled rows the offline store has a value for
    differing: int
    share: float
    max_abs_diff: float
    missing_offline: int  # sampled rows with no offline value within the ttl


def latest_events(connection: str | dict[str, Any], topic: str, n: int, timeout_s: float = 30.0) -> list[Served]:
    """The newest ``n`` events of the topic (about ``n / partitions`` from each), decodable ones only."""
    consumer = Consumer({**bootstrap_config(connection), "group.id": "mlops-skew", "enable.auto.commit": False,
                         "log_level": 2})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        if not partitions:
            raise SkewError(f"topic {topic} does not exist")
        per = max(1, -(-n // len(partitions)))
        ends = {}
        assigned = []
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
                assigned.append(TopicPartition(topic, p, max(low, high - per)))
        consumer.assign(assigned)
        raws: list[bytes | None] = []
        done: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(done) < len(ends) and time.monotonic() < deadline:
            for m in consumer.consume(1000, 0.5):
                if m.error() is None:
                    raws.append(m.value())
                    if m.offset() + 1 >= ends[m.partition()]:
                        done.add(m.partition())
    except KafkaException as exc:
        raise SkewError(f"cannot read {topic}: {exc}") from None
    finally:
        consumer.close()
    events = []
    for raw in raws:
        try:
            events.append(_decoder.decode(raw or b""))
        except msgspec.MsgspecError:
            continue  # the drift consumer dead-letters these
    return events


@dataclass
class SkewCheck:
    """One check: the skew per store feature, and per model version the largest share over the features."""

    sampled: int
    tolerance: float
    threshold: float
    features: list[FeatureSkew]
    versions: dict[str, float] = field(default_factory=dict)  # "name:version" -> largest share of differing rows
    checked_at: float = field(default_factory=time.time)

    @property
    def skewed(self) -> list[str]:
        return [f.feature for f in self.features if f.share > self.threshold]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skewed": self.skewed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SkewCheck:
        return cls(data["sampled"], data["tolerance"], data["threshold"],
                   [FeatureSkew(**f) for f in data["features"]], data.get("versions", {}), data["checked_at"])


def compare(events: list[Served], offline: pd.DataFrame, tolerance: float) -> tuple[list[FeatureSkew], np.ndarray]:
    """``offline``: the store features of each event's customer at its time, in the events' order. Also returns
    which rows differ (rows x features, False where the offline store has no value)."""
    out = []
    differs = np.zeros((len(events), len(STORE_FEATURES)), dtype=bool)
    for j, feature in enumerate(STORE_FEATURES):
        logged = np.array([e.features.get(feature, np.nan) for e in events], dtype=np.float64)
        truth = offline[feature].to_numpy(dtype=np.float64)
        known = ~np.isnan(truth) & ~np.isnan(logged)
        diff = np.abs(logged[known] - truth[known])
        differ = diff > tolerance * np.maximum(1.0, np.abs(truth[known]))
        differs[np.flatnonzero(known)[differ], j] = True
        rows = int(known.sum())
        out.append(FeatureSkew(feature, rows, int(differ.sum()), float(differ.sum() / rows) if rows else 0.0,
                               float(diff.max()) if rows else 0.0, int((~np.isnan(logged) & np.isnan(truth)).sum())))
    return out, differs


def check(connection: str | dict[str, Any], topic: str, repo: Path, redis_address: str, sample: int,
          tolerance: float, threshold: float = 0.01) -> SkewCheck:
    """The sampled events (those that name a customer) and the skew per store feature."""
    from mlops.offline import OfflineStoreError, features_as_of

    events = [e for e in latest_events(connection, topic, sample) if e.customer_id]
    if not events:
        raise SkewError(f"no prediction events with a {ENTITY} on {topic}")
    entities = pd.DataFrame({ENTITY: [e.customer_id for e in events],
                             TIMESTAMP: [e.timestamp.astimezone(UTC) for e in events]})
    try:
        offline = features_as_of(repo, entities, redis_address)
    except OfflineStoreError as exc:
        raise SkewError(str(exc)) from None
    features, differs = compare(events, offline, tolerance)
    versions = np.array([f"{e.model_name}:{e.model_version}" for e in events])
    shares = {}
    for version in sorted(set(versions.tolist())):
        rows = differs[versions == version]
        shares[version] = float(rows.mean(axis=0).max()) if len(rows) else 0.0
    return SkewCheck(len(events), tolerance, threshold, features, shares)


class SkewRecorder:
    """Keeps a check: the latest in Redis (``mlops:skew:<topic>:latest``), the metrics, and a ``skew_alert`` per
    feature that enters or leaves skew, published before the state change counts (a failed publish puts the
    state back, so the next check announces it again)."""

    def __init__(self, client: redis.Redis, topic: str, producer_config: dict[str, Any], alerts_topic: str,
                 min_rows: int) -> None:
        self.client = client
        self.prefix = f"mlops:skew:{topic}"
        self.alerts = AlertStates(client, self.prefix)
        self.producer = Producer({**producer_config, "log_level": 2})
        self.alerts_topic = alerts_topic
        self.min_rows = min_rows

    def record(self, result: SkewCheck) -> list[dict[str, Any]]:
        """Store, export and judge one check; returns the alerts published."""
        self.client.set(f"{self.prefix}:latest", json.dumps(result.as_dict()))
        metrics.SKEW_LAST_CHECK.set(result.checked_at)
        sent = []
        for f in result.features:
            metrics.SKEW_SHARE.labels(f.feature).set(f.share)
            metrics.SKEW_MAX_ABS_DIFF.labels(f.feature).set(f.max_abs_diff)
            metrics.SKEW_ROWS.labels(f.feature).set(f.rows)
            current = self.alerts.get((f.feature,))
            new = skew_state(current, f, result.threshold, self.min_rows)
            if new is not None and self.alerts.transition((f.feature,), new) is not None:
                alert = {"type": "skew_alert", "status": "resolved" if new == "ok" else "firing",
                         "feature": f.feature, "share": f.share, "threshold": result.threshold,
                         "max_abs_diff": f.max_abs_diff, "rows": f.rows, "differing": f.differing,
                         "missing_offline": f.missing_offline, "tolerance": result.tolerance, "severity": new,
                         "previous_severity": current, "versions": result.versions,
                         "timestamp": datetime.fromtimestamp(result.checked_at, UTC).isoformat()}
                if self._publish(alert):
                    sent.append(alert)
                    metrics.SKEW_ALERTS.labels(alert["status"]).inc()
                else:
                    self.alerts.revert((f.feature,), current)
                    new = current
            metrics.SKEW_STATE.labels(f.feature).set(0 if (new or current) == "ok" else 1)
        return sent

    def _publish(self, alert: dict[str, Any]) -> bool:
        failed: list[Any] = []
        try:
            self.producer.produce(self.alerts_topic, json.dumps(alert).encode(), key=alert["feature"].encode(),
                                  on_delivery=lambda err, _msg: failed.append(err) if err else None)
        except (BufferError, KafkaException) as exc:
            failed.append(exc)
        if self.producer.flush(15) or failed:
            log.error("could not publish the skew alert of %s (%s); the next check announces it again",
                      alert["feature"], failed or "timed out")
            return False
        log.info("skew alert: %s", alert)
        return True


def skew_state(current: str, feature: FeatureSkew, threshold: float, min_rows: int) -> str | None:
    """The new state, or None when it stays: ``warning`` above the threshold, ``ok`` again at half of it or
    below, judged only over ``min_rows`` compared rows or more."""
    if feature.rows < min_rows:
        return None
    if current == "ok" and feature.share > threshold:
        return "warning"
    if current != "ok" and feature.share <= threshold / 2:
        return "ok"
    return None


def latest(client: redis.Redis, topic: str) -> SkewCheck | None:
    """The last recorded check of the topic's predictions, if any."""
    raw = client.get(f"mlops:skew:{topic}:latest")
    return SkewCheck.from_dict(json.loads(raw)) if raw else None

