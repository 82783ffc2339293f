"""All benchmarks in one command: `python -m bench [--seconds 10] [--concurrency 1,8,32]`.

Prints the tables and writes bench/results/{drift,drift_kafka,serving}.json.
"""

from __future__ import annotations

import argparse
import sys

from bench import drift, serving


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--seconds", type=float, default=10.0, help="load duration per concurrency level")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--events", type=int, default=100_000, help="events for the in-process drift benchmark")
    args = parser.parse_args(argv)
    drift.main(["--events", str(args.events)])
    with serving.bench_workspace() as ws:
        drift.kafka_benchmark(ws.settings)
        serving.run(ws, [int(c) for c in args.concurrency.split(",")], args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
