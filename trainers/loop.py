"""The causal-LM training loop every objective uses (pretraining, continued pretraining with
replay, synthesizer-tuning, SFT): they differ only in their token sources and loss masks.

It runs in a plain process, under torchrun, or inside a Ray Train worker: distribution is
whatever ``torch.distributed`` says. Two engines: plain DDP (world > 1) and DeepSpeed ZeRO
(stage 0-3, optional optimizer offload), on CPU (gloo) or GPU (NCCL). Length is a token budget;
checkpoints hold everything needed for a resumed run to follow the uninterrupted trajectory.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from selftaught.net import free_port
from trainers.config import TrainConfig
from trainers.data import eval_windows
from trainers.mixture import Batch, MixtureSampler, TokenSource, labels_from

log = logging.getLogger(__name__)


def lr_schedule(cfg: TrainConfig, opt: torch.optim.Optimizer, total_steps: int):
    """transformers' linear warm-up (``warmup_frac`` of the steps), then cosine decay to
    ``min_lr_ratio`` x ``lr`` or a constant rate."""
    from transformers import get_scheduler

    warm = int(cfg.warmup_frac * total_steps)
    if cfg.schedule == "constant":
        return get_scheduler("constant_with_warmup", opt, num_warmup_steps=warm)
    return get_scheduler("cosine_with_min_lr", opt, num_warmup_steps=warm, num_training_steps=total_steps,
                         scheduler_specific_kwargs={"min_lr_rate": cfg.min_lr_ratio})


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lm_loss_sum(model, ids: torch.Tensor, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the tokens whose mask is 1 (all when no mask), and
    their number. ``positions`` (restarting at each packed example) make transformers attend
    block-diagonally, so packed examples do not see each other."""
    if mask is None:
        inputs, labels = ids[:, :-1], ids[:, 1:]
    else:
        inputs, labels = labels_from(ids, mask)
    pos = positions[:, :-1] if positions is not None else None
    logits = model(input_ids=inputs, position_ids=pos, use_cache=False).logits  # a cache turns packing off
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, (labels != -100).sum()


def masked_lm_loss(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens whose mask is 1 (all when no mask)."""
    loss, n = lm_loss_sum(model, ids, mask)
    return loss / n.clamp(min=1)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, device, batch_size: int = 16) -> float:
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size].to(device)
        total += float(masked_lm_loss(model, w)) * len(w)
        n += len(w)
    model.train(was_training)
    return total / max(n, 1)


def init_from_env(device: str) -> None:
    """Under ``torchrun`` (WORLD_SIZE > 1 in the environment) join the process group, so the
    same loop runs data-parallel without Ray."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_min(x: int, device: str) -> int:
    t = torch.tensor([x], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _ensure_dist(device: str) -> None:
    """DeepSpeed needs a process group even for one process."""
    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")


def as_sources(train) -> list[TokenSource]:
    """A list of token arrays is one repeating pretraining source named ``train``."""
    if train and isinstance(train[0], TokenSource):
        return list(train)
    return [TokenSource("train", list(train))]


# ---------------------------------------------------------------------------------- checkpoints
def _ckpt_root(out_dir: Path | None) -> Path | None:
    return out_dir / "checkpoints" if out_dir is not None else None


def latest_checkpoint(out_dir: str | Path | None) -> Path | None:
    root = _ckpt_root(Path(out_dir)) if out_dir is not None else None
    if root is None or not root.exists():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / "COMPLETE").exists())
    return done[-1] if done else None


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class _Trainer:
    """Holds model, optimizer and engine-specific calls so the step loop reads the same for
    DDP and DeepSpeed."""

    def __init__(self, model, cfg: TrainConfig, total_steps: int, device: str, world: int):
        self.cfg, self.device, self.world = cfg, device, world
        self.ds = cfg.engine == "deepspeed"
        if self.ds:
            from selftaught.models import cache_dir

            # DeepSpeed JIT-compiles a comm op on first use: cache it once, outside the repo.
            os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions"))
            import deepspeed

            _ensure_dist(device)
            ds_cfg = {
                "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
                "gradient_accumulation_steps": cfg.grad_accum,
                "gradient_clipping": cfg.grad_clip or 0.0,
                "zero_optimization": {"stage": cfg.zero_stage,
                                      **({"offload_optimizer": {"device": "cpu"}} if cfg.offload_optimizer else {}),
                                      **({"stage3_gather_16bit_weights_on_model_save": True}
                                         if cfg.zero_stage == 3 else {})},
                "bf16": {"enabled": cfg.dtype == "bfloat16"},
                "zero_allow_untested_optimizer": True,
                "steps_per_print": 10 ** 9,
                "wall_clock_breakdown": False,
            }
            if cfg.offload_optimizer:
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                opt = DeepSpeedCPUAdam(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
            else:
                opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
            sched = lr_schedule(cfg, opt, total_steps)
            self.engine, self.opt, _, self.sched = deepspeed.initialize(
                model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg)
            self.core = self.engine.module
            self.model = self.engine
        else:
            self.core = model.to(device)
            self.model = model
            if world > 1:
                self.model = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[torch.cuda.current_device()] if device == "cuda" else None)
            self.opt = torch.optim.AdamW(param_groups(self.core, cfg.weight_decay), lr=cfg.lr,
                                         betas=tuple(cfg.betas), fused=device == "cuda")
            self.sched = lr_schedule(cfg, self.opt, total_steps)
        self.autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16)
                         if cfg.dtype == "bfloat16" and not self.ds else nullcontext())
        self.core.train()

    def micro_step(self, b: Batch, scale: float, last: bool,
                   loss_fn: Callable[..., torch.Tensor] | None = None) -> float:
        """Backward of the micro-batch's summed loss times ``scale`` (world size over the step's
        loss tokens on all ranks: the engines average over ranks), so the step's gradient is the
        mean over its loss tokens however they fall across micro-batches. Returns the sum.

        ``loss_fn(model, batch)`` replaces the next-token loss with another summed token loss
        (the GRPO objective of ``trainers/grpo.py``) on the same engine, accumulation and
        checkpoints."""
        if loss_fn is None:
            ids, mask = b.ids.to(self.device), b.mask.to(self.device)
            pos = b.positions.to(self.device) if b.positions is not None else None

            def loss_fn(model, _b):
                return lm_loss_sum(model, ids, mask, pos)[0]
        if self.ds:
            loss = loss_fn(self.engine, b)
            self.engine.backward(loss * scale, scale_wrt_gas=False)
            self.engine.step()  # applies the update at the accumulation boundary only
            return float(loss.detach())
        with nullcontext() if (self.world == 1 or last) else self.model.no_sync():
            with self.autocast:
                loss = loss_fn(self.model, b)
            (loss * scale).backward()
        return float(loss.detach())

    def optimizer_step(self) -> float | None:
        if self.ds:
            g = self.engine.get_global_grad_norm()
            return float(g) if g is not None else None
        gnorm = (torch.nn.utils.clip_grad_norm_(self.core.parameters(), self.cfg.grad_clip)
                 if self.cfg.grad_clip else None)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(gnorm) if gnorm is not None else None

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    # ------------------------------------------------------------ state
    def save(self, path: Path, rank: int, extra: dict) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if self.ds:
            self.engine.save_checkpoint(str(path), tag="engine")
        elif rank == 0:
            torch.save({"model": self.core.state_dict(), "optimizer": self.opt.state_dict(),
                        "scheduler": self.sched.state_dict()}, path / "state.pt")
        torch.save(extra, path / f"rank-{rank}.pt")

    def load(self, path: Path, rank: int) -> dict:
        if self.ds:
            self.engine.load_checkpoint(str(path), tag="engine")
        else:
            st = torch.load(path / "state.pt", map_location=self.device, weights_only=False)
            self.core.load_state_dict(st["model"])
            self.opt.load_state_dict(st["optimizer"])
            self.sched.load_state_dict(st["scheduler"])
        return torch.load(path / f"rank-{rank}.pt", weights_only=False)

    def save_final(self, out: Path, rank: int) -> None:
        """A Hugging Face checkpoint (full weights, also under ZeRO-3) that transformers and vLLM load."""
        if self.ds and self.cfg.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
            if rank == 0:
                self.core.save_pretrained(str(out), state_dict=state)
        elif rank == 0:
            self.core.save_pretrained(str(out))


def train_causal_lm(model, train: Sequence, eval_docs: Sequence[np.ndarray] | None, cfg: TrainConfig,
                    out_dir: str | Path | None = None, on_log: Callable[[dict], None] | None = None,
                    device: str | None = None, pad_id: int | None = None,
                    on_step: Callable[[int, int], None] | None = None, resume_from: Path | None = None,
                    on_checkpoint: Callable[[Path, int], None] | None = None) -> dict:
    """Train ``model`` on ``train`` (token sources, or plain token arrays) until ``cfg.token_budget``
    tokens have been seen. Rank 0 writes ``metrics.jsonl``, ``curves.png`` and, when ``out_dir`` is
    given, the final Hugging Face model in ``out_dir/model``. ``on_step(step, rank)`` runs before
    every step (fault drills). ``resume_from`` names a checkpoint to continue from (default: the
    newest in ``out_dir``); with ``on_checkpoint(path, step)`` checkpoints go to a temporary
    directory handed to it on every rank (Ray Train uploads it) instead of ``out_dir``.
    Returns a summary."""
    device = device or ("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    init_from_env(device)
    rank, world = _world()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    out_dir = Path(out_dir) if out_dir is not None else None
    sources = as_sources(train)
    tokens_per_step = cfg.seq_len * cfg.micro_batch_size * cfg.grad_accum * world
    total_steps = cfg.token_budget // tokens_per_step
    if total_steps < 1:
        raise ValueError(f"token_budget {cfg.token_budget} is smaller than one optimizer step "
                         f"({tokens_per_step} tokens with {world} workers)")
    if all(not s.repeat for s in sources):  # each window reads seq_len + 1 tokens
        per_rank = total_steps * cfg.micro_batch_size * cfg.grad_accum * (cfg.seq_len + 1)
        have = sum(s.num_tokens for s in sources)
        if any(s.shard is not None for s in sources):
            # each rank holds only its shard and reads its share: the smallest shard decides, on every rank alike
            have = _all_min(have, device) if world > 1 else have
            if have < per_rank:
                raise ValueError(f"every source is never-repeat and the smallest rank's shard holds {have} tokens, "
                                 f"less than the {per_rank} that each of the {world} ranks reads for the "
                                 f"{cfg.token_budget}-token budget ({cfg.seq_len + 1} per window)")
        elif have < per_rank * world:
            raise ValueError(f"every source is never-repeat and they hold {have} tokens, less than the "
                             f"{per_rank * world} that the {cfg.token_budget}-token budget reads "
                             f"({cfg.seq_len + 1} per window)")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    pad = pad_id if pad_id is not None else (getattr(model.config, "pad_token_id", None)
                                             or getattr(model.config, "eos_token_id", None) or 0)
    sampler = MixtureSampler(sources, cfg.seq_len, int(pad), seed=cfg.seed, rank=rank, world=world)
    held_out = eval_windows(eval_docs, cfg.seq_len, cfg.eval_tokens) if eval_docs else None
    tr = _Trainer(model, cfg, total_steps, device, world)

    start_step, history = 0, []
    ckpt = resume_from or (latest_checkpoint(out_dir) if cfg.resume else None)
    if ckpt is not None:
        extra = tr.load(ckpt, rank)
        sampler.load_state_dict(extra["sampler"])
        _set_rng_state(extra["rng"])
        start_step, history = extra["step"], extra["history"]
        if rank == 0:
            log.info("resumed from %s (step %d of %d)", ckpt, start_step, total_steps)
    metrics_f = None
    if rank == 0 and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "metrics.jsonl", "w") as f:  # rewritten: a resumed run keeps one history
            f.writelines(json.dumps(h) + "\n" for h in history)
        metrics_f = open(out_dir / "metrics.jsonl", "a")
    names = [s.name for s in sources]

    def emit(rec: dict) -> None:
        history.append(rec)
        if metrics_f:
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()
        if on_log and rank == 0:
            on_log(rec)

    def all_sum(x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(t)
        return float(t)

    def source_totals() -> dict[str, dict[str, int]]:
        t = torch.tensor([[sampler.tokens[n], sampler.loss_tokens[n]] for n in names], dtype=torch.float64)
        if world > 1:
            t = t.to(device)
            dist.all_reduce(t)
        return {n: {"tokens": int(t[i, 0]), "loss_tokens": int(t[i, 1])} for i, n in enumerate(names)}

    def checkpoint(step: int) -> None:
        extra = {"sampler": sampler.state_dict(), "rng": _rng_state(), "step": step, "history": list(history)}
        if on_checkpoint is not None:
            with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:  # Ray may move it
                tr.save(Path(tmp), rank, extra)
                _barrier()
                on_checkpoint(Path(tmp), step)
            return
        if out_dir is None:
            return
        path = _ckpt_root(out_dir) / f"step-{step:07d}"
        tr.save(path, rank, extra)
        _barrier()
        if rank == 0:
            (path / "COMPLETE").write_text(json.dumps({"step": step, "time": time.time()}))
            old = sorted(p for p in _ckpt_root(out_dir).glob("step-*") if (p / "COMPLETE").exists())
            for p in old[:-cfg.keep_checkpoints]:
                shutil.rmtree(p, ignore_errors=True)
        _barrier()

    if held_out is not None and start_step == 0:
        emit({"step": 0, "tokens_seen": 0, "eval_loss": evaluate(tr.core, held_out, device)})
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
               disable=rank != 0 or not cfg.progress, mininterval=2.0)
    t_last, tok_last = time.perf_counter(), start_step * tokens_per_step
    stop_at = min(total_steps, cfg.stop_after_steps) if cfg.stop_after_steps else total_steps
    step = start_step
    for step in range(start_step + 1, stop_at + 1):
        if on_step is not None:
            on_step(step, rank)
        batches = [sampler.draw(cfg.micro_batch_size) for _ in range(cfg.grad_accum)]
        n_loss = all_sum(sum(int((b.mask[:, 1:] != 0).sum()) for b in batches))
        loss_sum = sum(tr.micro_step(b, world / max(n_loss, 1.0), last=i == len(batches) - 1)
                       for i, b in enumerate(batches))
        gnorm = tr.optimizer_step()
        tokens_seen = step * tokens_per_step
        if step % cfg.log_every == 0 or step == total_steps:
            now, loss = time.perf_counter(), all_sum(loss_sum) / max(n_loss, 1.0)
            rec = {"step": step, "tokens_seen": tokens_seen, "loss": loss, "lr": tr.lr(),
                   "tokens_per_s": (tokens_seen - tok_last) / max(now - t_last, 1e-9), "grad_norm": gnorm,
                   "sources": source_totals()}
            t_last, tok_last = now, tokens_seen
            if held_out is not None and (step % cfg.eval_every == 0 or step == total_steps):
                rec["eval_loss"] = evaluate(tr.core, held_out, device)
                rec["eval_ppl"] = math.exp(min(rec["eval_loss"], 50))
            emit(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        bar.update(1)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
            checkpoint(step)
    bar.close()
    finished = step >= total_steps
    if cfg.stop_after_steps and not finished:
        checkpoint(step)
    if metrics_f:
        metrics_f.close()
    if finished and out_dir is not None:
        if cfg.checkpoint_every and on_checkpoint is None:
            checkpoint(step)
        tr.save_final(out_dir / "model", rank)
        if rank == 0:
            plot_curves(history, out_dir / "curves.png")
    _barrier()
    evals = [h for h in history if "eval_loss" in h]
    logged = [h for h in history if "loss" in h]
    return {"steps": step, "total_steps": total_steps, "finished": finished,
            "tokens_seen": step * tokens_per_step,
            "final_loss": logged[-1]["loss"] if logged else None,
            "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
            "initial_eval_loss": evals[0]["eval_loss"] if evals else None,
            "sources": source_totals(), "exhausted_sources": list(sampler.exhausted),
            "skipped": {s.name: s.skipped for s in sources if s.skipped},
            "engine": cfg.engine, "world_size": world, "resumed_from_step": start_step}


def plot_curves(history: list[dict], path: Path, title: str | None = None) -> None:
    """Training and held-out loss against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["tokens_seen"], h["loss"]) for h in history if h.get("loss") is not None]
    held = [(h["tokens_seen"], h["eval_loss"]) for h in history if h.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
