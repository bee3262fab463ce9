"""Document embeddings on an actor pool (Ray Data ``map_batches``).

Embedders: ``minilm`` (bundled all-MiniLM-L6-v2), any local sentence-transformers directory, or
``hidden:<checkpoint>``: the mean of a causal LM's last hidden states (a document embedding
from the model's own activations, no external embedding model). Vectors are unit-norm float32.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)


class _HiddenStateEmbedder:
    def __init__(self, path: str, max_tokens: int = 512):
        import torch

        from selftaught.models import load_causal_lm

        self.torch = torch
        self.tok, self.model = load_causal_lm(path)
        self.max_tokens = max_tokens

    def encode(self, texts: Sequence[str], batch_size: int = 16, normalize_embeddings: bool = True,
               **_) -> np.ndarray:
        torch = self.torch
        out = []
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        for i in range(0, len(texts), batch_size):
            enc = [self.tok(t, add_special_tokens=False)["input_ids"][: self.max_tokens] or [pad]
                   for t in texts[i:i + batch_size]]
            L = max(len(e) for e in enc)
            ids = torch.tensor([e + [pad] * (L - len(e)) for e in enc])
            mask = torch.tensor([[1] * len(e) + [0] * (L - len(e)) for e in enc])
            with torch.no_grad():
                h = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            v = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            out.append(v.float().numpy())
        vecs = np.concatenate(out).astype(np.float32)
        if normalize_embeddings:
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True).clip(min=1e-12)
        return vecs


def load(name: str):
    if name.startswith("hidden:"):
        return _HiddenStateEmbedder(name.split(":", 1)[1])
    from selftaught.models import load_embedder

    return load_embedder(name)


def embed_texts(texts: Sequence[str], name: str = "minilm", batch_size: int = 64) -> np.ndarray:
    """In-process embedding (the reference the actor pool is measured against)."""
    model = load(name)
    return np.asarray(model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True),
                      dtype=np.float32)


class EmbedBatch:
    """Ray Data callable: adds a unit-norm ``embedding`` column for ``text_column``.

    One call embeds the whole batch it is given: ``encode`` sorts those texts by length and pads
    each ``batch_size`` group only to its own longest text, so larger calls waste less on padding.
    The column is one fixed-size float32 array (``rows x dim``), not a list of per-row arrays.
    """

    def __init__(self, name: str = "minilm", text_column: str = "text", batch_size: int = 64,
                 num_cpus: float | None = None, threads: int | None = None):
        import torch

        n = threads or (max(1, int(num_cpus)) if num_cpus else None)
        if n:
            torch.set_num_threads(n)
        self.model = load(name)
        self.text_column, self.batch_size = text_column, batch_size

    def __call__(self, batch: dict) -> dict:
        texts = [str(t) for t in batch[self.text_column]]
        vecs = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True)
        return {**batch, "embedding": np.ascontiguousarray(vecs, dtype=np.float32)}


def plan_pool(num_actors: int, total_cpus: float, threads_per_actor: int | None = None,
              min_threads_per_actor: int = 2) -> tuple[int, int]:
    """(actors, torch threads per actor) for a pool asked for ``num_actors`` on ``total_cpus``.

    Threads are whole numbers: a fractional CPU share (0.875 each for two actors on 2 cores) used
    to round down to one thread per actor. Actors are never given fewer than
    ``min_threads_per_actor`` threads while the cluster has that many cores: on 2 cores one actor
    with 2 intra-op threads embeds faster than two single-thread actors (measured, see
    docs/benchmarks.md) and loads the model once instead of twice.
    """
    cores = max(int(total_cpus), 1)
    if threads_per_actor:
        threads = max(1, int(threads_per_actor))
        actors = max(1, min(num_actors, cores // threads or 1))
    else:
        threads = max(1, min(max(min_threads_per_actor, 1), cores))
        actors = max(1, min(num_actors, cores // threads))
        threads = max(threads, cores // actors)
    return actors, threads


def embed_dataset(ds, name: str = "minilm", num_actors: int = 2, batch_size: int = 64,
                  text_column: str = "text", cpus_per_actor: float | None = None,
                  threads_per_actor: int | None = None, rows_per_call: int | None = None,
                  min_threads_per_actor: int = 2, preserve_order: bool = True, max_actors: int | None = None):
    """``ds`` with an ``embedding`` column, computed on a pool of embedder actors.

    ``batch_size`` is the model's forward batch; each actor call gets ``rows_per_call`` rows
    (default: the dataset split in about two calls per actor, 256 to 1024 rows), which ``encode``
    sorts by length before batching. The pool has at most ``num_actors`` actors, each with
    a whole number of torch threads (``plan_pool``); ``cpus_per_actor`` overrides the CPU request.
    Every input column is kept; with ``preserve_order`` rows come out in input order (the
    returned dataset gets its own copy of the context, the caller's ``ds`` is not changed).
    ``max_actors`` above the planned pool makes it elastic: Ray Data adds actors (each asking
    for the same CPUs, which the autoscaler can act on) while blocks are queued, up to that many.
    """
    import ray

    from selftaught.runtime import cluster_cpus, fit_actor_cpus

    elastic = bool(max_actors and max_actors > num_actors)
    # an elastic pool's actors must fit one node, not the whole cluster's CPUs
    room = _largest_node_cpus() if elastic else cluster_cpus()
    actors, threads = plan_pool(num_actors, room or 1.0, threads_per_actor, min_threads_per_actor)
    # Request a little less than the threads' cores so that the feeding tasks still get scheduled.
    if cpus_per_actor is not None:
        cpus = cpus_per_actor
    elif elastic:  # the whole request, which the autoscaler can act on (within one node)
        cpus = float(min(threads, room)) if room else float(threads)
    else:
        cpus = fit_actor_cpus(float(threads), actors, reserve=0.25)
    if rows_per_call is None:
        n = _known_count(ds)
        rows_per_call = 512 if n is None else -(-n // (2 * actors))
        rows_per_call = int(min(max(rows_per_call, 256), 1024))
    rows_per_call = max(rows_per_call, batch_size)
    log.info("embedding with %d actor(s) x %d thread(s), %.2f CPUs each, %d rows per call",
             actors, threads, cpus, rows_per_call)
    out = ds.map_batches(EmbedBatch, fn_constructor_kwargs={"name": name, "text_column": text_column,
                                                            "batch_size": batch_size, "threads": threads},
                         batch_size=rows_per_call,
                         compute=ray.data.ActorPoolStrategy(min_size=actors, max_size=max(actors, max_actors))
                         if max_actors and max_actors > actors else ray.data.ActorPoolStrategy(size=actors),
                         num_cpus=cpus, batch_format="numpy", zero_copy_batch=True)
    if preserve_order and not out.context.execution_options.preserve_order:
        ctx = out.context.copy()
        ctx.execution_options.preserve_order = True
        out._context = ctx  # this dataset only; ``ds`` keeps its own context
    return out


def _largest_node_cpus() -> float:
    """CPUs of the largest alive node (what one actor can ever get)."""
    import ray

    return max((float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0.0)


def _known_count(ds) -> int | None:
    """Row count when it is known without running anything (a materialized dataset)."""
    try:
        from ray.data.dataset import MaterializedDataset

        if isinstance(ds, MaterializedDataset):
            return ds.count()
    except Exception:  # noqa: BLE001 - a hint only
        return None
    return None
