"""The join's pending state, measured against the alternative the issue names: an archive of the prediction log
in Parquet, joined in batch. What one pending prediction costs there on disk, and what joining a batch of
outcomes against a day of it costs — beside Redis's figure from `python -m bench.join` (RAM, per event).

    python -m bench.join_state [--predictions 1000000] [--outcomes 100000] [--name join-state]

The records are what the Redis store keeps per pending prediction (request id, model version, score, time),
zstd-compressed Parquet written by pyarrow; the join is pyarrow's hash join of the outcomes' request ids
against the whole archive (one file standing for one day at 1,000 predictions/s would hold 86.4 million).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import print_table, write_results

SECONDS_7_DAYS = 7 * 86400


def archive(n: int, rng: np.random.Generator) -> pa.Table:
    ids = [uuid.uuid4().hex for _ in range(n)]
    return pa.table({"request_id": ids, "model_version": pa.array(["fraud_detector:v1"] * n).dictionary_encode(),
                     "score": rng.random(n).astype(np.float32),
                     "ts": (1_790_000_000 + np.sort(rng.random(n)) * 86400).astype(np.float64)})


def run(predictions: int, outcomes: int) -> list[dict]:
    rng = np.random.default_rng(1)
    table = archive(predictions, rng)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "predictions.parquet"
        started = time.perf_counter()
        pq.write_table(table, path, compression="zstd")
        write_s = time.perf_counter() - started
        size = path.stat().st_size
        wanted = pa.table({"request_id": rng.choice(table["request_id"].to_numpy(zero_copy_only=False), outcomes,
                                                    replace=False),
                           "label": rng.integers(0, 2, outcomes).astype(np.int8)})
        started = time.perf_counter()
        joined = pq.read_table(path).join(wanted, "request_id", join_type="inner")
        join_s = time.perf_counter() - started
    assert joined.num_rows == outcomes
    per = size / predictions
    return [{"store": "parquet archive (zstd) + pyarrow hash join", "predictions": predictions,
             "bytes_per_pending": round(per, 1),
             "gib_for_1000_per_s_7_days": round(per * 1000 * SECONDS_7_DAYS / 2**30, 1),
             "write_s": round(write_s, 2), "outcomes": outcomes, "join_s": round(join_s, 2),
             "join_rows_scanned_per_s": round(predictions / join_s)}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.join_state", description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=int, default=1_000_000)
    parser.add_argument("--outcomes", type=int, default=100_000)
    parser.add_argument("--name", default="join-state")
    args = parser.parse_args(argv)
    rows = run(args.predictions, args.outcomes)
    print_table("Pending join state in a Parquet archive (the alternative to Redis)", rows,
                ["predictions", "bytes_per_pending", "gib_for_1000_per_s_7_days", "write_s", "outcomes", "join_s",
                 "join_rows_scanned_per_s"])
    print(f"wrote {write_results(args.name, rows, vars(args))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
