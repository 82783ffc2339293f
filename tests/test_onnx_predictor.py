"""Execution provider selection and the ONNX session the service runs."""

from __future__ import annotations

import numpy as np
import pytest

from lifecycle import data as datamod
from lifecycle.train import register, train
from mlops.onnx_contract import main_provider
from mlops.schema import MODEL_FEATURES
from service.onnx_predictor import CPU, CUDA, OnnxPredictor, choose_providers


@pytest.mark.parametrize(
    ("requested", "available", "expected"),
    [
        ("auto", [CUDA, CPU], [CUDA, CPU]),
        ("auto", [CPU], [CPU]),
        ("cuda", [CUDA, CPU], [CUDA, CPU]),
        ("cuda", [CPU], [CPU]),  # requested but absent: fall back to CPU, with a warning
        ("cpu", [CUDA, CPU], [CPU]),
    ],
)
def test_choose_providers(requested, available, expected):
    assert choose_providers(requested, available) == expected


def test_unknown_provider_is_refused():
    with pytest.raises(ValueError, match="unknown ONNX provider"):
        choose_providers("tpu", [CPU])


def test_predictor_reports_real_provider_and_matches_sklearn():
    trained = train(datamod.generate(150, 2_000, seed=5))
    stored = register(trained, "predictor_test", "v1")
    predictor = OnnxPredictor.load(stored, "cuda")  # no GPU here: must land on CPU and say so
    assert predictor.provider == CPU
    assert predictor.placement == {CPU: 1}  # the whole graph: one TreeEnsembleClassifier node
    assert predictor.features == MODEL_FEATURES
    x = trained.x_holdout[:200]
    expected = trained.estimator.predict_proba(x.astype(np.float32))[:, 1]
    np.testing.assert_allclose(predictor.predict(x), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("placement", "expected"),
    [
        ({CPU: 1}, CPU),
        ({CPU: 1, CUDA: 0}, CPU),  # a CUDA session that ran nothing on the GPU (the tree ensemble on an H200)
        ({CUDA: 7, CPU: 2}, CUDA),  # the accelerator ran part of the graph: that is what it runs on
        ({}, CPU),
    ],
)
def test_main_provider_is_where_nodes_ran(placement, expected):
    assert main_provider(placement) == expected
