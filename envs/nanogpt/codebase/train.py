"""Pretrain the GPT of model.py on $DATA_DIR/tokens.bin for $TIME_BUDGET_S seconds of wall clock.

Environment: DATA_DIR (read-only: tokens.bin, meta.json, tokenizer.json), OUT_DIR (artefacts),
SEED, TIME_BUDGET_S, SMOKE ("1": one tiny step, then save), NUM_THREADS; under torchrun also
RANK / LOCAL_RANK / WORLD_SIZE (DDP, one process per GPU; only rank 0 saves).
Hyperparameters: config.json beside this file.

Writes $OUT_DIR/model.safetensors, $OUT_DIR/model_config.json (the dict given to
model.build_model) and $OUT_DIR/train_log.json (informational: steps, tokens, last loss).
"""
from __future__ import annotations

import time

T_START = time.time()  # the wall-clock budget counts from here (imports included)

import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model import build_model  # noqa: E402

HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- optimizers
def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximate orthogonalisation U V^T of G (quintic Newton-Schulz iteration, as in Muon)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if G.is_cuda else G.float()
    transposed = X.size(0) > X.size(1)
    if transposed:
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.T
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-schulz, for 2-D hidden weight matrices only."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, mom = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.mul_(mom).add_(p.grad)
                g = p.grad.add(buf, alpha=mom) if group["nesterov"] else buf
                g = zeropower_via_newtonschulz5(g, steps=group["ns_steps"])
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                p.add_(g, alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)


def make_optimizers(model: torch.nn.Module, cfg: dict, device_type: str) -> list[torch.optim.Optimizer]:
    """AdamW / SGD over all parameters (weight decay on matrices only), or Muon for the hidden
    matrices of the blocks plus AdamW for embeddings, gains and biases."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    wd, lr = float(cfg["weight_decay"]), float(cfg["lr"])
    betas = (float(cfg["beta1"]), float(cfg["beta2"]))
    name = cfg["optimizer"]
    fused = device_type == "cuda"
    if name == "adamw":
        groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
        return [torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)]
    if name == "sgd":
        groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
        return [torch.optim.SGD(groups, lr=lr, momentum=betas[0], nesterov=betas[0] > 0)]
    if name == "muon":
        hidden = [p for n, p in params if p.dim() == 2 and n.startswith("blocks.")]
        hidden_ids = {id(p) for p in hidden}
        rest_decay = [p for p in decay if id(p) not in hidden_ids]
        adam = torch.optim.AdamW([{"params": rest_decay, "weight_decay": wd},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, fused=fused)
        muon = Muon(hidden, lr=float(cfg["muon_lr"]), momentum=betas[0], weight_decay=0.0)
        return [adam, muon]
    raise ValueError(f"unknown optimizer {name!r} (adamw | sgd | muon)")


def lr_multiplier(progress: float, cfg: dict) -> float:
    """Warmup then the schedule, as a function of training progress in [0, 1]."""
    warm = float(cfg["warmup_frac"])
    if warm > 0 and progress < warm:
        return (progress + 1e-3) / (warm + 1e-3)
    floor = float(cfg["min_lr_frac"])
    frac = min(1.0, (progress - warm) / max(1e-9, 1.0 - warm))
    if cfg["schedule"] == "constant":
        return 1.0
    if cfg["schedule"] == "linear":
        return floor + (1.0 - floor) * (1.0 - frac)
    if cfg["schedule"] == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown schedule {cfg['schedule']!r} (cosine | linear | constant)")


# --------------------------------------------------------------------------- main
def main() -> None:
    cfg = json.loads((HERE / "config.json").read_text())
    data_dir = Path(os.environ["DATA_DIR"])
    out_dir = Path(os.environ.get("OUT_DIR", "out"))
    seed = int(os.environ.get("SEED", "0"))
    budget = float(os.environ.get("TIME_BUDGET_S", "45"))
    smoke = os.environ.get("SMOKE", "0") == "1"
    torch.set_num_threads(max(1, int(os.environ.get("NUM_THREADS", "1"))))

    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        dist.init_process_group(backend="nccl")
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        rank, world = 0, 1
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    master = rank == 0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    meta = json.loads((data_dir / "meta.json").read_text())
    data = np.memmap(data_dir / "tokens.bin", dtype=np.uint16, mode="r")
    pad = int(cfg.get("pad_vocab_to", 64))
    vocab = int(math.ceil(int(meta["vocab_size"]) / pad) * pad)
    T = int(cfg["block_size"])
    B = int(cfg["batch_size"])
    accum = int(cfg.get("grad_accum", 1))
    max_tokens = cfg.get("max_tokens")
    max_steps = None
    if smoke:
        B, accum, max_steps = min(B, 2), 1, 1
    if len(data) <= T + 1:
        raise ValueError(f"{len(data)} training tokens are too few for block_size {T}")

    torch.manual_seed(seed)
    model_cfg = {"vocab_size": vocab, "block_size": T, "n_layer": int(cfg["n_layer"]),
                 "n_head": int(cfg["n_head"]), "n_embd": int(cfg["n_embd"]),
                 "dropout": float(cfg["dropout"]), "bias": bool(cfg.get("bias", False))}
    raw_model = build_model(model_cfg).to(device)
    n_params = sum(p.numel() for p in raw_model.parameters())
    model = raw_model
    if cfg.get("compile") and not smoke:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[device.index])
    optimizers = make_optimizers(raw_model, cfg, device.type)
    for opt in optimizers:
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    rng = np.random.default_rng(seed * 1000 + rank)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = rng.integers(0, len(data) - T - 1, size=B)
        buf = torch.from_numpy(np.stack([data[i:i + T + 1] for i in ix]).astype(np.int64))
        if device.type == "cuda":
            buf = buf.pin_memory().to(device, non_blocking=True)
        return buf[:, :-1], buf[:, 1:]

    tokens_per_step = B * T * accum * world
    if master:
        log(f"model: {n_params / 1e6:.2f}M parameters, vocab {vocab}; {world} process(es) on {device.type}; "
            f"{tokens_per_step} tokens/step; budget {budget:.0f}s; optimizer {cfg['optimizer']}")

    t_loop = time.time()
    train_budget = max(1e-3, budget - (t_loop - T_START))
    step, tokens, last_loss, progress = 0, 0, float("nan"), 0.0
    log_every = int(cfg.get("log_every", 20))
    while True:
        # progress and the stop decision come from rank 0, so every rank agrees (LR, step count)
        progress = max((time.time() - t_loop) / train_budget, tokens / max_tokens if max_tokens else 0.0)
        stop = progress >= 1.0 or (max_steps is not None and step >= max_steps)
        if ddp:
            flag = torch.tensor([progress, float(stop)], device=device, dtype=torch.float64)
            dist.broadcast(flag, src=0)
            progress, stop = float(flag[0]), bool(flag[1])
        if stop:
            break
        mult = lr_multiplier(min(progress, 1.0), cfg)
        for opt in optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * mult
        loss_sum = 0.0
        for micro in range(accum):
            x, y = batch()
            sync = (not ddp) or micro == accum - 1
            with nullcontext() if sync else model.no_sync():
                with autocast():
                    logits = model(x)
                    logits = logits[0] if isinstance(logits, tuple) else logits
                    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1)) / accum
                loss.backward()
            loss_sum += loss.detach()
        if float(cfg["grad_clip"]) > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), float(cfg["grad_clip"]))
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step
        if step % log_every == 0 or step == 1 or smoke:
            last_loss = float(loss_sum)
            if master:
                el = time.time() - T_START
                log(f"step {step} loss {last_loss:.4f} lr_mult {mult:.3f} tokens {tokens} "
                    f"elapsed {el:.1f}s tok/s {tokens / max(1e-9, time.time() - t_loop):.0f}")

    if step and (step % log_every):
        last_loss = float(loss_sum)
    if master:
        from safetensors.torch import save_model

        out_dir.mkdir(parents=True, exist_ok=True)
        save_model(raw_model, str(out_dir / "model.safetensors"))
        (out_dir / "model_config.json").write_text(json.dumps(model_cfg, indent=1))
        train_log = {"steps": step, "tokens": tokens, "last_train_loss": last_loss,
                     "seconds": time.time() - T_START, "params": n_params, "world_size": world,
                     "smoke": smoke}
        (out_dir / "train_log.json").write_text(json.dumps(train_log, indent=1))
        log(f"done: {step} steps, {tokens} tokens, last train loss {last_loss:.4f}, "
            f"{time.time() - T_START:.1f}s; saved to {out_dir}")
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except Exception:
        import traceback

        traceback.print_exc()
        sys.exit(1)
