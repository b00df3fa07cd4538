#!/usr/bin/env bash
# Builds the separate venv in which bench/peers/peer_sdk.py runs: the public PyPI SDK
# envoy-extproc-sdk 0.1.1, the peer meshkit's benchmark must beat. It gets its own venv because the
# SDK needs ddtrace<2 and pulls grpclib, datadog and protoc-gen-validate, none of which belong in
# meshkit's environment. Idempotent: a venv whose marker matches these pins and which imports the SDK
# is left alone.
#
#   bench/peers/setup_peer.sh [VENV]      # default /work/main/build/peer-venv; PYTHON=python3 by default
#
# Pins verified together on Python 3.11 (Debian 12's 3.11.2 and 3.11.7), 2026-11. The SDK itself
# declares no dependency on the Envoy protos (xds-protos) it imports. pip may print harmless
# "WARNING: Location ... is ignored" lines on machines with a local index configured.
set -euo pipefail

VENV="${1:-/work/main/build/peer-venv}"
PYTHON="${PYTHON:-python3}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PINS=(
  envoy-extproc-sdk==0.1.1
  ddtrace==1.20.19 bytecode==0.19.1 envier==0.6.1 cattrs==26.2.1 attrs==26.1.0 ddsketch==3.0.1
  opentelemetry-api==1.45.2 xmltodict==1.0.4 six==1.17.0 typing_extensions==4.16.0
  datadog==0.44.0 grpclib==0.4.9 protoc-gen-validate==0.4.2
  grpcio==1.85.1 grpcio-health-checking==1.85.1 xds-protos==1.85.0 protobuf==7.36.2 xxhash==4.1.0
)
MARKER="$VENV/.peer-pins"
CHECK="import envoy_extproc_sdk, envoy_extproc_sdk.health, xxhash, grpc_health.v1.health"

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "${PINS[*]}" ]] \
  && PYTHONPATH="$HERE/shim" "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
  echo "peer venv ready: $VENV"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  if ! "$PYTHON" -m venv "$VENV"; then
    # Debian ships venv's pip bootstrap separately (python3-venv).
    rm -rf "$VENV"
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
      apt-get update -qq && apt-get install -y -qq python3-venv
      "$PYTHON" -m venv "$VENV"
    else
      echo "cannot create a venv with $PYTHON: install python3-venv" >&2
      exit 1
    fi
  fi
fi

"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PINS[@]}"
PYTHONPATH="$HERE/shim" "$VENV/bin/python" -c "$CHECK"
echo "${PINS[*]}" >"$MARKER"
echo "peer venv ready: $VENV"
