"""sklearn → ONNX export with a parity check that fails loudly.

The served model is the ONNX file, so it must answer like the model that was evaluated: on a holdout,
every probability may differ from sklearn's by at most ``PARITY_TOLERANCE``.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType

from mlops.onnx_contract import INPUT_NAME, positive_proba

PARITY_TOLERANCE = 1e-5
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}


class ParityError(RuntimeError):
    """The ONNX model does not reproduce the sklearn model's probabilities."""


def export(model, n_features: int) -> bytes:
    onx = to_onnx(
        model,
        initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
        options={id(model): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    return onx.SerializeToString()


def onnx_positive_proba(onnx_bytes: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {INPUT_NAME: x.astype(np.float32)})
    return positive_proba(outputs)


def check_parity(onnx_bytes: bytes, model, x: np.ndarray, tolerance: float = PARITY_TOLERANCE) -> float:
    """Max |onnx - sklearn| over ``x``; raises :class:`ParityError` above ``tolerance``."""
    # sklearn trees compare float32 inputs as ONNX does; feed both the same float32 values.
    x32 = x.astype(np.float32)
    expected = model.predict_proba(x32)[:, 1]
    got = onnx_positive_proba(onnx_bytes, x32)
    diff = float(np.max(np.abs(expected - got))) if len(x32) else 0.0
    if not np.isfinite(diff) or diff > tolerance:
        raise ParityError(f"ONNX export differs from sklearn by {diff:.3g} (> {tolerance:g}) on {len(x32)} rows")
    return diff


class InvalidModelError(ValueError):
    """A file offered as a model is not an ONNX model the service can serve."""


def check_servable(onnx_bytes: bytes, n_features: int) -> None:
    """The service's contract: an ONNX graph whose float input ``features`` takes ``n_features`` columns and
    whose outputs give (label, probability of each of two classes) for a row. Raises :class:`InvalidModelError`."""
    import onnx

    try:
        model = onnx.load_from_string(onnx_bytes)
        session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    except Exception as exc:  # protobuf DecodeError, onnxruntime's own errors: all mean "not a model"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(f"not a loadable ONNX model ({first[:200]})") from None
    del model
    inputs = session.get_inputs()
    if [i.name for i in inputs] != [INPUT_NAME]:
        raise InvalidModelError(f"expected one input named {INPUT_NAME!r}, found {[i.name for i in inputs]}")
    shape, kind = inputs[0].shape, inputs[0].type
    if kind != "tensor(float)" or len(shape) != 2 or shape[1] != n_features:
        raise InvalidModelError(f"input {INPUT_NAME!r} must be a float tensor [N, {n_features}], found {kind} {shape}")
    try:  # two rows: the service scores batches, and a graph exported with a fixed batch of 1 cannot
        outputs = session.run(None, {INPUT_NAME: np.zeros((2, n_features), dtype=np.float32)})
        proba = positive_proba(outputs)
    except Exception as exc:
        raise InvalidModelError(f"the model does not score a batch of rows of {n_features} features: "
                                f"{str(exc).splitlines()[0][:200]}") from None
    if proba.shape != (2,) or not np.isfinite(proba).all():
        raise InvalidModelError("the model's second output must hold the probabilities of two classes per row")
