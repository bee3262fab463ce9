"""Training throughput: our loop (under Ray Train, and its core without Ray) against a plain
single-process PyTorch loop, same model, batch and sequence length, in one run.

    python benchmarks/train.py                                   # CPU: 'mini' model, seq 256
    python benchmarks/train.py --device cuda --size 124m --seq-len 1024 --micro-batch 16 \\
        --dtype bfloat16 --no-ray --engines ddp,deepspeed        # GPU: tokens/s and MFU

Writes ``benchmarks/results/train-<device>.json``. MFU counts 6 x parameters x tokens plus the
attention term 12 x layers x hidden x seq_len per token, against the GPU's bf16 dense peak
(``--peak-tflops``, H100 SXM: 989).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from selftaught.models import MODEL_SIZES, build_model, load_tokenizer, resolve_model_path  # noqa: E402
from trainers.config import TrainConfig  # noqa: E402


def synthetic_docs(vocab: int, n_tokens: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(200, 2000, size=n_tokens // 500 + 1)
    return [rng.integers(10, vocab, size=int(n), dtype=np.int32) for n in lens]


def flops_per_token(model, size: str, seq_len: int) -> float:
    shape = MODEL_SIZES[size]
    n = sum(p.numel() for p in model.parameters())
    return 6 * n + 12 * shape.layers * shape.hidden * seq_len


def plain_loop(model, docs, cfg: TrainConfig, steps: int, device: str) -> float:
    """The reference: windows from one flat array, forward, backward, AdamW; nothing else."""
    flat = torch.from_numpy(np.concatenate(docs).astype(np.int64))
    B, L = cfg.micro_batch_size, cfg.seq_len
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=device == "cuda")
    model.to(device).train()
    ctx = torch.autocast(device, dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else torch.autocast(device, enabled=False)

    def step(i):
        off = (i * B * (L + 1)) % (len(flat) - B * (L + 1))
        x = flat[off: off + B * (L + 1)].view(B, L + 1).to(device)
        with ctx:
            logits = model(input_ids=x[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(3):
        step(i)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i + 3)
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * B * L / (time.perf_counter() - t0)


def steady_tokens_per_s(metrics: Path, skip: int = 3) -> float:
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r and "eval_loss" not in r][skip:]
    return float(np.median([r["tokens_per_s"] for r in rows]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="mini")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--engines", default="ddp", help="comma list: ddp,deepspeed")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray Train measurement (no Ray here)")
    ap.add_argument("--ray-dashboard", action=argparse.BooleanOptionalAction, default=True,
                    help="start Ray's dashboard (its processes share the CPUs with training)")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    tok = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    docs = synthetic_docs(len(tok), args.micro_batch * (args.seq_len + 1) * (args.steps + 10))
    cfg = TrainConfig(seq_len=args.seq_len, micro_batch_size=args.micro_batch, log_every=1, eval_every=10 ** 6,
                      token_budget=args.micro_batch * args.seq_len * (args.steps + 3), dtype=args.dtype,
                      use_gpu=args.device == "cuda", warmup_frac=0.0, progress=False, cpus_per_worker=threads)
    result = {"benchmark": "train", "size": args.size, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
              "device": args.device, "dtype": args.dtype, "threads": threads, "steps": args.steps,
              "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "ray_dashboard": args.ray_dashboard, "tokens_per_s": {}, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    dtype = torch.float32
    model = build_model(args.size, tok, context=max(args.seq_len, 256), dtype=dtype)
    fpt = flops_per_token(model, args.size, args.seq_len)
    result["params"] = sum(p.numel() for p in model.parameters())
    from trainers.loop import train_causal_lm

    with tempfile.TemporaryDirectory() as tmp:
        init = Path(tmp) / "init"
        model.save_pretrained(init)
        order = ["plain", *[f"loop_{e}" for e in args.engines.split(",")]] + ([] if args.no_ray else ["ray_train"])
        for name in order:  # each path gets a fresh copy of the same initial model
            m = build_model(args.size, tok, context=max(args.seq_len, 256), dtype=dtype)
            if name == "plain":
                tps = plain_loop(m, docs, cfg, args.steps, args.device)
            elif name.startswith("loop_"):
                out = Path(tmp) / name
                train_causal_lm(m, docs, None, cfg.model_copy(update={"engine": name[5:]}), out_dir=out,
                                device=args.device)
                tps = steady_tokens_per_s(out / "metrics.jsonl")
            else:
                from selftaught.config import RayConfig
                from selftaught.runtime import init_ray
                from trainers.ray_train import fit

                init_ray(RayConfig(include_dashboard=args.ray_dashboard))
                out = Path(tmp) / "ray"
                fit(cfg, init, docs, None, out, Path(tmp) / "ray_storage", name="bench")
                tps = steady_tokens_per_s(out / "metrics.jsonl")
            result["tokens_per_s"][name] = tps
            print(f"{name}: {tps:,.0f} tokens/s", flush=True)
    base = result["tokens_per_s"]["plain"]
    result["ratio_vs_plain"] = {k: v / base for k, v in result["tokens_per_s"].items()}
    if args.device == "cuda":
        result["mfu"] = {k: v * fpt / (args.peak_tflops * 1e12) for k, v in result["tokens_per_s"].items()}
    out = Path(args.out or Path(__file__).parent / "results" / f"train-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("tokens_per_s", "ratio_vs_plain")}, indent=2))


if __name__ == "__main__":
    main()
