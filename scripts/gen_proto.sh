#!/usr/bin/env bash
# Regenerates service/proto/fraud_pb2*.py from service/proto/fraud.proto (grpcio-tools, a dev dependency).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. service/proto/fraud.proto
