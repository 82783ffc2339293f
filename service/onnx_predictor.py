"""One ONNX Runtime session per model version, on the best execution provider that was asked for."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from mlops.models import StoredModel
from mlops.onnx_contract import INPUT_NAME, main_provider, node_placement, positive_proba

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def load_cuda_libraries() -> None:
    """Put CUDA 13 and cuDNN 9 in the process before a CUDA session starts. onnxruntime-gpu's CUDA provider
    finds them only on the loader's path (it has no RPATH); the GPU image installs them as pip packages
    (``onnxruntime-gpu[cuda,cudnn]``) beside onnxruntime, which ``preload_dlls`` loads, and does nothing harmful
    where they are installed system-wide. Without it, the provider fails to load and the session runs on CPU."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        preload(cuda=True, cudnn=True, msvc=False)


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
    placement: dict[str, int] = field(default_factory=dict)  # graph nodes per execution provider

    @classmethod
    def load(cls, model: StoredModel, requested_provider: str = "auto") -> OnnxPredictor:
        providers = choose_providers(requested_provider, ort.get_available_providers())
        if CUDA in providers:
            load_cuda_libraries()
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # many small batches: parallelism comes from batching, not threads
        session = ort.InferenceSession(str(model.onnx_path), sess_options=options, providers=providers)
        features = tuple(model.metadata["features"])
        sample = np.zeros((1, len(features)), dtype=np.float32)
        # A CUDA session may place nodes on CPU without a word: ask onnxruntime's profile (once per load, ~ms).
        placement = node_placement(str(model.onnx_path), providers, sample)
        predictor = cls(model=model, session=session, features=features, placement=placement)
        if providers != [CPU] and predictor.provider == CPU:
            log.warning("%s asked for %s, but onnxruntime runs every node of %s v%s on CPU (%s): serving on CPU",
                        requested_provider, providers[0], model.name, model.version, placement)
        predictor.predict(sample)  # warm-up
        return predictor

    @property
    def provider(self) -> str:
        """The provider the model's nodes really run on: a CUDA session runs a tree ensemble on CPU (onnxruntime
        has no CUDA kernel for ``ai.onnx.ml``), which ``session.get_providers()`` does not say."""
        return main_provider(self.placement)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Fraud probability per row of ``x`` (columns in ``self.features`` order)."""
        return positive_proba(self.session.run(None, {INPUT_NAME: x.astype(np.float32, copy=False)}))
