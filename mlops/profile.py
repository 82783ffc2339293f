"""The reference profile: what the training data looked like, binned, stored beside each model version.

Numeric features (and the prediction score) get fixed quantile bins with open-ended outer bins and the
reference counts; categorical ones (and the predicted label) get category counts. The streaming consumer
bins live events into exactly these bins; PSI uses ~10 mass-balanced groups of them, KS all of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlops import stats

PROFILE_FILE = "profile.json"
FINE_BINS = 40
PSI_GROUPS = 10
PREDICTION = "prediction"  # the score, profiled like a numeric feature
LABEL = "label"  # the predicted class, profiled like a categorical feature


@dataclass
class NumericProfile:
    edges: np.ndarray
    counts: np.ndarray
    psi_starts: list[int]
    kind: str = "numeric"

    @classmethod
    def build(cls, values: np.ndarray) -> NumericProfile:
        values = np.asarray(values, dtype=np.float64)
        edges = stats.quantile_edges(values, FINE_BINS)
        counts = stats.histogram(edges, values)
        return cls(edges=edges, counts=counts, psi_starts=stats.group_bins(counts, PSI_GROUPS))

    @property
    def n_bins(self) -> int:
        return len(self.edges) + 1

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "edges": self.edges.tolist(), "counts": self.counts.tolist(),
                "psi_starts": self.psi_starts}


@dataclass
class CategoricalProfile:
    categories: list[str]
    counts: np.ndarray
    kind: str = "categorical"

    @classmethod
    def build(cls, values: np.ndarray) -> CategoricalProfile:
        cats, counts = np.unique(np.asarray(values).astype(str), return_counts=True)
        return cls(categories=[str(c) for c in cats], counts=counts)

    @property
    def n_bins(self) -> int:
        return len(self.categories) + 1  # the last bin collects categories never seen in training

    def index(self, value: Any) -> int:
        try:
            return self.categories.index(str(value))
        except ValueError:
            return len(self.categories)

    def counts_with_unseen(self) -> np.ndarray:
        return np.append(self.counts, 0)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "categories": self.categories, "counts": self.counts.tolist()}


ColumnProfile = NumericProfile | CategoricalProfile


@dataclass
class ReferenceProfile:
    model_name: str
    model_version: str
    columns: dict[str, ColumnProfile] = field(default_factory=dict)
    n: int = 0

    def to_bytes(self) -> bytes:
        body = {"model_name": self.model_name, "model_version": self.model_version, "n": self.n,
                "columns": {name: col.to_json() for name, col in self.columns.items()}}
        return json.dumps(body).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> ReferenceProfile:
        body = json.loads(raw)
        columns: dict[str, ColumnProfile] = {}
        for name, col in body["columns"].items():
            if col["kind"] == "numeric":
                columns[name] = NumericProfile(np.asarray(col["edges"], dtype=np.float64),
                                               np.asarray(col["counts"], dtype=np.int64), list(col["psi_starts"]))
            else:
                columns[name] = CategoricalProfile(list(col["categories"]), np.asarray(col["counts"], dtype=np.int64))
        return cls(body["model_name"], body["model_version"], columns, int(body["n"]))


def build_profile(model_name: str, model_version: str, features: dict[str, np.ndarray],
                  scores: np.ndarray, threshold: float = 0.5) -> ReferenceProfile:
    """Profile of the training features plus the model's score and predicted label on them."""
    columns: dict[str, ColumnProfile] = {}
    for name, values in features.items():
        values = np.asarray(values)
        columns[name] = (NumericProfile.build(values) if np.issubdtype(values.dtype, np.number)
                         else CategoricalProfile.build(values))
    columns[PREDICTION] = NumericProfile.build(scores)
    columns[LABEL] = CategoricalProfile.build((np.asarray(scores) >= threshold).astype(int))
    return ReferenceProfile(model_name, model_version, columns, n=len(scores))
