"""The ideator: prompts per mode, lineage, context budgets, parsing, thinking, backends."""
from __future__ import annotations

import json
import random

import jsonschema
import pytest

from actors.ideator import (THINK_CLOSE, THINK_OPEN, EnsembleMember, Ideator, IdeatorConfig, build_prompt,
                            decode_schema, pack_listing, parse_ideas, split_thinking, to_idea, _entry)
from envs.base import Idea
from selftaught.config import EngineConfig, SamplingConfig
from selftaught.llm import LLMConfig

KNOBS = {"type": "object", "additionalProperties": False,
         "properties": {"lr": {"type": "number", "minimum": 0.0001, "maximum": 1.0},
                        "steps": {"type": "integer", "minimum": 1, "maximum": 10000},
                        "n_embd": {"type": "integer", "minimum": 32, "maximum": 128, "multipleOf": 32}}}
CTX = "# Environment: demo\n\nFit a line. Metric: 1 / (1 + MSE)."


def _history(n: int = 30) -> list[dict]:
    return [{"id": f"past-{i:02d}", "text": f"idea number {i}: " + "word " * (i % 7 + 3), "reward": 0.5 + i / 100}
            for i in range(n)]


def _user(p) -> str:
    return p.messages[-1]["content"]


# --------------------------------------------------------------------------- prompts
def test_fresh_prompt_has_context_and_no_lineage():
    p = build_prompt(IdeatorConfig(), "fresh", CTX, _history(5), 6)
    assert CTX in _user(p) and "6 research ideas" in _user(p) and p.shown_ids == [] and p.k == 6
    assert p.messages[0]["role"] == "system"


def test_exploit_prompt_shows_results_ranked_and_records_lineage():
    shown = [{"idea": {"text": "use cosine decay", "id": "a"}, "result": {"status": "ok", "reward": 0.81,
                                                                          "metrics": {"gain": 0.014}}},
             {"idea": Idea(knobs={"lr": 0.1}, id="b"), "result": {"status": "ok", "reward": 0.9}},
             {"id": "c", "text": "warm up for 5% of steps", "reward": 0.8}]
    p = build_prompt(IdeatorConfig(), "exploit", CTX, shown, 3)
    text = _user(p)
    assert p.shown_ids == ["b", "a", "c"]  # best first
    assert "reward 0.81" in text and "gain over baseline +0.014" in text and "reward 0.9" in text
    assert '{"lr": 0.1}' in text and "use cosine decay" in text
    assert text.index("[b]") < text.index("[a]") < text.index("[c]")
    with pytest.raises(ValueError):
        build_prompt(IdeatorConfig(), "exploit", CTX, [], 3)


def test_explore_fills_budget_never_beyond_and_records_lineage():
    hist = _history(40)
    cfg = IdeatorConfig(explore_budget_chars=400)
    p = build_prompt(cfg, "explore", CTX, hist, 4, rng=random.Random(1))
    assert 0 < p.listing_chars <= 400
    assert "reward" not in _user(p)  # explore lists ideas without results
    assert len(p.shown_ids) == len(set(p.shown_ids)) > 3
    for i in p.shown_ids:
        assert f"[{i}]" in _user(p)
    # filled: every idea left out would have overflowed the budget
    by_id = {e["id"]: e for e in map(_entry, hist)}
    from actors.ideator import _listing_line
    for i in set(by_id) - set(p.shown_ids):
        assert p.listing_chars + 1 + len(_listing_line(by_id[i], False, cfg.max_shown_chars)) > 400 - 1
    # a random sample: another seed shows other ideas, order not the history's
    q = build_prompt(cfg, "explore", CTX, hist, 4, rng=random.Random(2))
    assert q.shown_ids != p.shown_ids and p.shown_ids != sorted(p.shown_ids)
    # everything fits in a large budget
    assert len(build_prompt(IdeatorConfig(), "explore", CTX, hist, 4).shown_ids) == 40


def test_explore_token_budget():
    hist = _history(40)
    listing, ids, tokens = pack_listing([_entry(h) for h in hist], 10_000, budget_tokens=50,
                                        count_tokens=lambda s: len(s.split()))
    assert 0 < tokens <= 50 and len(listing.split()) <= 50 and 0 < len(ids) < 40


def test_knob_prompt_and_thinking_instruction():
    p = build_prompt(IdeatorConfig(thinking=True), "fresh", CTX, [], 2, schema=KNOBS)
    assert '"n_embd"' in _user(p) and "JSON list of 2 objects" in _user(p) and THINK_CLOSE in _user(p)


# --------------------------------------------------------------------------- parsing
def test_parse_free_form_json_and_numbered_lists():
    got = parse_ideas('Sure!\n```json\n["Use RMSNorm", "", {"idea": "Tie embeddings"}, 7]\n```\nGood luck')
    assert got.ideas == ["Use RMSNorm", "Tie embeddings"] and got.malformed == 2
    got = parse_ideas("Ideas:\n1. Warm up the lr\n   for 100 steps.\n2) Use a larger batch\n- Drop dropout")
    assert got.ideas == ["Warm up the lr for 100 steps.", "Use a larger batch", "Drop dropout"]
    assert got.malformed == 0
    bad = parse_ideas("I have no ideas today.")
    assert bad.ideas == [] and bad.malformed == 1
    assert parse_ideas('["x" * 9]').malformed == 1  # broken JSON, no list


def test_parse_structured_validates_and_counts_malformed():
    text = ('[{"lr": 0.01, "steps": 100}, {"lr": 5.0}, {"knobs": {"n_embd": 64}}, {"n_embd": 48}, '
            '{}, {"bogus": 1}, "text"]')
    got = parse_ideas(text, KNOBS)
    assert got.ideas == [{"lr": 0.01, "steps": 100}, {"n_embd": 64}]
    assert got.malformed == 5  # out of range, not a multiple, empty, unknown key, not an object
    for k in got.ideas:
        jsonschema.validate(k, KNOBS)
    assert parse_ideas('{"ideas": [{"steps": 3}]}', KNOBS).ideas == [{"steps": 3}]
    assert parse_ideas('{"steps": 3} and also {"steps": 4}', KNOBS).ideas == [{"steps": 3}, {"steps": 4}]
    assert parse_ideas("{}", KNOBS, require_knobs="none").ideas == [{}]
    assert parse_ideas('{"steps": 3}', KNOBS, require_knobs="all").malformed == 1
    nothing = parse_ideas("no json here", KNOBS)
    assert nothing.ideas == [] and nothing.malformed == 1


def test_thinking_is_split_off_and_never_in_ideas():
    t, a = split_thinking(f"{THINK_OPEN}Maybe lr is too high.{THINK_CLOSE}\n[\"Lower the lr\"]")
    assert t == "Maybe lr is too high." and a == '["Lower the lr"]'
    assert split_thinking(f"{THINK_OPEN}never closed") == ("never closed", "")
    assert split_thinking(f"template opened it{THINK_CLOSE}[1]") == ("template opened it", "[1]")
    assert split_thinking("<|im_start|>think\nhmm<|im_start|>answer\nok") == ("hmm", "ok")
    got = parse_ideas(f'{THINK_OPEN}1. a thought that looks like a list\n["Use Muon"]{THINK_CLOSE}["Use AdamW"]')
    assert got.ideas == ["Use AdamW"] and "Muon" in got.thinking
    unclosed = parse_ideas(f'{THINK_OPEN}["Use Muon"]')
    assert unclosed.ideas == [] and unclosed.malformed == 1


def test_decode_schema_spells_out_multiples_and_requires():
    s = decode_schema(KNOBS, "any")
    assert s["properties"]["n_embd"]["enum"] == [32, 64, 96, 128] and s["minProperties"] == 1
    assert decode_schema(KNOBS, "all")["required"] == ["lr", "steps", "n_embd"]
    assert "enum" not in KNOBS["properties"]["n_embd"]  # not mutated


# --------------------------------------------------------------------------- litellm backend (mock)
def _mock_cfg(answer: str, **kw) -> IdeatorConfig:
    return IdeatorConfig(llm=LLMConfig(model="openai/gpt-4o-mini", mock_response=answer, max_retries=0,
                                       input_price_per_mtok=1.0, output_price_per_mtok=2.0), **kw)


def test_litellm_backend_free_form_with_thinking_and_cost():
    answer = f'{THINK_OPEN}RMSNorm is cheap.{THINK_CLOSE}\n["Replace LayerNorm with RMSNorm", "Use a cosine schedule", ""]'
    ide = Ideator(_mock_cfg(answer, batch_size=2, thinking=True, max_rounds=1))
    ideas = ide.propose("explore", CTX, _history(10), n=4, seed=0)
    # two calls of two ideas each; the same canned answer twice -> duplicates dropped
    assert [i["text"] for i in ideas] == ["Replace LayerNorm with RMSNorm", "Use a cosine schedule"]
    st = ide.stats()
    assert st["calls"] == 2 and st["malformed"] == 2 and st["duplicates"] == 2 and st["ideas"] == 2
    for i in ideas:
        assert i["mode"] == "explore" and i["backend"] == "litellm" and i["model"] == "openai/gpt-4o-mini"
        assert i["thinking"] == "RMSNorm is cheap." and THINK_OPEN not in i["text"] and "cheap" not in i["text"]
        assert set(i["shown_ids"]) <= {h["id"] for h in _history(10)} and i["shown_ids"]
        assert i["tokens"] > 0 and i["cost_usd"] > 0 and i["knobs"] is None
        idea = to_idea(i)
        assert idea.id == i["id"] and idea.meta["ideator"]["shown_ids"] == i["shown_ids"]
    assert st["cost_usd"] == pytest.approx(sum(i["cost_usd"] for i in ideas) * 2)  # half went to duplicates


def test_litellm_backend_structured_and_ensemble():
    good = LLMConfig(model="openai/a", mock_response='[{"lr": 0.05, "steps": 200}, {"steps": 0}]')
    other = LLMConfig(model="openai/b", mock_response='[{"n_embd": 96}]')
    ide = Ideator(IdeatorConfig(ensemble=[EnsembleMember(llm=good, weight=1.0),
                                          EnsembleMember(llm=other, weight=1.0)], batch_size=1, seed=3))
    ideas = ide.propose("fresh", CTX, [], n=2, schema=KNOBS)
    assert sorted(json.dumps(i["knobs"], sort_keys=True) for i in ideas) == \
        ['{"lr": 0.05, "steps": 200}', '{"n_embd": 96}']
    assert {i["model"] for i in ideas} == {"openai/a", "openai/b"}
    for i in ideas:
        jsonschema.validate(i["knobs"], KNOBS)
        assert i["text"] == "" and i["shown_ids"] == [] and i["thinking"] is None


def test_failed_calls_are_counted_not_raised():
    ide = Ideator(IdeatorConfig(backend="openai", llm=LLMConfig(model="x", api_base="http://127.0.0.1:9/v1",
                                                              max_retries=0, timeout_s=2), max_rounds=1))
    assert ide.propose("fresh", CTX, [], n=2) == []
    assert ide.stats()["failed_calls"] == 1
    with pytest.raises(ValueError):
        IdeatorConfig(backend="openai", llm=LLMConfig(model="x"))


def test_ray_actor_with_mock_backend(ray_cluster):
    from actors.ideator import start_ideator

    actor = start_ideator(_mock_cfg('["Add gradient clipping at 1.0"]'))
    ideas = ray_cluster.get(actor.propose.remote("exploit", CTX, _history(3), 1), timeout=120)
    assert ideas[0]["text"] == "Add gradient clipping at 1.0" and ideas[0]["shown_ids"] == ["past-02", "past-01",
                                                                                           "past-00"]
    assert ray_cluster.get(actor.stats.remote(), timeout=60)["ideas"] == 1
    ray_cluster.kill(actor)


# --------------------------------------------------------------------------- local engine (SmolLM2-135M)
def test_local_smollm2_yields_schema_valid_knob_ideas(tmp_path):
    from envs.codebase import ExecutorConfig, load_packaged

    env = load_packaged("toy", executor=ExecutorConfig(run_dir=str(tmp_path / "run")))
    try:
        schema, ctx = env.idea_schema(), env.task_text()
    finally:
        env.close()
    cfg = IdeatorConfig(backend="local", engine=EngineConfig(backend="transformers", device="cpu"),
                        batch_size=4, sampling=SamplingConfig(temperature=1.0, max_new_tokens=40), seed=0,
                        max_rounds=1)
    ide = Ideator(cfg, num_cpus=1)
    ideas = ide.propose("fresh", ctx, [], n=4, schema=schema, seed=0)
    st = ide.stats()
    print("local ideas:", [i["knobs"] for i in ideas], st)
    assert len(ideas) + st["malformed"] + st["duplicates"] == 4 and len(ideas) >= 2
    for i in ideas:
        jsonschema.validate(i["knobs"], schema)
        assert i["knobs"] and i["backend"] == "local" and i["completion_tokens"] > 0 and i["cost_usd"] == 0.0
    # explore on the same engine: lineage from the sampled history, budget in model tokens
    ide.cfg.explore_budget_tokens = 60
    more = ide.propose("explore", ctx, [{"id": f"k{j}", "knobs": {"steps": j + 1}} for j in range(20)], n=2,
                       schema=schema, seed=1)
    for i in more:
        jsonschema.validate(i["knobs"], schema)
        assert 0 < len(i["shown_ids"]) < 20
