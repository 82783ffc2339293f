"""Rolling windows as time-slotted histograms: memory bounded by slots x bins, whatever the traffic.

Each Kafka partition keeps, per (model name, model version, column), one count vector per time slot
(``slot_seconds`` wide, by event time). A window is the sum of the slots of the last ``window_seconds``,
optionally cut to the newest slots that hold ``max_events``. Summing the slots of all partitions gives
the topic-wide window, which is what alerts judge.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

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
    """Per-key, per-slot counts for one partition."""

    def __init__(self) -> None:
        self.slots: dict[Key, dict[int, np.ndarray]] = defaultdict(dict)

    def add(self, key: Key, slot: int, bins: np.ndarray, n_bins: int) -> None:
        counts = np.bincount(bins, minlength=n_bins).astype(np.int64)
        per_slot = self.slots[key]
        if slot in per_slot:
            per_slot[slot] += counts
        else:
            per_slot[slot] = counts

    def expire(self, first_slot: int) -> None:
        """Forget slots that left every window (older than ``first_slot``)."""
        for key in list(self.slots):
            per_slot = self.slots[key]
            for slot in [s for s in per_slot if s < first_slot]:
                del per_slot[slot]
            if not per_slot:
                del self.slots[key]

    def cells(self) -> int:
        return sum(len(c) for per_slot in self.slots.values() for c in per_slot.values())

    def to_json(self) -> dict[str, Any]:
        return {"|".join(key): {str(slot): c.tolist() for slot, c in per_slot.items()}
                for key, per_slot in self.slots.items()}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SlotHistograms:
        h = cls()
        for joined, per_slot in body.items():
            key = tuple(joined.split("|", 2))
            h.slots[key] = {int(s): np.asarray(c, dtype=np.int64) for s, c in per_slot.items()}  # type: ignore[index]
        return h


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
