"""Argument parsing shared by the command-line tools."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes end with one line on stderr and exit code 2, like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")
