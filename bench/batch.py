"""Batch scoring at size: `mlops-score` in one process and on Ray (local), beside what a top engineer writes by
hand for one machine (pandas `merge_asof` for the point-in-time join, one onnxruntime call per chunk).

    python -m bench.batch [--sizes 100000,1000000,10000000] [--name batch-run1]

Each size: transactions of the demo's customers at times across the feature history (the point-in-time join
has work to do), written as Parquet; then each system scores it into a fresh folder. Reported per system and
size: rows/s end to end (process start to exit: what a user waits for), peak resident memory of the process
tree (Ray's workers and object store included), and the model step alone in rows/s per core on each runtime
(onnxruntime, the compiled trees). Results in
bench/results/<name>.json with the git commit and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.common import print_table, write_results

ROOT = Path(__file__).resolve().parents[1]
# mlops-score's command-line options per system: the default (compiled trees where a C compiler is), the same
# on onnxruntime (what compiling buys, end to end), and on Ray in this process
SYSTEMS = {"hand-written pandas": [], "mlops-score local": ["--engine", "local"],
           "mlops-score local, onnxruntime": ["--engine", "local", "--model-runtime", "onnxruntime"],
           "mlops-score ray": ["--engine", "ray"]}
CHECK_UP_TO = 1_000_000  # sizes whose outputs are read back and compared, row by row, with the first system's


def make_input(dataset, rows: int, path: Path, seed: int = 0) -> None:
    """``rows`` transactions: customers drawn from the demo's, times spread over the stats' history."""
    rng = np.random.default_rng(seed)
    customers = dataset.customers["customer_id"].unique()
    stamps = dataset.customers["event_timestamp"]
    low, high = stamps.min().value, (stamps.max() + pd.Timedelta(days=1)).value
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    for start in range(0, rows, 1_000_000):
        n = min(1_000_000, rows - start)
        frame = pd.DataFrame({
            "customer_id": customers[rng.integers(0, len(customers), n)],
            "event_timestamp": pd.to_datetime(rng.integers(low, high, n), utc=True),
            "transaction_amount": rng.gamma(2.0, 60.0, n).round(2),
            "row": np.arange(start, start + n),
        })
        table = pa.Table.from_pandas(frame, preserve_index=False)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=1_000_000)
    assert writer is not None
    writer.close()


class PeakMemory:
    """Resident memory of a process and all its descendants, sampled every 0.1 s; the peak."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                total = 0
                for proc in procs:
                    try:
                        total += proc.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                return
            time.sleep(0.1)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_system(system: str, source: Path, out: Path, env: dict[str, str], model_uri: str) -> dict[str, Any]:
    if system == "hand-written pandas":
        cmd = [sys.executable, "-m", "bench.batch_peer", str(source), str(out)]
    else:
        cmd = [sys.executable, "-m", "lifecycle.batch.cli", "--no-progress", "--json", "--input", str(source),
               "--model", model_uri, "--output", str(out), *SYSTEMS[system]]
    started = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = PeakMemory(process.pid)
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    peak = memory.stop()
    if process.returncode != 0:
        raise RuntimeError(f"{system}: exit {process.returncode}: {stderr[-2000:]}")
    report = json.loads(stdout.strip().splitlines()[-1] if system == "hand-written pandas" else stdout)
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak / 2**20), "scored": report["scored"],
            "read": report["read"], "model_seconds": report["model_seconds"],
            "runtime": report.get("runtime", "onnxruntime")}


def max_difference(a: Path, b: Path) -> float:
    """The largest difference between two systems' scores of the same input row; the same rows scored."""
    left, right = (pd.read_parquet(p, columns=["row", "prediction"]).set_index("row").sort_index() for p in (a, b))
    if not left.index.equals(right.index):
        raise AssertionError(f"{a.name} and {b.name} scored different rows ({len(left)} and {len(right)})")
    return float((left["prediction"] - right["prediction"]).abs().max()) if len(left) else 0.0


MODEL_STEPS = {"onnxruntime": "model step alone (onnxruntime, 1 thread)",
               "compiled": "model step alone (compiled trees, 1 thread)"}


def model_step(onnx: bytes, runtime: str, x: np.ndarray, rows: int = 2_000_000) -> float:
    """Rows per second of the model call alone, one thread (one core), on chunks ``x`` of the CLI's size, as
    mlops-score makes it (compiled: the library its parity check let through)."""
    from lifecycle.batch import runtimes

    choice = runtimes.choose(runtime, onnx)
    model, got = runtimes.load(onnx, choice, threads=1)
    assert got == runtime, (got, choice.why)
    model.positive_proba(x)
    started, done = time.perf_counter(), 0
    while done < rows:
        model.positive_proba(x)
        done += len(x)
    return done / (time.perf_counter() - started)


def run(sizes: list[int], systems: list[str]) -> list[dict[str, Any]]:
    from harness import workspace
    from tools import services as svc

    root = Path(tempfile.mkdtemp(prefix="mlops-batch-bench-"))
    run_dir = Path(".run/bench-batch")
    svc.up(run_dir, only="redis")  # the offline store needs none of it; the workspace's Feast apply does
    rows: list[dict[str, Any]] = []
    try:
        ws = workspace.prepare(root, svc.RunDir(run_dir).env_file, workspace.copy_feature_repo(root / "repo"))
        env = {**ws.env, "PYTHONPATH": str(ROOT)}
        uri = f"models:/{ws.model.name}/{ws.model.version}"
        # the model's real inputs: the demo's transactions with their features as of each one's time (branches
        # taken as in a job: noise would make every tree walk the same few paths, and look faster)
        from lifecycle.data import training_frame
        from mlops.schema import MODEL_FEATURES

        real = training_frame(ws.dataset)[list(MODEL_FEATURES)].to_numpy(np.float32)
        x = real[np.random.default_rng(1).integers(0, len(real), 65_536)]
        for runtime, name in MODEL_STEPS.items():  # the median of three
            step = sorted(model_step(ws.model.onnx_path.read_bytes(), runtime, x) for _ in range(3))[1]
            rows.append({"system": name, "runtime": runtime, "rows_per_s_per_core": round(step)})
            print(f"  {name}: {rows[-1]['rows_per_s_per_core']:,} rows/s on one core", flush=True)
        for size in sizes:
            source = root / f"in-{size}.parquet"
            make_input(ws.dataset, size, source)
            outputs = {}
            for system in systems:
                out = outputs[system] = root / f"out-{size}-{system.replace(' ', '-')}"
                r = run_system(system, source, out, env, uri)
                row = {"system": system, "rows": size, **r, "rows_per_s": round(size / r["seconds"]),
                       "model_rows_per_s": round(r["scored"] / r["model_seconds"]) if r["model_seconds"] else None}
                if size <= CHECK_UP_TO and system != systems[0]:
                    row["max_abs_diff_vs_first"] = max_difference(outputs[systems[0]], out)
                rows.append(row)
                print(f"  {system:<22} {size:>11,} rows  {row['seconds']:8.1f} s  {row['rows_per_s']:>9,} rows/s  "
                      f"peak {row['peak_rss_mb']:>6,} MB  scored {row['scored']:,}", flush=True)
            for out in outputs.values():
                shutil.rmtree(out, ignore_errors=True)
            source.unlink()
    finally:
        svc.down(run_dir, purge=True)
        shutil.rmtree(root, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.batch", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000,10000000", help="input rows, comma-separated")
    parser.add_argument("--systems", default=";".join(SYSTEMS), help="semicolon-separated, of: "
                                                                     + "; ".join(SYSTEMS))
    parser.add_argument("--name", default="batch", help="bench/results/<name>.json")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    systems = args.systems.split(";")
    if unknown := set(systems) - SYSTEMS.keys():
        parser.error(f"unknown systems {sorted(unknown)}")
    rows = run(sizes, systems)
    print_table("Batch scoring (end to end, process start to exit)", [r for r in rows if "rows" in r],
                ["system", "rows", "seconds", "rows_per_s", "peak_rss_mb", "model_rows_per_s", "runtime"])
    print(write_results(args.name, rows, {"sizes": sizes, "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
