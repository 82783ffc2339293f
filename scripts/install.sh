#!/usr/bin/env bash
# Installs what the stack needs on a fresh Debian/Ubuntu machine: redis-server, a JDK and Maven (for the
# Kafka broker jars), PostgreSQL (the MLflow server's store for many hosts), and a Python virtual environment
# (.venv) with the pinned dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v java >/dev/null || need_apt+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need_apt+=(maven)
# Debian keeps the server binaries off PATH, in /usr/lib/postgresql/<major>/bin.
{ command -v initdb >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; } || need_apt+=(postgresql)
if ((${#need_apt[@]})); then
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  echo "install.sh: apt-get install ${need_apt[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 13) else 1)' \
  || { echo "install.sh: Python 3.11 or 3.12 is required (set PYTHON=...)" >&2; exit 2; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
# Resolve the Kafka broker jars now (cached under ~/.cache/mlops-stack) so the first start is quick.
.venv/bin/python -c 'from tools.services import kafka_lib; print("kafka jars:", kafka_lib())'
