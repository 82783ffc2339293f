"""One poll's messages into window counts, in batches: decode, check, bin with numpy, count per slot.

Per poll: every message is decoded into a typed :class:`~mlops.events.EventView` (bad ones become poison
with a reason, their neighbours are unaffected); events are grouped by the model version they name;
per group each column becomes one numpy array, is binned with one ``searchsorted`` (numeric) or one
lookup (categorical), and counted with one ``bincount`` over (partition, time slot, bin). No Python work
per event beyond decoding and pulling its values into the arrays.

Each event is counted once per ``request_id`` (:mod:`streaming.dedupe`): an id already counted in its
partition's window, or earlier in the same poll, is a duplicate (``mlops_drift_duplicate_events_total``), not
counted in the histograms nor in ``consumed``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from mlops import stats
from mlops.events import EventView
from mlops.profile import (
    LABEL,
    MULTIVARIATE,
    PREDICTION,
    CategoricalProfile,
    ColumnProfile,
    NumericProfile,
    ReferenceProfile,
)
from streaming import metrics
from streaming.dedupe import first_unseen, request_hashes
from streaming.events import PoisonEvent, decode_batch
from streaming.state_store import PartitionCheckpoint
from streaming.window import WindowSpec

ProfileLookup = Callable[[str, str], ReferenceProfile | None]
_SLOT_BITS = 32  # (partition, slot) packed into one int64 for np.unique


class Absorber:
    def __init__(self, profiles: ProfileLookup, window: WindowSpec, decision_threshold: float = 0.5) -> None:
        self.profiles = profiles
        self.window = window
        self.threshold = decision_threshold

    def absorb(self, raws: list[bytes | None], partitions: list[int], states: dict[int, PartitionCheckpoint],
               now: float) -> list[tuple[int, PoisonEvent]]:
        """Adds the valid events to their partition's windows; returns ``(position, poison)`` for the rest.

        ``partitions[i]`` is the partition of ``raws[i]``; each must have a state in ``states``.
        """
        events, positions, poison = decode_batch(raws)
        if not events:
            return poison
        first = events[0]
        if all(e.model_name == first.model_name and e.model_version == first.model_version for e in events):
            groups = {(first.model_name, first.model_version): (events, positions)}
        else:
            groups = _group_by_model(events, positions)
        first_slot = self.window.first_slot(now)
        for (name, version), (group, where) in groups.items():
            profile = self.profiles(name, version)
            if profile is None:
                bad = PoisonEvent("unknown_model_version", f"no reference profile for {name}:{version}")
                poison += [(i, bad) for i in where]
                continue
            poison += self._count(name, version, profile, group, np.array([partitions[i] for i in where]), where,
                                  states, first_slot)
        return poison

    def _count(self, name: str, version: str, profile: ReferenceProfile, events: list[EventView],
               parts: np.ndarray, where: list[int], states: dict[int, PartitionCheckpoint],
               first_slot: int) -> list[tuple[int, PoisonEvent]]:
        n = len(events)
        features = [c for c in profile.columns if c not in (PREDICTION, LABEL, MULTIVARIATE)]
        values = {c: np.fromiter((e.features.get(c, math.nan) for e in events), np.float64, n) for c in features}
        poison: list[tuple[int, PoisonEvent]] = []
        keep = np.ones(n, dtype=bool)
        for column in values.values():
            keep &= ~np.isnan(column)
        if not keep.all():
            for k in np.flatnonzero(~keep):
                lacking = [c for c in features if math.isnan(values[c][k])]
                poison.append((where[k], PoisonEvent("missing_field", f"features lack {lacking}")))
        if PREDICTION in profile.columns or LABEL in profile.columns:
            values[PREDICTION] = np.fromiter((e.prediction for e in events), np.float64, n)
        if profile.multivariate is not None and MULTIVARIATE in profile.columns:  # NaN rows are dropped below
            values[MULTIVARIATE] = profile.multivariate.errors(
                np.column_stack([values[c] for c in profile.multivariate.features]))
        if LABEL in profile.columns:
            labels = np.fromiter((-1 if e.label is None else e.label for e in events), np.int64, n)
            values[LABEL] = np.where(labels < 0, values[PREDICTION] >= self.threshold, labels).astype(np.int64)
        slots = np.floor(np.fromiter((e.timestamp.timestamp() for e in events), np.float64, n)
                         / self.window.slot_seconds).astype(np.int64)
        ids = request_hashes([e.request_id for e in events])
        if not keep.all():
            parts, slots, ids = parts[keep], slots[keep], ids[keep]
            values = {c: v[keep] for c, v in values.items()}
        late = slots < first_slot  # consumed, not counted (nor remembered: any copy of it is late too)
        dup = np.zeros(len(parts), dtype=bool)
        for p in np.unique(parts).tolist():
            in_p = parts == p
            mine = np.flatnonzero(in_p & ~late)
            if len(mine):
                windows = states[p].windows
                dup[mine] = ~first_unseen(ids[mine], lambda h, w=windows: w.seen(h, first_slot))
            states[p].consumed += int(in_p.sum() - dup[in_p].sum())
        n_dup = int(dup.sum())
        metrics.EVENTS_CONSUMED.inc(len(parts) - n_dup)
        if n_dup:
            metrics.DUPLICATES.inc(n_dup)
        if late.any():
            metrics.LATE_EVENTS.inc(int(late.sum()))
        if n_dup or late.any():
            counted = ~(late | dup)
            parts, slots, ids = parts[counted], slots[counted], ids[counted]
            values = {c: v[counted] for c, v in values.items()}
        if not len(parts):
            return poison
        base = int(slots.min())
        cells, group = np.unique((parts.astype(np.int64) << _SLOT_BITS) | (slots - base), return_inverse=True)
        group = group.reshape(-1)
        for column, col in profile.columns.items():
            if column not in values:
                continue
            bins = _bins(col, values[column])
            counts = np.bincount(group * col.n_bins + bins, minlength=len(cells) * col.n_bins)
            counts = counts.reshape(len(cells), col.n_bins)
            for g, cell in enumerate(cells.tolist()):
                slot = (cell & ((1 << _SLOT_BITS) - 1)) + base
                states[cell >> _SLOT_BITS].windows.add_counts((name, version, column), slot, counts[g])
        by_cell = np.argsort(group, kind="stable")
        ends = np.cumsum(np.bincount(group, minlength=len(cells))).tolist()
        for g, cell in enumerate(cells.tolist()):
            slot = (cell & ((1 << _SLOT_BITS) - 1)) + base
            states[cell >> _SLOT_BITS].windows.add_ids(slot, ids[by_cell[(ends[g - 1] if g else 0):ends[g]]])
        return poison


def _bins(col: ColumnProfile, values: np.ndarray) -> np.ndarray:
    if isinstance(col, NumericProfile):
        return stats.bin_index(col.edges, values)
    return _categorical_bins(col, values)


def _categorical_bins(col: CategoricalProfile, values: np.ndarray) -> np.ndarray:
    """Category index per value (the extra last bin for categories never seen in training)."""
    unique, inverse = np.unique(values, return_inverse=True)
    as_text = [str(int(u)) if np.issubdtype(values.dtype, np.integer) else str(u) for u in unique.tolist()]
    return np.array([col.index(t) for t in as_text], dtype=np.int64)[inverse.reshape(-1)]


def _group_by_model(events: list[EventView], positions: list[int]) -> dict[tuple[str, str], tuple[list, list]]:
    groups: dict[tuple[str, str], tuple[list, list]] = defaultdict(lambda: ([], []))
    for event, i in zip(events, positions, strict=True):
        group = groups[(event.model_name, event.model_version)]
        group[0].append(event)
        group[1].append(i)
    return dict(groups)
