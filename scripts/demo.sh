#!/usr/bin/env bash
# README command 1: install, then run the whole path once (services, data, training, Feast, serving, Kafka).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export BENTOML_DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true
exec .venv/bin/python -m harness.demo "$@"
