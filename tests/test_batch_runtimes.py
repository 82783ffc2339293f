"""The batch scorer's compiled trees (lifecycle/batch/runtimes.py): built from the served ONNX graph by the real
C compiler, they answer as onnxruntime does, for every comparison operator, at every threshold; the parity
check that guards them catches a wrong operator; what cannot be compiled runs on onnxruntime, and says why."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from sklearn.linear_model import LogisticRegression

from lifecycle.batch import runtimes
from lifecycle.onnx_export import export
from lifecycle.train import fit


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 30.0, (5_000, 8)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 3] + rng.normal(0, 20, len(x)) > 100).astype(int)
    return x, y


@pytest.fixture(scope="module")
def served(data) -> bytes:
    """The graph training exports: 150 trees of depth 3 (lifecycle.train's defaults)."""
    return export(fit(*data), 8)


def with_mode(graph: bytes, mode: bytes) -> bytes:
    model = onnx.load_from_string(graph)
    for attr in model.graph.node[0].attribute:
        if attr.name == "nodes_modes":
            attr.strings[:] = [mode if m != b"LEAF" else m for m in attr.strings]
    return model.SerializeToString()


def both(graph: bytes, library: bytes, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (runtimes.OnnxModel(graph, threads=1).positive_proba(x),
            runtimes.CompiledModel(library, threads=2).positive_proba(x))


def test_compiled_trees_answer_as_onnxruntime_on_the_served_graph(served, data):
    choice = runtimes.choose("auto", served)
    assert choice.runtime == "compiled", choice.why
    for x in (data[0], runtimes.probe_rows(served, seed=3), np.zeros((1, 8), np.float32)):
        expected, got = both(served, choice.library, x)
        assert got.shape == expected.shape and got.dtype == np.float64
        assert np.abs(got - expected).max() <= runtimes.PARITY


@pytest.mark.parametrize("mode", list(runtimes.OPERATORS))
def test_every_branch_operator_means_what_onnx_means(served, mode):
    """At, just above and just below every threshold: a `<` compiled as `<=` would answer differently there."""
    graph = with_mode(served, mode)
    expected, got = both(graph, runtimes.compile_trees(graph), runtimes.probe_rows(graph, seed=1))
    assert np.abs(got - expected).max() <= runtimes.PARITY


def test_the_parity_check_catches_a_wrong_operator(served):
    """The probe rows sit on the thresholds: random rows would almost never tell `<` from `<=`."""
    lt = with_mode(served, b"BRANCH_LT")
    assert runtimes.parity_difference(lt, runtimes.compile_trees(served)) > 100 * runtimes.PARITY


def test_a_graph_that_is_not_a_tree_ensemble_runs_on_onnxruntime_and_says_why(data):
    linear = export(LogisticRegression(max_iter=500).fit(*data), 8)
    choice = runtimes.choose("auto", linear)
    assert choice.runtime == "onnxruntime" and "not one TreeEnsembleClassifier" in choice.why
    assert choice.describe() == {"runtime": "onnxruntime", "runtime_note": choice.why}
    with pytest.raises(runtimes.NotCompilable, match="TreeEnsembleClassifier"):
        runtimes.choose("compiled", linear)
    assert runtimes.choose("onnxruntime", linear) == runtimes.Choice("onnxruntime")


def test_without_a_c_compiler_auto_runs_on_onnxruntime(served, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no gcc or clang on it
    choice = runtimes.choose("auto", served)
    assert (choice.runtime, choice.why) == ("onnxruntime", "not compiled: no C compiler (gcc or clang) on PATH")
    with pytest.raises(runtimes.NotCompilable, match="no C compiler"):
        runtimes.choose("compiled", served)


def test_a_library_that_does_not_load_falls_back_to_onnxruntime(served, data):
    """A worker of another platform gets bytes it cannot load: it scores on onnxruntime and says so."""
    model, runtime = runtimes.load(served, runtimes.Choice("compiled", b"not a shared library"), threads=1)
    assert runtime == "onnxruntime"
    assert np.array_equal(model.positive_proba(data[0][:10]),
                          runtimes.OnnxModel(served, threads=1).positive_proba(data[0][:10]))


def test_the_build_is_cached_by_graph(served, tmp_path):
    first = runtimes.compile_trees(served)
    cached = list((tmp_path / "cache" / "mlops-stack" / "compiled-trees").glob("*.so"))
    assert len(cached) == 1 and cached[0].read_bytes() == first
    assert runtimes.compile_trees(served) == first


def test_the_parity_verdict_is_cached_beside_the_library(served, tmp_path, monkeypatch):
    assert runtimes.choose("auto", served).runtime == "compiled"
    verdicts = list((tmp_path / "cache" / "mlops-stack" / "compiled-trees").glob("*.parity"))
    assert len(verdicts) == 1 and float(verdicts[0].read_text()) <= runtimes.PARITY

    def not_again(*_):
        raise AssertionError("the parity check ran again")

    monkeypatch.setattr(runtimes, "parity_difference", not_again)
    assert runtimes.choose("compiled", served).runtime == "compiled"
    verdicts[0].write_text(repr(1.0))  # a verdict of a failed check is kept too: the job says so
    with pytest.raises(runtimes.NotCompilable, match="differ from onnxruntime by 1"):
        runtimes.choose("compiled", served)
