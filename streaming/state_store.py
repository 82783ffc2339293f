"""Durable consumer state in Redis: per-partition checkpoints and the shared alert state.

A checkpoint holds a partition's window slots *and* the offset they reflect, written in one transaction,
so a restarted (or rebalanced) consumer resumes exactly there: nothing lost, nothing counted twice.
The alert state per (model, version, feature) is shared by all consumers of the group and changed with
a compare-and-set, so one state change makes one alert however many consumers see it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis

from streaming.window import SlotHistograms

CAS_SCRIPT = """
local current = redis.call('GET', KEYS[1]) or 'ok'
if current == ARGV[1] then return false end
redis.call('SET', KEYS[1], ARGV[1])
return current
"""


@dataclass
class PartitionCheckpoint:
    offset: int | None  # next offset to read (None: not known yet for a brand-new group)
    consumed: int  # events reflected in the windows (valid ones)
    dead_lettered: int
    windows: SlotHistograms

    def to_json(self) -> str:
        return json.dumps({"offset": self.offset, "consumed": self.consumed, "dead_lettered": self.dead_lettered,
                           "windows": self.windows.to_json()}, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> PartitionCheckpoint:
        body = json.loads(raw)
        return cls(int(body["offset"]), int(body["consumed"]), int(body.get("dead_lettered", 0)),
                   SlotHistograms.from_json(body["windows"]))


class StateStore:
    def __init__(self, client: redis.Redis, group: str, topic: str) -> None:
        self.client = client
        self.prefix = f"mlops:drift:{group}:{topic}"
        self._cas = client.register_script(CAS_SCRIPT)

    def _ckpt_key(self, partition: int) -> str:
        return f"{self.prefix}:ckpt:{partition}"

    def _alert_key(self, model: str, version: str, column: str) -> str:
        return f"{self.prefix}:alert:{model}:{version}:{column}"

    def save(self, checkpoints: dict[int, PartitionCheckpoint]) -> None:
        if not checkpoints:
            return
        with self.client.pipeline(transaction=True) as pipe:
            for partition, ckpt in checkpoints.items():
                pipe.set(self._ckpt_key(partition), ckpt.to_json())
            pipe.execute()

    def load(self, partition: int) -> PartitionCheckpoint | None:
        raw = self.client.get(self._ckpt_key(partition))
        return PartitionCheckpoint.from_json(raw) if raw else None

    def load_all(self, partitions: list[int]) -> dict[int, PartitionCheckpoint]:
        raws = self.client.mget([self._ckpt_key(p) for p in partitions]) if partitions else []
        return {p: PartitionCheckpoint.from_json(raw) for p, raw in zip(partitions, raws, strict=True) if raw}

    def alert_state(self, model: str, version: str, column: str) -> str:
        raw = self.client.get(self._alert_key(model, version, column))
        return raw.decode() if raw else "ok"

    def transition(self, model: str, version: str, column: str, severity: str) -> str | None:
        """Set the alert state; returns the previous state if it changed, None if it already was that."""
        previous = self._cas(keys=[self._alert_key(model, version, column)], args=[severity])
        return previous.decode() if isinstance(previous, bytes) else previous or None

    def revert(self, model: str, version: str, column: str, severity: str) -> None:
        self.client.set(self._alert_key(model, version, column), severity)
