"""SBP throughput: document embedding on the actor pool vs one process, ANN vs exact neighbour
search at 10k and 100k vectors (speed and recall@10), and synthesis tokens/s.

    python benchmarks/sbp.py [--docs 400] [--sizes 10000,100000] [--synth-model runs/sbp-tiny/synthesizer/model]

Writes ``benchmarks/results/sbp.json``. The search vectors are 384-d unit vectors drawn around
1,000 random centres (MiniLM's dimension; embedding 100k real documents would take over an hour
on 2 cores); timing uses 2,000 queries against the full index.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402


def wiki_texts(n: int) -> list[str]:
    from selftaught.data.wiki import build_wiki

    return [r["text"] for r in build_wiki(limit=n)[0]]


def _time_pipeline(texts: list[str], actors: int, **kwargs) -> dict:
    """One ``embed_dataset`` run as the SBP pairing stage makes it (rows from ``from_items``,
    ``take_all`` in the driver), timed end to end: actor start-up and model load included."""
    import ray.data

    from actors.embedder import embed_dataset

    n = len(texts)
    ds = ray.data.from_items([{"row": i, "text": t} for i, t in enumerate(texts)])
    t0 = time.perf_counter()
    rows = embed_dataset(ds, "minilm", actors, 64, **kwargs).take_all()
    seconds = time.perf_counter() - t0
    order = [r["row"] for r in rows]
    assert sorted(order) == list(range(n)) and len(rows[0]["embedding"]) == 384
    return {"seconds": seconds, "docs_per_s": n / seconds, "in_input_order": order == list(range(n))}


def bench_embedding(n_docs: int, actors: int, baseline: bool = False) -> dict:
    """Single process (1 and all threads, best kept) against the Ray Data pipeline
    ``embed_dataset`` as the SBP pairing stage calls it (``actors`` asked for, 64 per forward)."""
    import torch

    from actors.embedder import embed_texts, plan_pool
    from selftaught.config import RayConfig
    from selftaught.runtime import cluster_cpus, init_ray

    texts = wiki_texts(n_docs)
    out = {"docs": n_docs, "actors_asked": actors}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        embed_texts(texts[:32])  # warm-up (model load)
        t0 = time.perf_counter()
        embed_texts(texts)
        out[f"one_process_{threads}_threads_docs_per_s"] = n_docs / (time.perf_counter() - t0)
    init_ray(RayConfig(include_dashboard=False))
    out["pool_actors"], out["pool_threads_per_actor"] = plan_pool(actors, cluster_cpus())
    runs = {"ray_data": {}}
    if baseline:  # the configuration before the fix: 2 single-thread actors, 64 rows per call
        runs["ray_data_before_two_1_thread_actors_64_rows"] = {"threads_per_actor": 1, "rows_per_call": 64,
                                                                "min_threads_per_actor": 1}
    for label, kwargs in runs.items():
        # Start-up as the pipeline pays it (actor processes, imports, model loads, one tiny call),
        # measured on 8 documents; steady state is the full run without that cost.
        start = _time_pipeline(texts[:8], actors, **kwargs)["seconds"]
        r = _time_pipeline(texts, actors, **kwargs)
        out[f"{label}_startup_s"] = start
        out[f"{label}_end_to_end_docs_per_s"] = r["docs_per_s"]
        out[f"{label}_steady_docs_per_s"] = n_docs / max(r["seconds"] - start, 1e-9)
        out[f"{label}_in_input_order"] = r["in_input_order"]
    # single process again after the pipelines: the machine is shared, load drifts
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    embed_texts(texts)
    out["one_process_all_threads_after_docs_per_s"] = n_docs / (time.perf_counter() - t0)
    best_single = max(v for k, v in out.items() if k.startswith("one_process"))
    out["one_process_best_docs_per_s"] = best_single
    for label in runs:
        out[f"{label}_end_to_end_vs_one_process"] = out[f"{label}_end_to_end_docs_per_s"] / best_single
        out[f"{label}_steady_vs_one_process"] = out[f"{label}_steady_docs_per_s"] / best_single
    return out


def clustered(n: int, d: int = 384, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, d))
    v = centres[rng.integers(0, 1000, n)] + 0.6 * rng.normal(size=(n, d))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def bench_search(n: int, queries: int = 2000, k: int = 10) -> dict:
    import faiss

    from selftaught.ann import AnnConfig, build_index, recall_at_k, search

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    vecs = clustered(n)
    q = vecs[np.random.default_rng(1).choice(n, queries, replace=False)]
    res = {"vectors": n, "queries": queries}
    t0 = time.perf_counter()
    exact = build_index(vecs, AnnConfig(kind="exact"))
    res["exact_build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, ex_ids = search(exact, q, k)
    res["exact_search_s"] = time.perf_counter() - t0
    settings = {"hnsw_ef64": AnnConfig(kind="hnsw", hnsw_m=32, ef_search=64),
                "hnsw_ef24": AnnConfig(kind="hnsw", hnsw_m=32, ef_search=24),
                "ivf_nprobe16": AnnConfig(kind="ivf", nprobe=16),
                "ivf_nprobe4": AnnConfig(kind="ivf", nprobe=4),
                "ivf_nprobe2": AnnConfig(kind="ivf", nprobe=2)}
    for kind, cfg in settings.items():
        t0 = time.perf_counter()
        index = build_index(vecs, cfg)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, ids = search(index, q, k)
        dt = time.perf_counter() - t0
        res[kind] = {"build_s": build, "search_s": dt, "speedup_vs_exact": res["exact_search_s"] / dt,
                     "recall_at_10": recall_at_k(ids, ex_ids, k)}
    ok = {k: v for k, v in res.items() if isinstance(v, dict) and v["recall_at_10"] >= 0.95}
    if ok:
        best = max(ok, key=lambda k: ok[k]["speedup_vs_exact"])
        res["best_at_recall_0.95"] = {"setting": best, **ok[best]}
    return res


def bench_synthesis(model: str, n: int = 64, new_tokens: int = 128) -> dict:
    from actors.engine import create_engine
    from selftaught.config import EngineConfig, SamplingConfig

    engine = create_engine(EngineConfig(backend="transformers", model=model, max_batch_size=64))
    prompts = wiki_texts(n)
    prompts = [" ".join(p.split()[:60]) + "\n\n" for p in prompts]
    params = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=new_tokens, seed=0)
    engine.generate(prompts[:8], params.model_copy(update={"max_new_tokens": 8}))
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    dt = time.perf_counter() - t0
    toks = sum(c.num_tokens for o in outs for c in o.completions)
    return {"model": model, "prompts": n, "max_new_tokens": new_tokens, "tokens": toks, "tokens_per_s": toks / dt}


def bench_sharded_pairing(n: int, dim: int, shards: int, parts: int, k: int = 8, threshold: float = 0.8) -> dict:
    """Pairing over ``n`` vectors that never sit in one process: Parquet parts written one at
    a time, shard actors that read their own parts and build IVF indexes, a self-join whose
    query batches go from shard to shards, vectorised pair selection; peak memory per process."""
    import resource
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from selftaught.ann import AnnConfig, ShardedIndex, pairs_above
    from selftaught.config import RayConfig
    from selftaught.runtime import init_ray

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(1000, dim)).astype(np.float32)
    tmp = Path(tempfile.mkdtemp(prefix="pairing-"))
    files, bounds = [], np.linspace(0, n, parts + 1).astype(int)
    t0 = time.perf_counter()
    schema = pa.schema([("row", pa.int64()), ("embedding", pa.list_(pa.float32(), dim))])
    for p, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        path = tmp / f"part-{p:03d}.parquet"
        with pq.ParquetWriter(path, schema) as w:  # in chunks: the driver never holds a part
            for c in range(a, b, 16384):
                e = min(b, c + 16384)
                v = centers[rng.integers(0, len(centers), e - c)]
                v += 0.35 * rng.standard_normal((e - c, dim), dtype=np.float32)
                v /= np.linalg.norm(v, axis=1, keepdims=True)
                emb = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), dim)
                w.write_table(pa.table({"row": np.arange(c, e), "embedding": emb}, schema=schema))
        files.append(str(path))
    write_s = time.perf_counter() - t0
    driver_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    init_ray(RayConfig(include_dashboard=False))
    cfg = AnnConfig(kind="ivf", shards=shards, nlist=1024, nprobe=4, query_batch=8192)
    t0 = time.perf_counter()
    index = ShardedIndex.from_parquet(files, cfg)
    import ray

    sizes = ray.get([s.size.remote() for s in index.shards])
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pairs = queries = 0
    for ids, scores, nbrs in index.self_join(k + 1):
        queries += len(ids)
        pairs += len(pairs_above(ids, scores, nbrs, threshold)[0])
    join_s = time.perf_counter() - t0
    shard_mb = index.memory_mb()
    index.close()
    return {"vectors": n, "dim": dim, "corpus_mb": n * dim * 4 / 1e6, "shards": shards, "parquet_parts": parts,
            "shard_sizes": sizes, "index": cfg.model_dump(), "k": k, "threshold": threshold,
            "write_parts_s": write_s, "build_s": build_s, "self_join_s": join_s, "queries": queries,
            "queries_per_s": queries / join_s, "pairs": pairs,
            "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "driver_peak_mb_after_writing_parts": driver_before_mb,
            "shard_peak_mb": shard_mb}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--synth-model", default="runs/sbp-tiny/synthesizer/model")
    ap.add_argument("--only", default="search,synthesis,embedding", help="also: pairing")
    ap.add_argument("--pairing-vectors", type=int, default=1_000_000)
    ap.add_argument("--pairing-dim", type=int, default=384)
    ap.add_argument("--pairing-shards", type=int, default=4)
    ap.add_argument("--embedding-baseline", action="store_true",
                    help="embedding: also time the pre-fix pool (2 single-thread actors, 64 rows a call)")
    ap.add_argument("--out", default=None, help="default results/sbp.json; "
                    "results/sbp-embedding.json with --only embedding")
    args = ap.parse_args()
    result = {"benchmark": "sbp", "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    only = set(args.only.split(","))
    if "search" in only:
        result["search"] = [bench_search(int(n)) for n in args.sizes.split(",")]
        print(json.dumps(result["search"], indent=1), flush=True)
    if "synthesis" in only and Path(args.synth_model).exists():
        result["synthesis"] = bench_synthesis(args.synth_model)
        print(json.dumps(result["synthesis"]), flush=True)
    if "pairing" in only:
        result["sharded_pairing"] = bench_sharded_pairing(args.pairing_vectors, args.pairing_dim,
                                                          args.pairing_shards, parts=2 * args.pairing_shards)
        print(json.dumps(result["sharded_pairing"]), flush=True)
    if "embedding" in only:
        result["embedding"] = bench_embedding(args.docs, args.actors, baseline=args.embedding_baseline)
        print(json.dumps(result["embedding"]), flush=True)
    default = "sbp-embedding.json" if only == {"embedding"} else "sbp.json"
    out = Path(args.out or Path(__file__).parent / "results" / default)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
