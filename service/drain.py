"""The pod's preStop hook: keep serving while the endpoints drop the pod, then wait for the spool to empty.

A pod that ends with events still spooled (Kafka was unreachable) leaves them on its volume; on Kubernetes
that volume is the StatefulSet's claim for the pod's ordinal, so the pod that takes the ordinal next replays
them. Waiting here first, while the broker may be back and the server still runs its replay, means a normal
roll or scale-down leaves nothing behind. The wait ends when every worker's spool is empty, or at
``--timeout`` (exit 1, so the kubelet records a FailedPreStopHook event naming what was left).

    python -m service.drain [--settle 10] [--timeout 30]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mlops.cli_args import OneLineParser
from mlops.settings import Settings
from service.spool import pending_on_disk


def spool_files(spool_path: Path) -> list[Path]:
    """Every worker's spool beside the configured path (``<stem>-w<N><suffix>``), and the path itself."""
    found = sorted(spool_path.parent.glob(f"{spool_path.stem}-w*{spool_path.suffix}"))
    return [*found, spool_path] if spool_path.exists() else found


def pending(spool_paths: list[Path]) -> int:
    return sum(pending_on_disk(path) for base in spool_paths for path in spool_files(base))


def wait_empty(spool_paths: list[Path], timeout_s: float, poll_s: float = 0.5) -> int:
    """Bytes still spooled (predictions and outcomes) when the spools emptied (0) or the time ran out."""
    deadline = time.monotonic() + timeout_s
    left = pending(spool_paths)
    while left and time.monotonic() < deadline:
        time.sleep(poll_s)
        left = pending(spool_paths)
    return left


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m service.drain", description=__doc__.splitlines()[0])
    parser.add_argument("--settle", type=float, default=10.0, help="seconds to keep serving first (endpoints drop)")
    parser.add_argument("--timeout", type=float, default=30.0, help="longest wait for the spool to empty")
    args = parser.parse_args(argv)
    if args.settle < 0 or args.timeout < 0:
        parser.error("--settle and --timeout must be 0 or more")
    settings = Settings.load()
    spool_path = settings.spool_path
    time.sleep(args.settle)
    left = wait_empty([spool_path, settings.outcome_spool_path], args.timeout)
    if left:
        print(f"drain: {left} bytes of prediction and outcome events still spooled in {spool_path.parent} after "
              f"{args.timeout:g} s (Kafka unreachable?): the pod that takes this volume next replays them",
              file=sys.stderr)
        return 1
    print(f"drain: spool in {spool_path.parent} empty", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
