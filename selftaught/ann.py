"""Nearest-neighbour search over unit-norm embeddings with FAISS: exact inner product for small
corpora, IVF or HNSW for large ones, and a sharded form whose shards live in Ray actors and are
searched in parallel (the corpus never has to fit in one process)."""
from __future__ import annotations

import logging
from typing import Literal

import numpy as np
from pydantic import Field

from selftaught.config import Strict

log = logging.getLogger(__name__)


class AnnConfig(Strict):
    kind: Literal["auto", "exact", "ivf", "hnsw"] = "auto"  # auto: exact below exact_below vectors
    exact_below: int = Field(default=20_000, ge=1)
    nlist: int | None = Field(default=None, ge=1)  # IVF lists (default ~4 sqrt(n))
    nprobe: int = Field(default=16, ge=1)
    hnsw_m: int = Field(default=32, ge=4)
    ef_search: int = Field(default=128, ge=1)
    ef_construction: int = Field(default=80, ge=1)
    shards: int = Field(default=1, ge=1)  # >1: one Ray actor per shard
    query_batch: int = Field(default=4096, ge=1)


def _kind(cfg: AnnConfig, n: int) -> str:
    return ("exact" if n < cfg.exact_below else "hnsw") if cfg.kind == "auto" else cfg.kind


def build_index(vecs: np.ndarray, cfg: AnnConfig):
    """An inner-product index over ``vecs`` (float32, rows unit-norm for cosine)."""
    import faiss

    vecs = np.ascontiguousarray(vecs, dtype=np.float32)
    n, d = vecs.shape
    kind = _kind(cfg, n)
    if kind == "exact":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
        index.hnsw.efSearch = cfg.ef_search
    else:
        nlist = cfg.nlist or max(1, min(n // 39, int(4 * np.sqrt(n))))
        quant = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vecs)
        index.nprobe = min(cfg.nprobe, nlist)
    index.add(vecs)
    return index


def search(index, queries: np.ndarray, k: int, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, index.ntotal)
    scores, ids = [], []
    for i in range(0, len(queries), batch):
        s, j = index.search(queries[i:i + batch], k)
        scores.append(s)
        ids.append(j)
    return np.concatenate(scores), np.concatenate(ids)


class IndexShard:
    """One shard of a corpus index (a Ray actor): its vectors, their global ids, its index."""

    def __init__(self, vecs: np.ndarray, ids: np.ndarray, cfg: dict):
        import faiss

        faiss.omp_set_num_threads(1)
        self.cfg = AnnConfig(**cfg)
        self.ids = np.asarray(ids, dtype=np.int64)
        self.index = build_index(vecs, self.cfg)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        s, j = search(self.index, queries, k, self.cfg.query_batch)
        return s, np.where(j >= 0, self.ids[np.clip(j, 0, None)], -1)


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    order = np.argsort(-scores, axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def knn(vecs: np.ndarray, k: int, cfg: AnnConfig, queries: np.ndarray | None = None,
        ) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` neighbours of ``queries`` (default: every vector) by inner product. With
    ``cfg.shards > 1`` the corpus is split over Ray actors, every shard searched in parallel,
    and the per-shard top-k merged."""
    queries = vecs if queries is None else queries
    if cfg.shards <= 1:
        return search(build_index(vecs, cfg), queries, k, cfg.query_batch)
    import ray

    from selftaught.runtime import fit_actor_cpus

    cpus = fit_actor_cpus(1.0, cfg.shards)
    shard_cls = ray.remote(IndexShard).options(num_cpus=cpus)
    bounds = np.linspace(0, len(vecs), cfg.shards + 1).astype(int)
    shards = [shard_cls.remote(vecs[a:b], np.arange(a, b), cfg.model_dump())
              for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    q_ref = ray.put(np.ascontiguousarray(queries, dtype=np.float32))
    parts = ray.get([s.search.remote(q_ref, k) for s in shards])
    for s in shards:
        ray.kill(s)
    return merge_topk(parts, k)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    hits = [len(set(a[:k]) & set(e[:k])) for a, e in zip(approx_ids, exact_ids)]
    return float(np.sum(hits) / (k * len(exact_ids)))
