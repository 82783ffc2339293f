"""Where a result came from: the machine and the commit (a dirty tree's numbers name no commit). Used by the
benchmarks and by the demo's recorded runs."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict[str, str | int]:
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count() or 0,
            "cpu_model": cpu, "memory_gib": round(memory_gib, 1), "kernel": platform.release()}


def git_state() -> dict[str, Any]:
    """The commit measured, and whether the tree differed from it (a dirty tree's numbers name no commit)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    # Result files of earlier runs are outputs, not code: a second run after the first wrote its JSON is
    # still a run of the clean commit.
    return {"sha": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"))}
