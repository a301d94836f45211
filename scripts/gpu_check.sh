#!/usr/bin/env bash
# The GPU check (issue 19 item 7): flash-attention and SDPA in bf16 vs fp32 CPU (RxT and the SQA kernel), the
# side-stream async memory update vs sync, TensorBLEU on CUDA vs NLTK and its speed, SQA at 32k-128k tokens.
# One summary table; exit status 1 when a check fails. Under 8 minutes on one GPU; never part of CI.
#   bash scripts/gpu_check.sh          # on a CUDA machine, with the project's environment (.venv or RXT_VENV)
#   bash scripts/gpu_check.sh --cpu    # dry run of every check on CPU at small sizes
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RXT_VENV:-.venv}"
PY="$VENV/bin/python"
[ -x "$PY" ] || PY="${PYTHON:-python3}"
exec timeout 600 "$PY" scripts/gpu_check.py "$@"
