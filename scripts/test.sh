#!/usr/bin/env bash
# README command 2 (what CI runs): install, lint, then the whole test suite. The tests start the real
# Redis and Kafka themselves (tests/conftest.py → tools.services) and stop them at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export BENTOML_DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
