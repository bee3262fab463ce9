"""Serving: the OpenAI-compatible Serve app against the engine called directly, and the cost
of budget forcing against plain decoding of the same length.

    python benchmarks/serve.py                         # CPU default: SmolLM2-135M, 32 tokens/request
    python benchmarks/serve.py --clients 1 8 32 64 --new-tokens 128 --device cuda   # GPU box

1. Throughput and latency: ``c`` concurrent clients (threads with their own HTTP connection)
   each send chat requests through the ``openai`` client; every request decodes exactly
   ``--new-tokens`` tokens (``ignore_eos``), greedy. The direct baseline drives the same engine
   in this process with the same requests and the same concurrency: ``c`` asyncio callers, each
   sending its requests one after another through an ``EngineLoop`` (the replica's loop, minus
   HTTP and Serve), with the same torch thread count. Serve is measured while the direct engine
   is idle and vice versa. Errors are counted, never retried.
2. Budget forcing overhead (``benchmarks/budget_overhead.py``): a batch of budget-forced
   requests (thinking forced to exactly ``T`` tokens, then the delimiter and an answer; and the
   same with "Wait" extensions), then plain decoding of exactly the same number of tokens per
   request; greedy, interleaved, median of ``--repeats``. The figure is time per generated
   token, budget vs plain.

Writes ``benchmarks/results/serve.json``. Ratios inside one run are what to compare.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.budget_overhead import QUESTIONS, budget_overhead  # noqa: E402
from selftaught.config import EngineConfig, SamplingConfig  # noqa: E402


def _free_port() -> int:
    from selftaught.net import free_port

    return free_port()


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q * (len(v) - 1)))))]


def serve_load(base_url: str, model: str, clients: int, per_client: int, new_tokens: int) -> dict:
    import openai

    lat, errors = [], []
    lock = threading.Lock()

    clis = [openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600) for _ in range(clients)]

    def client_loop(c: int) -> None:
        cli = clis[c]
        for r in range(per_client):
            q = QUESTIONS[(c * per_client + r) % len(QUESTIONS)]
            t0 = time.perf_counter()
            try:
                out = cli.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                  max_tokens=new_tokens, temperature=0,
                                                  extra_body={"ignore_eos": True})
                ok = out.usage.completion_tokens == new_tokens
                with lock:
                    lat.append(time.perf_counter() - t0)
                    if not ok:
                        errors.append(f"short completion {out.usage.completion_tokens}")
            except Exception as e:  # counted, not retried
                with lock:
                    errors.append(repr(e)[:200])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    wall = time.perf_counter() - t0
    n = clients * per_client
    return {"requests": n, "seconds": wall, "req_per_s": (n - len(errors)) / wall,
            "p50_s": pct(lat, 0.5) if lat else None, "p99_s": pct(lat, 0.99) if lat else None,
            "errors": len(errors), "error_samples": errors[:3]}


def direct_load(engine, clients: int, per_client: int, new_tokens: int) -> dict:
    """The same requests straight into the engine: ``clients`` concurrent callers, each waiting
    for its answer before sending the next (as the HTTP clients do)."""
    import asyncio

    from actors.engine.runner import EngineLoop

    convs = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(clients * per_client)]
    prompts = [engine.apply_chat_template(c) for c in convs]
    sp = SamplingConfig(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    loop_ = EngineLoop(engine)
    lat: list[float] = []

    async def client(c: int) -> None:
        for r in range(per_client):
            t = time.perf_counter()
            await loop_.generate(prompts[c * per_client + r], sp)
            lat.append(time.perf_counter() - t)

    async def all_clients() -> None:
        await asyncio.gather(*(client(c) for c in range(clients)))

    t0 = time.perf_counter()
    asyncio.run(all_clients())
    wall = time.perf_counter() - t0
    loop_.close()
    return {"requests": len(prompts), "seconds": wall, "req_per_s": len(prompts) / wall,
            "p50_s": pct(lat, 0.5), "p99_s": pct(lat, 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the engine (both paths)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-client", type=int, default=0, help="0: 4 at 1 client, 2 at 8, 1 at 32+")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--skip-budget", action="store_true")
    ap.add_argument("--think", type=int, default=48)
    ap.add_argument("--budget-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    args = ap.parse_args()

    import ray
    import torch
    from ray import serve

    from actors.engine import create_engine
    from selftaught.config import RayConfig
    from selftaught.runtime import init_ray
    from serve.config import ServeConfig
    from serve.openai_app import base_url, run_openai_app

    torch.set_num_threads(args.threads)
    engine_cfg = EngineConfig(model=args.model, backend="transformers", device=args.device,
                              max_batch_size=args.max_batch, cpus_per_actor=args.threads,
                              gpus_per_actor=1 if args.device == "cuda" else 0)
    engine = create_engine(engine_cfg)
    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": args.device,
                                 "torch_threads": args.threads},
                     "model": args.model, "new_tokens": args.new_tokens, "max_batch_size": args.max_batch}
    if not args.skip_budget:
        results["budget_forcing"] = budget_overhead(engine, args.budget_batch, args.think, args.repeats)
        print(json.dumps({k: round(v["overhead"], 4) for k, v in results["budget_forcing"].items()}))

    import httpx

    init_ray(RayConfig(num_cpus=max(4, args.threads + 2)))
    cfg = ServeConfig(engine=engine_cfg, port=_free_port(), app_name="bench", max_ongoing_requests=256)
    run_openai_app(cfg)
    url = base_url(cfg)
    model_id = cfg.model_id()
    serve_load(url, model_id, 1, 1, 4)  # warm-up
    direct_load(engine, 1, 1, 4)
    rows = []
    for c in args.clients:
        per = args.requests_per_client or (4 if c == 1 else 2 if c <= 8 else 1)
        d = direct_load(engine, c, per, args.new_tokens)
        s = serve_load(url, model_id, c, per, args.new_tokens)
        s["engine"] = httpx.get(url.removesuffix("/v1") + "/health").json()["engine"]
        row = {"clients": c, "serve": s, "direct": d, "serve_over_direct": s["req_per_s"] / d["req_per_s"]}
        rows.append(row)
        print(json.dumps({"clients": c, "serve_rps": round(s["req_per_s"], 3), "direct_rps": round(d["req_per_s"], 3),
                          "ratio": round(row["serve_over_direct"], 3), "p50": round(s["p50_s"], 2),
                          "p99": round(s["p99_s"], 2), "direct_p50": round(d["p50_s"], 2),
                          "direct_p99": round(d["p99_s"], 2), "errors": s["errors"],
                          "max_running_rows": s["engine"]["max_running"]}))
    results["throughput"] = rows
    serve.delete(cfg.app_name)
    serve.shutdown()
    ray.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
