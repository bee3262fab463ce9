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
    """One shard of a corpus index (a Ray actor): its vectors, their global ids, its index.
    It loads its own part of the corpus (Parquet files, or an array handed to it), so no
    process ever holds the whole corpus, and it serves its own vectors as query batches."""

    def __init__(self, source: list[str] | np.ndarray, ids: np.ndarray | None, cfg: dict,
                 column: str = "embedding", id_column: str | None = None):
        import faiss

        faiss.omp_set_num_threads(1)
        self.cfg = AnnConfig(**cfg)
        if isinstance(source, list):  # Parquet files of this shard
            import pyarrow as pa
            import pyarrow.parquet as pq

            vec_parts, id_parts = [], []
            for f in source:  # one file at a time: its Arrow buffers are freed before the next
                t = pq.read_table(f, columns=[column] + ([id_column] if id_column else []))
                c = t.column(column).combine_chunks()
                if isinstance(c.type, pa.ExtensionType):  # e.g. Ray Data's tensor columns
                    c = c.storage
                vec_parts.append(np.asarray(c.flatten(), dtype=np.float32).reshape(len(c), -1).copy())
                if id_column:
                    id_parts.append(t.column(id_column).to_numpy())
                del t, c
            vecs = np.concatenate(vec_parts)
            del vec_parts
            ids = np.concatenate(id_parts) if id_column else ids
        else:
            vecs = source
        self.vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        self.ids = np.asarray(ids, dtype=np.int64)
        self.index = build_index(self.vecs, self.cfg)

    def size(self) -> int:
        return len(self.ids)

    def queries(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """This shard's vectors ``start:stop`` and their global ids (to query every shard with)."""
        return self.vecs[start:stop], self.ids[start:stop]

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(queries, tuple):  # a batch from ``queries``
            queries = queries[0]
        s, j = search(self.index, queries, k, self.cfg.query_batch)
        return s, np.where(j >= 0, self.ids[np.clip(j, 0, None)], -1)

    def memory_mb(self) -> float:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    order = np.argsort(-scores, axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


class ShardedIndex:
    """A corpus index split over Ray actors. Vectors stay on their shard; a query batch is
    broadcast to every shard through the object store and the per-shard top-k are merged, so
    the driver holds one query batch and the results, never the corpus."""

    def __init__(self, shards: list, cfg: AnnConfig):
        self.shards, self.cfg = shards, cfg

    @staticmethod
    def _cls(cfg: AnnConfig):
        import ray

        from selftaught.runtime import fit_actor_cpus

        return ray.remote(IndexShard).options(num_cpus=fit_actor_cpus(1.0, cfg.shards))

    @classmethod
    def from_arrays(cls, vecs: np.ndarray, cfg: AnnConfig) -> "ShardedIndex":
        """Shards over an in-memory array (each shard's slice goes through the object store)."""
        bounds = np.linspace(0, len(vecs), cfg.shards + 1).astype(int)
        shard = cls._cls(cfg)
        return cls([shard.remote(np.ascontiguousarray(vecs[a:b]), np.arange(a, b), cfg.model_dump())
                    for a, b in zip(bounds[:-1], bounds[1:]) if b > a], cfg)

    @classmethod
    def from_parquet(cls, files: list[str], cfg: AnnConfig, column: str = "embedding",
                     id_column: str = "row") -> "ShardedIndex":
        """Shards that each read their own Parquet files (``column``: fixed-size float lists,
        ``id_column``: global integer ids): the corpus is never read by the caller."""
        groups = [files[i::cfg.shards] for i in range(cfg.shards)]
        shard = cls._cls(cfg)
        return cls([shard.remote(g, None, cfg.model_dump(), column, id_column) for g in groups if g], cfg)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import ray

        out = []
        for i in range(0, len(queries), self.cfg.query_batch):
            ref = ray.put(np.ascontiguousarray(queries[i:i + self.cfg.query_batch], dtype=np.float32))
            out.append(merge_topk(ray.get([s.search.remote(ref, k) for s in self.shards]), k))
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])

    def self_join(self, k: int):
        """Top-``k`` neighbours of every indexed vector, batch by batch: yields (global ids,
        scores, neighbour ids). Query batches go from their shard to every shard directly."""
        import ray

        sizes = ray.get([s.size.remote() for s in self.shards])
        for shard, n in zip(self.shards, sizes):
            for a in range(0, n, self.cfg.query_batch):
                batch = shard.queries.remote(a, min(n, a + self.cfg.query_batch))
                parts = ray.get([s.search.remote(batch, k) for s in self.shards])
                ids = ray.get(batch)[1]
                yield (ids, *merge_topk(parts, k))

    def memory_mb(self) -> list[float]:
        """Peak resident memory of each shard process (MB)."""
        import ray

        return ray.get([s.memory_mb.remote() for s in self.shards])

    def close(self) -> None:
        import ray

        for s in self.shards:
            ray.kill(s)


def knn(vecs: np.ndarray, k: int, cfg: AnnConfig, queries: np.ndarray | None = None,
        ) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` neighbours of ``queries`` (default: every vector) by inner product. With
    ``cfg.shards > 1`` the corpus is split over Ray actors (:class:`ShardedIndex`), every
    shard searched in parallel, and the per-shard top-k merged."""
    queries = vecs if queries is None else queries
    if cfg.shards <= 1:
        return search(build_index(vecs, cfg), queries, k, cfg.query_batch)
    index = ShardedIndex.from_arrays(vecs, cfg)
    try:
        return index.search(queries, k)
    finally:
        index.close()


def pairs_above(ids: np.ndarray, scores: np.ndarray, nbrs: np.ndarray, threshold: float,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised pairing: (seed id, neighbour id, score) for every neighbour above
    ``threshold`` that is not the seed itself, in row order."""
    ok = (nbrs >= 0) & (nbrs != ids[:, None]) & (scores > threshold)
    rows, cols = np.nonzero(ok)
    return ids[rows], nbrs[rows, cols], scores[rows, cols]


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    hits = [len(set(a[:k]) & set(e[:k])) for a, e in zip(approx_ids, exact_ids)]
    return float(np.sum(hits) / (k * len(exact_ids)))
