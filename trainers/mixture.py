"""Token sources and the mixture sampler every objective trains from.

A *source* is a list of token segments with loss masks, of one of two kinds:

- ``stream``: documents joined with EOS and cut into fixed windows anywhere (pretraining,
  continued pretraining, replay data). Every token is a loss token.
- ``examples``: whole examples (a synthesizer-tuning pair d1 -> d2, an SFT conversation) packed
  greedily into windows without splitting one; the rest of a window is padding. The mask says
  which tokens carry loss (d2's, the assistant's). Each batch carries position ids restarting
  at every example, from which transformers builds block-diagonal causal attention: a packed
  example sees only itself.

Each micro-batch comes from one source, chosen at random by weight (EntiGraph's replay: the
generic source with probability 0.1 per batch). A source with ``repeat=False`` (SBP's
synthetic documents) is read at most once: when it cannot fill another batch it leaves the
mixture and the remaining weights are renormalised. The sampler's state is plain data, so a
checkpoint restores the exact position.

Data-parallel ranks read disjoint documents. A source holding the whole corpus (a plain process,
``torchrun``) gives rank r the slice ``r::world`` of every epoch's global permutation. A *sharded*
source (``shard=(rank, world)``: under Ray Train each worker receives only its shard through
``ray.train.get_dataset_shard``) already holds only that rank's documents, and the rank shuffles
them per epoch; with one rank both read the same order.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Sequence

import numpy as np
import torch

Kind = Literal["stream", "examples"]


@dataclass
class TokenSource:
    name: str
    ids: list[np.ndarray]  # int32 token ids per document / example
    masks: list[np.ndarray] | None = None  # uint8 loss mask per example (None: all ones)
    kind: Kind = "stream"
    weight: float = 1.0
    repeat: bool = True
    skipped: dict[str, int] = field(default_factory=dict)  # counted at tokenisation time
    # (rank, world): ``ids`` hold only this data-parallel rank's shard, which it shuffles per epoch
    # (None: the whole source, of which each rank reads a slice of every epoch's permutation)
    shard: tuple[int, int] | None = None

    def __post_init__(self):
        if not self.ids:
            raise ValueError(f"source {self.name!r} has no non-empty documents or examples")
        if self.weight <= 0:
            raise ValueError(f"source {self.name!r}: weight must be positive, got {self.weight}")
        if self.masks is not None and len(self.masks) != len(self.ids):
            raise ValueError(f"source {self.name!r}: {len(self.masks)} masks for {len(self.ids)} examples")
        if self.shard is not None and not 0 <= self.shard[0] < self.shard[1]:
            raise ValueError(f"source {self.name!r}: shard {self.shard} is not (rank, world) with rank < world")

    @property
    def num_tokens(self) -> int:
        return int(sum(len(x) for x in self.ids))


class Batch(NamedTuple):
    source: str
    ids: torch.Tensor  # (batch, seq_len + 1) token ids
    mask: torch.Tensor  # (batch, seq_len + 1) uint8 loss mask
    positions: torch.Tensor | None  # per-example positions of packed examples; None for streams


class Exhausted(Exception):
    """A never-repeat source cannot fill another batch."""


class SourceStream:
    """Batches of ``(ids, mask)`` windows of ``seq_len + 1`` tokens from one source, for one
    data-parallel rank: of a whole source, the rank's slice of every epoch's permutation; of a
    sharded source (``src.shard``), a fresh permutation of the rank's own shard every epoch. With
    one rank the two orders are the same."""

    def __init__(self, src: TokenSource, seq_len: int, pad_id: int, seed: int, rank: int, world: int):
        self.src, self.L, self.pad_id = src, seq_len + 1, pad_id
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch = 0
        self.order: list[int] = []
        self.next = 0
        self.buf_ids = np.zeros(0, np.int32)
        self.buf_mask = np.zeros(0, np.uint8)
        if src.kind == "examples":
            too_long = [i for i, x in enumerate(src.ids) if len(x) > self.L]
            if too_long:
                raise ValueError(f"source {src.name!r}: {len(too_long)} examples exceed seq_len + 1 = {self.L} "
                                 "tokens; truncate them when tokenising")
        if src.shard is not None and tuple(src.shard) != (rank, world):
            raise ValueError(f"source {src.name!r} holds shard {tuple(src.shard)} (rank, world), "
                             f"not this rank's ({rank}, {world})")

    def _advance(self) -> int | None:
        """Index of the next item of this rank's shard, or None when a non-repeat source is done."""
        if self.next >= len(self.order):
            if self.epoch >= 1 and not self.src.repeat:
                return None
            key = [self.seed, self.epoch, zlib_name(self.src.name)]
            if self.src.shard is None:  # the whole source: this rank's slice of the global permutation
                self.order = np.random.default_rng(key).permutation(len(self.src.ids)).tolist()[self.rank::self.world]
            else:  # only this rank's shard: all of it, shuffled per rank (the same order as above for one rank)
                rng = np.random.default_rng(key + [self.rank] if self.world > 1 else key)
                self.order = rng.permutation(len(self.src.ids)).tolist()
            self.next = 0
            self.epoch += 1
            if not self.order:
                raise ValueError(f"source {self.src.name!r} has fewer items than data-parallel ranks")
        i = self.order[self.next]
        self.next += 1
        return i

    def _mask(self, i: int) -> np.ndarray:
        m = self.src.masks
        return m[i] if m is not None else np.ones(len(self.src.ids[i]), np.uint8)

    def next_batch(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.src.kind == "stream":
            need = batch * self.L
            while len(self.buf_ids) < need:
                i = self._advance()
                if i is None:
                    raise Exhausted(self.src.name)
                self.buf_ids = np.concatenate([self.buf_ids, self.src.ids[i]])
                self.buf_mask = np.concatenate([self.buf_mask, self._mask(i)])
            ids, self.buf_ids = self.buf_ids[:need], self.buf_ids[need:]
            mask, self.buf_mask = self.buf_mask[:need], self.buf_mask[need:]
            return (torch.from_numpy(ids.astype(np.int64)).view(batch, self.L),
                    torch.from_numpy(mask.astype(np.uint8)).view(batch, self.L), None)
        return self._pack(batch)

    def _pack(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows of whole examples, positions restarting at each one (padding is a segment of its
        own). When the source runs out, the rows already filled are returned with the rest padded;
        only an empty batch raises ``Exhausted``."""
        rows_ids = np.full((batch, self.L), self.pad_id, np.int64)
        rows_mask = np.zeros((batch, self.L), np.uint8)
        rows_pos = np.tile(np.arange(self.L, dtype=np.int64), (batch, 1))
        for r in range(batch):
            fill = 0
            while True:
                if len(self.buf_ids) == 0:  # one pending example lives in the buffer
                    i = self._advance()
                    if i is None:
                        if r == 0 and fill == 0:
                            raise Exhausted(self.src.name)
                        rows_pos[r, fill:] = np.arange(self.L - fill)
                        return torch.from_numpy(rows_ids), torch.from_numpy(rows_mask), torch.from_numpy(rows_pos)
                    self.buf_ids, self.buf_mask = self.src.ids[i], self._mask(i)
                n = len(self.buf_ids)
                if fill + n > self.L:
                    break
                rows_ids[r, fill:fill + n] = self.buf_ids
                rows_mask[r, fill:fill + n] = self.buf_mask
                rows_pos[r, fill:fill + n] = np.arange(n)
                fill += n
                self.buf_ids, self.buf_mask = np.zeros(0, np.int32), np.zeros(0, np.uint8)
            rows_pos[r, fill:] = np.arange(self.L - fill)
        return torch.from_numpy(rows_ids), torch.from_numpy(rows_mask), torch.from_numpy(rows_pos)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "order": list(self.order), "next": self.next,
                "buf_ids": self.buf_ids.copy(), "buf_mask": self.buf_mask.copy()}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.order, self.next = s["epoch"], list(s["order"]), s["next"]
        self.buf_ids, self.buf_mask = np.asarray(s["buf_ids"]), np.asarray(s["buf_mask"])


def zlib_name(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode())


class MixtureSampler:
    """Draws each micro-batch from one source by weight; tracks tokens seen per source."""

    def __init__(self, sources: Sequence[TokenSource], seq_len: int, pad_id: int, seed: int = 0,
                 rank: int = 0, world: int = 1):
        names = [s.name for s in sources]
        if not sources:
            raise ValueError("no training sources")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate source names: {names}")
        self.streams = {s.name: SourceStream(s, seq_len, pad_id, seed, rank, world) for s in sources}
        self.weights = {s.name: s.weight for s in sources}
        self.active = list(names)
        self.rng = np.random.default_rng([seed, rank, 7919])
        self.seq_len = seq_len
        self.tokens = {n: 0 for n in names}
        self.loss_tokens = {n: 0 for n in names}
        self.exhausted: list[str] = []

    def next_batch(self, batch: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        b = self.draw(batch)
        return b.source, b.ids, b.mask

    def draw(self, batch: int) -> Batch:
        while self.active:
            w = np.array([self.weights[n] for n in self.active], dtype=np.float64)
            name = self.active[int(self.rng.choice(len(self.active), p=w / w.sum()))]
            try:
                ids, mask, positions = self.streams[name].next_batch(batch)
            except Exhausted:
                self.active.remove(name)
                self.exhausted.append(name)
                continue
            self.tokens[name] += batch * self.seq_len
            self.loss_tokens[name] += int(mask[:, 1:].sum())
            return Batch(name, ids, mask, positions)
        raise RuntimeError("every source is exhausted (all are never-repeat): the token budget is larger "
                           "than the data; add a repeating source or lower the budget")

    def state_dict(self) -> dict:
        return {"streams": {n: s.state_dict() for n, s in self.streams.items()}, "active": list(self.active),
                "rng": copy.deepcopy(self.rng.bit_generator.state), "tokens": dict(self.tokens),
                "loss_tokens": dict(self.loss_tokens), "exhausted": list(self.exhausted)}

    def load_state_dict(self, s: dict) -> None:
        if set(s["streams"]) != set(self.streams):
            raise ValueError(f"checkpoint sources {sorted(s['streams'])} differ from {sorted(self.streams)}")
        for n, st in s["streams"].items():
            self.streams[n].load_state_dict(st)
        self.active, self.exhausted = list(s["active"]), list(s["exhausted"])
        self.rng.bit_generator.state = s["rng"]
        self.tokens, self.loss_tokens = dict(s["tokens"]), dict(s["loss_tokens"])


def labels_from(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token labels of ``seq_len + 1`` windows; masked targets become -100."""
    labels = ids[:, 1:].clone()
    labels[mask[:, 1:] == 0] = -100
    return ids[:, :-1], labels
