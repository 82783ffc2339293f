"""Rolling windows as time-slotted histograms: memory bounded by slots x bins, whatever the traffic.

Each Kafka partition keeps, per (model name, model version, column), one count vector per time slot
(``slot_seconds`` wide, by event time). A window is the sum of the slots of the last ``window_seconds``,
optionally cut to the newest slots that hold ``max_events``. Summing the slots of all partitions gives
the topic-wide window, which is what alerts judge.

Checkpoints store one binary blob per slot (msgpack of little-endian int64 counts per key), and the
histograms remember which slots changed or expired since the last save, so a checkpoint per poll writes
only those (usually the current slot) instead of the whole window.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

Key = tuple[str, str, str]  # (model_name, model_version, column)


@dataclass(frozen=True)
class WindowSpec:
    slot_seconds: float = 10.0
    window_seconds: float = 300.0
    max_events: int | None = None

    @property
    def n_slots(self) -> int:
        return max(1, math.ceil(self.window_seconds / self.slot_seconds))

    def slot_of(self, timestamp: float) -> int:
        return int(timestamp // self.slot_seconds)

    def first_slot(self, now: float) -> int:
        return self.slot_of(now) - self.n_slots + 1


class SlotHistograms:
    """Per-key, per-slot counts for one partition, with the slots changed/expired since the last save."""

    def __init__(self) -> None:
        self.slots: dict[Key, dict[int, np.ndarray]] = defaultdict(dict)
        self.dirty: set[int] = set()
        self.dropped: set[int] = set()

    def add(self, key: Key, slot: int, bins: np.ndarray, n_bins: int) -> None:
        self.add_counts(key, slot, np.bincount(bins, minlength=n_bins).astype(np.int64))

    def add_counts(self, key: Key, slot: int, counts: np.ndarray) -> None:
        per_slot = self.slots[key]
        if slot in per_slot:
            per_slot[slot] += counts
        else:
            per_slot[slot] = counts.astype(np.int64, copy=True)
        self.dirty.add(slot)

    def expire(self, first_slot: int) -> None:
        """Forget slots that left every window (older than ``first_slot``)."""
        for key in list(self.slots):
            per_slot = self.slots[key]
            for slot in [s for s in per_slot if s < first_slot]:
                del per_slot[slot]
                self.dropped.add(slot)
                self.dirty.discard(slot)
            if not per_slot:
                del self.slots[key]

    def cells(self) -> int:
        return sum(len(c) for per_slot in self.slots.values() for c in per_slot.values())

    def slot_numbers(self) -> set[int]:
        return {slot for per_slot in self.slots.values() for slot in per_slot}

    def slot_blob(self, slot: int) -> bytes:
        """One slot of every key, for the checkpoint: msgpack {"name|version|column": int64 LE bytes}."""
        return _blob_encoder.encode({"|".join(key): per_slot[slot].astype("<i8").tobytes()
                                     for key, per_slot in self.slots.items() if slot in per_slot})

    def mark_saved(self, dirty: set[int], dropped: set[int]) -> None:
        """The slots in ``dirty``/``dropped`` were written: forget them (changes made since stay pending)."""
        self.dirty -= dirty
        self.dropped -= dropped

    def mark_all_dirty(self) -> None:
        self.dirty = self.slot_numbers()

    @classmethod
    def from_blobs(cls, blobs: dict[int, bytes]) -> SlotHistograms:
        h = cls()
        for slot, blob in blobs.items():
            for joined, raw in _blob_decoder.decode(blob).items():
                key = tuple(joined.split("|", 2))
                h.slots[key][slot] = np.frombuffer(raw, dtype="<i8").astype(np.int64)  # type: ignore[index]
        return h

    def to_json(self) -> dict[str, Any]:
        return {"|".join(key): {str(slot): c.tolist() for slot, c in per_slot.items()}
                for key, per_slot in self.slots.items()}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SlotHistograms:
        """The JSON form the first checkpoints used (read once when a consumer takes over an old one)."""
        h = cls()
        for joined, per_slot in body.items():
            key = tuple(joined.split("|", 2))
            h.slots[key] = {int(s): np.asarray(c, dtype=np.int64) for s, c in per_slot.items()}  # type: ignore[index]
        return h


_blob_encoder = msgspec.msgpack.Encoder()
_blob_decoder = msgspec.msgpack.Decoder(dict[str, bytes])


@dataclass
class Window:
    counts: np.ndarray
    first_slot: int
    last_slot: int

    @property
    def n(self) -> int:
        return int(self.counts.sum())


def merged_windows(parts: list[SlotHistograms], spec: WindowSpec, now: float) -> dict[Key, Window]:
    """The topic-wide window per key: slots of all partitions inside the window, summed."""
    first = spec.first_slot(now)
    by_key: dict[Key, dict[int, np.ndarray]] = defaultdict(dict)
    for part in parts:
        for key, per_slot in part.slots.items():
            acc = by_key[key]
            for slot, counts in per_slot.items():
                if slot < first:
                    continue
                acc[slot] = acc[slot] + counts if slot in acc else counts.copy()
    windows: dict[Key, Window] = {}
    for key, per_slot in by_key.items():
        if not per_slot:
            continue
        chosen: list[int] = []
        total = 0
        for slot in sorted(per_slot, reverse=True):  # newest first
            chosen.append(slot)
            total += int(per_slot[slot].sum())
            if spec.max_events is not None and total >= spec.max_events:
                break
        counts = np.sum([per_slot[s] for s in chosen], axis=0)
        windows[key] = Window(counts=counts, first_slot=min(chosen), last_slot=max(chosen))
    return windows
