"""Where the partitions run: in this process, one after another (small inputs: no start-up to pay), or on Ray
Data (local by default: Ray starts in this process with one worker per core; a cluster by its address), with
the same partition function. Ray streams the partitions through a bounded pool of tasks, so memory stays at a
few partitions whatever the input's size; tasks go with ``max_retries=3`` (Ray retries one whose worker died).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from lifecycle import ray_runtime
from lifecycle.batch.inputs import Partition
from lifecycle.batch.scoring import Job, PartitionResult, score_partition

ENGINES = ("auto", "local", "ray")

Done = Callable[[PartitionResult, Partition], None]


def choose(engine: str, address: str | None) -> str:
    """`auto`: Ray when given a cluster, else this process. Measured on one 2-core machine (bench/batch.py), Ray
    in-process was slower up to 1,000,000 rows (start-up; the single process already runs the model on every
    core) and 8-9 % faster at 10,000,000 at 4.5x the memory: `--engine ray` is for a cluster, or a large input
    on a machine with many cores."""
    if engine != "auto":
        return engine
    return "ray" if address else "local"


def run_local(partitions: Sequence[Partition], job: Job, done: Done) -> None:
    for partition in partitions:
        done(score_partition(partition, job), partition)


def run_ray(partitions: Sequence[Partition], job: Job, done: Done, address: str | None = None,
            workers: int | None = None) -> None:
    import ray

    with ray_runtime.session(address, workers):
        by_key = {p.key: p for p in partitions}
        specs = ray.data.from_items([p.to_dict() for p in partitions], override_num_blocks=max(1, len(partitions)))

        def task(spec: dict[str, Any]) -> dict[str, Any]:
            result = score_partition(Partition(**spec), job).to_dict()
            return {**result, "reasons": json.dumps(result["reasons"])}  # (a dict per row: one Arrow schema)

        size = workers or ray_runtime.cpus()
        with warnings.catch_warnings():  # (fewer partitions than allowed tasks is no concern)
            warnings.simplefilter("ignore", UserWarning)
            for row in specs.map(task, compute=ray.data.TaskPoolStrategy(size=size), max_retries=3).iter_rows():
                fields = {k: row[k] for k in PartitionResult.__dataclass_fields__}
                result = PartitionResult(**{**fields, "reasons": json.loads(fields["reasons"])})
                done(result, by_key[result.key])
