"""Runs the real `feast` CLI on a repo, with the Redis address from the services env file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


class FeastError(RuntimeError):
    """`feast` exited non-zero."""


def feast_env(env_file: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's env) plus the KEY=VALUE lines of ``env_file``."""
    env = dict(os.environ if base is None else base)
    for line in env_file.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            env[key.strip()] = value.strip()
    return env


def feast(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("feast")
    result = subprocess.run([str(exe), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise FeastError(f"feast {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def apply_and_materialize(repo: Path, env: dict[str, str], lookback_s: int = 2 * 86_400) -> None:
    """`feast apply`, then `feast materialize` over the last ``lookback_s`` seconds.

    An explicit window, not materialize-incremental: the registry remembers the last incremental run, and
    data regenerated since (or a Redis that restarted empty) would otherwise be skipped.
    """
    feast(repo, env, "apply")
    now = time.time()
    fmt = "%Y-%m-%dT%H:%M:%S"
    feast(repo, env, "materialize", time.strftime(fmt, time.gmtime(now - lookback_s)),
          time.strftime(fmt, time.gmtime(now)))
