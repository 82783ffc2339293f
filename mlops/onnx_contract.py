"""What the served ONNX graph looks like from outside: input name and how to read the probability.

Kept apart from the exporter so the serving image needs onnxruntime only, not skl2onnx/sklearn.
"""

from __future__ import annotations

import numpy as np

INPUT_NAME = "features"


def positive_proba(outputs: list[np.ndarray]) -> np.ndarray:
    """The probability of class 1 from a classifier's (label, probabilities) outputs."""
    return np.asarray(outputs[1], dtype=np.float64)[:, 1]
