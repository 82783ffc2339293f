"""One way to be on Ray, for batch scoring and the training pipeline: join the cluster at an address, or start
Ray in this process (one worker per core, no dashboard), quiet, and leave it as found.

Ray keeps unix sockets under its temp folder and a socket path may not exceed 107 bytes: under a deep TMPDIR (a
test session's, a CI runner's) Ray in-process gets a short folder of its own in /tmp, removed afterwards.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SHORT_TEMP = 40


class RayUnavailable(RuntimeError):
    """Ray could not be started or joined (a wrong address, a cluster down): one line to show."""


@contextmanager
def session(address: str | None = None, workers: int | None = None) -> Iterator[None]:
    """Ray for the block's length: an already started Ray is used as is (and left running)."""
    import ray

    started_here, short_temp = not ray.is_initialized(), ""
    if started_here:
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                   "logging_level": logging.ERROR}
        if address:
            options["address"] = address
        else:
            options["num_cpus"] = workers or os.cpu_count() or 1
            if len(str(Path(tempfile.gettempdir()) / "ray")) > SHORT_TEMP:
                short_temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
                options["_temp_dir"] = short_temp
        try:
            ray.init(**options)
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError, ...
            if short_temp:
                shutil.rmtree(short_temp, ignore_errors=True)
            raise RayUnavailable(f"no Ray at {address or 'this process'}: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    try:
        from ray.data import DataContext

        context = DataContext.get_current()
        context.enable_progress_bars = False  # (callers draw their own, or none)
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # (its INFO lines on stderr)
        yield
    finally:
        if started_here:
            ray.shutdown()
        if short_temp:
            shutil.rmtree(short_temp, ignore_errors=True)


def cpus() -> int:
    """The CPUs of the Ray this process is on."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
