"""Row-level training/serving skew: the features a prediction was scored with (logged in its event) against
what Feast's offline store returns for the same customer at the same time — what training would have used.

A stale or broken materialisation, an online store written by something else, or a serving-side transform
that differs from training all show here row by row, where a drift test on distributions can miss them (the
values can be wrong and still look like the reference). Per store feature: the share of sampled rows that
differ beyond the tolerance, the largest absolute difference, and the rows the offline store has no value for.

    mlops-drift skew [--sample 500] [--tolerance 1e-6] [--threshold 0.01] [--json]

Exit codes: 0 no feature skewed (share of differing rows <= --threshold), 1 some feature skewed, 2 bad usage,
no events, or an unreachable broker or feature repo (one line on stderr).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pandas as pd
from confluent_kafka import Consumer, KafkaException, TopicPartition

from mlops.connections import bootstrap_config
from mlops.schema import ENTITY, STORE_FEATURES, TIMESTAMP


class Served(msgspec.Struct):
    """The part of a prediction event (mlops/events.py) the check reads."""

    timestamp: datetime
    features: dict[str, float]
    customer_id: str | None = None


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


def compare(events: list[Served], offline: pd.DataFrame, tolerance: float) -> list[FeatureSkew]:
    """``offline``: the store features of each event's customer at its time, in the events' order."""
    out = []
    for feature in STORE_FEATURES:
        logged = np.array([e.features.get(feature, np.nan) for e in events], dtype=np.float64)
        truth = offline[feature].to_numpy(dtype=np.float64)
        known = ~np.isnan(truth) & ~np.isnan(logged)
        diff = np.abs(logged[known] - truth[known])
        differ = diff > tolerance * np.maximum(1.0, np.abs(truth[known]))
        rows = int(known.sum())
        out.append(FeatureSkew(feature, rows, int(differ.sum()), float(differ.sum() / rows) if rows else 0.0,
                               float(diff.max()) if rows else 0.0, int((~np.isnan(logged) & np.isnan(truth)).sum())))
    return out


def check(connection: str | dict[str, Any], topic: str, repo: Path, redis_address: str, sample: int,
          tolerance: float) -> tuple[int, list[FeatureSkew]]:
    """The sampled events (those that name a customer) and the skew per store feature."""
    from lifecycle.offline import OfflineStoreError, features_as_of

    events = [e for e in latest_events(connection, topic, sample) if e.customer_id]
    if not events:
        raise SkewError(f"no prediction events with a {ENTITY} on {topic}")
    entities = pd.DataFrame({ENTITY: [e.customer_id for e in events],
                             TIMESTAMP: [e.timestamp.astimezone(UTC) for e in events]})
    try:
        offline = features_as_of(repo, entities, redis_address)
    except OfflineStoreError as exc:
        raise SkewError(str(exc)) from None
    return len(events), compare(events, offline, tolerance)


def as_dicts(skews: list[FeatureSkew]) -> list[dict[str, Any]]:
    return [asdict(s) for s in skews]
