"""What runs the model over a batch: onnxruntime on the served graph, or the same trees compiled to C.

onnxruntime's TreeEnsemble walks every tree as data, about 4 µs a row for 150 trees of depth 3 on one core
(bench/batch.py); the same trees written out as nested comparisons by tl2cgen and built by the C compiler run
about 4× faster. The compiled library is made *from the served ONNX graph* (its TreeEnsembleClassifier's nodes,
through Treelite's model builder), so the registry's model stays the one artifact, and before a job uses it it
must answer like onnxruntime to ``PARITY`` on rows placed on, just above and just below every threshold (where
a `<` read as `<=` would show). ``auto`` compiles when the graph is one binary tree ensemble and a C compiler is
present, and says why not otherwise; anything else runs on onnxruntime.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlops.onnx_contract import INPUT_NAME, positive_proba

RUNTIMES = ("auto", "onnxruntime", "compiled")
PARITY = 1e-6  # the bound every batch score keeps to /predict's (tests/test_batch_scoring.py)
# ONNX's branch modes as Treelite's comparison operators; BRANCH_NEQ has none.
OPERATORS = {b"BRANCH_LEQ": "<=", b"BRANCH_LT": "<", b"BRANCH_GTE": ">=", b"BRANCH_GT": ">", b"BRANCH_EQ": "=="}
POST_TRANSFORMS = {b"LOGISTIC": "sigmoid", b"NONE": "identity"}


class NotCompilable(ValueError):
    """The graph (or this machine) cannot give a compiled model that answers as onnxruntime does."""


@dataclass(frozen=True)
class Choice:
    runtime: str  # "onnxruntime" or "compiled"
    library: bytes = b""  # the compiled shared library (built once by the driver, shipped to every worker)
    why: str = ""  # why "auto" did not compile

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.runtime, **({"runtime_note": self.why} if self.why else {})}


def choose(requested: str, onnx: bytes) -> Choice:
    """The runtime a job uses. Raises :class:`NotCompilable` when ``compiled`` was asked and cannot be had."""
    if requested == "onnxruntime":
        return Choice("onnxruntime")
    try:
        library = compile_trees(onnx)
        difference = _checked_parity(onnx, library)
        if difference > PARITY:
            raise NotCompilable(f"the compiled trees differ from onnxruntime by {difference:.3g} (> {PARITY:g})")
    except NotCompilable as exc:
        if requested == "compiled":
            raise
        return Choice("onnxruntime", why=f"not compiled: {exc}")
    return Choice("compiled", library)


def compile_trees(onnx: bytes) -> bytes:
    """The shared library of the graph's trees, from a cache keyed by the graph and the compiler's versions."""
    compiler = shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise NotCompilable("no C compiler (gcc or clang) on PATH")
    import tl2cgen

    cached = _cached(onnx, ".so")
    if cached.exists():
        return cached.read_bytes()
    model = tree_model(onnx)
    with tempfile.TemporaryDirectory(prefix="mlops-trees-") as tmp:
        path = Path(tmp) / "trees.so"
        log = Path(tmp) / "build.log"
        try:
            with _output_to(log):  # tl2cgen logs to stdout (where --json prints) and the compiler to stderr
                tl2cgen.export_lib(model, toolchain=Path(compiler).name, libpath=str(path),
                                   params={"parallel_comp": os.cpu_count() or 1}, verbose=False)
        except Exception as exc:  # the compiler's or tl2cgen's failure: the job goes on without it
            raise NotCompilable(f"the C build failed ({str(exc).strip().splitlines()[0][:200]})") from None
        library = path.read_bytes()
    _keep(cached, library)
    return library


def _checked_parity(onnx: bytes, library: bytes) -> float:
    """The parity check's largest difference, run once per graph and library: its verdict is cached beside
    the library (the check is ~0.3 s of every job otherwise)."""
    verdict = _cached(onnx + hashlib.sha256(library).digest(), ".parity")
    try:
        return float(verdict.read_text())
    except (OSError, ValueError):
        difference = parity_difference(onnx, library)
        _keep(verdict, repr(difference).encode())
        return difference


def _cached(content: bytes, suffix: str) -> Path:
    """The cache's file for ``content`` (a graph), keyed with the compiler chain's versions."""
    import tl2cgen
    import treelite

    key = hashlib.sha256(content + f"{treelite.__version__}/{tl2cgen.__version__}".encode()).hexdigest()[:32]
    return _cache() / f"{key}{suffix}"


def _keep(path: Path, content: bytes) -> None:
    try:  # a cache, nothing more: written whole under another name, then renamed
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(content)
        os.replace(partial, path)
    except OSError:
        pass


def tree_model(onnx: bytes):
    """Treelite's model of the graph's TreeEnsembleClassifier, node for node (thresholds and leaves float32,
    as onnxruntime reads them)."""
    from treelite.model_builder import Metadata, ModelBuilder, PostProcessorFunc, TreeAnnotation

    graph, n_features, a = _ensemble(onnx)
    ensembles = [n for n in graph.node if n.op_type == "TreeEnsembleClassifier"]
    others = [n.op_type for n in graph.node if n.op_type not in ("TreeEnsembleClassifier", "Identity")]
    if len(ensembles) != 1 or others:
        raise NotCompilable("the graph is not one TreeEnsembleClassifier "
                            f"(nodes: {', '.join(n.op_type for n in graph.node)})")
    if "nodes_values_as_tensor" in a or "class_weights_as_tensor" in a or "base_values_as_tensor" in a:
        raise NotCompilable("double-precision tree attributes")
    if len(a.get("classlabels_int64s", a.get("classlabels_strings", []))) != 2 or set(a["class_ids"]) != {0}:
        raise NotCompilable("not a binary classifier with one score per tree")
    post = POST_TRANSFORMS.get(a.get("post_transform", b"NONE"))
    if post is None:
        raise NotCompilable(f"post_transform {a['post_transform'].decode()}")
    modes = set(a["nodes_modes"]) - {b"LEAF"}
    if not modes <= OPERATORS.keys():
        raise NotCompilable(f"branch modes {sorted(m.decode() for m in modes - OPERATORS.keys())}")
    leaves: dict[tuple[int, int], float] = {}
    for tree, node, weight in zip(a["class_treeids"], a["class_nodeids"], a["class_weights"], strict=True):
        leaves[(tree, node)] = leaves.get((tree, node), 0.0) + weight
    nodes: dict[int, list[int]] = {}
    for i, tree in enumerate(a["nodes_treeids"]):
        nodes.setdefault(tree, []).append(i)
    base = a.get("base_values") or [0.0]
    if len(base) != 1:
        raise NotCompilable(f"{len(base)} base values (one expected for a binary score)")
    tracks = a.get("nodes_missing_value_tracks_true") or [0] * len(a["nodes_modes"])
    builder = ModelBuilder(
        threshold_type="float32", leaf_output_type="float32",
        metadata=Metadata(num_feature=n_features, task_type="kBinaryClf", average_tree_output=False,
                          num_target=1, num_class=[1], leaf_vector_shape=(1, 1)),
        tree_annotation=TreeAnnotation(num_tree=len(nodes), target_id=[0] * len(nodes), class_id=[0] * len(nodes)),
        postprocessor=PostProcessorFunc(name=post), base_scores=[float(base[0])])
    for tree in sorted(nodes):
        builder.start_tree()
        for i in nodes[tree]:
            node = a["nodes_nodeids"][i]
            builder.start_node(node)
            if a["nodes_modes"][i] == b"LEAF":
                builder.leaf(leaves.get((tree, node), 0.0))
            else:  # ONNX's "true" branch is Treelite's left; a missing value goes where ONNX sends it
                builder.numerical_test(feature_id=a["nodes_featureids"][i], threshold=a["nodes_values"][i],
                                       default_left=bool(tracks[i]),
                                       opname=OPERATORS[a["nodes_modes"][i]],
                                       left_child_key=a["nodes_truenodeids"][i],
                                       right_child_key=a["nodes_falsenodeids"][i])
            builder.end_node()
        builder.end_tree()
    return builder.commit()


def _ensemble(onnx: bytes) -> tuple[Any, int, dict[str, Any]]:
    """The graph, its input's feature count and the (first) tree ensemble's attributes ({} without one)."""
    import onnx as onnx_lib

    graph = onnx_lib.load_from_string(onnx).graph
    n_features = graph.input[0].type.tensor_type.shape.dim[1].dim_value
    node = next((n for n in graph.node if n.op_type == "TreeEnsembleClassifier"), None)
    return graph, n_features, {} if node is None else {
        attr.name: onnx_lib.helper.get_attribute_value(attr) for attr in node.attribute}


def probe_rows(onnx: bytes, rows: int = 20_000, seed: int = 0) -> np.ndarray:
    """Rows whose every feature sits on one of that feature's thresholds, or the float32 just above or below
    it, or between them: every branch taken both ways, and every comparison tried at equality."""
    _, n_features, a = _ensemble(onnx)
    rng = np.random.default_rng(seed)
    x = np.empty((rows, n_features), dtype=np.float32)
    features = np.asarray(a.get("nodes_featureids", []))
    values = np.asarray(a.get("nodes_values", []), dtype=np.float32)
    for f in range(n_features):
        thresholds = np.unique(values[(features == f) & (np.asarray(a["nodes_modes"]) != b"LEAF")]) \
            if len(values) else np.empty(0, np.float32)
        if not len(thresholds):
            x[:, f] = rng.normal(0, 100, rows)
            continue
        at = rng.choice(thresholds, rows)
        step = rng.integers(-1, 2, rows)  # below, on, above
        x[:, f] = np.where(step < 0, np.nextafter(at, np.float32(-np.inf)),
                           np.where(step > 0, np.nextafter(at, np.float32(np.inf)), at))
        spread = rng.random(rows) < 0.2  # and some anywhere in (and a little past) the range
        x[spread, f] = rng.uniform(thresholds[0] - 1, thresholds[-1] + 1, int(spread.sum()))
    return x


def parity_difference(onnx: bytes, library: bytes) -> float:
    x = probe_rows(onnx)
    expected = OnnxModel(onnx, threads=1).positive_proba(x)
    got = CompiledModel(library, threads=1).positive_proba(x)
    return float(np.max(np.abs(expected - got))) if len(x) else 0.0


class OnnxModel:
    def __init__(self, onnx: bytes, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: every core
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])

    def positive_proba(self, x: np.ndarray) -> np.ndarray:
        return positive_proba(self.session.run(None, {INPUT_NAME: x}))


class CompiledModel:
    """The library written to a temp file (a worker on another node got its bytes), loaded, the file removed."""

    def __init__(self, library: bytes, threads: int) -> None:
        import tl2cgen

        with tempfile.TemporaryDirectory(prefix="mlops-trees-") as folder:  # loaded, the file may go
            path = Path(folder) / f"{hashlib.sha256(library).hexdigest()[:16]}.so"
            path.write_bytes(library)
            self.predictor = tl2cgen.Predictor(str(path), nthread=threads or os.cpu_count() or 1)
        self._dmatrix = tl2cgen.DMatrix

    def positive_proba(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.predictor.predict(self._dmatrix(np.ascontiguousarray(x, dtype=np.float32))),
                          dtype=np.float64).reshape(len(x))


def load(onnx: bytes, choice: Choice, threads: int) -> tuple[Any, str]:
    """(the model, the runtime it is): a compiled library that does not load here (another platform's worker)
    falls back to onnxruntime, and the job's summary counts the partitions each runtime scored."""
    if choice.runtime == "compiled":
        try:
            return CompiledModel(choice.library, threads), "compiled"
        except Exception:  # noqa: BLE001 - an OSError from dlopen, tl2cgen's own: onnxruntime answers the same
            pass
    return OnnxModel(onnx, threads), "onnxruntime"


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Both output streams into ``path``: Python's (tl2cgen's log callback prints) and the file descriptors
    (the compiler's own)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with path.open("w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
            sink.flush()
    finally:
        for fd, copy in ((1, saved[0]), (2, saved[1])):
            os.dup2(copy, fd)
            os.close(copy)


def _cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlops-stack" / "compiled-trees"
