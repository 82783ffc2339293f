"""Schemathesis fuzzes the live API from its own OpenAPI document: no 5xx, no answer outside the schema."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def test_fuzzing_finds_no_server_error_and_no_schema_violation(server, tmp_path):
    st = Path(sys.executable).with_name("st")
    before = len(server.log_tail(100_000).splitlines())
    result = subprocess.run(
        [str(st), "run", f"{server.url}/docs.json", "--checks", "all", "--max-examples", "300", "--seed", "20261125",
         "--no-color", "--report", "junit", "--report-dir", str(tmp_path), "--request-timeout", "10"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(ROOT)},
    )
    summary = result.stdout[-3000:]
    assert result.returncode == 0, summary
    generated = int(re.search(r"(\d+) generated", result.stdout).group(1))
    assert generated >= 500, summary
    new_log = server.log_tail(100_000).splitlines()[before:]
    assert not [line for line in new_log if "Traceback" in line], "a fuzzed request made a traceback"
    print(f"\nschemathesis: {generated} cases, all checks passed")
