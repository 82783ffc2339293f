#!/usr/bin/env bash
# Installs the load generators `python -m bench` drives the servers with (compiled, so the client does not
# eat the server's cores): wrk (Debian), vegeta and ghz (built from the Go module proxy into
# ~/.cache/mlops-stack/bin), and py-spy (PyPI, a dev dependency) for the profile.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${XDG_CACHE_HOME:-$HOME/.cache}/mlops-stack/bin"
mkdir -p "$BIN"
if ! command -v wrk >/dev/null; then
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq wrk >/dev/null
fi
if ! command -v go >/dev/null; then
  echo "install-bench-tools.sh: Go is needed to build vegeta and ghz (apt-get install golang-go)" >&2; exit 2
fi
[ -x "$BIN/vegeta" ] || GOBIN="$BIN" go install github.com/tsenart/vegeta/v12@v12.13.0
[ -x "$BIN/ghz" ] || GOBIN="$BIN" go install github.com/bojand/ghz/cmd/ghz@v0.93.0
echo "bench tools: $(command -v wrk) $BIN/vegeta $BIN/ghz"
