"""What a batch job reads, cut into partitions: the unit of work, of progress and of resuming.

A Parquet partition is a slice of at most ``partition_rows`` rows of one row group of one file (read in chunks,
so a large row group does not need its size in memory, and a file of one big row group still spreads over
many workers); a prediction-log partition is a range of offsets of one Kafka partition, fixed when
the job is planned (a time range is turned into offsets once, so a resumed job reads the same events).
Partition keys name the output files and depend only on the input, so a job run again finds its own output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from mlops.schema import ENTITY, REQUEST_FEATURES, STORE_FEATURES, TIMESTAMP

REQUIRED = (ENTITY, TIMESTAMP, *REQUEST_FEATURES)
# A prediction-log row's columns, the same in every chunk (an unreadable event fills only the first two).
LOG_COLUMNS = ("log_offset", "log_error", "request_id", ENTITY, TIMESTAMP, "served_version", "served_prediction",
               *REQUEST_FEATURES, *(f"logged_{name}" for name in STORE_FEATURES))


class BatchInputError(ValueError):
    """The input cannot be scored at all (missing, unreadable, lacking columns): nothing is written."""


@dataclass(frozen=True)
class Partition:
    key: str
    rows: int  # rows (Parquet) or offsets (Kafka) it holds: the progress bar's unit
    path: str = ""
    row_group: int = -1
    first: int = 0  # Parquet: the slice's first row in its row group
    topic: str = ""
    kafka_partition: int = -1
    start: int = 0  # Kafka offsets [start, end)
    end: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if files:
            return files
        raise BatchInputError(f"no .parquet files under {path}")
    raise BatchInputError(f"no input at {path}")


def parquet_partitions(path: Path, partition_rows: int = 250_000) -> list[Partition]:
    """Slices of the row groups; every file must hold the columns a prediction needs."""
    import pyarrow.parquet as pq

    partitions = []
    for i, file in enumerate(parquet_files(path)):
        try:
            meta = pq.ParquetFile(file).metadata
        except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
            raise BatchInputError(f"{file} is not a readable Parquet file: {exc}") from None
        names = set(meta.schema.names)
        missing = [c for c in REQUIRED if c not in names]
        if missing:
            raise BatchInputError(f"{file} lacks the column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                                  f"(a row needs {', '.join(REQUIRED)})")
        for rg in range(meta.num_row_groups):
            size = meta.row_group(rg).num_rows
            partitions += [Partition(key=f"{i:05d}-{rg:05d}-{first:010d}", rows=min(partition_rows, size - first),
                                     path=str(file), row_group=rg, first=first)
                           for first in range(0, size, partition_rows)]
    return partitions


def read_parquet(partition: Partition, chunk_rows: int) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    file = pq.ParquetFile(partition.path)
    start, stop, at = partition.first, partition.first + partition.rows, 0
    for batch in file.iter_batches(batch_size=chunk_rows, row_groups=[partition.row_group]):
        if at + len(batch) > start:
            yield batch.slice(max(0, start - at), stop - max(at, start)).to_pandas()
        at += len(batch)
        if at >= stop:
            return


def log_partitions(kafka: dict[str, Any], topic: str, since: datetime, until: datetime,
                   chunk_offsets: int) -> list[Partition]:
    """The offsets of the events logged in [since, until) on every partition of ``topic``, in chunks."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer({**kafka, "group.id": "mlops-score-plan", "enable.auto.commit": False, "log_level": 2})
    try:
        try:
            meta = consumer.list_topics(topic, timeout=30)
        except KafkaException as exc:
            raise BatchInputError(f"cannot reach Kafka at {kafka.get('bootstrap.servers')}: {exc}") from None
        found = meta.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            raise BatchInputError(f"no topic {topic!r} on {kafka.get('bootstrap.servers')}")
        partitions = []
        for p in sorted(found.partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
            start, end = (_offset_at(consumer, topic, p, t, high) for t in (since, until))
            start = max(start, low)
            for first in range(start, end, chunk_offsets):
                last = min(first + chunk_offsets, end)
                partitions.append(Partition(key=f"{topic}-{p:03d}-{first:012d}", rows=last - first, topic=topic,
                                            kafka_partition=p, start=first, end=last))
        return partitions
    finally:
        consumer.close()


def _offset_at(consumer, topic: str, partition: int, at: datetime, high: int) -> int:
    """The first offset logged at or after ``at``; the end of the partition when none is."""
    from confluent_kafka import TopicPartition

    found = consumer.offsets_for_times([TopicPartition(topic, partition, int(at.timestamp() * 1000))], timeout=30)[0]
    return high if found.offset < 0 else found.offset


def read_log(partition: Partition, kafka: dict[str, Any], chunk_rows: int,
             stall_s: float = 60.0) -> Iterator[pd.DataFrame]:
    """The partition's events as rows: what was asked (customer, time, amount), the store features it was
    served with (``logged_*``) and what Production answered (``served_*``). Unreadable events are rows with a
    ``log_error``, so they are rejected and counted, never skipped."""
    from mlops import events

    return read_range(partition, kafka, chunk_rows, lambda raw, offset: log_row(raw, offset, events), LOG_COLUMNS,
                      stall_s)


def read_range(partition: Partition, kafka: dict[str, Any], chunk_rows: int,
               row: Callable[[bytes | None, int], dict[str, Any]], columns: Sequence[str],
               stall_s: float = 60.0) -> Iterator[pd.DataFrame]:
    """The partition's offsets read exactly, as frames of ``row(value, offset)`` (``columns``, in every chunk)."""
    import time

    from confluent_kafka import Consumer, KafkaError, TopicPartition

    consumer = Consumer({**kafka, "group.id": "mlops-score", "enable.auto.commit": False, "log_level": 2,
                         "enable.partition.eof": True})
    consumer.assign([TopicPartition(partition.topic, partition.kafka_partition, partition.start)])
    rows: list[dict[str, Any]] = []
    offset, progress_at = partition.start, time.monotonic()
    try:
        while offset < partition.end:
            messages = consumer.consume(min(chunk_rows, 10_000), timeout=1.0)
            if messages:
                progress_at = time.monotonic()
            elif time.monotonic() - progress_at > stall_s:
                raise TimeoutError(f"{partition.key}: no event from Kafka for {stall_s:.0f} s at offset {offset}")
            for message in messages:
                error = message.error()
                if error is not None and error.code() == KafkaError._PARTITION_EOF:
                    if message.offset() < partition.end:  # (offsets past the last event: transaction markers)
                        raise BatchInputError(f"{partition.key}: the log ends at offset {message.offset()}, before "
                                              f"{partition.end}")
                    offset = partition.end
                    break
                if error is not None:
                    raise BatchInputError(f"{partition.key}: {error}")
                if message.offset() >= partition.end:
                    offset = partition.end
                    break
                offset = message.offset() + 1
                rows.append(row(message.value(), message.offset()))
                if len(rows) >= chunk_rows:
                    yield pd.DataFrame(rows, columns=list(columns))
                    rows = []
        if rows:
            yield pd.DataFrame(rows, columns=list(columns))
    finally:
        consumer.close()


def log_row(raw: bytes | None, offset: int, events) -> dict[str, Any]:
    try:
        event = events.decode(raw or b"")
    except Exception as exc:  # msgspec's DecodeError/ValidationError: one reject row, the job goes on
        return {"log_offset": offset, "log_error": f"unreadable event: {exc}"}
    row: dict[str, Any] = {"log_offset": offset, "request_id": event.request_id, ENTITY: event.customer_id,
                           TIMESTAMP: event.timestamp,
                           "served_version": event.model_version, "served_prediction": event.prediction}
    for name in REQUEST_FEATURES:
        row[name] = event.features.get(name)
    for name in STORE_FEATURES:
        row[f"logged_{name}"] = event.features.get(name)
    return row
