"""What a top engineer writes by hand to score a Parquet file on one machine: pandas reads it whole, one
``merge_asof`` per customer for the point-in-time join (the feature view's ttl as tolerance), onnxruntime on
every core in chunks, one Parquet file out. No checks, no rejects file, no resume: the floor of the work.

    python -m bench.batch_peer INPUT.parquet OUTPUT_DIR   (prints {"read", "scored", "model_seconds"} as JSON)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd

from lifecycle.data import CUSTOMERS_FILE, point_in_time
from mlops.onnx_contract import INPUT_NAME, positive_proba
from mlops.schema import MODEL_FEATURES, STORE_FEATURES
from mlops.settings import Settings


def main(source: str, out: str) -> int:
    from mlops import models

    settings = Settings.load()
    stored = models.load(settings.model_name, settings.model_version)
    frame = pd.read_parquet(source)
    stats = pd.read_parquet(settings.feature_repo / "data" / CUSTOMERS_FILE)
    frame = pd.concat([frame, point_in_time(frame, stats)], axis=1).dropna(subset=list(STORE_FEATURES))
    session = ort.InferenceSession(str(stored.onnx_path), providers=["CPUExecutionProvider"])
    x = frame[list(MODEL_FEATURES)].to_numpy(dtype=np.float32)
    started = time.perf_counter()
    proba = np.concatenate([positive_proba(session.run(None, {INPUT_NAME: x[i:i + 65_536]}))
                            for i in range(0, len(x), 65_536)]) if len(x) else np.empty(0)
    model_seconds = time.perf_counter() - started
    frame = frame.assign(prediction=proba, label=(proba >= settings.decision_threshold).astype(np.int8))
    Path(out).mkdir(parents=True, exist_ok=True)
    frame.to_parquet(Path(out) / "part-0.parquet", index=False)
    print(json.dumps({"read": int(pd.read_parquet(source, columns=["row"]).shape[0]), "scored": len(frame),
                      "model_seconds": model_seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
