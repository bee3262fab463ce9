#!/usr/bin/env bash
# Entry point of a job: GRPO post-training of the base model in $MODEL_DIR on $DATA_DIR/problems.jsonl,
# checkpoint written to $OUT_DIR. Variables: DATA_DIR MODEL_DIR OUT_DIR SEED TIME_BUDGET_S SMOKE NUM_THREADS.
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS="${NUM_THREADS:-1}" MKL_NUM_THREADS="${NUM_THREADS:-1}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python train.py --config config.json "$@"
