#!/usr/bin/env bash
# The CPU leaderboard: fine-tune the dense MiniLM baselines, then compare STAT, the
# Fisher-mask method and magnitude pruning at 60/50/40 % of the FLOPs on GLUE dev sets,
# and STAT vs Fisher vs magnitude on SmolLM2 (WikiText-2 perplexity). Every figure lands in
# results/runs/**.json (one record per run, resumable) and results/LEADERBOARD.md; the
# fine-tuning records are copied to results/finetune/.
#
#   TSHRINK_DATA_DIR=../shared/data bash benchmarks/leaderboard_cpu.sh [glue tasks...]
#
# Run from the repository root inside the project's environment (scripts/setup.sh). On a
# GPU add DEVICE=cuda. Recipes: see each finetune record; calibration: 512 random training
# examples per task (the same batches for every method), seed 0.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${TSHRINK_DATA_DIR:-../shared/data}
DEVICE=${DEVICE:-cpu}
CACHE=${TSHRINK_CACHE:-$HOME/.cache/tshrink}
TASKS=("$@")
[ ${#TASKS[@]} -gt 0 ] || TASKS=(stsb mrpc rte sst2)
METHODS=${METHODS:-stat,fisher,magnitude}
BUDGETS=${BUDGETS:-0.6,0.5,0.4}

epochs() {  # small sets want more passes; on 2 CPU cores (about 0.05 s per example-epoch) fewer
  if [ "$DEVICE" = cuda ]; then
    case "$1" in rte) echo 10 ;; mrpc|stsb) echo 5 ;; *) echo 3 ;; esac
  else
    case "$1" in rte|mrpc) echo 3 ;; stsb) echo 2 ;; *) echo 1 ;; esac
  fi
}

mkdir -p results/finetune
for task in "${TASKS[@]}"; do
  out="$CACHE/finetuned/minilm-$task"
  harness finetune --task "$task" --model minilm --epochs "$(epochs "$task")" --data-dir "$DATA" \
    --device "$DEVICE" --output "$out"
  cp "$out/finetune.json" "results/finetune/minilm-$task.json"
  harness compare --methods "$METHODS" --model "$out" --task "$task" --flops "$BUDGETS" \
    --calib-samples 512 --data-dir "$DATA" --device "$DEVICE" --results results --no-leaderboard
done

# decoder: WikiText-2 raw test perplexity; calibration 32 random windows of the valid file.
# CPU: windows of 256 tokens, the first 64 test windows; GPU: 1024 tokens, the whole test split.
if [ -z "${SKIP_DECODER:-}" ]; then
  if [ "$DEVICE" = cuda ]; then LM=(--seq-len 1024 --eval-samples 0); else LM=(--seq-len 256 --eval-samples 64); fi
  harness compare --methods "$METHODS" --model smollm2 --task wikitext2 --flops "$BUDGETS" "${LM[@]}" \
    --data-dir "$DATA" --device "$DEVICE" --results results --no-leaderboard
fi
harness leaderboard --results results
