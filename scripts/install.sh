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

# Operations tooling, each only if missing: Prometheus + promtool (alert rules checked, unit-tested and
# scraping the live stack) and headless Chromium (the drift report rendered) from Debian; kustomize,
# pinned, built once from the Go module proxy into the cache (tools/manifests.py names the same version).
ops_apt=()
{ command -v promtool >/dev/null && command -v prometheus >/dev/null; } || ops_apt+=(prometheus)
command -v chromium >/dev/null || ops_apt+=(chromium)
if ((${#ops_apt[@]})); then
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  echo "install.sh: apt-get install ${ops_apt[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${ops_apt[@]}" >/dev/null
fi
KUSTOMIZE_VERSION=v5.8.1
kustomize_bin="$HOME/.cache/mlops-stack/bin/kustomize-$KUSTOMIZE_VERSION"
if [ ! -x "$kustomize_bin" ]; then
  command -v go >/dev/null || { echo "install.sh: Go (1.22 or newer) is needed to build kustomize" >&2; exit 2; }
  echo "install.sh: go install sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
  gobin="$(mktemp -d)"
  GOBIN="$gobin" go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
  mkdir -p "$(dirname "$kustomize_bin")"
  mv "$gobin/kustomize" "$kustomize_bin"
  rm -rf "$gobin"
fi
