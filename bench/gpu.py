"""The CUDA provider path, measured: where the model's nodes run and what a batch costs on each provider.

Two steps, so a GPU machine need not hold the stack: here, `python -m bench.gpu --prepare DIR` trains the demo's
model (synthetic data, the served parameters) and writes DIR/{model.onnx,rows.npy,labels.npy}; there, with
onnxruntime-gpu (and, for the tensorised variant, scikit-learn + hummingbird-ml + torch),
`python -m bench.gpu --model DIR/model.onnx --rows DIR/rows.npy --labels DIR/labels.npy --out F.json` needs
numpy, onnxruntime and `mlops.onnx_contract` only. Results: bench/results/gpu-run{1,2}.json.

Variants:
- ``served-cpu`` / ``served-cuda``: the served graph (skl2onnx, one ``TreeEnsembleClassifier`` node) with the
  service's session options on each provider. onnxruntime has no CUDA kernel for the ``ai.onnx.ml`` tree
  operators, so the CUDA session places that node on CPU: this benchmark records the placement per node
  from onnxruntime's own profile instead of trusting ``session.get_providers()``.
- ``tensorised-torch-cpu`` / ``-cuda``: the same trees compiled to tensor operations (GEMM strategy) by
  hummingbird-ml and run by PyTorch, the way a GBDT can really use a GPU; probabilities checked against the
  refitted sklearn model's. (hummingbird 0.4's ONNX backend traces a fixed batch size under torch 2.11.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mlops.onnx_contract import INPUT_NAME, node_placement, positive_proba

BATCHES = (1, 32, 256, 1024, 8192, 65536)


def session(model: bytes | str, provider: str, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # as the service's sessions
    providers = [provider, "CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [provider]
    return ort.InferenceSession(model, sess_options=options, providers=providers)


def time_batches(predict: Callable[[np.ndarray], Any], x_all: np.ndarray, budget_s: float) -> list[dict[str, Any]]:
    """Latency of one call per batch size, numpy in and out (what the service's batcher hands the model)."""
    rows = []
    for batch in BATCHES:
        x = np.ascontiguousarray(np.resize(x_all, (batch, x_all.shape[1])).astype(np.float32))
        for _ in range(5):
            predict(x)
        times: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(times) < 20 or (time.perf_counter() < deadline and len(times) < 2000):
            t0 = time.perf_counter()
            predict(x)
            times.append(time.perf_counter() - t0)
        times.sort()
        p50 = statistics.median(times)
        rows.append({
            "batch": batch, "calls": len(times), "p50_ms": round(p50 * 1e3, 4),
            "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3, 4),
            "rows_per_s": round(batch / p50, 1),
        })
    return rows


def proba(sess, x: np.ndarray, input_name: str) -> np.ndarray:
    return positive_proba(sess.run(None, {input_name: x}))


def tensorised(x: np.ndarray, y: np.ndarray, params: dict[str, Any], budget_s: float,
               reference: np.ndarray) -> list[dict[str, Any]]:
    """The GBDT refitted with the served model's parameters, compiled to tensor ops (GEMM) by hummingbird-ml
    and run by PyTorch on CPU and CUDA: what the same trees cost where a GPU can really work on them."""
    import torch
    from hummingbird.ml import convert
    from sklearn.ensemble import GradientBoostingClassifier

    model = GradientBoostingClassifier(**params).fit(x, y)
    sklearn_p = model.predict_proba(x)[:, 1]
    results = []
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        hb = convert(model, "torch", x[:256], extra_config={"tree_implementation": "gemm"}).to(device)
        p = hb.predict_proba(x)[:, 1]
        results.append({
            "variant": f"tensorised-torch-{device}", "device": device, "torch_threads": torch.get_num_threads(),
            "max_abs_diff_vs_refit_sklearn": float(np.max(np.abs(p - sklearn_p))),
            "max_abs_diff_vs_served_cpu": float(np.max(np.abs(p - reference))),
            "batches": time_batches(hb.predict_proba, x, budget_s),
        })
        print(json.dumps(results[-1]), flush=True)
    return results


def prepare(out: Path) -> None:
    from lifecycle import data
    from lifecycle.train import split, train

    dataset = data.generate()
    x_train, _, y_train, _ = split(dataset)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(train(dataset).onnx_bytes)
    np.save(out / "rows.npy", x_train.astype(np.float32))
    np.save(out / "labels.npy", y_train)


def environment() -> dict[str, Any]:
    import onnxruntime as ort

    gpu = ""
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "gpu": gpu,
            "cpu_count": os.cpu_count(), "python": platform.python_version()}


def run_variant(name: str, model: bytes | str, provider: str, x: np.ndarray, input_name: str,
                budget_s: float, reference: np.ndarray | None) -> dict[str, Any]:
    sess = session(model, provider)
    result: dict[str, Any] = {
        "variant": name, "provider_asked": provider, "session_providers": sess.get_providers(),
        "nodes_by_provider": node_placement(model, sess.get_providers(), x[:256], input_name),
    }
    p = proba(sess, x, input_name)
    if reference is not None:
        result["max_abs_diff_vs_served_cpu"] = float(np.max(np.abs(p - reference)))
    result["batches"] = time_batches(lambda b: sess.run(None, {input_name: b}), x, budget_s)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", metavar="DIR", help="write the model, rows and labels to DIR and stop")
    parser.add_argument("--model", help="the served ONNX model")
    parser.add_argument("--rows", help="feature rows (.npy, float32)")
    parser.add_argument("--labels", help="labels (.npy) to refit the trees for the tensorised variant")
    parser.add_argument("--params", default='{"n_estimators": 150, "max_depth": 3, "learning_rate": 0.1, '
                        '"random_state": 0}', help="the served model's GradientBoostingClassifier parameters")
    parser.add_argument("--budget-s", type=float, default=1.0, help="seconds of timed calls per batch size")
    parser.add_argument("--out", default="bench/results/gpu.json")
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(Path(args.prepare))
        return 0
    if not (args.model and args.rows):
        parser.error("--model and --rows are required (or --prepare DIR)")

    x = np.load(args.rows).astype(np.float32)
    env = environment()
    print(json.dumps(env), flush=True)
    providers = ["CPUExecutionProvider"] + (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in env["providers"]
                                            else [])
    results: list[dict[str, Any]] = []
    reference = proba(session(args.model, "CPUExecutionProvider"), x, INPUT_NAME)
    for provider in providers:
        tag = "cuda" if provider.startswith("CUDA") else "cpu"
        results.append(run_variant(f"served-{tag}", args.model, provider, x, INPUT_NAME, args.budget_s, reference))
        print(json.dumps(results[-1]), flush=True)
    tensorised_error = None
    if args.labels:
        try:
            results += tensorised(x, np.load(args.labels), json.loads(args.params), args.budget_s, reference)
        except Exception as exc:  # the tensorised variant is a comparison, not the served path
            tensorised_error = f"{type(exc).__name__}: {exc}"
            print("tensorised variant failed:", tensorised_error, file=sys.stderr, flush=True)
    out = {"environment": env, "rows": int(len(x)), "variants": results, "tensorised_error": tensorised_error,
           "taken_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
