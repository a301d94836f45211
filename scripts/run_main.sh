#!/usr/bin/env bash
# README command 1: the main job, on CPU, offline, on the embedded synthetic memory corpus.
#   1. sets up .venv (torch==2.13.0 CPU build first, then this package) unless it is there already;
#   2. trains a tiny RxT through the whole curriculum, stages 0-5 (rxt train --preset tiny; stages 1-4 as two
#      data-parallel CPU processes on a machine with two cores or more), then measures
#      memory retention on held-out dialogues (memory carried vs reset) and writes a Hub-ready directory;
#   3. chats with the trained model from a script: facts first, questions about them turns later; then the
#      same questions with a fresh memory, where the model can only guess.
# Interrupted? Run it again: finished stages are skipped and a stopped stage resumes from its checkpoint.
# RXT_OUTPUT (default outputs/main) picks the output folder, RXT_VENV the virtual environment, RXT_CPU_PROCESSES
# the number of training processes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RXT_VENV:-.venv}"
OUT="${RXT_OUTPUT:-outputs/main}"
started=$(date +%s)
echo "[main] installing into $VENV (torch==2.13.0 CPU build first) ..."
bash scripts/install_venv.sh "$VENV"
installed=$(date +%s)
# No network at run time; one thread per process is fastest for this small model on a shared 2-core CPU.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
RXT="$VENV/bin/rxt"
# Stages 1-4 as two data-parallel processes (one per core, each with half of the preset's batch: the same
# global batch) where the machine has two cores; RXT_CPU_PROCESSES=1 trains in one process.
# (the cores this process may use; not `nproc`, which reports OMP_NUM_THREADS when it is set)
CORES=$("$VENV/bin/python" -c "import os; print(len(os.sched_getaffinity(0)))")
PROCESSES="${RXT_CPU_PROCESSES:-$(( CORES >= 2 ? 2 : 1 ))}"
echo "[main] training: stages 1-4 on $PROCESSES CPU process(es) of $OMP_NUM_THREADS thread(s) ($CORES cores available)"

"$RXT" train --preset tiny --output "$OUT" --num-threads "$OMP_NUM_THREADS" --cpu-processes "$PROCESSES"
trained=$(date +%s)

echo
echo "[main] a conversation with the trained model (greedy decoding; each turn reads only the new message,"
echo "       the memory update runs after the answer):"
"$RXT" chat "$OUT/hub" --script examples/chat_scripts/memory_recall.txt --greedy --max-new-tokens 24 --seed 0
echo
echo "[main] the same questions to a fresh memory (no conversation before them):"
"$RXT" chat "$OUT/hub" --script examples/chat_scripts/question_only.txt --greedy --max-new-tokens 24 --seed 0
finished=$(date +%s)

echo
echo "[main] done: install $((installed - started)) s, training + evaluation $((trained - installed)) s," \
     "chat $((finished - trained)) s, total $((finished - started)) s"
echo "[main] stage outputs: $OUT/stage0 ... $OUT/stage5; retention: $OUT/memory_retention.json"
echo "[main] Hub-ready model directory: $OUT/hub  (rxt push $OUT/hub --repo-id <you>/<name> publishes it, gated, RAML v1.0)"
