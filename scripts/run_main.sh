#!/usr/bin/env bash
# README command 1: the main job.
# PLACEHOLDER until the main-job issue lands: today it sets up the environment and runs the
# rxlm-parity demo (load a reference checkpoint, converse, show the memory changing).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RXT_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -c ci/constraints.txt -e ".[dev]"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
exec "$VENV/bin/python" examples/rxlm_checkpoint_demo.py "$@"
