#!/usr/bin/env bash
# The install both README commands run (scripts/run_main.sh, scripts/run_tests.sh): a virtual environment with
# the CPU build of torch and this package with its dev extras. Idempotent: a second run only re-checks.
# Usage: bash scripts/install_venv.sh VENV [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$1"
PY="${2:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# torch first, pinned to the CPU build: anything looser lets accelerate/peft pull CUDA wheels.
# pip byte-compiles the ~10,000 installed files one at a time, about half of the install; it skips that here and
# compileall does it on every core (98 s -> 75 s for the whole install on a 2-core box).
"$VENV/bin/python" -m pip install -q --no-compile torch==2.13.0
"$VENV/bin/python" -m pip install -q --no-compile -c ci/constraints.txt -e ".[dev]"
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$VENV/bin/python" -m compileall -q -j 0 "$SITE" >/dev/null \
  || echo "install_venv.sh: some installed files did not byte-compile; Python compiles them when they are imported" >&2
