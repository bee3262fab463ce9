"""The training loop under torchrun, without Ray:

    torchrun --nproc_per_node 2 benchmarks/torchrun_smoke.py [--engine deepspeed]

Trains the 'nano' model on random tokens for a few steps and prints the summary from rank 0."""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="ddp")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from selftaught.models import build_model, train_bpe_tokenizer
    from trainers.config import TrainConfig
    from trainers.loop import train_causal_lm

    torch.set_num_threads(1)
    tok = train_bpe_tokenizer(["some words to learn a tokenizer from"] * 50, 300)
    rng = np.random.default_rng(0)
    docs = [rng.integers(5, len(tok), 300, dtype=np.int32) for _ in range(40)]
    cfg = TrainConfig(token_budget=2 * 4 * 64 * 5, seq_len=64, micro_batch_size=4, log_every=1, progress=False,
                      engine=args.engine, zero_stage=1)
    summary = train_causal_lm(build_model("nano", tok), docs, docs[:4], cfg, out_dir=args.out)
    if torch.distributed.get_rank() == 0:
        print(json.dumps({k: summary[k] for k in ("world_size", "steps", "tokens_seen", "final_loss")}))


if __name__ == "__main__":
    main()
