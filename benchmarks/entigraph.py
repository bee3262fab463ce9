"""EntiGraph synthesis throughput: the same relation requests (entity pairs of World Factbook
countries, EntiGraph's prompts) answered by one engine in this process, by the Ray Data fan-out
(``fanout: ray_data``, the default: a dataset streamed through N engine actors, actor start-up
included, as every stage pays it) and by a warm pool of N long-lived engine actors
(``fanout: actors``).

    python -m benchmarks.entigraph                         # SmolLM2-135M on CPU, 1 and 2 actors
    python -m benchmarks.entigraph --actors 1,2,4 --requests 64 --device cuda

Writes ``benchmarks/results/entigraph-synthesis.json`` (``--out``) after every measurement.
Compare the ratios within one run: absolute figures move with the machine's load. On a 2-core
machine the actors share the same two cores, so more actors cannot be faster there; on a node
with GPUs each actor holds its own.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def relation_requests(n: int, model: str, new_tokens: int, doc_chars: int) -> list:
    """``n`` pair requests over Factbook countries, each country's first entities taken from
    the capitalised words of its text (no LLM: the benchmark measures synthesis, not extraction)."""
    import itertools
    import re

    from pipelines.entigraph_synth import SynthConfig, relation_requests as build
    from selftaught.config import SamplingConfig
    from selftaught.data.prepare import DataConfig, prepare
    from selftaught.storage import read_parquet

    data = Path(tempfile.mkdtemp(prefix="eg-bench-"))
    prepare(DataConfig(datasets=["factbook"]), data)
    docs = read_parquet(data / "factbook" / "documents.parquet").to_pylist()
    cfg = SynthConfig(max_doc_chars=doc_chars,
                      relation_sampling=SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=new_tokens, seed=0))

    class _Gen:
        pass

    gen = _Gen()
    gen.model = model
    reqs: list = []
    for d in docs:
        names = list(dict.fromkeys(re.findall(r"\b[A-Z][a-z]{3,}\b", d["text"][:doc_chars])))[:6]
        reqs += build(d, list(itertools.combinations(names, 2))[:4], [], gen, cfg)
        if len(reqs) >= n:
            break
    return reqs[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--doc-chars", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16, help="the engine's max_batch_size")
    ap.add_argument("--actors", default="1,2")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "entigraph-synthesis.json"))
    a = ap.parse_args()

    import ray
    import torch

    from actors.engine import create_engine
    from pipelines.entigraph_synth import GeneratorConfig, make_generator, run_requests
    from selftaught.config import EngineConfig

    cores = os.cpu_count() or 1
    reqs = relation_requests(a.requests, a.model, a.new_tokens, a.doc_chars)
    res: dict = {"benchmark": "entigraph_synthesis", "model": a.model, "device": a.device, "requests": len(reqs),
                 "new_tokens": a.new_tokens, "doc_chars": a.doc_chars, "batch": a.batch, "cores": cores,
                 "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": {}}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(name: str, wall: float, tokens: int, **extra) -> None:
        res["runs"][name] = {"wall_s": round(wall, 2), "completion_tokens": tokens,
                             "tokens_per_s": round(tokens / wall, 1), **extra}
        base = res["runs"].get("one_engine")
        if base:
            for r in res["runs"].values():
                r["vs_one_engine"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
        out.write_text(json.dumps(res, indent=1))
        print(name, json.dumps(res["runs"][name]), flush=True)

    def engine_cfg(cpus: float) -> EngineConfig:
        return EngineConfig(backend="transformers", model=a.model, device=a.device, max_batch_size=a.batch,
                            cpus_per_actor=cpus, gpus_per_actor=1 if a.device == "cuda" else 0)

    # one engine, this process, no Ray
    torch.set_num_threads(cores)
    t0 = time.perf_counter()
    eng = create_engine(engine_cfg(cores))
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = eng.chat([r.messages for r in reqs], [r.sampling for r in reqs])
    record("one_engine", time.perf_counter() - t0, sum(len(o.completions[0].token_ids) for o in outs),
           load_s=round(load, 2))
    del eng

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    for n in [int(x) for x in a.actors.split(",")]:
        cpus = max(1.0, cores / n) if a.device != "cuda" else 1.0
        for fanout in ("ray_data", "actors"):
            cfg = GeneratorConfig(backend="local", fanout=fanout, num_actors=n, engine=engine_cfg(cpus))
            t0 = time.perf_counter()
            gen = make_generator(cfg)
            if fanout == "actors":  # a warm pool: its start is reported apart
                ray.get([x.info.remote() for x in gen.chat_model.actors])
            start = time.perf_counter() - t0
            t0 = time.perf_counter()
            rows, stats = run_requests(reqs, gen, None, part_size=a.batch)
            wall = time.perf_counter() - t0
            gen.close()
            record(f"{fanout}_{n}", wall, stats["completion_tokens"], actors=n, cpus_per_actor=cpus,
                   failed=stats["failed"],
                   **({"pool_start_s": round(start, 2)} if fanout == "actors" else {"includes_actor_start": True}))
    ray.shutdown()


if __name__ == "__main__":
    main()
