"""EntiGraph synthesis: JSON repair and retries, pair / triplet selection under a budget,
relation rows and megadocs, resuming after a kill, the answer cache and cost caps (litellm's
own mock path, answers chosen per request as tests/test_llm.py does), and JSON-schema
decoded extraction on our engine's Ray actors with a tiny random-weight LM."""
from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path

import jsonschema
import litellm
import pytest

from pipelines.entigraph_synth import (EXTRACT_SYSTEM, RELATION_SYSTEM, RETRY_USER, GeneratorConfig, SynthConfig,
                                       clean_entities, entity_schema, estimate_cost, extract_entities,
                                       make_generator, megadocs, parse_entities, parse_json_object,
                                       relation_context, relation_requests, rephrase, rephrase_units,
                                       select_pairs, select_triplets, synthesize, synthesize_relations)
from selftaught.config import EngineConfig, SamplingConfig
from selftaught.ledger import BudgetCaps, BudgetExceeded, Ledger
from selftaught.llm import LLMConfig

DOCS = [
    {"id": "doc/a", "title": "The Lighthouse", "text": "Mara keeps the lighthouse on Gull Rock. Her brother "
                                                        "Tomas brings oil from Port Elin each spring."},
    {"id": "doc/b", "title": "Salt Roads", "text": "Caravans carried salt from Taoudenni to Timbuktu across "
                                                   "the Sahara, trading it for gold."},
]
ENTITIES = {"doc/a": ["Mara", "lighthouse", "Gull Rock", "Tomas"], "doc/b": ["salt", "Taoudenni", "Timbuktu"]}


_REAL_COMPLETION = litellm.completion


class _Kill(BaseException):
    """A simulated kill of the driver (not an Exception: nothing may swallow it)."""


def _doc_of(messages) -> str:
    text = "\n".join(str(m["content"]) for m in messages)
    return next(d["id"] for d in DOCS if d["title"] in text)


def _default_answer(messages) -> str:
    """What a well-behaved model would say to each of our prompts."""
    sys = messages[0]["content"]
    if sys == EXTRACT_SYSTEM:
        d = _doc_of(messages)
        return json.dumps({"summary": f"summary of {d}", "entities": ENTITIES[d]})
    if sys == RELATION_SYSTEM:
        return "relation text: " + messages[1]["content"].split("relate to each other: ")[1].split("\n")[0].rstrip(".")
    return "rephrased: " + messages[-1]["content"][:40]


def _answering(monkeypatch, answer=_default_answer, kill_at: int | None = None) -> list[dict]:
    """litellm's mock path with the answer chosen per request; returns the requests that reached
    litellm (their kwargs). ``kill_at``: the n-th request raises a kill instead."""
    real = _REAL_COMPLETION  # never a fake from an earlier call of this helper
    seen: list[dict] = []
    lock = threading.Lock()

    def completion(**kw):
        with lock:
            seen.append(kw)
            n = len(seen)
        if kill_at is not None and n == kill_at:
            raise _Kill(f"killed at request {n}")
        return real(**{**kw, "mock_response": answer(kw["messages"])})

    monkeypatch.setattr(litellm, "completion", completion)
    return seen


def _gen_cfg(tmp_path: Path | None = None, concurrency: int = 4, cache: bool = False) -> GeneratorConfig:
    # $1 per token both ways (litellm's mock reports 10 prompt + 20 completion tokens: $30 a call)
    llm = LLMConfig(model="openai/local-test", mock_response="unused", max_tokens=64, max_retries=0,
                    input_price_per_mtok=1e6, output_price_per_mtok=1e6, role="entigraph")
    return GeneratorConfig(backend="litellm", llm=llm, concurrency=concurrency,
                           cache=str(tmp_path / "llm_cache.sqlite") if cache else None)


def _synth_cfg(**kw) -> SynthConfig:
    short = SamplingConfig(temperature=1.0, max_new_tokens=64)
    return SynthConfig(**{"extract_sampling": SamplingConfig(temperature=0.0, max_new_tokens=64),
                          "relation_sampling": short, "rephrase_sampling": short, **kw})


# ---------------------------------------------------------------- parsing
def test_json_repair_and_entity_cleaning():
    good = {"summary": "s", "entities": ["A", "B"]}
    assert parse_json_object(json.dumps(good)) == (good, False)
    cases = {
        "fenced, trailing comma": '```json\n{"summary": "s", "entities": ["A", "B",],}\n```',
        "prose around": 'Here you go: {"summary": "s", "entities": ["A", "B"]} Hope it helps!',
        "cut by the token limit": '{"summary": "s", "entities": ["A", "B", "C',
        "single quotes": "{'summary': 's', 'entities': ['A', 'B']}",
        "unterminated fence": '```\n{"summary": "s", "entities": ["A", "B"]}',
    }
    for name, text in cases.items():
        obj, repaired = parse_json_object(text)
        assert repaired and obj is not None and obj["summary"] == "s", name
        assert obj["entities"][:2] == ["A", "B"], name
    assert parse_json_object('{"summary": "cut', )[0] == {"summary": "cut"}
    assert parse_json_object('{"summary": "a \\"quoted\\" word", "entities": ["x"')[0] == \
        {"summary": 'a "quoted" word', "entities": ["x"]}
    assert parse_json_object("no json here, just Alice and Bob") == (None, True)
    cfg = SynthConfig(max_entities=3, max_entity_chars=10)
    assert parse_entities('{"summary": "only a summary"}', cfg)[0] is None  # no entity list: malformed
    assert clean_entities(["Alice", " alice ", "", "  ", "BOB", "Bob", {"name": "Carol"}, 7,
                           "a very long sentence, not a name"], 10, 12) == ["Alice", "BOB", "Carol"]
    assert clean_entities(["people", "Tswana", "Places", "organisations", "Bechuanaland"], 10, 20) == \
        ["Tswana", "Bechuanaland"]  # the prompt's category words are not entities
    # ... nor a list of nothing but them in one string (SmolLM2 wrote this one); names with commas stay
    book = "Concepts, Techniques, and Models of Computer Programming"
    assert clean_entities(["people,places,organisations,objects,work", "Washington, D.C.", book, "Benin"], 10, 60) \
        == ["Washington, D.C", book, "Benin"]  # (a trailing full stop is stripped from every name)
    parsed, _ = parse_entities('{"summary": "  two\\nlines ", "entities": ["a", "A", "b", "c", "d"]}', cfg)
    assert parsed == {"summary": "two lines", "entities": ["a", "b", "c"]}  # deduplicated, capped at 3


# ---------------------------------------------------------------- selection
def test_pairs_and_triplets_under_budget_are_deterministic():
    ents = [f"e{i}" for i in range(10)]
    allp, info = select_pairs(ents)
    assert len(allp) == 45 and info == {"total": 45, "selected": 45, "dropped": 0}
    assert allp == list(itertools.combinations(ents, 2))
    a, info = select_pairs(ents, None, 7, token_budget=1050, tokens_per_pair=100)
    assert info == {"total": 45, "selected": 10, "dropped": 35} and len(a) * 100 <= 1050
    assert a == select_pairs(ents, None, 7, token_budget=1050, tokens_per_pair=100)[0]  # same seed, same sample
    assert len(set(a)) == 10 and set(a) <= set(allp) and a == sorted(a, key=allp.index)
    assert a != select_pairs(ents, None, 8, token_budget=1050, tokens_per_pair=100)[0]
    assert len(select_pairs(ents, 4, 7, token_budget=1050, tokens_per_pair=100)[0]) == 4  # the tighter limit
    assert select_pairs(ents, None, 7, token_budget=99, tokens_per_pair=100)[1]["selected"] == 0

    t, info = select_triplets(ents, 7, 3)
    assert info == {"total": 120, "selected": 7, "dropped": 113} and len(set(t)) == 7
    assert t == select_triplets(ents, 7, 3)[0] and all(list(x) == sorted(x, key=ents.index) for x in t)
    assert len(select_triplets(ents, 500, 3)[0]) == 120 and select_triplets(ents[:2], 5, 3)[0] == []
    many = [f"x{i}" for i in range(200)]  # 1.3M triplets: sampled without listing them
    t, info = select_triplets(many, 20, 1)
    assert len(set(t)) == 20 and info["dropped"] == info["total"] - 20 and t == select_triplets(many, 20, 1)[0]


# ---------------------------------------------------------------- extraction retries
def test_extraction_repairs_retries_and_counts_malformed(tmp_path, monkeypatch):
    docs = DOCS + [{"id": "doc/c", "title": "Broken Answers", "text": "Nobody answers this one properly."},
                   {"id": "doc/d", "title": "Fenced", "text": "Ada met Ada and Grace."}]

    def answer(messages):
        title = messages[1]["content"]
        retried = any(m["content"] == RETRY_USER for m in messages)
        if "The Lighthouse" in title and not retried:
            return "Sure! The entities are Mara, Tomas and the lighthouse."  # no JSON at all
        if "Broken Answers" in title:
            return "I cannot answer in JSON, sorry."
        if "Fenced" in title:
            return '```json\n{"summary": "Ada and Grace meet.", "entities": ["Ada", "ada", " ", "Grace",],}\n```'
        return _default_answer(messages)

    seen = _answering(monkeypatch, answer)
    gen = make_generator(_gen_cfg())
    rows, stats = extract_entities(docs, gen, _synth_cfg(retries=2))
    assert [r["source_id"] for r in rows] == ["doc/a", "doc/b", "doc/d"]
    a, b, d = rows
    assert a["attempts"] == 2 and a["entities"] == ENTITIES["doc/a"] and a["summary"] == "summary of doc/a"
    assert b["attempts"] == 1 and not b["repaired"] and d["repaired"] and d["entities"] == ["Ada", "Grace"]
    # a: 2 calls, b: 1, c: 1 + 2 retries, d: 1
    assert len(seen) == 7 and stats["requests"] == 7 and stats["retried"] == 3
    assert (stats["malformed"], stats["malformed_answers"], stats["repaired"], stats["failed"]) == (1, 4, 1, 0)
    assert a["prompt_tokens"] == 20 and a["completion_tokens"] == 40  # both attempts counted (mock: 10 + 20 each)
    retry = [kw["messages"] for kw in seen if any(m["content"] == RETRY_USER for m in kw["messages"])]
    assert len(retry) == 3 and retry[0][-2]["role"] == "assistant"  # the bad answer is shown back


def test_extraction_in_pieces_merges_entities_and_summaries(monkeypatch):
    text = ("Mara keeps the lighthouse on Gull Rock. " * 3 + "\n\n" + "Tomas brings oil from Port Elin. " * 3)
    doc = {"id": "doc/p", "title": "Pieces", "text": text}

    def answer(messages):
        piece = messages[1]["content"]
        if "Mara" in piece:
            return json.dumps({"entities": ["Mara", "lighthouse", "Gull Rock"], "summary": "Mara keeps it."})
        return json.dumps({"entities": ["Tomas", "oil", "Port Elin", "mara"], "summary": "Tomas brings oil."})

    seen = _answering(monkeypatch, answer)
    cfg = _synth_cfg(extract_chunk_chars=130, max_entities=5)
    rows, stats = extract_entities([doc], make_generator(_gen_cfg()), cfg)
    assert len(seen) == 2 and (stats["pieces"], stats["requests"]) == (2, 2)
    (r,) = rows
    # interleaved over the pieces before the cap, so the second piece is not crowded out
    assert r["entities"] == ["Mara", "Tomas", "lighthouse", "oil", "Gull Rock"] and r["pieces"] == 2
    assert r["summary"] == "Mara keeps it. Tomas brings oil." and r["prompt_tokens"] == 20


def test_relation_context_shows_the_passages_that_name_the_entities():
    paras = [f"Paragraph {i} is about the harbour and its tides, the ferries and the fish market." for i in range(12)]
    paras[2] += " Mara keeps the lighthouse."
    paras[9] += " Tomas sails to Port Elin."
    doc = {"id": "d", "title": "Coast", "text": "\n\n".join(paras)}
    whole = _synth_cfg()
    assert relation_context(doc, ["Mara", "Tomas"], whole) == doc["text"]  # default: the whole document
    cfg = _synth_cfg(relation_context_chars=260)
    ctx = relation_context(doc, ["Mara", "Tomas"], cfg)
    # each entity's passage, in document order, the gap marked, within the limit
    assert len(ctx) <= 260 and "Mara keeps" in ctx and "Tomas sails" in ctx
    assert ctx.index("Mara") < ctx.index("[...]") < ctx.index("Tomas")
    assert "Paragraph 5 " not in ctx
    # whole words, any case: "mara" is named, "Maral" would not be
    assert "Mara keeps" in relation_context(doc, ["mara", "Harbourmaster"], cfg)
    # a pair the text never names: the document's opening, still within the limit
    none = relation_context(doc, ["Zed", "Quill"], cfg)
    assert none.startswith("Paragraph 0") and len(none) <= 260
    # never over the limit, gaps included, and two passages named far apart always fit
    for limit in (100, 120, 150, 200, 260):
        c = relation_context(doc, ["Mara", "Tomas"], _synth_cfg(relation_context_chars=limit))
        assert len(c) <= limit and "Mara" in c and "Tomas" in c
    # the pair budget prices the longest context a pair can get, not the opening an unnamed pair gets
    from pipelines.entigraph_synth import pair_tokens

    assert pair_tokens(doc, cfg) == pair_tokens({**doc, "text": doc["text"][:260]}, cfg) > \
        pair_tokens({**doc, "text": doc["text"][:100]}, cfg)
    # the prompt carries the context, not the document
    (req,) = relation_requests(doc, [("Mara", "Tomas")], [], make_generator(_gen_cfg()), cfg)
    assert "Tomas sails" in req.messages[1]["content"] and "Paragraph 5 " not in req.messages[1]["content"]


def test_rephrase_in_pieces_asks_each_piece_in_each_style(monkeypatch):
    text = "\n\n".join(f"Part {i}: the caravans crossed the dunes to reach the salt mines of Taoudenni." for i in range(6))
    doc = {"id": "doc/r", "title": "Salt", "text": text}
    cfg = _synth_cfg(rephrase_chunk_chars=170)
    units = rephrase_units(doc, cfg)
    assert len(units) == 3 and "".join(u["text"] for u in units).replace("\n", "") == text.replace("\n", "")
    seen = _answering(monkeypatch)
    stats: dict = {}
    rows = rephrase([doc], ["easy", "hard"], make_generator(_gen_cfg()), cfg, None, stats)
    assert len(seen) == 6 and len(rows) == 6 and len({r["id"] for r in rows}) == 6
    assert sorted(r["kind"] for r in rows) == ["rephrase:easy"] * 3 + ["rephrase:hard"] * 3
    asked = [kw["messages"][-1]["content"] for kw in seen]
    assert all(sum(u["text"] in a for u in units) == 1 for a in asked)  # one piece per request
    # without pieces: one request per style, as before
    assert len(rephrase_units(doc, _synth_cfg())) == 1


# ---------------------------------------------------------------- relations, megadocs, cache, ledger
def test_synthesis_rows_megadocs_and_a_cached_rerun_pays_nothing(tmp_path, monkeypatch):
    seen = _answering(monkeypatch)
    ledger = Ledger.for_run(tmp_path / "run")
    cfg = _synth_cfg(triplets=2)
    gen = make_generator(_gen_cfg(tmp_path, cache=True), ledger=ledger)
    rows, stats = synthesize(DOCS, gen, cfg, tmp_path / "out1")
    sel = stats["selection"]
    assert (sel["pairs"], sel["triplets"], sel["triplets_total"], sel["triplets_dropped"]) == (6 + 3, 2 + 1, 4 + 1, 2)
    kinds = {k: sum(r["kind"] == k for r in rows) for k in ("summary", "pair", "triplet")}
    assert kinds == {"summary": 2, "pair": 9, "triplet": 3} and len(rows) == 14
    assert len(seen) == 2 + 12 and gen.client.usage.snapshot()["calls"] == 14
    for r in rows:
        if r["kind"] != "summary":  # the answer echoes the entities it was asked about
            assert r["text"] == "relation text: " + ", ".join(f'"{e}"' for e in r["entities"])
            assert set(r["entities"]) <= set(ENTITIES[r["source_id"]])
            assert r["completion_tokens"] == 20 and r["id"].startswith(r["source_id"] + "#" + r["kind"])
    for kw in seen[2:]:  # every relation prompt names its document's title and holds its text
        doc = next(d for d in DOCS if d["id"] == _doc_of(kw["messages"]))
        assert kw["messages"][1]["content"].count(f'"{doc["title"]}"') >= 3 and doc["text"] in kw["messages"][1]["content"]
        assert kw["temperature"] == 1.0

    # megadocs: one per document, summary first, stable whatever the row order
    mega = megadocs(rows)
    assert [m["source_id"] for m in mega] == ["doc/a", "doc/b"] and [m["parts"] for m in mega] == [1 + 6 + 2, 1 + 3 + 1]
    assert mega == megadocs(list(reversed(rows)))
    a = mega[0]
    assert a["text"].startswith("summary of doc/a\n\nrelation text: ") and a["kind"] == "megadoc"
    assert all(r["text"] in a["text"] for r in rows if r["source_id"] == "doc/a")
    assert a["completion_tokens"] == sum(r["completion_tokens"] for r in rows if r["source_id"] == "doc/a")
    assert a["entities"] == sorted(ENTITIES["doc/a"], key=str.casefold)
    mrows, _ = synthesize(DOCS, gen, cfg.model_copy(update={"megadocs": True}), tmp_path / "out1")
    assert mrows == mega and len(seen) == 14  # from the parts: nothing asked again

    # a fresh output directory (parts gone): every answer comes from the cache, no new paid call
    before = ledger.snapshot()["roles"]["entigraph"]
    gen2 = make_generator(_gen_cfg(tmp_path, cache=True), ledger=ledger)
    rows2, stats2 = synthesize(DOCS, gen2, cfg, tmp_path / "out2")
    assert rows2 == rows and len(seen) == 14
    u = gen2.client.usage.snapshot()
    assert u["calls"] == 0 and u["cost_usd"] == 0 and u["cache_hits"] == 14
    after = ledger.snapshot()["roles"]["entigraph"]
    assert (after["calls"], after["usd"]) == (before["calls"], before["usd"]) == (14, pytest.approx(14 * 30.0))
    assert after["cache_hits"] == before["cache_hits"] + 14 and stats2["relations"]["cached"] == 12

    # the plan's worst case, as the client reserves it
    reqs = relation_requests(DOCS[0], [("Mara", "Tomas")], [], gen, cfg)
    est = estimate_cost(reqs * 3, _gen_cfg())
    assert est["calls"] == 3 and est["max_completion_tokens"] == 3 * 64
    assert est["usd"] == pytest.approx(3 * est["max_call_usd"]) and est["max_call_usd"] > 64


# ---------------------------------------------------------------- resuming
def test_resume_after_kill_skips_finished_keys_and_retries_failed_ones(tmp_path, monkeypatch):
    out = tmp_path / "rephrase"
    cfg = _synth_cfg(part_size=2)
    docs = DOCS + [{"id": "doc/c", "title": "Third", "text": "A third document."}]
    gen = make_generator(_gen_cfg(concurrency=1))
    first = _answering(monkeypatch, kill_at=5)
    with pytest.raises(_Kill):
        rephrase(docs, ["easy", "qa"], gen, cfg, out)
    assert len(list(out.glob("part-*.parquet"))) == 2  # parts 1 and 2 (4 answers) finished before the kill
    done = [json.dumps(kw["messages"]) for kw in first[:4]]

    def flaky(messages):  # one request fails for good this time: counted, not written, not fatal
        if "Third" in messages[-1]["content"] and "questions" in messages[-1]["content"]:
            raise litellm.exceptions.BadRequestError("refused", model="local-test", llm_provider="openai")
        return _default_answer(messages)

    again = _answering(monkeypatch, flaky)
    stats: dict = {}
    rows = rephrase(docs, ["easy", "qa"], gen, cfg, out, stats=stats)
    asked = [json.dumps(kw["messages"]) for kw in again]
    assert len(asked) == 2 and not set(asked) & set(done)  # only what was not finished
    assert (stats["resumed"], stats["generated"], stats["failed"]) == (4, 1, 1) and len(rows) == 5

    third = _answering(monkeypatch)
    rows = rephrase(docs, ["easy", "qa"], gen, cfg, out)
    assert len(third) == 1 and len(rows) == 6  # only the failed one was asked again
    assert sorted(r["kind"] for r in rows) == ["rephrase:easy"] * 3 + ["rephrase:qa"] * 3
    assert all(r["text"].startswith("rephrased: ") for r in rows) and third[0]["temperature"] == 1.0
    fourth = _answering(monkeypatch)
    assert len(rephrase(docs, ["easy", "qa"], gen, cfg, out)) == 6 and fourth == []
    with pytest.raises(ValueError, match="unknown rephrase style"):
        rephrase(docs, ["shouty"], gen, cfg)


def test_budget_cap_stops_the_run_and_keeps_what_finished(tmp_path, monkeypatch):
    seen = _answering(monkeypatch)
    cfg = _synth_cfg()
    gen_cfg = _gen_cfg(concurrency=1)
    probe = make_generator(gen_cfg)
    one = relation_requests(DOCS[0], [("Mara", "Tomas"), ("Mara", "Gull Rock"), ("Tomas", "lighthouse")], [],
                            probe, cfg)
    worst = estimate_cost(one, gen_cfg)["max_call_usd"]
    ledger = Ledger.for_run(tmp_path / "run", caps=BudgetCaps(total_usd=worst + 1.0))  # room for one call
    gen = make_generator(gen_cfg, ledger=ledger)
    entity_row = {"source_id": "doc/a", "summary": "s", "prompt_tokens": 0, "completion_tokens": 0}
    pairs = [("Mara", "Tomas"), ("Mara", "Gull Rock"), ("Tomas", "lighthouse")]
    with pytest.raises(BudgetExceeded):
        synthesize_relations(DOCS[0], entity_row, pairs, [], gen, cfg, tmp_path / "rel")
    assert len(seen) == 1 and ledger.snapshot()["roles"]["entigraph"]["calls"] == 1
    ledger.set_caps(BudgetCaps())  # raise the cap and resume: only the two missing pairs are paid for
    stats: dict = {}
    rows = synthesize_relations(DOCS[0], entity_row, pairs, [], gen, cfg, tmp_path / "rel", stats=stats)
    assert len(seen) == 3 and (stats["resumed"], stats["generated"]) == (1, 2)
    assert [r["kind"] for r in rows] == ["summary", "pair", "pair", "pair"]
    assert [tuple(r["entities"]) for r in rows[1:]] == pairs


# ---------------------------------------------------------------- the local backend (Ray actors)
def test_local_backend_decodes_extraction_under_the_schema(ray_cluster, tiny_chat_lm, tmp_path):
    # bounded strings and list: even random weights finish the object within max_new_tokens
    cfg = _synth_cfg(max_doc_chars=200, max_entities=2, max_entity_chars=8, max_summary_chars=16, retries=0,
                     extract_sampling=SamplingConfig(temperature=1.0, seed=0, max_new_tokens=320))
    gen_cfg = GeneratorConfig(backend="local", fanout="actors", num_actors=1, timeout_s=300,
                              engine=EngineConfig(backend="transformers", model=tiny_chat_lm, device="cpu",
                                                  cpus_per_actor=1))
    with make_generator(gen_cfg) as gen:
        assert gen.supports_schema and gen.model == tiny_chat_lm
        rows, stats = extract_entities(DOCS, gen, cfg, tmp_path / "entities")
    assert (stats["malformed"], stats["failed"], stats["repaired"]) == (0, 0, 0) and len(rows) == 2
    schema = entity_schema(cfg)
    for r in rows:  # random weights, yet every answer is schema-valid JSON as it stands
        raw = json.loads(r["raw"])
        jsonschema.validate(raw, schema)
        assert r["entities"] == clean_entities(raw["entities"], 2, 8) and 0 < r["completion_tokens"] < 320


def test_ray_data_fanout_writes_parts_isolates_a_bad_row_and_resumes(ray_cluster, tiny_chat_lm, tmp_path):
    """The default local fan-out: one Ray Data dataset per stage through engine actors. A
    conversation longer than the model's context fails alone; a rerun asks only for it."""
    from pipelines.entigraph_synth import DataGenerator, Request, run_requests

    gen_cfg = GeneratorConfig(backend="local", num_actors=1, timeout_s=300,
                              engine=EngineConfig(backend="transformers", model=tiny_chat_lm, device="cpu",
                                                  cpus_per_actor=1, max_batch_size=4))
    s = SamplingConfig(temperature=1.0, seed=0, max_new_tokens=8)
    gen = make_generator(gen_cfg)
    assert isinstance(gen, DataGenerator) and gen.supports_schema
    reqs = [Request(f"d{i}", "pair", ["a", "b"], [{"role": "user", "content": f"say something {i}"}], s, gen.model)
            for i in range(6)]
    reqs.append(Request("long", "pair", ["a", "b"], [{"role": "user", "content": "word " * 5000}], s, gen.model))
    rows, stats = run_requests(reqs, gen, tmp_path / "parts", part_size=2)
    assert (stats["generated"], stats["failed"]) == (6, 1) and stats["parts"] >= 3
    assert [r["source_id"] for r in rows] == [f"d{i}" for i in range(6)]
    assert all(0 < r["completion_tokens"] <= 8 for r in rows) and stats["errors"]
    again, st2 = run_requests(reqs, gen, tmp_path / "parts", part_size=2)
    assert (st2["resumed"], st2["generated"], st2["failed"]) == (6, 0, 1) and again == rows
