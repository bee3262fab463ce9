"""Evaluation for EntiGraph-style knowledge acquisition on the World Factbook.

A model that studied a niche corpus (or synthetic text derived from it) is measured four ways:

- closed book, by log-likelihood: each of the four options is scored as a continuation of
  ``Question: ...\\nAnswer:`` (the lettered choices are not shown), summed and per token;
  this needs no instruction following, so it also works for base and from-scratch models;
- open book (RAG): the same scoring with retrieved chunks of the corpus placed before the
  question, the ceiling that parametric knowledge is compared against;
- generation (optional): k-shot chat prompts with lettered choices, optionally with chain of
  thought, answered through our generation engine and parsed with ``parse_choice``;
- forgetting: perplexity on generic held-out text (e.g. Wikipedia summaries), since continued
  pretraining on a narrow corpus can erode general language modelling.

Retrieval embeds metadata-prefixed chunks with MiniLM into a FAISS inner-product index over
unit-norm vectors (cosine similarity), optionally re-ranking the top candidates lexically.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
from pydantic import Field, model_validator

from selftaught.ann import AnnConfig, build_index, search
from selftaught.config import SamplingConfig, Strict
from selftaught.data.factbook import LETTERS, format_mcq, parse_choice

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- configs

class ChunkConfig(Strict):
    """How documents are cut for retrieval. ``unit="tokens"`` counts the embedder's tokens
    (MiniLM reads at most 256 word pieces, so longer chunks would be truncated unseen);
    ``"chars"`` needs no tokenizer. The metadata header is not counted."""

    size: int = Field(default=160, ge=8)
    overlap: int = Field(default=32, ge=0)
    unit: Literal["tokens", "chars"] = "tokens"

    @model_validator(mode="after")
    def _overlap_below_size(self) -> "ChunkConfig":
        if self.overlap >= self.size:
            raise ValueError(f"chunk overlap {self.overlap} must be smaller than the size {self.size}")
        return self


class RagConfig(Strict):
    """Open-book settings: ``top_k`` candidates come from the index, ``k`` of them (after the
    optional re-rank) become the context."""

    enabled: bool = True
    k: int = Field(default=3, ge=1)
    top_k: int = Field(default=20, ge=1)
    rerank: Literal["none", "lexical"] = "lexical"
    lexical_weight: float = Field(default=0.5, ge=0.0)
    embedder: str = "minilm"
    chunk: ChunkConfig = ChunkConfig()
    ann: AnnConfig = AnnConfig()
    embed_batch_size: int = Field(default=64, ge=1)

    @model_validator(mode="after")
    def _k_within_top_k(self) -> "RagConfig":
        if self.top_k < self.k:
            raise ValueError(f"rag.top_k ({self.top_k}) must be at least rag.k ({self.k})")
        return self


class GenerationEvalConfig(Strict):
    """Chat-format evaluation through the generation engine (off by default: it is the slow
    part and needs an instruction-following model)."""

    enabled: bool = False
    few_shot: int = Field(default=3, ge=0)
    cot: bool = False
    sampling: SamplingConfig | None = None  # None: greedy, 16 tokens (256 with cot)
    max_batch_size: int = Field(default=16, ge=1)


class EvalConfig(Strict):
    """One evaluation of one checkpoint on the Factbook questions."""

    limit: int | None = Field(default=None, ge=1)  # first N questions
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(default=8, ge=1)  # sequences per forward pass
    max_length: int | None = Field(default=None, ge=16)  # None: the model's positions
    heldout_docs: int = Field(default=64, ge=0)  # held-out generic texts for forgetting (0: skip)
    heldout_max_tokens: int = Field(default=512, ge=2)  # per held-out text
    keep_predictions: bool = False
    rag: RagConfig = RagConfig()
    generation: GenerationEvalConfig = GenerationEvalConfig()


# --------------------------------------------------------------------------- exact log-probs

def _device_of(model, device: str | None) -> Any:
    return device if device is not None else next(model.parameters()).device


def token_logprobs(model, seqs: Sequence[Sequence[int]], starts: Sequence[int], batch_size: int = 8,
                   device: str | None = None) -> list[np.ndarray]:
    """``log p(seq[t] | seq[:t])`` for every ``t`` in ``[start, len(seq))``, one array per sequence.

    Batches are right-padded: a real token then only ever attends to real tokens before it
    (the causal mask hides the padding after it) and keeps its natural position, so the
    result equals scoring each sequence alone. Sequences are grouped by length, and only the
    scored positions go through the output layer (``trainers.grpo.token_logprobs``)."""
    import torch

    from trainers.grpo import token_logprobs as masked_logprobs

    if any(s < 1 for s in starts):
        raise ValueError("a scored token needs at least one token before it (start >= 1)")
    dev = _device_of(model, device)
    order = sorted(range(len(seqs)), key=lambda i: (starts[i], len(seqs[i])))
    out: list[np.ndarray | None] = [None] * len(seqs)
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            width = max(len(seqs[i]) for i in idx)
            ids = torch.zeros((len(idx), width), dtype=torch.long)
            scored = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, :len(seqs[i])] = torch.tensor(list(seqs[i]), dtype=torch.long)
                scored[r, starts[i]:len(seqs[i])] = 1
            lp = masked_logprobs(model, ids.to(dev), scored.to(dev)).cpu()
            for r, i in enumerate(idx):
                out[i] = lp[r, starts[i]:len(seqs[i])].numpy().astype(np.float64)
    return out  # type: ignore[return-value]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _max_positions(model, max_length: int | None) -> int:
    return int(max_length or getattr(model.config, "max_position_embeddings", None) or 2048)


# --------------------------------------------------------------------------- closed / open book, log-likelihood

def loglik_prompt(row: dict, context: str | None = None) -> str:
    """The cloze prompt: optional context, then the question; choices are never listed, so
    the model must produce the answer's words rather than recognise a letter."""
    q = f"Question: {row['question']}\nAnswer:"
    return f"{context}\n\n{q}" if context else q


def mcq_loglik(model, tokenizer, rows: Sequence[dict], contexts: Sequence[str | None] | None = None,
               batch_size: int = 8, device: str | None = None, max_length: int | None = None) -> dict:
    """Accuracy of picking the option with the highest log-likelihood after the prompt.

    ``loglik_acc`` ranks options by their summed log-probability; ``loglik_norm_acc`` by the
    mean per token, which does not favour short options. A prompt that would not fit the
    model (or ``max_length``) loses tokens from its start, so the question always stays.
    ``device``: where the inputs go (default: the model's device)."""
    if not rows:
        raise ValueError("mcq_loglik needs at least one question")
    if contexts is not None and len(contexts) != len(rows):
        raise ValueError(f"got {len(contexts)} contexts for {len(rows)} questions")
    limit = _max_positions(model, max_length)
    seqs, starts, n_tokens, truncated = [], [], [], 0
    for i, row in enumerate(rows):
        prompt = _encode(tokenizer, loglik_prompt(row, contexts[i] if contexts else None))
        conts = [_encode(tokenizer, " " + str(c)) for c in row["choices"]]
        room = limit - max(len(c) for c in conts)
        if room < 1:
            raise ValueError(f"question {row.get('id')}: an option alone fills the model's {limit} positions")
        if len(prompt) > room:
            prompt, truncated = prompt[-room:], truncated + 1
        for c in conts:
            seqs.append(prompt + c)
            starts.append(len(prompt))
            n_tokens.append(len(c))
    lps = token_logprobs(model, seqs, starts, batch_size, device)
    preds, hits, hits_norm, j = [], 0, 0, 0
    for row in rows:
        m = len(row["choices"])
        sums = [float(lp.sum()) for lp in lps[j:j + m]]
        norms = [s / max(n, 1) for s, n in zip(sums, n_tokens[j:j + m])]
        j += m
        pred, pred_norm = int(np.argmax(sums)), int(np.argmax(norms))
        hits += pred == row["answer_index"]
        hits_norm += pred_norm == row["answer_index"]
        preds.append({"id": row.get("id"), "answer_index": row["answer_index"], "pred": pred,
                      "pred_norm": pred_norm, "loglik": sums, "loglik_norm": norms})
    if truncated:
        log.info("mcq_loglik: %d of %d prompts cut from the left to fit %d positions", truncated, len(rows), limit)
    return {"loglik_acc": hits / len(rows), "loglik_norm_acc": hits_norm / len(rows), "n": len(rows),
            "truncated": truncated, "predictions": preds}


# --------------------------------------------------------------------------- generation (chat, k-shot, CoT)

_FINAL = re.compile(r"answer is\s*:?\s*\(?([A-D])\b", re.I)


def mcq_user_message(row: dict, cot: bool) -> str:
    """The question with lettered choices; with ``cot`` the model is asked to reason first and
    close with a fixed phrase that ``parse_generated`` looks for."""
    if not cot:
        return format_mcq(row)
    opts = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"]))
    return (f"{row['question']}\n{opts}\nReason step by step, then end with "
            f"\"The answer is X\", X being the letter of the correct choice.")


def mcq_demo_answer(row: dict, cot: bool) -> str:
    """A worked answer for a few-shot example: the letter, or (with ``cot``) a short rationale
    built from the stated fact, so demonstrations never need hand-written reasoning."""
    letter = LETTERS[row["answer_index"]]
    if not cot:
        return letter
    what = str(row.get("field", "answer")).replace("_", " ")
    return (f"The document on {row.get('country', 'this country')} gives its {what} as {row['answer']}. "
            f"Of the choices, only {letter} says that. The answer is {letter}.")


def pick_few_shot(row: dict, pool: Sequence[dict], k: int, exclude_same_doc: bool = True) -> list[dict]:
    """The first ``k`` examples of ``pool`` that are not the question being asked (by id or by
    text) and, by default, not about the same document (they could leak its facts)."""
    out = []
    for ex in pool:
        if len(out) >= k:
            break
        if ex.get("id") == row.get("id") or ex["question"] == row["question"]:
            continue
        if exclude_same_doc and row.get("doc_id") is not None and ex.get("doc_id") == row.get("doc_id"):
            continue
        out.append(ex)
    return out


def mcq_messages(row: dict, shots: Sequence[dict], cot: bool) -> list[dict]:
    """Chat turns: each example as a user question and an assistant answer, then the question."""
    msgs: list[dict] = []
    for ex in shots:
        msgs += [{"role": "user", "content": mcq_user_message(ex, cot)},
                 {"role": "assistant", "content": mcq_demo_answer(ex, cot)}]
    return msgs + [{"role": "user", "content": mcq_user_message(row, cot)}]


def fit_messages(chat_model, row: dict, shots: Sequence[dict], cot: bool, max_new_tokens: int) -> list[dict]:
    """``mcq_messages`` with trailing demonstrations dropped until the prompt and the answer fit
    the model, when ``chat_model`` can tell (a local engine: ``max_len``, ``count_tokens``,
    ``apply_chat_template``); a remote model is sent every demonstration."""
    shots = list(shots)
    msgs = mcq_messages(row, shots, cot)
    need = ("max_len", "count_tokens", "apply_chat_template")
    if not all(hasattr(chat_model, a) for a in need):
        return msgs
    room = int(chat_model.max_len) - max_new_tokens
    while shots and chat_model.count_tokens(chat_model.apply_chat_template(msgs)) > room:
        shots.pop()
        msgs = mcq_messages(row, shots, cot)
    return msgs


def parse_generated(row: dict, text: str, cot: bool) -> int | None:
    """The chosen index: with ``cot`` the last "answer is X" wins (the reasoning may mention
    other letters on the way); otherwise, and as a fallback, ``parse_choice``."""
    if cot:
        found = _FINAL.findall(text)
        if found:
            return LETTERS.index(found[-1].upper())
    return parse_choice(row, text)


def default_sampling(cot: bool) -> SamplingConfig:
    return SamplingConfig(temperature=0.0, max_new_tokens=256 if cot else 16)


def mcq_generate(chat_model, rows: Sequence[dict], few_shot: Sequence[dict], cot: bool = False,
                 sampling: SamplingConfig | None = None, k: int | None = None,
                 exclude_same_doc: bool = True) -> dict:
    """Accuracy of generated answers. ``chat_model``: anything with ``.chat(conversations,
    sampling)`` (an engine, an engine pool, the litellm client). ``few_shot`` is the pool of
    examples; each question gets the first ``k`` (default: ``len(few_shot)``) that pass
    :func:`pick_few_shot`. An answer that commits to no letter counts as wrong and unparsed."""
    if not rows:
        raise ValueError("mcq_generate needs at least one question")
    k = len(few_shot) if k is None else k
    sampling = sampling or default_sampling(cot)
    convs = [fit_messages(chat_model, r, pick_few_shot(r, few_shot, k, exclude_same_doc), cot,
                          sampling.max_new_tokens) for r in rows]
    outs = chat_model.chat(convs, sampling)
    preds, hits, unparsed = [], 0, 0
    for row, conv, out in zip(rows, convs, outs):
        text = out.text
        pred = parse_generated(row, text, cot)
        unparsed += pred is None
        hits += pred == row["answer_index"]
        preds.append({"id": row.get("id"), "answer_index": row["answer_index"], "pred": pred,
                      "response": text, "shots": (len(conv) - 1) // 2})
    return {"acc": hits / len(rows), "unparsed": unparsed, "n": len(rows), "k": k, "cot": cot,
            "predictions": preds}


# --------------------------------------------------------------------------- chunking

def _sections(doc: dict) -> tuple[str, list[tuple[str, list[str]]]]:
    """(title, [(section, lines)]) from ``# Title`` / ``## Section`` markdown; a document
    without headings is one untitled section."""
    title = str(doc.get("title") or "")
    sections: list[tuple[str, list[str]]] = [("", [])]
    for line in str(doc["text"]).splitlines():
        s = line.strip()
        if not s:
            continue
        if s.startswith("## "):
            sections.append((s[3:].strip(), []))
        elif s.startswith("# ") and not title:
            title = s[2:].strip()
        elif s.startswith("# "):
            continue  # the title line itself: it goes into every chunk's header instead
        else:
            sections[-1][1].append(s)
    return title or str(doc.get("id", "")), [(n, ls) for n, ls in sections if ls]


def _split_long(line: str, size: int, measure: Callable[[str], int]) -> list[str]:
    """A line longer than a chunk, cut at word boundaries (or inside a word longer than a chunk)."""
    pieces, cur = [], ""
    for word in line.split(" "):
        cand = f"{cur} {word}" if cur else word
        if cur and measure(cand) > size:
            pieces.append(cur)
            cand = word
        while measure(cand) > size and len(cand) > 1:  # one enormous "word"
            cut = max(1, len(cand) * size // max(measure(cand), 1))
            pieces.append(cand[:cut])
            cand = cand[cut:]
        cur = cand
    return pieces + ([cur] if cur else [])


def _windows(lines: list[str], size: int, overlap: int, measure: Callable[[str], int]) -> list[list[str]]:
    """Whole lines packed into windows of at most ``size``; each window after the first starts
    with the last lines of the previous one, up to ``overlap``, so a fact near a boundary is
    retrievable with its neighbours."""
    units = [p for ln in lines for p in (_split_long(ln, size, measure) if measure(ln) > size else [ln])]
    out: list[list[str]] = []
    cur: list[str] = []
    cur_len = 0
    for u in units:
        n = measure(u)
        if cur and cur_len + n > size:
            out.append(cur)
            tail: list[str] = []
            t = 0
            for prev in reversed(cur):
                m = measure(prev)
                if t + m > overlap:
                    break
                tail.insert(0, prev)
                t += m
            cur, cur_len = (tail, t) if t + n <= size else ([], 0)
        cur.append(u)
        cur_len += n
    if cur:
        out.append(cur)
    return out


def chunk_header(title: str, section: str) -> str:
    return f"{title} > {section}" if section else title


def chunk_documents(docs: Sequence[dict], cfg: ChunkConfig | None = None, tokenizer=None) -> list[dict]:
    """Retrieval chunks: ``{"id", "doc_id", "title", "section", "text"}`` with ``text`` =
    ``"<title> > <section>"`` then the chunk's lines. Factbook lines rarely name their country
    ("Capital - name: Kabul"), so without the header a chunk could not be matched to a question
    about that country. Chunks never cross a section. ``tokenizer`` is needed for
    ``unit="tokens"`` (the embedder's own, e.g. ``embedder.tokenizer``)."""
    cfg = cfg or ChunkConfig()
    if cfg.unit == "tokens":
        if tokenizer is None:
            raise ValueError("chunk unit 'tokens' needs a tokenizer (or use unit='chars')")
        measure = lambda s: len(tokenizer(s, add_special_tokens=False, verbose=False)["input_ids"]) + 1  # noqa: E731
    else:
        measure = lambda s: len(s) + 1  # noqa: E731
    chunks: list[dict] = []
    for doc in docs:
        title, sections = _sections(doc)
        n = 0
        for section, lines in sections:
            for window in _windows(lines, cfg.size, cfg.overlap, measure):
                chunks.append({"id": f"{doc['id']}#{n}", "doc_id": doc["id"], "title": title, "section": section,
                               "text": chunk_header(title, section) + "\n" + "\n".join(window)})
                n += 1
    return chunks


# --------------------------------------------------------------------------- retrieval

_WORD = re.compile(r"[a-z0-9]+")
_STOP = {"what", "which", "who", "whom", "is", "are", "was", "the", "a", "an", "of", "in", "on", "to", "and",
         "or", "these", "this", "that", "does", "do", "did", "have", "has", "for", "by", "with", "its", "it",
         "describes", "describe", "how", "many", "much", "there"}


def _stems(text: str) -> set[str]:
    """Content-word prefixes: "languages" meets "language", "holiday" meets "holidays"."""
    return {w[:5] for w in _WORD.findall(text.lower()) if w not in _STOP and len(w) > 1}


def lexical_overlap(question: str, text: str) -> float:
    """Share of the question's content words that the text contains (0..1)."""
    q = _stems(question)
    return len(q & _stems(text)) / len(q) if q else 0.0


def embed(embedder, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Unit-norm float32 rows (normalised again here: inner product must equal cosine)."""
    vecs = np.asarray(embedder.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                      show_progress_bar=False), dtype=np.float32)
    vecs = vecs.reshape(len(texts), -1)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True).clip(min=1e-12)
    return np.ascontiguousarray(vecs)


@dataclass
class RagIndex:
    """Chunks, their embeddings and a FAISS inner-product index over them."""

    chunks: list[dict]
    vectors: np.ndarray
    index: Any
    embedder: Any
    batch_size: int = 64

    @classmethod
    def build(cls, chunks: Sequence[dict], embedder, ann: AnnConfig | None = None,
              batch_size: int = 64) -> "RagIndex":
        if not chunks:
            raise ValueError("RagIndex needs at least one chunk")
        vecs = embed(embedder, [c["text"] for c in chunks], batch_size)
        return cls(list(chunks), vecs, build_index(vecs, ann or AnnConfig()), embedder, batch_size)

    def retrieve_many(self, questions: Sequence[str], k: int, top_k: int | None = None,
                      rerank: Literal["none", "lexical"] = "none", lexical_weight: float = 0.5,
                      ) -> list[list[dict]]:
        """The ``k`` best chunks per question, best first, each a copy of the chunk with
        ``score`` (what ranked it) and ``dense`` (cosine).

        ``rerank="lexical"`` takes ``top_k`` dense candidates and re-orders them by cosine +
        ``lexical_weight`` x word overlap with the question. The dense score mostly finds the
        right country (its name is in every chunk header); the field asked for ("capital",
        "currency", "terrain") is a literal word in the right chunk, which the overlap
        rewards exactly. (Re-ranking by the same MiniLM cosine would change nothing: the
        index already returns exact inner products of the stored vectors.)"""
        if not questions:
            return []
        if rerank not in ("none", "lexical"):
            raise ValueError(f"unknown rerank {rerank!r}; known: none, lexical")
        pool = max(k, top_k or k) if rerank != "none" else k
        scores, ids = search(self.index, embed(self.embedder, questions, self.batch_size), pool)
        out = []
        for q, srow, irow in zip(questions, scores, ids):
            cands = [(float(s), int(i)) for s, i in zip(srow, irow) if i >= 0]
            ranked = []
            for dense, i in cands:
                score = dense
                if rerank == "lexical":
                    score += lexical_weight * lexical_overlap(q, self.chunks[i]["text"])
                ranked.append((score, dense, i))
            ranked.sort(key=lambda t: (-t[0], t[2]))  # ties: lower chunk number, deterministic
            out.append([{**self.chunks[i], "score": s, "dense": d} for s, d, i in ranked[:k]])
        return out

    def retrieve(self, question: str, k: int, top_k: int | None = None,
                 rerank: Literal["none", "lexical"] = "none", lexical_weight: float = 0.5) -> list[dict]:
        return self.retrieve_many([question], k, top_k, rerank, lexical_weight)[0]


def format_context(hits: Sequence[dict]) -> str:
    """Retrieved chunks, the best one last: closest to the question, and the last to be cut
    when a long prompt loses tokens from its start."""
    return "\n\n".join(h["text"] for h in reversed(hits))


def retrieve_rows(rows: Sequence[dict], index: RagIndex, k: int, top_k: int | None = None,
                  rerank: Literal["none", "lexical"] = "none", lexical_weight: float = 0.5) -> list[list[dict]]:
    return index.retrieve_many([r["question"] for r in rows], k, top_k, rerank, lexical_weight)


def rag_contexts(rows: Sequence[dict], index: RagIndex, k: int, top_k: int | None = None,
                 rerank: Literal["none", "lexical"] = "none", lexical_weight: float = 0.5) -> list[str]:
    """One context string per question, for ``mcq_loglik(..., contexts=...)``."""
    return [format_context(h) for h in retrieve_rows(rows, index, k, top_k, rerank, lexical_weight)]


def retrieval_stats(rows: Sequence[dict], hits: Sequence[Sequence[dict]]) -> dict:
    """How often the retrieved chunks come from the question's document, and contain its answer."""
    n = max(len(rows), 1)
    doc = sum(any(h["doc_id"] == r.get("doc_id") for h in hs) for r, hs in zip(rows, hits))
    top1 = sum(bool(hs) and hs[0]["doc_id"] == r.get("doc_id") for r, hs in zip(rows, hits))
    ans = sum(any(str(r["answer"]) in h["text"] for h in hs) for r, hs in zip(rows, hits))
    return {"doc_recall": doc / n, "doc_top1": top1 / n, "answer_recall": ans / n}


# --------------------------------------------------------------------------- forgetting

def heldout_perplexity(model, tokenizer, texts: Sequence[str], max_tokens: int = 512, device: str | None = None,
                       batch_size: int = 8) -> dict:
    """Token-weighted perplexity on held-out text: ``exp`` of the mean negative log-likelihood
    of every token after a text's first, each text cut to its first ``max_tokens`` tokens (and
    to the model's positions). Texts of fewer than two tokens predict nothing and are skipped."""
    limit = min(max_tokens, _max_positions(model, None))
    seqs = [ids[:limit] for ids in (_encode(tokenizer, t) for t in texts)]
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise ValueError("heldout_perplexity needs at least one text of two or more tokens")
    lps = token_logprobs(model, seqs, [1] * len(seqs), batch_size, device)
    tokens = sum(len(lp) for lp in lps)
    nll = -float(sum(lp.sum() for lp in lps)) / tokens
    return {"ppl": math.exp(nll), "nll": nll, "tokens": tokens, "texts": len(seqs)}


# --------------------------------------------------------------------------- entry point

def _summary(result: dict, keep: bool) -> dict:
    return result if keep else {k: v for k, v in result.items() if k != "predictions"}


def open_book(model, tokenizer, rows: Sequence[dict], documents: Sequence[dict], cfg: EvalConfig,
              device: str, embedder=None) -> dict:
    """Chunk, embed and index ``documents``, retrieve for every question, score with contexts."""
    from selftaught.models import load_embedder

    rc = cfg.rag
    embedder = embedder if embedder is not None else load_embedder(rc.embedder, device)
    chunks = chunk_documents(documents, rc.chunk, getattr(embedder, "tokenizer", None))
    index = RagIndex.build(chunks, embedder, rc.ann, rc.embed_batch_size)
    hits = retrieve_rows(rows, index, rc.k, rc.top_k, rc.rerank, rc.lexical_weight)
    res = mcq_loglik(model, tokenizer, rows, [format_context(h) for h in hits], cfg.batch_size, device,
                     cfg.max_length)
    return {**_summary(res, cfg.keep_predictions), "chunks": len(chunks), **retrieval_stats(rows, hits)}


def evaluate(model_path: str, questions: Sequence[dict], documents: Sequence[dict] | None = None,
             heldout_texts: Sequence[str] | None = None, cfg: EvalConfig | None = None, embedder=None) -> dict:
    """Closed book, open book (when ``documents`` are given and RAG is on), generation (when
    enabled) and held-out perplexity (when texts are given) of one checkpoint.

    ``model_path``: a packaged model name or a checkpoint directory. Few-shot examples come
    from ``questions`` (never the asked question, nor its country). ``embedder``: an already
    loaded sentence embedder to reuse."""
    from selftaught.models import load_causal_lm, resolve_device

    cfg = cfg or EvalConfig()
    device = resolve_device(cfg.device)
    rows = list(questions)[:cfg.limit] if cfg.limit else list(questions)
    tokenizer, model = load_causal_lm(model_path, device)
    out: dict[str, Any] = {"model": str(model_path), "n_questions": len(rows)}
    closed = mcq_loglik(model, tokenizer, rows, None, cfg.batch_size, device, cfg.max_length)
    out["closed_book"] = _summary(closed, cfg.keep_predictions)
    if cfg.rag.enabled and documents:
        out["open_book"] = open_book(model, tokenizer, rows, documents, cfg, device, embedder)
    if cfg.generation.enabled:
        from actors.engine import create_engine
        from selftaught.config import EngineConfig

        g = cfg.generation
        engine = create_engine(EngineConfig(backend="transformers", model=str(model_path), device=device,
                                            max_batch_size=g.max_batch_size), model=model, tokenizer=tokenizer)
        gen = mcq_generate(engine, rows, list(questions), g.cot, g.sampling, g.few_shot)
        out["generation"] = _summary(gen, cfg.keep_predictions)
    if heldout_texts:
        ppl = heldout_perplexity(model, tokenizer, heldout_texts, cfg.heldout_max_tokens, device, cfg.batch_size)
        out["heldout_ppl"] = ppl["ppl"]
        out["heldout"] = ppl
    log.info("entigraph eval: %s", json.dumps({k: v for k, v in out.items() if k != "heldout"}, default=str))
    return out
