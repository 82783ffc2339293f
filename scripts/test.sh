#!/usr/bin/env bash
# README command 2 (what CI runs): install, lint, then the whole test suite. The tests start the real
# Redis and Kafka themselves (tests/conftest.py → tools.services) and stop them at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export BENTOML_DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
.venv/bin/ruff check .
# Two pytest workers (pytest-xdist), each with its own workspace and its own Redis, Kafka, PostgreSQL and
# servers (tests/conftest.py), so a fault test that kills the broker kills only its worker's; files stay whole on
# one worker (their module fixtures start once). MLOPS_TEST_WORKERS=0 runs everything in this one process.
exec .venv/bin/python -m pytest -q -n "${MLOPS_TEST_WORKERS:-2}" --dist loadfile "$@"
