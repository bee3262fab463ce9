"""The novelty gate of the research search: an idea is executed only if it is new.

Two checks, before any job is queued (a job costs GPU-hours; a check costs a hash and one
embedding):

- **Exact**: the hash of the idea's normalised content (free text: lower case, punctuation
  and spacing folded; knobs: canonical JSON with numbers in one form; an edit: its diff with
  whitespace folded) against every idea already tried.
- **Near**: the cosine similarity of the idea's text embedding (MiniLM by default, the same
  embedders as SBP's pairing) against every idea already tried, in a FAISS inner-product
  index; at or above ``threshold`` the idea is a near duplicate.

A rejected idea comes back with the id of the neighbour it repeats and the similarity, so the
search records it (never executes it). The gate is rebuilt from the journal on resume by
``add``-ing the ideas tried so far.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from pydantic import Field

from selftaught.config import Strict
from selftaught.text import normalize_answer


class NoveltyConfig(Strict):
    enabled: bool = True
    embedder: str | None = "minilm"  # None: exact duplicates only
    threshold: float = Field(default=0.95, ge=-1, le=1)  # cosine at or above: a near duplicate
    # structured ideas (knob values) are compared exactly only: two settings of a learning rate
    # read alike to an embedder yet are different experiments
    embed_structured: bool = False


@dataclass
class Verdict:
    novel: bool
    reason: str = ""  # "", "exact_duplicate" or "near_duplicate"
    neighbour: str | None = None  # id of the idea it repeats
    similarity: float | None = None
    key: str = ""  # the exact-match hash
    vector: np.ndarray | None = None  # the idea's embedding, when one was computed (reused by add)

    def to_dict(self) -> dict[str, Any]:
        return {"novel": self.novel, "reason": self.reason, "neighbour": self.neighbour,
                "similarity": self.similarity, "key": self.key}


def _canonical(value: Any) -> Any:
    """Knob values in one form: numbers as canonical decimals (1e-3 == 0.001 == 0.0010),
    strings folded like answers, keys sorted by json.dumps."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return normalize_answer(repr(float(value)) if isinstance(value, float) else str(value))
    if isinstance(value, str):
        return normalize_answer(value)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return str(value)


def content_key(text: str = "", knobs: dict[str, Any] | None = None, edit: str | None = None) -> str:
    """The exact-duplicate hash: of the edit when there is one (two wordings of one change are
    one experiment), else of the knobs, else of the folded text."""
    if edit:
        body = {"edit": "\n".join(" ".join(line.split()) for line in edit.splitlines() if line.strip())}
    elif knobs is not None:
        body = {"knobs": _canonical(knobs)}
    else:
        body = {"text": normalize_answer(text)}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class NoveltyGate:
    """Remembers the ideas tried and judges new ones. Thread-safe. ``embed`` maps texts to
    unit-norm float32 rows (default: :func:`actors.embedder.embed_texts` with the configured
    embedder, loaded once)."""

    def __init__(self, cfg: NoveltyConfig | None = None,
                 embed: Callable[[Sequence[str]], np.ndarray] | None = None):
        self.cfg = cfg or NoveltyConfig()
        self._embed_fn = embed
        self._model = None
        self._keys: dict[str, str] = {}  # content key -> idea id
        self._ids: list[str] = []  # row of the index -> idea id
        self._index = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ embeddings
    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._embed_fn is not None:
            v = np.asarray(self._embed_fn(list(texts)), dtype=np.float32)
        else:
            if self._model is None:
                from actors.embedder import load

                self._model = load(self.cfg.embedder)
            v = np.asarray(self._model.encode(list(texts), normalize_embeddings=True), dtype=np.float32)
        return v.reshape(len(texts), -1)

    def _uses_embedding(self, knobs: dict[str, Any] | None) -> bool:
        return bool(self.cfg.embedder or self._embed_fn) and (knobs is None or self.cfg.embed_structured)

    @staticmethod
    def _text_of(text: str, knobs: dict[str, Any] | None) -> str:
        return text.strip() or json.dumps(knobs, sort_keys=True)

    # ------------------------------------------------------------------ API
    def __len__(self) -> int:
        return len(self._keys)

    def check(self, text: str = "", knobs: dict[str, Any] | None = None, edit: str | None = None) -> Verdict:
        """Judge one idea against everything added so far (does not add it)."""
        key = content_key(text, knobs, edit)
        if not self.cfg.enabled:
            return Verdict(True, key=key)
        with self._lock:
            if key in self._keys:
                return Verdict(False, "exact_duplicate", self._keys[key], 1.0, key)
            index = self._index
        if index is None or not self._uses_embedding(knobs) or index.ntotal == 0:
            return Verdict(True, key=key)
        q = self._embed([self._text_of(text, knobs)])
        with self._lock:
            score, row = self._index.search(q, 1)
        sim, j = float(score[0, 0]), int(row[0, 0])
        if j >= 0 and sim >= self.cfg.threshold:
            return Verdict(False, "near_duplicate", self._ids[j], sim, key, q)
        return Verdict(True, similarity=sim if j >= 0 else None, neighbour=self._ids[j] if j >= 0 else None,
                       key=key, vector=q)

    def add(self, idea_id: str, text: str = "", knobs: dict[str, Any] | None = None, edit: str | None = None,
            vector: np.ndarray | None = None) -> None:
        """Remember a tried idea (executed or not: a rejected idea is not worth a second try)."""
        key = content_key(text, knobs, edit)
        with self._lock:
            self._keys.setdefault(key, idea_id)
        if not self._uses_embedding(knobs):
            return
        v = vector if vector is not None else self._embed([self._text_of(text, knobs)])
        v = np.ascontiguousarray(np.asarray(v, np.float32).reshape(1, -1))
        with self._lock:
            if self._index is None:
                import faiss

                self._index = faiss.IndexFlatIP(v.shape[1])
            self._index.add(v)
            self._ids.append(idea_id)

    def admit(self, idea_id: str, text: str = "", knobs: dict[str, Any] | None = None,
              edit: str | None = None) -> Verdict:
        """``check`` then ``add``, atomically enough for one search driver: ideas within one
        batch are judged against each other too."""
        verdict = self.check(text, knobs, edit)
        self.add(idea_id, text, knobs, edit, vector=verdict.vector)
        return verdict
