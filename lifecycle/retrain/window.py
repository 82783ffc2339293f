"""The recent labelled window: predictions of the last days read back from the prediction log, each with the
outcome that arrived for it (joined by ``request_id``), as training rows — the store features as served, the
request's features, the true label. The retrain trains on them beside the offline store's history, and the
gate compares the candidate with Production on them (:func:`compare`), rows Production really answered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from lifecycle.batch import inputs
from mlops.schema import LABEL, MODEL_FEATURES, STORE_FEATURES, TIMESTAMP

OUTCOME_COLUMNS = ("log_offset", "log_error", "request_id", LABEL, "outcome_at")
PLAN_OFFSETS = 1_000_000  # offsets per planned range (ranges are read one after another here)


def read_topic(kafka: dict[str, Any], topic: str, since: datetime, until: datetime, row, columns) -> pd.DataFrame:
    """Every event of ``topic`` logged in [since, until), as rows made by ``row(raw, offset)``."""
    frames = [frame for partition in inputs.log_partitions(kafka, topic, since, until, PLAN_OFFSETS)
              for frame in inputs.read_range(partition, kafka, 50_000, row, columns)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(columns))


def _outcome_row(raw: bytes | None, offset: int) -> dict[str, Any]:
    from mlops import outcomes

    try:
        event = outcomes.decode(raw or b"")
    except Exception as exc:  # noqa: BLE001 - msgspec's errors: counted, never a crash
        return {"log_offset": offset, "log_error": f"unreadable outcome: {exc}"}
    return {"log_offset": offset, "request_id": event.request_id, LABEL: int(event.label),
            "outcome_at": event.timestamp}


def labelled_window(kafka: dict[str, Any], predictions_topic: str, outcomes_topic: str, since: datetime,
                    until: datetime) -> pd.DataFrame:
    """Predictions logged in [since, until) that have an outcome (outcomes are read up to ``until`` too: a
    label known later is not in the window yet). One row per request (the log is at-least-once: the first
    copy; the newest outcome of a request wins), columns ``request_id``, the model's features, ``label``,
    ``served_version``, ``served_prediction``, oldest first."""
    from mlops import events

    predictions = read_topic(kafka, predictions_topic, since, until,
                             lambda raw, offset: inputs.log_row(raw, offset, events), inputs.LOG_COLUMNS)
    outcomes = read_topic(kafka, outcomes_topic, since, until, _outcome_row, OUTCOME_COLUMNS)
    predictions = predictions[predictions["log_error"].isna()].drop_duplicates("request_id")
    outcomes = outcomes[outcomes["log_error"].isna()].drop_duplicates("request_id", keep="last")
    joined = predictions.merge(outcomes[["request_id", LABEL]], on="request_id", how="inner")
    joined = joined.rename(columns={f"logged_{name}": name for name in STORE_FEATURES})
    joined = joined.dropna(subset=list(MODEL_FEATURES))
    return joined[["request_id", TIMESTAMP, *MODEL_FEATURES, LABEL, "served_version", "served_prediction"]] \
        .sort_values(TIMESTAMP, kind="stable").reset_index(drop=True).astype({LABEL: np.int64})


def split(window: pd.DataFrame, gate_share: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(older rows: trained on, newest ``gate_share``: judged on) by prediction time — the gate never sees a row
    the candidate learnt from, and judges it on the most recent traffic."""
    cut = len(window) - int(round(len(window) * gate_share))
    return window.iloc[:cut].reset_index(drop=True), window.iloc[cut:].reset_index(drop=True)


@dataclass(frozen=True)
class Comparison:
    """Candidate against Production on the same labelled rows: accuracy of each, and the confidence interval of
    the paired difference (candidate − Production)."""

    rows: int
    candidate: float
    production: float
    low: float
    high: float
    confidence: float

    @property
    def difference(self) -> float:
        return self.candidate - self.production

    def to_dict(self) -> dict[str, float]:
        return {"window_rows": self.rows, "window_accuracy_candidate": self.candidate,
                "window_accuracy_production": self.production, "window_difference": self.difference,
                "window_difference_low": self.low, "window_difference_high": self.high}


def compare(y: np.ndarray, candidate: np.ndarray, production: np.ndarray, threshold: float,
            confidence: float = 0.95) -> Comparison:
    """Paired: each row is right or wrong under both models, so the difference of accuracies is the mean of
    per-row differences d ∈ {−1, 0, 1}, and its interval is the normal one on that mean (the interval behind
    McNemar's test; rows where both models agree add no variance). Valid from a few hundred rows on."""
    from scipy.stats import norm

    right_c = ((candidate >= threshold).astype(int) == y).astype(float)
    right_p = ((production >= threshold).astype(int) == y).astype(float)
    d = right_c - right_p
    n = len(d)
    if n == 0:
        raise ValueError("no labelled rows to compare on")
    z = float(norm.ppf(0.5 + confidence / 2))
    half = z * float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else math.inf
    return Comparison(n, float(right_c.mean()), float(right_p.mean()), float(d.mean()) - half,
                      float(d.mean()) + half, confidence)
