"""The reference profile: what the training data looked like, binned, stored beside each model version.

Numeric features (and the prediction score) get fixed quantile bins with open-ended outer bins and the
reference counts; categorical ones (and the predicted label) get category counts. The streaming consumer
bins live events into exactly these bins; PSI uses ~10 mass-balanced groups of them, KS all of them.

Multivariate drift (:class:`Multivariate`): a change in how the features move *together* (a correlation that
breaks, a combination training never saw) can leave every feature's own histogram in place. The profile holds a
PCA of the standardised training features, kept to the components that explain 90 % of the variance, and the
binned distribution of the training rows' reconstruction error; each event's error is one more numeric column,
``multivariate_reconstruction_error``, binned and scored like any feature (the same tests, the same rules), so
its threshold is calibrated on the reference by construction and the stream needs only one projection per event.
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
MULTIVARIATE = "multivariate_reconstruction_error"  # the features together, profiled like a numeric feature
EXPLAINED = 0.9  # PCA keeps the fewest components explaining this share of the variance


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
class Multivariate:
    """PCA of the standardised features: each row's reconstruction error from the kept components."""

    features: list[str]
    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray  # (kept components, features), orthonormal rows

    @classmethod
    def fit(cls, features: dict[str, np.ndarray]) -> Multivariate:
        names = list(features)
        x = np.column_stack([np.asarray(features[f], dtype=np.float64) for f in names])
        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        scale[scale == 0] = 1.0
        _, singular, vt = np.linalg.svd((x - mean) / scale, full_matrices=False)
        share = np.cumsum(singular**2) / max(float(np.sum(singular**2)), 1e-300)
        kept = int(np.searchsorted(share, EXPLAINED) + 1)
        return cls(names, mean, scale, vt[:min(kept, len(names))])

    def errors(self, x: np.ndarray) -> np.ndarray:
        """Squared reconstruction error per row of ``x`` (rows x features, in ``features`` order)."""
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        residual = z - (z @ self.components.T) @ self.components
        return np.einsum("ij,ij->i", residual, residual)

    def to_json(self) -> dict[str, Any]:
        return {"features": self.features, "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "components": self.components.tolist()}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Multivariate:
        return cls(list(body["features"]), np.asarray(body["mean"], dtype=np.float64),
                   np.asarray(body["scale"], dtype=np.float64), np.asarray(body["components"], dtype=np.float64))


@dataclass
class ReferenceProfile:
    model_name: str
    model_version: str
    columns: dict[str, ColumnProfile] = field(default_factory=dict)
    n: int = 0
    multivariate: Multivariate | None = None  # with it, columns[MULTIVARIATE] bins its reconstruction errors

    def to_bytes(self) -> bytes:
        body = {"model_name": self.model_name, "model_version": self.model_version, "n": self.n,
                "columns": {name: col.to_json() for name, col in self.columns.items()}}
        if self.multivariate is not None:
            body["multivariate"] = self.multivariate.to_json()
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
        multivariate = Multivariate.from_json(body["multivariate"]) if body.get("multivariate") else None
        if multivariate is None:
            columns.pop(MULTIVARIATE, None)
        return cls(body["model_name"], body["model_version"], columns, int(body["n"]), multivariate)


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
    numeric = {name: np.asarray(values, dtype=np.float64) for name, values in features.items()
               if isinstance(columns[name], NumericProfile)}
    multivariate = None
    if len(numeric) >= 2:
        multivariate = Multivariate.fit(numeric)
        columns[MULTIVARIATE] = NumericProfile.build(multivariate.errors(np.column_stack(list(numeric.values()))))
    return ReferenceProfile(model_name, model_version, columns, n=len(scores), multivariate=multivariate)
