"""Rolling windows as time-slotted histograms: memory bounded by slots x bins, whatever the traffic.

Each Kafka partition keeps, per (model name, model version, column), one count vector per time slot
(``slot_seconds`` wide, by event time). A window is the sum of the slots of the last ``window_seconds``,
optionally cut to the newest slots that hold ``max_events``. Summing the slots of all partitions gives
the topic-wide window, which is what alerts judge.

Checkpoints store one binary blob per slot (msgpack of little-endian int64 counts per key), and the
histograms remember which slots changed or expired since the last save, so a checkpoint per poll writes
only those (usually the current slot) instead of the whole window.

Each slot also holds the 64-bit hashes of the request ids it counted (:mod:`streaming.dedupe`), sorted, so an
event already counted in any slot of the window is not counted again; they expire with their slot (an event
whose slot left the window is not counted at all: late). Checkpoints append the ids added since the last save.
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
        self.ids: dict[int, np.ndarray] = {}  # slot -> sorted uint64 hashes of the request ids counted there
        self.new_ids: dict[int, list[np.ndarray]] = {}  # slot -> ids added since the last save, in order
        self.ids_rewrite = False  # the next save replaces the stored ids with all of self.ids
        # For lookups, the ids of the window's slots merged into one sorted array (one binary search per event
        # instead of one per slot), rebuilt when a slot leaves the window; slots changed since are looked up
        # on their own, until there are more than a few.
        self._index: np.ndarray | None = None
        self._indexed: set[int] = set()
        self._fresh: set[int] = set()

    def seen(self, hashes: np.ndarray, first_slot: int) -> np.ndarray:
        """Which of these sorted unique hashes a slot from ``first_slot`` on already counted (bool per hash)."""
        if self._index is None or len(self._fresh) > 3 or any(s < first_slot for s in self._indexed):
            live = sorted(s for s in self.ids if s >= first_slot)
            merged = np.concatenate([self.ids[s] for s in live]) if live else np.empty(0, dtype=np.uint64)
            merged.sort(kind="stable")  # sorted runs, one per slot: merged
            self._index, self._indexed, self._fresh = merged, set(live), set()
        found = _member(self._index, hashes)
        for slot in self._fresh:
            if slot >= first_slot:
                found |= _member(self.ids[slot], hashes)
        return found

    def add_ids(self, slot: int, hashes: np.ndarray) -> None:
        """Remember ids counted in ``slot`` (unique, none held already)."""
        if not len(hashes):
            return
        hashes = np.sort(hashes)
        held = self.ids.get(slot)
        merged = hashes if held is None else np.concatenate([held, hashes])
        if held is not None:
            merged.sort(kind="stable")  # two sorted runs: one merge
        self.ids[slot] = merged
        self.new_ids.setdefault(slot, []).append(hashes)
        self._fresh.add(slot)
        self.dirty.add(slot)

    def id_count(self) -> int:
        return sum(len(held) for held in self.ids.values())

    def pending_ids(self) -> dict[int, bytes]:
        """What the next save appends to each slot's stored ids (every id of the slot when rewriting)."""
        if self.ids_rewrite:
            return {slot: held.astype("<u8").tobytes() for slot, held in self.ids.items()}
        return {slot: b"".join(h.astype("<u8").tobytes() for h in chunks) for slot, chunks in self.new_ids.items()}

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
        for slot in [s for s in self.ids if s < first_slot]:
            del self.ids[slot]
            self.new_ids.pop(slot, None)
            self._fresh.discard(slot)
            self._index = None
            self.dropped.add(slot)
            self.dirty.discard(slot)

    def cells(self) -> int:
        return sum(len(c) for per_slot in self.slots.values() for c in per_slot.values())

    def slot_numbers(self) -> set[int]:
        return {slot for per_slot in self.slots.values() for slot in per_slot} | set(self.ids)

    def slot_blob(self, slot: int) -> bytes:
        """One slot of every key, for the checkpoint: msgpack {"name|version|column": int64 LE bytes}."""
        return _blob_encoder.encode({"|".join(key): per_slot[slot].astype("<i8").tobytes()
                                     for key, per_slot in self.slots.items() if slot in per_slot})

    def mark_saved(self, dirty: set[int], dropped: set[int], ids: dict[int, bytes] | None = None,
                   rewrote: bool = False) -> None:
        """The slots in ``dirty``/``dropped`` and the ids ``ids`` (from :meth:`pending_ids`) were written: forget
        them (changes made since stay pending)."""
        self.dirty -= dirty
        self.dropped -= dropped
        for slot in ids or {}:
            self.new_ids.pop(slot, None)
        if rewrote:
            self.ids_rewrite = False

    def mark_all_dirty(self) -> None:
        """The next save writes the whole state (the stored ids are replaced, not appended to)."""
        self.dirty = self.slot_numbers()
        self.ids_rewrite = True

    def load_ids(self, stored: dict[int, bytes]) -> None:
        """The ids of a checkpoint: per slot, the little-endian uint64 hashes its saves appended."""
        for slot, raw in stored.items():
            held = np.frombuffer(raw, dtype="<u8").astype(np.uint64)
            held.sort(kind="stable")  # sorted runs (one per save): merged, not re-sorted
            if len(held):  # a save retried after its reply was lost appended its ids twice
                self.ids[slot] = held[np.concatenate([[True], held[1:] != held[:-1]])]
        self._index = None

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


def _member(held: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Whether each of ``hashes`` is in the sorted array ``held``."""
    if not len(held):
        return np.zeros(len(hashes), dtype=bool)
    at = np.searchsorted(held, hashes)
    np.minimum(at, len(held) - 1, out=at)
    return held[at] == hashes


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
