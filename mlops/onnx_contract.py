"""What the served ONNX graph looks like from outside: input name and how to read the probability.

Kept apart from the exporter so the serving image needs onnxruntime only, not skl2onnx/sklearn.
"""

from __future__ import annotations

import json

import numpy as np

INPUT_NAME = "features"


def positive_proba(outputs: list[np.ndarray]) -> np.ndarray:
    """The probability of class 1 from a classifier's (label, probabilities) outputs."""
    return np.asarray(outputs[1], dtype=np.float64)[:, 1]


def node_placement(model: str | bytes, providers: list[str], sample: np.ndarray, input_name: str = INPUT_NAME,
                   threads: int = 1) -> dict[str, int]:
    """How many graph nodes each execution provider ran on one call of ``sample``, from onnxruntime's profile.

    ``session.get_providers()`` lists what a session *may* use: a CUDA session still runs every node that has no
    CUDA kernel on CPU (all of ``ai.onnx.ml``, the tree ensembles among them), silently. The profile says which.
    """
    import tempfile
    from collections import Counter
    from pathlib import Path

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "placement")
        session = ort.InferenceSession(model, sess_options=options, providers=providers)
        session.run(None, {input_name: sample})
        events = json.loads(Path(session.end_profiling()).read_text())
    placed: Counter[str] = Counter()
    seen: set[str] = set()
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") == "Node" and "provider" in args and event.get("name") not in seen:
            seen.add(event["name"])
            placed[args["provider"]] += 1
    return dict(placed)


def main_provider(placement: dict[str, int], cpu: str = "CPUExecutionProvider") -> str:
    """The accelerator that ran any node (the most nodes), else CPU: what the session really runs on."""
    accelerated = {name: n for name, n in placement.items() if name != cpu and n > 0}
    return max(accelerated, key=lambda name: accelerated[name]) if accelerated else cpu
