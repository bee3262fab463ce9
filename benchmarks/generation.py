"""Generation throughput: the engine's transformers backend vs a plain ``model.generate`` loop
(and vLLM where installed), same model, same prompts, same token counts, one process.

    python benchmarks/generation.py                       # CPU default: SmolLM2-135M, 16 x 64 tokens
    python benchmarks/generation.py --model 124m --prompts 64 --new-tokens 256 --compile   # GPU target

Writes ``benchmarks/results/generation-<device>.json``. Runs without Ray so it can be measured on
any machine with torch and transformers. Ratios inside one run are the figure to compare; the
absolute numbers move with machine load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from selftaught.config import EngineConfig, SamplingConfig  # noqa: E402

TOPICS = ["the history of", "a short guide to", "the economy of", "how to explain", "the climate of",
          "the architecture of", "a famous scientist named", "the rules of", "an overview of modern",
          "the geography of", "a recipe for", "the main causes of"]
SUBJECTS = ["Norway", "photosynthesis", "the Roman Empire", "jazz music", "volcanoes", "chess",
            "the printing press", "Brazil", "neural networks", "the moon", "bread", "rivers"]


def make_prompts(n: int) -> list[str]:
    """Prompts of varied length (as real batches have), deterministic."""
    out = []
    for i in range(n):
        words = [TOPICS[i % len(TOPICS)], SUBJECTS[(i * 7) % len(SUBJECTS)]]
        out.append(("Write an article about " + " ".join(words) + ". ") * (1 + i % 3))
    return out


def load(model_name: str, device: str, dtype):
    from selftaught.models import MODEL_SIZES, build_model, load_causal_lm, load_tokenizer, resolve_model_path

    if model_name in MODEL_SIZES:  # random-init model of a named size with SmolLM2's tokenizer
        tok = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
        model = build_model(model_name, tok, context=2048, dtype=dtype)
    else:
        tok, model = load_causal_lm(model_name, dtype=dtype)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, model.to(device).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def bench_plain(model, tok, prompts, new_tokens, batch_size, device) -> dict:
    tok.padding_side = "left"
    produced, t0 = 0, time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        produced += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    sync(device)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens": produced, "tokens_per_s": produced / dt}


def bench_engine(engine, prompts, new_tokens, device) -> dict:
    params = SamplingConfig(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    sync(device)
    dt = time.perf_counter() - t0
    produced = sum(c.num_tokens for o in outs for c in o.completions)
    return {"seconds": dt, "tokens": produced, "tokens_per_s": produced / dt}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct", help="packaged name, checkpoint dir or size")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--compile", action="store_true", help="engine: static cache + compiled decode step")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from actors.engine import create_engine, vllm_available
    from selftaught.models import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    tok, model = load(args.model, device, dtype)
    prompts = make_prompts(args.prompts)
    cfg = EngineConfig(backend="transformers", model=args.model, device=device, compile=args.compile,
                       max_batch_size=args.batch_size,
                       dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
                       max_model_len=max(len(tok(p)["input_ids"]) for p in prompts) + args.new_tokens + 8)
    engine = create_engine(cfg, model=model, tokenizer=tok)
    warm = prompts[: min(len(prompts), args.batch_size)]
    bench_plain(model, tok, warm, 8, args.batch_size, device)
    t0 = time.perf_counter()
    bench_engine(engine, warm if not args.compile else prompts, args.new_tokens if args.compile else 8, device)
    warmup_s = time.perf_counter() - t0
    runs = {"plain_generate": [], "engine": []}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        runs["plain_generate"].append(bench_plain(model, tok, prompts, args.new_tokens, args.batch_size, device))
        runs["engine"].append(bench_engine(engine, prompts, args.new_tokens, device))
    best = {k: max(v, key=lambda r: r["tokens_per_s"]) for k, v in runs.items()}
    result = {
        "benchmark": "generation", "model": args.model,
        "params": sum(p.numel() for p in model.parameters()), "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "dtype": str(dtype), "prompts": len(prompts),
        "new_tokens": args.new_tokens, "batch_size": args.batch_size, "engine_static_cache": engine.use_static,
        "engine_compiled": args.compile, "engine_warmup_s": warmup_s, "runs": runs,
        "tokens_per_s": {k: v["tokens_per_s"] for k, v in best.items()},
        "engine_vs_plain": best["engine"]["tokens_per_s"] / best["plain_generate"]["tokens_per_s"],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if vllm_available() and not args.skip_vllm:
        del engine
        vcfg = cfg.model_copy(update={"backend": "vllm", "model": args.model})
        veng = create_engine(vcfg)
        bench_engine(veng, warm, 8, device)
        result["tokens_per_s"]["vllm"] = bench_engine(veng, prompts, args.new_tokens, device)["tokens_per_s"]
    out = Path(args.out or Path(__file__).parent / "results" / f"generation-{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("model", "device", "tokens_per_s", "engine_vs_plain")}, indent=2))


if __name__ == "__main__":
    main()
