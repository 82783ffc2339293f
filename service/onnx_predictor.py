"""One ONNX Runtime session per model version, on the best execution provider that was asked for."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from mlops.models import StoredModel
from mlops.onnx_contract import INPUT_NAME, positive_proba

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def choose_providers(requested: str, available: Sequence[str]) -> list[str]:
    """``auto`` and ``cuda`` use CUDA when the installed onnxruntime has it; CPU is always the fallback."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown ONNX provider {requested!r}: use auto, cpu or cuda")
    if requested in ("auto", "cuda") and CUDA in available:
        return [CUDA, CPU]
    if requested == "cuda":
        log.warning("CUDA provider requested but onnxruntime offers only %s; serving on CPU", list(available))
    return [CPU]


@dataclass(eq=False)
class OnnxPredictor:
    model: StoredModel
    session: ort.InferenceSession
    features: tuple[str, ...]

    @classmethod
    def load(cls, model: StoredModel, requested_provider: str = "auto") -> OnnxPredictor:
        providers = choose_providers(requested_provider, ort.get_available_providers())
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # many small batches: parallelism comes from batching, not threads
        session = ort.InferenceSession(str(model.onnx_path), sess_options=options, providers=providers)
        predictor = cls(model=model, session=session, features=tuple(model.metadata["features"]))
        predictor.predict(np.zeros((1, len(predictor.features)), dtype=np.float32))  # warm-up
        return predictor

    @property
    def provider(self) -> str:
        """The provider the session really runs on (onnxruntime may fall back silently)."""
        return self.session.get_providers()[0]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Fraud probability per row of ``x`` (columns in ``self.features`` order)."""
        return positive_proba(self.session.run(None, {INPUT_NAME: x.astype(np.float32, copy=False)}))
