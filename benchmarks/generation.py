"""Generation throughput: the engine's transformers backend (eager, and with ``--compile`` its
static-cache compiled decode step) vs a plain ``model.generate`` loop (and vLLM where installed),
same model, same prompts, same token counts, one process.

    python benchmarks/generation.py                       # CPU default: SmolLM2-135M, 16 x 64 tokens
    python benchmarks/generation.py --model 124m --prompts 64 --new-tokens 256 --compile   # GPU target

Writes ``benchmarks/results/generation-<device>.json`` after every measurement (a run stopped by
a timeout keeps what it measured). Needs torch, transformers and pydantic only: named sizes get
random weights and a word-level tokenizer built in code, so nothing is downloaded or packaged.
Ratios inside one run are the figure to compare; the absolute numbers move with machine load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from selftaught.config import EngineConfig, SamplingConfig  # noqa: E402

TOPICS = ["the history of", "a short guide to", "the economy of", "how to explain", "the climate of",
          "the architecture of", "a famous scientist named", "the rules of", "an overview of modern",
          "the geography of", "a recipe for", "the main causes of"]
SUBJECTS = ["Norway", "photosynthesis", "the Roman Empire", "jazz music", "volcanoes", "chess",
            "the printing press", "Brazil", "neural networks", "the moon", "bread", "rivers"]
GPT2_VOCAB = 50304  # GPT-2's 50257 rounded up to a multiple of 64, as nanoGPT does: the 124M shape


def make_prompts(n: int) -> list[str]:
    """Prompts of varied length (as real batches have), deterministic."""
    out = []
    for i in range(n):
        words = [TOPICS[i % len(TOPICS)], SUBJECTS[(i * 7) % len(SUBJECTS)]]
        out.append(("Write an article about " + " ".join(words) + ". ") * (1 + i % 3))
    return out


def synthetic_tokenizer(vocab_size: int = GPT2_VOCAB, texts: Iterable[str] = ()):
    """A word-level tokenizer of exactly ``vocab_size`` ids, built in code.

    Throughput with random weights does not depend on the vocabulary's contents, only its size,
    and the GPU machine has neither our packaged tokenizer nor a network. It knows the words of
    the benchmark prompts, ``texts`` and the chat/budget markers (other words map to ``<unk>``),
    then filler words up to the size, so any id the model emits decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from selftaught.models import CHAT_TEMPLATE, EOS, IM_END, IM_START, PAD

    pre = pre_tokenizers.Whitespace()
    corpus = [*TOPICS, *SUBJECTS, "Write an article about", "user assistant system think answer Wait", *texts]
    words = [w for text in corpus for w, _ in pre.pre_tokenize_str(text)]
    names = list(dict.fromkeys([EOS, PAD, IM_START, IM_END, "<unk>", *words]))
    if len(names) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(names)} words it must hold")
    names += [f"w{i}" for i in range(vocab_size - len(names))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   unk_token="<unk>", additional_special_tokens=[IM_START, IM_END])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load(model_name: str, device: str, dtype, vocab: int = GPT2_VOCAB):
    """A named size: random weights, word-level tokenizer; else a packaged model or checkpoint."""
    from selftaught.models import MODEL_SIZES, build_model, load_causal_lm

    if model_name in MODEL_SIZES:
        tok = synthetic_tokenizer(vocab)
        model = build_model(model_name, tok, context=2048, dtype=dtype)
    else:
        tok, model = load_causal_lm(model_name, dtype=dtype)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, model.to(device).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic, so a part killed by its timeout leaves the last complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


@torch.inference_mode()
def bench_plain(model, tok, prompts, new_tokens, batch_size, device) -> dict:
    tok.padding_side = "left"
    sync(device)
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
    sync(device)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    sync(device)
    dt = time.perf_counter() - t0
    produced = sum(c.num_tokens for o in outs for c in o.completions)
    return {"seconds": dt, "tokens": produced, "tokens_per_s": produced / dt}


def summarise(result: dict[str, Any]) -> None:
    """Best run of each path, and each engine's ratio to plain ``generate``."""
    best = {k: max(r["tokens_per_s"] for r in v) for k, v in result["runs"].items() if v}
    result["tokens_per_s"] = best
    base = best.get("plain_generate")
    for k, v in best.items():
        if k != "plain_generate" and base:
            result[f"{k}_vs_plain"] = v / base


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct", help="packaged name, checkpoint dir or size")
    ap.add_argument("--vocab", type=int, default=GPT2_VOCAB, help="vocabulary of a named size")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--compile", action="store_true",
                    help="also the engine with static cache + compiled decode step (its GPU path)")
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
    out = Path(args.out or Path(__file__).parent / "results" / f"generation-{device}.json")
    tok, model = load(args.model, device, dtype, args.vocab)
    prompts = make_prompts(args.prompts)
    cfg = EngineConfig(backend="transformers", model=args.model, device=device, compile=False,
                       max_batch_size=args.batch_size,
                       dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
                       max_model_len=max(len(tok(p)["input_ids"]) for p in prompts) + args.new_tokens + 8)
    engines = {"engine": create_engine(cfg, model=model, tokenizer=tok)}
    result: dict[str, Any] = {
        "benchmark": "generation", "model": args.model, "params": sum(p.numel() for p in model.parameters()),
        "vocab": model.config.vocab_size, "device": device, "device_name": device_name(device),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": str(dtype),
        "prompts": len(prompts), "new_tokens": args.new_tokens, "batch_size": args.batch_size,
        "engine_continuous_batching": True, "warmup_s": {},
        "runs": {"plain_generate": [], "engine": []}, "target": "engine_compiled >= 10x plain_generate (GPU)",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    warm = prompts[: min(len(prompts), args.batch_size)]
    bench_plain(model, tok, warm, 8, args.batch_size, device)
    t0 = time.perf_counter()
    bench_engine(engines["engine"], warm, 8, device)
    result["warmup_s"]["engine"] = time.perf_counter() - t0
    compile_at = min(1, args.repeats - 1)  # after one full round: a failed compile keeps the eager figures
    for rep in range(args.repeats):  # interleaved, so drift in machine load hits every path alike
        if rep == compile_at and args.compile:
            t0 = time.perf_counter()
            engines["engine_compiled"] = create_engine(cfg.model_copy(update={"compile": True}),
                                                       model=model, tokenizer=tok)
            bench_engine(engines["engine_compiled"], prompts, args.new_tokens, device)  # same shapes: compiles
            result["warmup_s"]["engine_compiled"] = time.perf_counter() - t0
            result["runs"]["engine_compiled"] = []
        result["runs"]["plain_generate"].append(bench_plain(model, tok, prompts, args.new_tokens,
                                                            args.batch_size, device))
        for name, engine in engines.items():
            result["runs"][name].append(bench_engine(engine, prompts, args.new_tokens, device))
            summarise(result)
            write_json(out, result)
        print(json.dumps({"round": rep, **result["tokens_per_s"]}), flush=True)
    if vllm_available() and not args.skip_vllm:
        engines.clear()
        vcfg = cfg.model_copy(update={"backend": "vllm", "model": args.model})
        veng = create_engine(vcfg)
        bench_engine(veng, warm, 8, device)
        result["runs"]["vllm"] = [bench_engine(veng, prompts, args.new_tokens, device)]
        summarise(result)
        write_json(out, result)
    print(json.dumps({k: v for k, v in result.items() if k in ("model", "device", "tokens_per_s")
                      or k.endswith("_vs_plain")}, indent=2))


if __name__ == "__main__":
    main()
