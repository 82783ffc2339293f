"""All benchmarks in one command: `python -m bench [serving options]` (see `python -m bench.serving -h`).

Prints the tables and writes bench/results/{drift,drift_kafka,serving}.json.
"""

from __future__ import annotations

import sys

from bench import drift, serving
from bench.common import print_table, write_results


def main(argv: list[str] | None = None) -> int:
    parser = serving.parser()
    parser.prog = "bench"
    parser.add_argument("--events", type=int, default=100_000, help="events for the in-process drift benchmark")
    args = parser.parse_args(argv)
    drift.main(["--events", str(args.events)])
    with serving.bench_workspace() as ws:
        row = drift.kafka_end_to_end(ws)
        print_table("Drift consumer end to end (real Kafka fetch + Redis checkpoints)", [row],
                    ["what", "events", "cpu_s", "wall_s", "events_per_s_per_core", "events_per_s_wall"])
        print(f"wrote {write_results('drift_kafka', [row])}")
        serving.run(ws, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
