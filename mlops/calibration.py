"""The score calibration stored beside each model version: what the model's scores mean as probabilities.

Fitted at training time on the holdout (isotonic regression of the label on the served ONNX model's score)
and stored as its breakpoints, so any reader applies it with one ``numpy.interp`` and no scikit-learn
object crosses a process. The outcome join uses it to *estimate* quality before the labels arrive
(confidence-based performance estimation, CBPE: a calibrated probability ``p`` is the chance the label is 1,
so each prediction adds ``p`` expected positives and ``1 - p`` expected negatives). The estimate tracks shifts
in the inputs (the scores move) and cannot see a change in how inputs relate to labels (a concept shift):
that one only realised quality shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

CALIBRATION_FILE = "calibration.json"


@dataclass
class Calibration:
    x: np.ndarray  # score breakpoints, increasing
    y: np.ndarray  # calibrated probability at each breakpoint, non-decreasing

    @classmethod
    def fit(cls, scores: np.ndarray, labels: np.ndarray) -> Calibration:
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, labels)
        return cls(np.asarray(iso.X_thresholds_, dtype=np.float64), np.asarray(iso.y_thresholds_, dtype=np.float64))

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (equal to the fitted IsotonicRegression's ``predict``)."""
        return np.interp(np.asarray(scores, dtype=np.float64), self.x, self.y)

    def to_bytes(self) -> bytes:
        return json.dumps({"method": "isotonic", "x": self.x.tolist(), "y": self.y.tolist()}).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Calibration:
        body = json.loads(raw)
        return cls(np.asarray(body["x"], dtype=np.float64), np.asarray(body["y"], dtype=np.float64))
