"""The transformers engine's decode step on CPU, with and without its two CPU paths, side by
side in one process (the machine's load moves absolute figures; compare the ratios):

- attention: grouped-query SDPA sharing KV heads (``actors/engine/attention.py``, the default on
  CPU) vs transformers' SDPA, which copies every KV head per query head when a mask is given;
- top-p: candidates from ``topk`` with a full-sort fallback (the default) vs sorting the whole
  vocabulary every step (``TOP_P_CANDIDATES`` set to the vocabulary size).

Every variant runs the same requests (seeded sampling, so the tokens must match; the JSON says
whether they did) and reports decode seconds per step and tokens per second.

    python -m benchmarks.engine_cpu                     # SmolLM2-135M, 32 rows x ~360 prompt tokens
    python -m benchmarks.engine_cpu --rows 16 --prompt-chars 800 --new-tokens 32

Writes ``benchmarks/results/engine-cpu.json`` (``--out``).
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


def prompts(rows: int, chars: int) -> list[list[dict]]:
    """Factbook countries' opening text, ``chars`` characters each, as rewrite requests."""
    import tempfile

    from selftaught.data.prepare import DataConfig, prepare
    from selftaught.storage import read_parquet

    d = Path(tempfile.mkdtemp(prefix="engine-cpu-"))
    prepare(DataConfig(datasets=["factbook"], questions_per_country=1), d)
    docs = read_parquet(d / "factbook" / "documents.parquet").to_pylist()
    return [[{"role": "user", "content": "Rewrite this for a child:\n\n" + docs[i % len(docs)]["text"][:chars]}]
            for i in range(rows)]


def run_variant(engine, convs, sampling, gqa: bool, candidates: int | None) -> dict:
    from actors.engine.attention import NAME

    engine.model.set_attn_implementation(NAME if gqa else "sdpa")
    type(engine).TOP_P_CANDIDATES = candidates or engine.vocab_size
    ids = [engine.apply_chat_template(c) for c in convs]
    for i, p in enumerate(ids):
        engine.add_request(f"v{gqa}{candidates}-{i}", p, sampling)
    out: dict[int, list[int]] = {}

    def keep(events) -> None:
        for ev in events:
            if ev.finished:
                out[int(ev.request_id.rsplit("-", 1)[1])] = list(ev.completion.token_ids)

    t0 = time.perf_counter()
    keep(engine.step())  # the prefill (and the first token)
    prefill = time.perf_counter() - t0
    steps = 0
    t1 = time.perf_counter()
    while engine.has_unfinished():
        keep(engine.step())
        steps += 1
    decode = time.perf_counter() - t1
    tokens = len(convs) * steps  # one token per row per decode step (the first came with the prefill)
    return {"gqa_sdpa": gqa, "top_p_candidates": candidates, "prefill_s": round(prefill, 3),
            "decode_s": round(decode, 3), "steps": steps, "s_per_step": round(decode / max(steps, 1), 4),
            "decode_tok_s": round(tokens / decode, 1), "tokens": [out[i] for i in sorted(out)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--prompt-chars", type=int, default=1400)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default="benchmarks/results/engine-cpu.json")
    args = ap.parse_args()

    import torch

    from actors.engine import create_engine
    from actors.engine.hf import TransformersEngine
    from selftaught.config import EngineConfig, SamplingConfig

    torch.set_num_threads(args.threads)
    engine = create_engine(EngineConfig(backend="transformers", model=args.model, device="cpu",
                                        max_batch_size=args.rows))
    default_candidates = TransformersEngine.TOP_P_CANDIDATES
    convs = prompts(args.rows, args.prompt_chars)
    sampling = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=args.new_tokens, seed=0, ignore_eos=True)
    variants = [(False, None), (True, None), (False, default_candidates), (True, default_candidates)]
    results = []
    for gqa, cand in variants:
        r = run_variant(engine, convs, sampling, gqa, cand)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "tokens"}), flush=True)
    TransformersEngine.TOP_P_CANDIDATES = default_candidates
    base = results[0]["s_per_step"]
    for r in results:
        r["speedup_vs_transformers_sdpa_full_sort"] = round(base / r["s_per_step"], 2)
        r["same_tokens_as_first"] = r["tokens"] == results[0]["tokens"]
    for r in results:
        del r["tokens"]
    prompt_tokens = [len(engine.encode(engine.apply_chat_template(c))) for c in convs]
    doc = {"benchmark": "engine_cpu_decode_step", "model": args.model, "rows": args.rows,
           "prompt_tokens_mean": round(sum(prompt_tokens) / len(prompt_tokens), 1), "new_tokens": args.new_tokens,
           "threads": args.threads, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "variants": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps({k: v for k, v in doc.items() if k != "variants"}))


if __name__ == "__main__":
    main()
