"""Token streams for causal-LM training: documents joined with EOS and cut into fixed windows."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch


def tokenize_documents(tokenizer, texts: Iterable[str], batch_size: int = 256) -> list[np.ndarray]:
    """Token ids per non-empty document (EOS appended), as int32 arrays."""
    eos = tokenizer.eos_token_id
    out: list[np.ndarray] = []
    batch: list[str] = []

    def flush():
        if batch:
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                if ids:
                    out.append(np.asarray(ids + [eos], dtype=np.int32))
            batch.clear()

    for t in texts:
        if t and t.strip():
            batch.append(t)
            if len(batch) >= batch_size:
                flush()
    flush()
    return out


class PackedStream:
    """An endless stream of ``seq_len + 1`` token windows over shuffled documents (epoch by
    epoch, a fresh permutation each time), sharded across data-parallel ranks. The position
    (epoch, offset) is plain data so a checkpoint can restore it."""

    def __init__(self, docs: Sequence[np.ndarray], seq_len: int, seed: int = 0, rank: int = 0,
                 world: int = 1):
        if not docs:
            raise ValueError("no non-empty documents to train on")
        self.docs, self.seq_len, self.seed, self.rank, self.world = docs, seq_len, seed, rank, world
        self.epoch = 0
        self._buf = np.zeros(0, dtype=np.int32)
        self._order: list[int] = []
        self._next = 0
        self.tokens_total = int(sum(len(d) for d in docs))

    def _refill(self) -> None:
        if self._next >= len(self._order):
            rng = np.random.default_rng(self.seed + self.epoch)
            self._order = rng.permutation(len(self.docs)).tolist()[self.rank::self.world]
            self._next = 0
            self.epoch += 1 if self._order else 0
        take = self._order[self._next:self._next + 64]
        self._next += len(take)
        self._buf = np.concatenate([self._buf, *[self.docs[i] for i in take]])

    def next_batch(self, batch_size: int) -> torch.Tensor:
        need = batch_size * (self.seq_len + 1)
        while len(self._buf) < need:
            self._refill()
        chunk, self._buf = self._buf[:need], self._buf[need:]
        return torch.from_numpy(chunk.astype(np.int64)).view(batch_size, self.seq_len + 1)


def eval_windows(docs: Sequence[np.ndarray], seq_len: int, max_tokens: int) -> torch.Tensor:
    """Deterministic held-out windows (first ``max_tokens`` tokens of the held-out stream)."""
    flat = np.concatenate(list(docs)) if docs else np.zeros(0, dtype=np.int32)
    n = min(len(flat) // (seq_len + 1), max(1, max_tokens // seq_len))
    if n == 0:
        raise ValueError("held-out set shorter than one training window")
    return torch.from_numpy(flat[: n * (seq_len + 1)].astype(np.int64)).view(n, seq_len + 1)
