"""nanoGPT speedrun environment: an idea edits a small GPT pretraining codebase, the job
pretrains for a fixed wall-clock budget, and a frozen evaluator scores 1 / validation loss on
held-out documents the job never sees (``env.yaml``: CPU-sized; ``paper.yaml``: 124M GPT-2 on
8 GPUs for 25 minutes)."""
