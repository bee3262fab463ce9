"""The causal-LM training loop's core. It runs in a plain process, under torchrun, or inside a
Ray Train worker: distribution is whatever ``torch.distributed`` says (DDP when world > 1)."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from trainers.config import TrainConfig
from trainers.data import PackedStream, eval_windows

log = logging.getLogger(__name__)


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warm = int(cfg.warmup_frac * total_steps)

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        prog = (step - warm) / max(1, total_steps - warm)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(prog, 1.0)))

    return f


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def causal_lm_loss(model, windows: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=windows[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, device, batch_size: int = 16) -> float:
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size].to(device)
        total += float(causal_lm_loss(model, w)) * len(w)
        n += len(w)
    model.train()
    return total / max(n, 1)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train_causal_lm(model, train_docs: Sequence[np.ndarray], eval_docs: Sequence[np.ndarray],
                    cfg: TrainConfig, out_dir: str | Path | None = None,
                    on_log: Callable[[dict], None] | None = None, device: str | None = None) -> dict:
    """Train ``model`` on packed windows of ``train_docs`` until ``cfg.token_budget`` tokens are
    seen. Rank 0 writes ``metrics.jsonl`` into ``out_dir``. Returns a summary."""
    rank, world = _world()
    device = device or ("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    if device == "cuda" and world > 1:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.manual_seed(cfg.seed)
    total_steps = cfg.total_steps() if world == cfg.num_workers else (
        cfg.token_budget // (cfg.seq_len * cfg.micro_batch_size * cfg.grad_accum * world))
    if total_steps < 1:
        raise ValueError("token budget smaller than one optimizer step")
    model = model.to(device)
    model.train()
    core = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if device == "cuda" else None)
    opt = torch.optim.AdamW(param_groups(core, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                            fused=device == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
    stream = PackedStream(train_docs, cfg.seq_len, seed=cfg.seed, rank=rank, world=world)
    held_out = eval_windows(eval_docs, cfg.seq_len, cfg.eval_tokens) if eval_docs else None
    autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16)
                if cfg.dtype == "bfloat16" else nullcontext())
    metrics_f = None
    if rank == 0 and out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        metrics_f = open(Path(out_dir) / "metrics.jsonl", "w")
    tokens_per_step = cfg.seq_len * cfg.micro_batch_size * cfg.grad_accum * world
    tokens_seen, t_last, tok_last = 0, time.perf_counter(), 0
    history: list[dict] = []

    def emit(rec: dict) -> None:
        history.append(rec)
        if metrics_f:
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()
        if on_log and rank == 0:
            on_log(rec)

    if held_out is not None:
        emit({"step": 0, "tokens_seen": 0, "eval_loss": evaluate(core, held_out, device)})
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=rank != 0 or not cfg.progress,
               mininterval=2.0)
    for step in range(1, total_steps + 1):
        loss_acc = 0.0
        for micro in range(cfg.grad_accum):
            batch = stream.next_batch(cfg.micro_batch_size).to(device)
            sync = nullcontext() if (world == 1 or micro == cfg.grad_accum - 1) else model.no_sync()
            with sync, autocast:
                loss = causal_lm_loss(model, batch)
            (loss / cfg.grad_accum).backward()
            loss_acc += float(loss.detach()) / cfg.grad_accum
        gnorm = torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.grad_clip) if cfg.grad_clip else None
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens_seen += tokens_per_step
        if step % cfg.log_every == 0 or step == total_steps:
            loss_t = torch.tensor([loss_acc], device=device)
            if world > 1:
                dist.all_reduce(loss_t)
                loss_t /= world
            now = time.perf_counter()
            rec = {"step": step, "tokens_seen": tokens_seen, "loss": float(loss_t),
                   "lr": sched.get_last_lr()[0], "tokens_per_s": (tokens_seen - tok_last) / (now - t_last),
                   "grad_norm": float(gnorm) if gnorm is not None else None, "epoch": stream.epoch}
            t_last, tok_last = now, tokens_seen
            if held_out is not None and (step % cfg.eval_every == 0 or step == total_steps):
                rec["eval_loss"] = evaluate(core, held_out, device)
                rec["eval_ppl"] = math.exp(min(rec["eval_loss"], 50))
            emit(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        bar.update(1)
    bar.close()
    if metrics_f:
        metrics_f.close()
    final = [h for h in history if "eval_loss" in h]
    return {"steps": total_steps, "tokens_seen": tokens_seen,
            "final_loss": history[-1].get("loss") if history else None,
            "final_eval_loss": final[-1]["eval_loss"] if final else None,
            "initial_eval_loss": final[0]["eval_loss"] if final else None,
            "train_tokens_unique": stream.tokens_total * world}
