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


def apply_and_materialize(repo: Path, env: dict[str, str]) -> None:
    feast(repo, env, "apply")
    feast(repo, env, "materialize-incremental", time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()))
