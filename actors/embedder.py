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
    """Ray Data callable: adds a unit-norm ``embedding`` column for ``text_column``."""

    def __init__(self, name: str = "minilm", text_column: str = "text", batch_size: int = 64,
                 num_cpus: float | None = None):
        import torch

        if num_cpus:
            torch.set_num_threads(max(1, int(num_cpus)))
        self.model = load(name)
        self.text_column, self.batch_size = text_column, batch_size

    def __call__(self, batch: dict) -> dict:
        texts = [str(t) for t in batch[self.text_column]]
        vecs = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True)
        return {**batch, "embedding": list(np.asarray(vecs, dtype=np.float32))}


def embed_dataset(ds, name: str = "minilm", num_actors: int = 2, batch_size: int = 64,
                  text_column: str = "text", cpus_per_actor: float = 1.0):
    """``ds`` with an ``embedding`` column, computed on a pool of embedder actors."""
    import ray

    from selftaught.runtime import fit_actor_cpus

    cpus = fit_actor_cpus(cpus_per_actor, num_actors, reserve=0.25)
    return ds.map_batches(EmbedBatch, fn_constructor_kwargs={"name": name, "text_column": text_column,
                                                             "batch_size": batch_size, "num_cpus": cpus},
                          batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=num_actors),
                          num_cpus=cpus, batch_format="numpy")
