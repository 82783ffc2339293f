"""What a rollout adds to the request path: the scorer's cost per batch with Production alone, a traffic split
(routing by the customer hash, two model calls where a batch holds both arms) and a shadow (two calls on every
batch), in process and without the online store, so that only the rollout's own work differs.

`python -m bench.routing [--name routing-run1]`; prints a table and writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import write_results
from mlops.models import ONNX_FILE, StoredModel
from mlops.schema import MODEL_FEATURES, STORE_FEATURES
from service.contract import PredictRequest, StoreFeatures
from service.model_selector import Serving
from service.onnx_predictor import OnnxPredictor
from service.scoring import Scorer

BATCHES = (1, 8, 64)  # 64: the service's default MLOPS_MAX_BATCH_SIZE
VARIANTS = ("production only", "split 5 %", "split 50 %", "shadow")


class _Selector:
    def __init__(self, serving: Serving) -> None:
        self.current = serving


def predictors(folder: Path) -> tuple[OnnxPredictor, OnnxPredictor]:
    from lifecycle import data
    from lifecycle.train import train

    dataset = data.generate(2_000, 20_000, seed=3)
    out = []
    for version, params in (("v1", None), ("v2", {"n_estimators": 100, "max_depth": 3})):
        path = folder / version
        path.mkdir(parents=True)
        (path / ONNX_FILE).write_bytes(train(dataset, params=params).onnx_bytes)
        out.append(OnnxPredictor.load(StoredModel("bench", version, path, {"features": list(MODEL_FEATURES)}),
                                      "cpu"))
    return out[0], out[1]


def serving_for(variant: str, production: OnnxPredictor, candidate: OnnxPredictor) -> Serving:
    if variant == "production only":
        return Serving(production)
    if variant == "shadow":
        return Serving(production, shadow=candidate, rollout="r:0")
    share = 0.05 if variant == "split 5 %" else 0.5
    return Serving(production, candidate, share, rollout="r:1")


def requests(n: int, offset: int) -> list[PredictRequest]:
    """Rows that bring every store feature (no lookup), each from another customer (routing differs per row)."""
    return [PredictRequest(transaction_amount=50.0 + i % 400, customer_id=f"C{(offset + i) % 100_000:06d}",
                           features=StoreFeatures(**{name: 1.0 + (i % 7) for name in STORE_FEATURES}))
            for i in range(n)]


def measure(scorer: Scorer, batch: int, budget_s: float) -> dict[str, Any]:
    loop = asyncio.new_event_loop()
    try:
        pools = [requests(batch, k * batch) for k in range(64)]
        for rows in pools[:8]:
            loop.run_until_complete(scorer.score(rows))
        times: list[float] = []
        deadline = time.perf_counter() + budget_s
        k = 0
        while len(times) < 50 or (time.perf_counter() < deadline and len(times) < 20_000):
            rows = pools[k % len(pools)]
            k += 1
            started = time.perf_counter()
            loop.run_until_complete(scorer.score(rows))
            times.append(time.perf_counter() - started)
    finally:
        loop.close()
    p50 = statistics.median(times)
    return {"batch": batch, "calls": len(times), "p50_us": round(p50 * 1e6, 2),
            "p50_us_per_row": round(p50 * 1e6 / batch, 2)}


def run(budget_s: float) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        production, candidate = predictors(Path(tmp))
        rows = []
        for batch in BATCHES:
            # Interleaved, each variant measured twice, so drift of a noisy machine touches all alike.
            samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for _ in range(2):
                for variant in VARIANTS:
                    scorer = Scorer(store=None, selector=_Selector(serving_for(variant, production, candidate)))  # type: ignore[arg-type]
                    samples[variant].append(measure(scorer, batch, budget_s / 2)["p50_us"])
            base = statistics.median(samples["production only"])
            for variant in VARIANTS:
                p50 = statistics.median(samples[variant])
                rows.append({"variant": variant, "batch": batch, "p50_us": round(p50, 2),
                             "p50_us_per_row": round(p50 / batch, 2), "added_us": round(p50 - base, 2),
                             "ratio": round(p50 / base, 3)})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | " + " | ".join(f"batch {b}: µs (×)" for b in BATCHES) + " |",
             "|---|" + "---|" * len(BATCHES)]
    for variant in VARIANTS:
        cells = [next(f"{r['p50_us']:.0f} (×{r['ratio']:.2f})" for r in rows
                      if r["variant"] == variant and r["batch"] == b) for b in BATCHES]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.routing", description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=2.0, help="seconds per variant and batch size")
    parser.add_argument("--name", default="routing", help="bench/results/<name>.json")
    args = parser.parse_args(argv)
    rows = run(args.budget_s)
    print(table(rows))
    print(write_results(args.name, rows, {"budget_s": args.budget_s, "batches": list(BATCHES)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
