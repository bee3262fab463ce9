"""Budget forcing's cost per token: a batch of budget-forced requests (thinking forced to exactly
``T`` tokens; and up to 4 "Wait" extensions under a cap of ``T``), then plain decoding of exactly
the same token counts from the same prefixes; greedy, interleaved, median of ``--repeats``.

    python benchmarks/budget_overhead.py --device cpu --size nano --batch 2 --think 8 --repeats 1
    python benchmarks/budget_overhead.py --device cuda --size 124m --batch 32 --think 64   # GPU

``budget_overhead`` is shared with ``benchmarks/serve.py`` (which runs it on a packaged model).
Here the model is a named size with random weights and a tokenizer built in code, so the script
needs torch, transformers and pydantic only. Random weights rarely propose to end thinking, so
in the "Wait" case most rows think to the cap; the per-token policy work is what is measured.
Writes ``benchmarks/results/budget-overhead-<device>.json`` after every engine.
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

from selftaught.config import BudgetConfig, EngineConfig, SamplingConfig  # noqa: E402

QUESTIONS = ["What is 17 + 25?", "Name three rivers in Europe.", "Explain photosynthesis briefly.",
             "Write a haiku about snow.", "What is the capital of Norway?", "Compute 12 * 13.",
             "Why is the sky blue?", "List the planets of the solar system."]


def sync(engine) -> None:
    import torch

    if getattr(engine, "device", "cpu") == "cuda":
        torch.cuda.synchronize()


def budget_overhead(engine, batch: int, think: int, repeats: int) -> dict[str, Any]:
    """Time per token of budget-forced decoding vs plain decoding of the same token counts."""
    convs = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(batch)]
    prompts = [engine.apply_chat_template(c) for c in convs]
    cases = {
        "cap_and_min": BudgetConfig(min_thinking_tokens=think, max_thinking_tokens=think, extension="",
                                    max_answer_tokens=16),
        "wait_extensions": BudgetConfig(num_extensions=4, max_thinking_tokens=think, max_answer_tokens=16),
    }
    out = {}
    for name, budget in cases.items():
        bp = SamplingConfig(temperature=0, max_new_tokens=think + 40, budget=budget)
        ref = engine.generate(prompts, bp)  # warm-up, and the exact lengths to match
        counts = [o.completions[0].num_tokens for o in ref]
        # the plain run decodes from the same prefix (prompt + think_start) the same number of tokens
        plain_prompts = [o.prompt for o in ref]
        plain = [SamplingConfig(temperature=0, max_new_tokens=n, ignore_eos=True) for n in counts]
        engine.generate(plain_prompts, plain)  # warm-up of the plain shapes too
        t_b, t_p = [], []
        for _ in range(repeats):
            sync(engine)
            t = time.perf_counter()
            outs = engine.generate(prompts, bp)
            sync(engine)
            t_b.append(time.perf_counter() - t)
            t = time.perf_counter()
            pouts = engine.generate(plain_prompts, plain)
            sync(engine)
            t_p.append(time.perf_counter() - t)
        assert [o.completions[0].num_tokens for o in outs] == counts
        assert [o.completions[0].num_tokens for o in pouts] == counts
        used = [o.completions[0].budget for o in outs]
        tb, tp = statistics.median(t_b), statistics.median(t_p)
        out[name] = {"tokens": sum(counts), "budget_s": tb, "plain_s": tp, "overhead": tb / tp - 1,
                     "budget_s_all": t_b, "plain_s_all": t_p,
                     "mean_thinking_tokens": statistics.mean(u["thinking_tokens"] for u in used),
                     "mean_extensions": statistics.mean(u["extensions"] for u in used)}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="124m")
    ap.add_argument("--vocab", type=int, default=None, help="default: GPT-2's, padded (50304)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--think", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also the engine's compiled decode step")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    from actors.engine import create_engine
    from benchmarks.generation import GPT2_VOCAB, device_name, synthetic_tokenizer, write_json
    from selftaught.models import build_model, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    out = Path(args.out or Path(__file__).parent / "results" / f"budget-overhead-{device}.json")
    texts = [*QUESTIONS, BudgetConfig().think_start, BudgetConfig().think_end]
    tok = synthetic_tokenizer(args.vocab or GPT2_VOCAB, texts)
    model = build_model(args.size, tok, context=1024, dtype=dtype).to(device).eval()
    result: dict[str, Any] = {"benchmark": "budget_overhead", "size": args.size, "vocab": len(tok),
                              "device": device, "device_name": device_name(device), "torch": torch.__version__,
                              "dtype": str(dtype), "batch": args.batch, "think": args.think,
                              "repeats": args.repeats, "target": "overhead <= 0.05",
                              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    variants = {"engine": False, **({"engine_compiled": True} if args.compile else {})}
    for name, compile_ in variants.items():
        cfg = EngineConfig(backend="transformers", model=args.size, device=device, compile=compile_,
                           max_batch_size=args.batch, dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
                           max_model_len=1024)
        engine = create_engine(cfg, model=model, tokenizer=tok)
        result[name] = budget_overhead(engine, args.batch, args.think, args.repeats)
        write_json(out, result)
        print(name, {k: round(v["overhead"], 4) for k, v in result[name].items()}, flush=True)


if __name__ == "__main__":
    main()
