"""Runs the real `feast` CLI on a repo, with the Redis connection from the settings: the address from the
services env file, and the credentials and TLS options when Redis has them.

``feature_store.yaml`` names the connection ``${MLOPS_REDIS_ADDRESS}``; for the `feast` process alone that
variable is set to Feast's full connection string (``host:port,username=…,password=…,ssl=true,…``), built
from the secret files, so no password sits in an env file or a YAML file.

    python -m tools.feast_cli [--repo feature_repo] materialize-incremental 2026-12-03T00:00:00
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from mlops.connections import feast_connection_string
from mlops.settings import DEFAULT_ENV_FILE, ENV_PREFIX, Settings


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


def settings_of(env: dict[str, str]) -> Settings:
    """The settings a process started with ``env`` would load (its ``MLOPS_*`` variables win)."""
    fields = Settings.model_fields
    given = {k[len(ENV_PREFIX):].lower(): v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    return Settings(**{k: v for k, v in given.items() if k in fields})


def feast(repo: Path, env: dict[str, str], *args: str, capture: bool = True) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("feast")
    env = {**env, "MLOPS_REDIS_ADDRESS": feast_connection_string(settings_of(env))}
    result = subprocess.run([str(exe), *args], cwd=repo, env=env, capture_output=capture, text=True,
                            timeout=600 if capture else None)
    if capture and result.returncode != 0:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.feast_cli",
                                     description="feast, with the Redis connection (credentials, TLS) from settings")
    parser.add_argument("--repo", type=Path, default=Path("feature_repo"))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the feast command and its arguments")
    args = parser.parse_args(argv)
    env_file = Path(os.environ.get(f"{ENV_PREFIX}ENV_FILE", DEFAULT_ENV_FILE))
    env = feast_env(env_file) if env_file.exists() else dict(os.environ)
    try:
        return feast(args.repo, env, *args.args, capture=False).returncode
    except (FeastError, ValueError) as exc:
        print(f"feast_cli: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
