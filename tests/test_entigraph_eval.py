"""EntiGraph evaluation (pipelines/entigraph_eval.py): exact log-likelihood scoring against
one-sequence-at-a-time computations on the tiny LM, few-shot hygiene and answer parsing,
chunking, MiniLM retrieval on real Factbook countries, held-out perplexity, the entry point."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from actors.engine.base import Completion, GenerationOutput
from pipelines.entigraph_eval import (ChunkConfig, EvalConfig, GenerationEvalConfig, RagConfig, RagIndex,
                                      chunk_documents, embed, evaluate, heldout_perplexity, lexical_overlap,
                                      mcq_generate, mcq_loglik, mcq_messages, pick_few_shot, rag_contexts,
                                      retrieval_stats, retrieve_rows)
from selftaught.config import SamplingConfig
from tests.conftest import wiki_texts


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    from selftaught.models import load_causal_lm

    return load_causal_lm(tiny_lm_dir, "cpu")


@pytest.fixture(scope="module")
def factbook5():
    from selftaught.data.factbook import build_questions, country_documents, load_countries

    countries, _ = load_countries(limit=5)
    rows, _ = build_questions(countries, per_country=8, seed=0)
    return country_documents(countries), rows


@pytest.fixture(scope="module")
def embedder():
    from selftaught.models import load_embedder

    return load_embedder("minilm", "cpu")


@pytest.fixture(scope="module")
def rag_index(factbook5, embedder):
    docs, _ = factbook5
    return RagIndex.build(chunk_documents(docs, ChunkConfig(), embedder.tokenizer), embedder)


ROWS = [
    {"id": "q/0", "doc_id": "d/0", "country": "Testland", "field": "capital",
     "question": "What is the capital of Testland?", "choices": ["Paris", "New York City", "Rome", "A"],
     "answer_index": 2, "answer": "Rome"},
    {"id": "q/1", "doc_id": "d/1", "country": "Otherland", "field": "currency",
     "question": "What is the currency of Otherland?",
     "choices": ["euro", "US dollar", "Otherland crown (OTC)", "yen"], "answer_index": 0, "answer": "euro"},
    {"id": "q/2", "doc_id": "d/2", "country": "Thirdland", "field": "climate",
     "question": "Which of these describes the climate of Thirdland?",
     "choices": ["temperate", "tropical; hot and humid", "arid desert", "polar"], "answer_index": 1,
     "answer": "tropical; hot and humid"},
    {"id": "q/3", "doc_id": "d/0", "country": "Testland", "field": "population",
     "question": "What is the population of Testland?", "choices": ["1 million", "2", "3,000", "40 billion"],
     "answer_index": 3, "answer": "40 billion"},
]


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _hand_logprobs(model, ids: list[int], start: int) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= start: one unpadded sequence, float64 softmax."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    return [float(lp[t - 1, ids[t]]) for t in range(start, len(ids))]


# --------------------------------------------------------------------------- log-likelihood scoring

def test_mcq_loglik_matches_one_sequence_at_a_time(lm):
    tok, model = lm
    contexts = ["Testland > Government\nCapital - name: Rome", None, "Thirdland is hot.", ""]
    # batch of 5 sequences: the 4 options of one question are split over batches, lengths differ
    res = mcq_loglik(model, tok, ROWS, contexts, batch_size=5)
    assert res["n"] == 4 and res["truncated"] == 0
    hits = hits_norm = 0
    for row, ctx, pred in zip(ROWS, contexts, res["predictions"]):
        prompt = (f"{ctx}\n\n" if ctx else "") + f"Question: {row['question']}\nAnswer:"
        p = _ids(tok, prompt)
        sums, norms = [], []
        for choice in row["choices"]:
            c = _ids(tok, " " + choice)
            lps = _hand_logprobs(model, p + c, len(p))
            assert len(lps) == len(c)
            sums.append(sum(lps))
            norms.append(sum(lps) / len(c))
        np.testing.assert_allclose(pred["loglik"], sums, atol=1e-4, rtol=0)
        np.testing.assert_allclose(pred["loglik_norm"], norms, atol=1e-4, rtol=0)
        assert pred["pred"] == int(np.argmax(sums)) and pred["pred_norm"] == int(np.argmax(norms))
        hits += pred["pred"] == row["answer_index"]
        hits_norm += pred["pred_norm"] == row["answer_index"]
    assert res["loglik_acc"] == hits / 4 and res["loglik_norm_acc"] == hits_norm / 4
    # the batch size changes nothing, nor does a model that computes every position's logits
    one = mcq_loglik(model, tok, ROWS, contexts, batch_size=1)
    full = mcq_loglik(AllLogits(model), tok, ROWS, contexts, batch_size=3)
    for other in (one, full):
        np.testing.assert_allclose([p["loglik"] for p in other["predictions"]],
                                   [p["loglik"] for p in res["predictions"]], atol=1e-4, rtol=0)


class AllLogits(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep`` (the generic path)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache)


def test_mcq_loglik_scores_the_model_preferred_option_correct(lm):
    """Single-token options: the model's most likely next token must win, its least likely lose."""
    tok, model = lm
    row = {"id": "x", "question": "What is the capital of Testland?"}
    p = _ids(tok, f"Question: {row['question']}\nAnswer:")
    with torch.no_grad():
        probs = torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0, -1].double(), -1)
    words = []  # tokens that are a space plus a word, and re-encode to themselves
    for t in range(len(tok)):
        s = tok.decode([t])
        if len(s) > 2 and s[0] == " " and s[1:].isalpha() and _ids(tok, s) == [t]:
            words.append((float(probs[t]), s[1:]))
    words.sort()
    assert len(words) >= 8
    best, worst = words[-1][1], [w for _, w in words[:3]]
    good = {**row, "choices": [worst[0], worst[1], best, worst[2]], "answer_index": 2, "answer": best}
    bad = {**row, "id": "y", "choices": [worst[0], worst[1], best, worst[2]], "answer_index": 0, "answer": worst[0]}
    res = mcq_loglik(model, tok, [good, bad], batch_size=3)
    assert [p["pred"] for p in res["predictions"]] == [2, 2]
    assert [p["pred_norm"] for p in res["predictions"]] == [2, 2]
    assert res["loglik_acc"] == 0.5 and res["loglik_norm_acc"] == 0.5
    assert res["predictions"][0]["loglik"][2] == pytest.approx(words[-1][0], abs=1e-4)


def test_mcq_loglik_cuts_long_prompts_from_the_left(lm):
    tok, model = lm
    ctx = " ".join(wiki_texts(3))
    res = mcq_loglik(model, tok, ROWS[:1], [ctx], max_length=40)
    assert res["truncated"] == 1
    conts = [_ids(tok, " " + c) for c in ROWS[0]["choices"]]
    p = _ids(tok, f"{ctx}\n\nQuestion: {ROWS[0]['question']}\nAnswer:")[-(40 - max(map(len, conts))):]
    assert tok.decode(p).endswith("Question: What is the capital of Testland?\nAnswer:")
    hand = [sum(_hand_logprobs(model, p + c, len(p))) for c in conts]
    np.testing.assert_allclose(res["predictions"][0]["loglik"], hand, atol=1e-4, rtol=0)


def test_mcq_loglik_rejects_bad_input(lm):
    tok, model = lm
    with pytest.raises(ValueError, match="at least one"):
        mcq_loglik(model, tok, [])
    with pytest.raises(ValueError, match="contexts"):
        mcq_loglik(model, tok, ROWS, ["only one"])


# --------------------------------------------------------------------------- held-out perplexity

def test_heldout_perplexity_matches_hand_computation(lm):
    tok, model = lm
    texts = wiki_texts(5) + ["a"]  # one token: predicts nothing, skipped
    res = heldout_perplexity(model, tok, texts, max_tokens=48, batch_size=2)
    nll, n = 0.0, 0
    for t in texts[:5]:
        ids = _ids(tok, t)[:48]
        lps = _hand_logprobs(model, ids, 1)
        nll -= sum(lps)
        n += len(lps)
    assert res["texts"] == 5 and res["tokens"] == n
    assert res["nll"] == pytest.approx(nll / n, abs=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    # a random 512-token model is close to uniform: perplexity of the order of the vocabulary
    assert 50 < res["ppl"] < 5 * len(tok)


# --------------------------------------------------------------------------- generation

class FakeChat:
    """Records the conversations and answers with fixed replies."""

    def __init__(self, replies):
        self.replies, self.conversations, self.sampling = replies, None, None

    def chat(self, conversations, sampling=None):
        self.conversations, self.sampling = [list(c) for c in conversations], sampling
        return [GenerationOutput(prompt="", prompt_token_ids=[],
                                 completions=[Completion(text=r, token_ids=[], finish_reason="stop")])
                for r in self.replies]


def test_few_shot_never_contains_the_asked_question():
    chat = FakeChat(["C", "The answer is A.", "no idea", "B or D"])
    res = mcq_generate(chat, ROWS, few_shot=ROWS, k=2)
    for row, conv in zip(ROWS, chat.conversations):
        assert [m["role"] for m in conv] == ["user", "assistant"] * 2 + ["user"]
        demos = conv[:-1]
        assert all(row["question"] not in m["content"] for m in demos)
        assert row["question"] in conv[-1]["content"] and "A. " + row["choices"][0] in conv[-1]["content"]
    # q/0 and q/3 share a document: neither is a demonstration for the other
    assert "population of Testland" not in " ".join(m["content"] for m in chat.conversations[0])
    assert pick_few_shot(ROWS[0], ROWS, 3) == [ROWS[1], ROWS[2]]
    assert pick_few_shot(ROWS[0], ROWS, 3, exclude_same_doc=False) == ROWS[1:]
    assert pick_few_shot(ROWS[0], [dict(ROWS[0], id="copy")], 1) == []  # same text, other id
    # demonstrations answer with their own letter
    assert chat.conversations[0][1]["content"] == "A" and chat.conversations[0][3]["content"] == "B"
    # replies: C (right), A (right), nothing, two letters (unparsed)
    assert res["acc"] == 0.5 and res["unparsed"] == 2 and res["n"] == 4
    assert [p["pred"] for p in res["predictions"]] == [2, 0, None, None]
    assert chat.sampling.temperature == 0.0 and chat.sampling.max_new_tokens == 16


class SizedChat(FakeChat):
    """A local-engine look-alike: one token per character, a fixed number of positions."""

    max_len = 10 ** 6

    def apply_chat_template(self, messages):
        return "\n".join(m["content"] for m in messages)

    def count_tokens(self, text):
        return len(text)


def test_few_shot_is_trimmed_to_fit_the_model():
    chat = SizedChat(["C"])
    one = chat.count_tokens(chat.apply_chat_template(mcq_messages(ROWS[0], ROWS[1:2], False)))
    chat.max_len = one + 16  # one demonstration plus the 16 answer tokens of default sampling
    res = mcq_generate(chat, ROWS[:1], ROWS, k=2)
    assert res["predictions"][0]["shots"] == 1 and chat.conversations[0] == mcq_messages(ROWS[0], ROWS[1:2], False)
    chat.max_len = 10 ** 6
    assert mcq_generate(chat, ROWS[:1], ROWS, k=2)["predictions"][0]["shots"] == 2


def test_chain_of_thought_prompts_and_parsing():
    replies = ["Not A, and B is wrong. Checking again, the answer is C.", "The answer is (B)",
               "Thinking... I pick tropical; hot and humid", "The answer is D"]
    chat = FakeChat(replies)
    res = mcq_generate(chat, ROWS, few_shot=ROWS[2:3], cot=True)
    conv = chat.conversations[0]
    assert "step by step" in conv[-1]["content"]
    assert conv[1]["content"].endswith("The answer is B.") and "tropical; hot and humid" in conv[1]["content"]
    assert len(chat.conversations[2]) == 1  # its only candidate demo was itself
    # last "answer is" wins; otherwise the option text is matched
    assert [p["pred"] for p in res["predictions"]] == [2, 1, 1, 3]
    assert res["acc"] == 0.75 and res["unparsed"] == 0 and chat.sampling.max_new_tokens == 256


def test_mcq_generate_through_the_engine(tiny_lm_dir):
    from actors.engine import create_engine
    from selftaught.config import EngineConfig

    engine = create_engine(EngineConfig(backend="transformers", model=str(tiny_lm_dir), device="cpu",
                                        max_batch_size=4))
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=4)
    a = mcq_generate(engine, ROWS[:2], ROWS[2:], sampling=sampling, k=1)
    b = mcq_generate(engine, ROWS[:2], ROWS[2:], sampling=sampling, k=1)
    assert a["n"] == 2 and [p["shots"] for p in a["predictions"]] == [1, 1]
    assert [p["response"] for p in a["predictions"]] == [p["response"] for p in b["predictions"]]
    assert a["acc"] == sum(p["pred"] == p["answer_index"] for p in a["predictions"]) / 2
    assert a["unparsed"] == sum(p["pred"] is None for p in a["predictions"])


# --------------------------------------------------------------------------- chunking

def test_chunk_windows_overlap_and_stay_in_their_section():
    lines = [f"Fact {i}: {'x' * 12}" for i in range(5)]  # 20 characters each, 21 with the newline
    doc = {"id": "t/1", "title": "Testland",
           "text": "# Testland\n\n## Geography\n" + "\n".join(lines) + "\n\n## Economy\nGDP: 3 units"}
    chunks = chunk_documents([doc], ChunkConfig(size=60, overlap=25, unit="chars"))
    assert [c["text"].split("\n")[1:] for c in chunks] == [
        lines[0:2], lines[1:3], lines[2:4], lines[3:5], ["GDP: 3 units"]]
    assert [c["section"] for c in chunks] == ["Geography"] * 4 + ["Economy"]
    assert chunks[0]["text"].startswith("Testland > Geography\n")
    assert chunks[-1]["text"] == "Testland > Economy\nGDP: 3 units"
    assert [c["id"] for c in chunks] == [f"t/1#{i}" for i in range(5)] and {c["doc_id"] for c in chunks} == {"t/1"}
    # a line longer than a chunk is cut at word boundaries; no overlap, no headings: plain title
    long = {"id": "w/1", "title": "Long", "text": " ".join(["word"] * 60)}
    parts = chunk_documents([long], ChunkConfig(size=50, overlap=0, unit="chars"))
    assert all(c["text"].startswith("Long\n") and len(c["text"]) - 5 < 50 for c in parts)
    assert " ".join(c["text"][5:] for c in parts) == long["text"]


def test_chunk_factbook_by_tokens_with_metadata(factbook5, embedder):
    docs, _ = factbook5
    tok = embedder.tokenizer
    cfg = ChunkConfig(size=120, overlap=20)
    chunks = chunk_documents(docs, cfg, tok)
    names = {d["id"]: d["title"] for d in docs}
    assert set(names) == {c["doc_id"] for c in chunks}
    for c in chunks:
        header, body = c["text"].split("\n", 1)
        assert header == f"{names[c['doc_id']]} > {c['section']}" and c["section"]
        assert len(tok(body, add_special_tokens=False)["input_ids"]) <= cfg.size
    # every fact line of every document is in some chunk
    for d in docs:
        kept = {ln for c in chunks if c["doc_id"] == d["id"] for ln in c["text"].split("\n")[1:]}
        facts = [ln.strip() for ln in d["text"].splitlines() if ln.strip() and not ln.startswith("#")]
        assert all(f in kept or len(tok(f, add_special_tokens=False)["input_ids"]) + 1 > cfg.size
                   for f in facts)
    with pytest.raises(ValueError, match="tokenizer"):
        chunk_documents(docs, cfg)


# --------------------------------------------------------------------------- retrieval

def test_retrieval_finds_the_questions_country(factbook5, rag_index):
    docs, rows = factbook5
    assert len(rows) >= 25
    assert np.allclose(np.linalg.norm(rag_index.vectors, axis=1), 1.0, atol=1e-5)
    hits = retrieve_rows(rows, rag_index, k=3, top_k=20, rerank="lexical")
    assert all(len(h) == 3 for h in hits)
    stats = retrieval_stats(rows, hits)
    assert stats["doc_top1"] == 1.0, stats  # the country is named in every chunk header
    assert stats["answer_recall"] >= 0.9, stats
    # the re-rank puts the chunk holding the answer first more often than cosine alone
    lexical1 = retrieval_stats(rows, retrieve_rows(rows, rag_index, k=1, top_k=20, rerank="lexical"))
    dense1 = retrieval_stats(rows, retrieve_rows(rows, rag_index, k=1))
    assert dense1["doc_top1"] >= 0.9, dense1
    assert lexical1["answer_recall"] >= max(dense1["answer_recall"], 0.8), (dense1, lexical1)


def test_retrieval_k_and_determinism(factbook5, rag_index, embedder):
    docs, rows = factbook5
    q = rows[0]["question"]
    for k in (1, 2, 5):
        assert len(rag_index.retrieve(q, k)) == k
    assert len(rag_index.retrieve(q, 10 ** 6)) == len(rag_index.chunks)  # k beyond the corpus
    a = rag_index.retrieve(q, 4, top_k=10, rerank="lexical")
    b = rag_index.retrieve(q, 4, top_k=10, rerank="lexical")
    assert a == b
    # embedding is deterministic: the retrieved chunks embed again to their stored vectors
    row_of = {c["id"]: i for i, c in enumerate(rag_index.chunks)}
    pos = [row_of[h["id"]] for h in a]
    np.testing.assert_allclose(embed(embedder, [h["text"] for h in a]), rag_index.vectors[pos], atol=1e-5)
    assert [h["score"] for h in a] == sorted([h["score"] for h in a], reverse=True)
    # dense order follows the cosine the index reports
    d = rag_index.retrieve(q, 4)
    assert [h["score"] for h in d] == [h["dense"] for h in d]
    assert lexical_overlap("What is the capital of Testland?", "Testland > Government\nCapital - name: X") == 1.0
    ctx = rag_contexts(rows[:2], rag_index, k=2, top_k=10, rerank="lexical")
    hits = retrieve_rows(rows[:2], rag_index, k=2, top_k=10, rerank="lexical")
    assert ctx[0] == hits[0][1]["text"] + "\n\n" + hits[0][0]["text"]  # best chunk next to the question


# --------------------------------------------------------------------------- configs and entry point

def test_configs_validate():
    with pytest.raises(ValidationError):
        ChunkConfig(size=10, overlap=10)
    with pytest.raises(ValidationError):
        RagConfig(k=5, top_k=2)
    with pytest.raises(ValidationError):
        EvalConfig(few_shot=3)  # few_shot lives under generation
    cfg = EvalConfig(limit=5, rag={"k": 2, "rerank": "none"}, generation={"enabled": True, "cot": True})
    assert cfg.rag.k == 2 and cfg.generation.cot and cfg.generation.few_shot == 3


def _section(text: str, name: str) -> str:
    start = text.index(f"\n## {name}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_evaluate_end_to_end(tiny_lm_dir, lm, factbook5, embedder):
    docs, rows = factbook5
    # two countries, their Government section only: the wiring is under test, not retrieval
    small = [{**d, "text": d["text"][:d["text"].index("\n## ")] + _section(d["text"], "Government")}
             for d in docs[:2]]
    rows = [r for r in rows if r["field"] in ("capital", "national_holiday") and r["doc_id"] in
            {d["id"] for d in small}]
    cfg = EvalConfig(limit=4, device="cpu", rag=RagConfig(k=2, top_k=8),
                     generation=GenerationEvalConfig(enabled=True, few_shot=1,
                                                     sampling=SamplingConfig(temperature=0, max_new_tokens=3)))
    heldout = wiki_texts(3)
    out = evaluate(str(tiny_lm_dir), rows, small, heldout, cfg, embedder=embedder)
    tok, model = lm
    direct = mcq_loglik(model, tok, rows[:4])
    assert out["n_questions"] == 4
    assert out["closed_book"] == {k: v for k, v in direct.items() if k != "predictions"}
    ob = out["open_book"]
    assert ob["n"] == 4 and 0 <= ob["loglik_acc"] <= 1 and ob["chunks"] > 0 and ob["doc_recall"] == 1.0
    assert out["generation"]["n"] == 4 and "predictions" not in out["generation"]
    assert out["generation"]["k"] == 1  # asked for; demonstrations that do not fit 256 positions are dropped
    assert out["heldout_ppl"] == pytest.approx(heldout_perplexity(model, tok, heldout, 512)["ppl"], rel=1e-6)
    # nothing optional when not asked for
    bare = evaluate(str(tiny_lm_dir), rows, None, None, EvalConfig(limit=2, device="cpu"))
    assert set(bare) == {"model", "n_questions", "closed_book"}
