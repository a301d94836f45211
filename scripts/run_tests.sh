#!/usr/bin/env bash
# README command 2: set up a virtual environment on a fresh machine and run the test suite.
# Idempotent: a second run reuses .venv and only re-checks the install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RXT_VENV:-.venv}"
PY="${PYTHON:-python3}"

# tests/test_serve.py starts a real redis-server (two `rxt serve` replicas sharing one Redis store): the one OS
# package the suite needs. Not fatal: without it the rest still runs and that test fails naming what is missing.
if ! command -v redis-server >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null; } \
    || echo "run_tests.sh: could not install redis-server (apt-get failed); tests/test_serve.py's Redis test will fail" >&2
fi

bash scripts/install_venv.sh "$VENV" "$PY"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export HF_HOME="${HF_HOME_FOR_TESTS:-$PWD/.cache/hf}"
exec "$VENV/bin/python" -m pytest "$@"
