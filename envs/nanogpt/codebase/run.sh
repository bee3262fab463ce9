#!/usr/bin/env bash
# Entry point of a job: `bash run.sh` in a private copy of this directory.
# One process on CPU or one GPU; with several GPUs, one DDP process per GPU under torchrun
# (python -m torch.distributed.run is torchrun, found through the `python` on PATH).
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${NUM_GPUS:-}" ]; then
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    NUM_GPUS=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
  else
    NUM_GPUS=0
  fi
fi
if [ "$NUM_GPUS" -gt 1 ]; then
  exec python -m torch.distributed.run --standalone --nproc_per_node="$NUM_GPUS" train.py
else
  exec python train.py
fi
