"""Training throughput: our loop (its core in this process, and under Ray Train) against a plain
single-process PyTorch loop, same model, batch and sequence length, in one run; with
``--compile`` also both with the model under ``torch.compile``.

    python benchmarks/train.py                                   # CPU: 'mini' model, seq 256
    python benchmarks/train.py --device cuda --size 124m --seq-len 1024 --micro-batch 16 \\
        --dtype bfloat16 --no-ray --compile                      # GPU: tokens/s and MFU

Writes ``benchmarks/results/train-<device>.json`` after every path (a run stopped by a timeout
keeps what it measured). Without Ray (``--no-ray``) and DeepSpeed (the default ``--engines ddp``)
it needs torch, transformers and pydantic only. MFU is 6 x parameters x tokens/s over the GPU's
bf16 dense peak (detected from the device name, or ``--peak-tflops``); ``mfu_with_attention``
adds the attention term 12 x layers x hidden x seq_len per token.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.generation import GPT2_VOCAB, synthetic_tokenizer, write_json  # noqa: E402
from selftaught.models import MODEL_SIZES, build_model  # noqa: E402
from trainers.config import TrainConfig  # noqa: E402

# bf16 dense peak, TFLOP/s, by device-name fragment (first match wins: the PCIe H100 is slower)
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0)]


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS if k.lower() in name.lower()), None)


def synthetic_docs(vocab: int, n_tokens: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(200, 2000, size=n_tokens // 500 + 1)
    return [rng.integers(10, vocab, size=int(n), dtype=np.int32) for n in lens]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


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
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i + 3)
    sync(device)
    return steps * B * L / (time.perf_counter() - t0)


def our_loop(model, docs, cfg: TrainConfig, device: str, skip: int = 3) -> float:
    """``train_causal_lm`` with no output directory (no checkpoints, no plots): the median of
    its per-step throughput logs after ``skip`` warm-up steps."""
    from trainers.loop import train_causal_lm

    logs: list[dict] = []
    train_causal_lm(model, docs, None, cfg, out_dir=None, on_log=logs.append, device=device)
    return float(statistics.median(r["tokens_per_s"] for r in logs[skip:]))


def ray_loop(cfg: TrainConfig, model, docs, tmp: Path, dashboard: bool) -> float:
    import json

    from selftaught.config import RayConfig
    from selftaught.runtime import init_ray
    from trainers.ray_train import fit

    init = tmp / "init"
    model.save_pretrained(init)
    init_ray(RayConfig(include_dashboard=dashboard))
    fit(cfg, init, docs, None, tmp / "ray", tmp / "ray_storage", name="bench")
    rows = [json.loads(x) for x in (tmp / "ray" / "metrics.jsonl").read_text().splitlines()]
    return float(statistics.median([r["tokens_per_s"] for r in rows if "tokens_per_s" in r][3:]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="mini")
    ap.add_argument("--vocab", type=int, default=GPT2_VOCAB)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--engines", default="ddp", help="our loop's engines, comma list: ddp,deepspeed")
    ap.add_argument("--compile", action="store_true", help="also plain and our loop on torch.compile(model)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: quick check)")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray Train measurement (no Ray here)")
    ap.add_argument("--ray-dashboard", action=argparse.BooleanOptionalAction, default=True,
                    help="start Ray's dashboard (its processes share the CPUs with training)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak; default: from the GPU's name")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")
    out = Path(args.out or Path(__file__).parent / "results" / f"train-{args.device}.json")
    tok = synthetic_tokenizer(args.vocab)
    docs = synthetic_docs(len(tok), args.micro_batch * (args.seq_len + 1) * (args.steps + 10))
    cfg = TrainConfig(seq_len=args.seq_len, micro_batch_size=args.micro_batch, log_every=1, eval_every=10 ** 6,
                      token_budget=args.micro_batch * args.seq_len * (args.steps + 3), dtype=args.dtype,
                      use_gpu=args.device == "cuda", warmup_frac=0.0, progress=False, cpus_per_worker=threads)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if args.device == "cuda" else None)
    context = max(args.seq_len, 256)
    model = build_model(args.size, tok, context=context)
    params = sum(p.numel() for p in model.parameters())
    shape = MODEL_SIZES[args.size]
    fpt = {"mfu": 6 * params, "mfu_with_attention": 6 * params + 12 * shape.layers * shape.hidden * args.seq_len}
    result: dict[str, Any] = {
        "benchmark": "train", "size": args.size, "params": params, "vocab": len(tok), "seq_len": args.seq_len,
        "micro_batch": args.micro_batch, "device": args.device, "device_name": name, "dtype": args.dtype,
        "torch": torch.__version__, "threads": threads, "steps": args.steps, "peak_tflops": peak,
        "compile_backend": args.compile_backend if args.compile else None, "ray_dashboard": args.ray_dashboard,
        "tokens_per_s": {}, "errors": {}, "target": "mfu >= 0.40 (GPU)", "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    order = ["plain", *[f"loop_{e}" for e in args.engines.split(",")]]
    order += ["plain_compiled", "loop_compiled"] if args.compile else []
    order += [] if args.no_ray else ["ray_train"]
    for path in order:  # each path gets a fresh model with the same initial weights (seed 0)
        m = build_model(args.size, tok, context=context)
        if path.endswith("_compiled"):
            m = torch.compile(m.to(args.device), backend=args.compile_backend)
        t0 = time.perf_counter()
        try:
            if path.startswith("plain"):
                tps = plain_loop(m, docs, cfg, args.steps, args.device)
            elif path.startswith("loop_"):
                engine = "ddp" if path == "loop_compiled" else path[5:]
                tps = our_loop(m, docs, cfg.model_copy(update={"engine": engine}), args.device)
            else:
                import tempfile

                with tempfile.TemporaryDirectory() as tmp:
                    tps = ray_loop(cfg, m, docs, Path(tmp), args.ray_dashboard)
        except Exception as e:  # noqa: BLE001 - one failing path (a compile error, say) keeps the others
            result["errors"][path] = f"{type(e).__name__}: {e}"[:2000]
            print(f"{path}: FAILED {result['errors'][path][:300]}", flush=True)
            continue
        finally:
            del m
            if args.device == "cuda":
                torch.cuda.empty_cache()
        result["tokens_per_s"][path] = tps
        print(f"{path}: {tps:,.0f} tokens/s ({time.perf_counter() - t0:.0f} s with warm-up)", flush=True)
        base = result["tokens_per_s"].get("plain")
        if base:
            result["ratio_vs_plain"] = {k: v / base for k, v in result["tokens_per_s"].items()}
        if peak:
            for key, f in fpt.items():
                result[key] = {k: v * f / (peak * 1e12) for k, v in result["tokens_per_s"].items()}
        write_json(out, result)
    print({k: result.get(k) for k in ("tokens_per_s", "ratio_vs_plain", "mfu")}, flush=True)


if __name__ == "__main__":
    main()
