"""Argument parsing shared by the command-line tools."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes end with one line on stderr and exit code 2, like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An argparse type: a count of at least one (0 or -5 rows would fail deep inside, with a traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1")
    return value


def settings_error(exc: ValidationError) -> str:
    """The first bad setting as one line, named as the user set it (``MLOPS_…``), not pydantic's report."""
    from mlops.settings import ENV_PREFIX

    first = exc.errors()[0]
    field = str(first["loc"][0]) if first.get("loc") else "?"
    return f"{ENV_PREFIX}{field.upper()}: {first['msg']} (got {first.get('input')!r})"


def serve_metrics(port: int, prog: str) -> bool:
    """Prometheus on ``port`` (0: off); False, with the one-line reason on stderr, when it cannot listen."""
    if not port:
        return True
    import sys

    from prometheus_client import start_http_server

    try:
        start_http_server(port)
    except OSError as exc:
        print(f"{prog}: cannot serve metrics on :{port}: {exc.strerror}", file=sys.stderr)
        return False
    return True
