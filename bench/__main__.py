"""All benchmarks in one command: `python -m bench [serving options]` (see `python -m bench.serving -h`).

Prints the tables and writes bench/results/{drift,drift_kafka,serving}.json.
"""

from __future__ import annotations

import sys

from bench import drift, serving


def main(argv: list[str] | None = None) -> int:
    parser = serving.parser()
    parser.prog = "bench"
    parser.add_argument("--events", type=int, default=100_000, help="events for the in-process drift benchmark")
    args = parser.parse_args(argv)
    drift.main(["--events", str(args.events)])
    with serving.bench_workspace() as ws:
        drift.kafka_benchmark(ws.settings)
        serving.run(ws, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
