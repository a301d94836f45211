#!/usr/bin/env bash
# The supervised curriculum (stages 0-4) of a preset into outputs/<preset>/stageN, through `rxt train`
# (which is what to use directly: it also runs stage 5, the retention check and the Hub-ready export).
#   bash trainers/run_curriculum.sh tiny                 # in one process
#   LAUNCH="accelerate launch --multi_gpu --num_processes 2" bash trainers/run_curriculum.sh tiny
# Extra arguments go to the training stages 1-4 (e.g. --report_to tensorboard).
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET="${1:-tiny}"; shift || true
exec "${PYTHON:-python}" -m transformers_rxt.cli train --preset "$PRESET" --output "outputs/$PRESET" --stages 0-4 \
    --eval-dialogues 0 --no-hub ${LAUNCH:+--launcher "$LAUNCH"} -- "$@"
