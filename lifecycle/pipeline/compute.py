"""Where the training pipeline's heavy stages run: in this process (the default), or on Ray (in this process,
or a cluster by its address), with the same code.

- **The point-in-time join** over the whole history: the feature view's definition (source, timestamp, ttl)
  comes from Feast's registry and each transaction gets the newest snapshot at or before its time within the
  ttl (``mlops.offline.join_training_rows``, held equal to Feast's ``get_historical_features`` by the tests).
  Locally one join; on Ray the transactions and the history are cut by customer (a hash of the id) and each
  part joins in a task of its own (exact: the join never crosses customers), retried when its worker dies. A
  feature view on another source than a file goes through Feast's own offline store: the repo's locally, Feast's
  Ray offline store on Ray.
- **Training** (one scikit-learn fit: it does not spread over machines) runs as one Ray task, on a worker with
  the memory for it, not in the driver (on Kubernetes: the controller's or the RayJob's submitter pod).

- **Scoring** a model over many rows (Production on the holdout at the gate; the candidate and Production on
  the retraining controller's labelled window) runs as Ray tasks of ``SCORE_ROWS`` rows.

The ONNX export and its parity check (the holdout through both sklearn and the graph) stay in the driver;
scoring a candidate over days of logged traffic without labels is batch scoring's job (``mlops-score
--features logged --engine ray``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lifecycle import ray_runtime, train
from lifecycle.onnx_export import onnx_positive_proba
from mlops import offline
from mlops.schema import ENTITY

ENGINES = ("auto", "local", "ray")
KEYS = {"engine", "address", "partitions"}
ROW = "_row"
PARTS_PER_CPU = 2  # a part per core and one more queued: a slow part does not leave a core idle
SCORE_ROWS = 250_000  # rows a scoring task takes (a few MB of features, well under a second of the model)


class ComputeError(ValueError):
    """A bad ``compute:`` section or option."""


@dataclass(frozen=True)
class Compute:
    engine: str = "local"  # resolved: "local" or "ray"
    address: str | None = None  # a Ray cluster (ray://host:10001, auto); None: Ray in this process
    partitions: int = 0  # parts of the join on Ray; 0: two per CPU of the cluster

    @classmethod
    def resolve(cls, section: Any = None, engine: str | None = None, address: str | None = None) -> Compute:
        """The pipeline file's ``compute:`` section, then the options given (the CLI's, ``MLOPS_RAY_ADDRESS``)
        over it. ``auto`` (the default): Ray when there is an address, this process otherwise."""
        section = {} if section is None else section
        if not isinstance(section, dict):
            raise ComputeError("compute must be a mapping (engine, address, partitions)")
        unknown = sorted(set(section) - KEYS)
        if unknown:
            raise ComputeError(f"compute has unknown fields {unknown} (known: {', '.join(sorted(KEYS))})")
        chosen = str(engine or section.get("engine") or "auto")
        if chosen not in ENGINES:
            raise ComputeError(f"compute.engine must be one of {', '.join(ENGINES)}, got {chosen!r}")
        where = address or section.get("address") or None
        if where is not None and not isinstance(where, str):
            raise ComputeError(f"compute.address must be a Ray address (ray://host:10001 or auto), got {where!r}")
        parts = section.get("partitions", 0)
        if isinstance(parts, bool) or not isinstance(parts, int) or parts < 0:
            raise ComputeError(f"compute.partitions must be a whole number >= 0 (0: two per CPU), got {parts!r}")
        if chosen == "auto":
            chosen = "ray" if where else "local"
        return cls(chosen, where if chosen == "ray" else None, parts)

    @contextmanager
    def session(self) -> Iterator[None]:
        """Ray for a pipeline run's length (one start, whatever the stages); nothing when local."""
        if self.engine == "local":
            yield
            return
        with ray_runtime.session(self.address):
            yield

    def join(self, repo: Path, transactions: pd.DataFrame, redis_address: str) -> tuple[pd.DataFrame, str]:
        """:func:`mlops.offline.training_frame`'s rows, and how they were joined."""
        store = offline.open_store(repo, redis_address)
        asof = offline.AsOfJoin.from_store(store)
        if asof is None:  # a source Feast alone reads: its file store here, its Ray store on Ray
            if self.engine == "local":
                return offline.training_frame(repo, transactions, redis_address), "Feast's offline store"
            with tempfile.TemporaryDirectory(prefix="feast-ray-") as scratch:
                frame = offline.training_frame(repo, transactions, redis_address,
                                               {"type": "ray", "storage_path": scratch, "ray_address": self.address})
            return frame, "Feast's Ray offline store"
        if self.engine == "local":
            return asof.training_rows(transactions).reset_index(drop=True), "one as-of join in this process"
        return self._join_on_ray(asof, transactions)

    def _join_on_ray(self, asof: offline.AsOfJoin, transactions: pd.DataFrame) -> tuple[pd.DataFrame, str]:
        import ray

        parts = self.partitions or PARTS_PER_CPU * ray_runtime.cpus()
        events = transactions.assign(**{ROW: np.arange(len(transactions))})
        event_part = _part_of(events[ENTITY], parts)
        history_part = _part_of(asof.history[ENTITY], parts)
        join = ray.remote(max_retries=3)(_join_part)
        pending = []
        for part in range(parts):
            chosen = events[event_part == part]
            if len(chosen):
                pending.append(join.remote(chosen, asof.history[history_part == part], asof.ttl))
        joined = [ray.get(ref) for ref in pending]
        frame = pd.concat(joined) if joined else asof.training_rows(events.iloc[:0]).assign(**{ROW: 0})
        frame = frame.sort_values(ROW).drop(columns=[ROW], errors="ignore").reset_index(drop=True)
        return frame, f"as-of join in {len(pending)} parts by customer on Ray"

    def score(self, onnx: bytes, x: Any) -> np.ndarray:
        """The served graph's positive-class probability of each row, in order: one call here; on Ray, tasks of
        ``SCORE_ROWS`` rows (the graph put in the object store once), retried when their worker dies."""
        if self.engine == "local" or not len(x):
            return onnx_positive_proba(onnx, x)
        import ray

        graph, task = ray.put(onnx), ray.remote(max_retries=3)(onnx_positive_proba)
        parts = [task.remote(graph, x[start:start + SCORE_ROWS]) for start in range(0, len(x), SCORE_ROWS)]
        return np.concatenate([ray.get(part) for part in parts])

    def fit(self, x: pd.DataFrame, y: pd.Series, params: dict[str, Any]) -> Any:
        """``train.fit``, here or as one Ray task (retried when its worker dies)."""
        if self.engine == "local":
            return train.fit(x, y, params)
        import ray

        return ray.get(ray.remote(max_retries=3)(train.fit).remote(x, y, params))


def _part_of(ids: pd.Series, parts: int) -> np.ndarray:
    """The same part for a customer's transactions and its snapshots (a stable hash of the id)."""
    return pd.util.hash_array(ids.astype(str).to_numpy()) % np.uint64(parts)


def _join_part(events: pd.DataFrame, history: pd.DataFrame, ttl: Any) -> pd.DataFrame:
    rows = offline.join_training_rows(events, history, ttl)
    return rows.assign(**{ROW: events[ROW].to_numpy()[rows.index.to_numpy()]})
