#!/usr/bin/env bash
# Run the supervised curriculum (stages 0-4) of a preset, each stage loading the previous stage's output.
#   bash trainers/run_curriculum.sh tiny                 # plain python, one process
#   LAUNCH="accelerate launch --multi_gpu --num_processes 2" bash trainers/run_curriculum.sh tiny
# Extra arguments go to the training stages 1-4 (e.g. --report_to tensorboard).
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET="${1:-tiny}"; shift || true
PY="${PYTHON:-python}"
RUN="${LAUNCH:-$PY}"
CFG="trainers/configs/$PRESET"
export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
"$PY" trainers/stage0_tokenizer.py --config "$CFG/stage0.yaml"
$RUN trainers/stage1_joint_pretrain.py --config "$CFG/stage1.yaml" "$@"
$RUN trainers/stage2_joint_sft.py --config "$CFG/stage2.yaml" "$@"
$RUN trainers/stage3_memory_attention.py --config "$CFG/stage3.yaml" "$@"
$RUN trainers/stage4_memory_aware.py --config "$CFG/stage4.yaml" "$@"
