"""Budget forcing: exact semantics on a tiny model, both implementations.

Making every vocabulary id a stop token turns each sampled token into a proposal to stop
thinking, which pins down exactly where extensions and delimiters must appear.
"""
from __future__ import annotations

import pytest

from actors.engine.budget import budget_tokens, generate_in_rounds
from selftaught.config import BudgetConfig, EngineConfig, SamplingConfig


@pytest.fixture(scope="module")
def engine(tiny_lm_dir):
    from actors.engine.hf import TransformersEngine

    return TransformersEngine(EngineConfig(model=str(tiny_lm_dir), backend="transformers", max_batch_size=8))


def _all_stop(engine, budget: BudgetConfig, **kw) -> SamplingConfig:
    vocab = list(range(len(engine.tokenizer)))
    return SamplingConfig(temperature=0.0, max_new_tokens=kw.pop("max_new_tokens", 64),
                          stop_token_ids=vocab, budget=budget, **kw)


def _ids(engine, text):
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


PROMPT = "The river flows"


def test_extensions_then_delimiter_then_answer(engine):
    b = BudgetConfig(num_extensions=2, extension="Wait")
    out = engine.generate([PROMPT], _all_stop(engine, b))[0]
    c = out.completions[0]
    wait, end = _ids(engine, "Wait"), _ids(engine, b.think_end)
    # trigger -> Wait, trigger -> Wait, trigger -> delimiter, one answer token that is a stop id
    assert c.token_ids[:2 * len(wait)] == wait + wait
    assert c.token_ids[2 * len(wait):2 * len(wait) + len(end)] == end
    assert c.budget == {"thinking_tokens": 2 * len(wait), "extension_tokens": 2 * len(wait),
                        "extensions": 2, "control_tokens": len(end), "answer_tokens": 1, "capped": False}
    assert len(c.token_ids) == 2 * len(wait) + len(end) + 1
    assert c.finish_reason == "stop"
    # the prompt carries the start-of-thinking marker
    assert out.prompt_token_ids[-len(_ids(engine, b.think_start)):] == _ids(engine, b.think_start)


def test_min_budget_with_extension_and_cap_cuts_it(engine):
    wait = _ids(engine, "Wait")
    b = BudgetConfig(min_thinking_tokens=7, max_thinking_tokens=7, extension="Wait", answer_cue="Final Answer:")
    c = engine.generate([PROMPT], _all_stop(engine, b))[0].completions[0]
    end, cue = _ids(engine, b.think_end), _ids(engine, "Final Answer:")
    assert c.budget["thinking_tokens"] == 7
    assert c.budget["extensions"] == -(-7 // len(wait))  # ceil: the last one cut at the cap
    assert c.budget["capped"] is True
    assert c.token_ids[7:7 + len(end) + len(cue)] == end + cue
    assert c.budget["control_tokens"] == len(end) + len(cue)


def test_min_budget_without_extension_masks_the_end(engine):
    allowed = set(range(20, 60))  # every other id is a stop: a proposal to end thinking
    b = BudgetConfig(min_thinking_tokens=5, max_thinking_tokens=30, extension="")
    p = SamplingConfig(temperature=0.0, max_new_tokens=64, budget=b,
                       stop_token_ids=[t for t in range(len(engine.tokenizer)) if t not in allowed])
    c = engine.generate([PROMPT], p)[0].completions[0]
    end, t = _ids(engine, b.think_end), c.budget["thinking_tokens"]
    assert t >= 5 and c.budget["extensions"] == 0
    assert set(c.token_ids[:5]) <= allowed  # the end was masked for the first 5 tokens
    assert set(c.token_ids[:t]) <= allowed  # any later proposal would have ended thinking
    assert c.token_ids[t:t + len(end)] == end
    rounds = generate_in_rounds(engine, [_ids(engine, PROMPT)], [p])[0][0]
    assert rounds.token_ids == c.token_ids and rounds.budget == c.budget


def test_max_budget_forces_delimiter_at_exact_position(engine):
    b = BudgetConfig(max_thinking_tokens=6, min_thinking_tokens=6, extension="", max_answer_tokens=4)
    p = SamplingConfig(temperature=0.0, max_new_tokens=64, budget=b, ignore_eos=True)
    c = engine.generate([PROMPT], p)[0].completions[0]
    end = _ids(engine, b.think_end)
    assert c.token_ids[6:6 + len(end)] == end
    assert c.budget["thinking_tokens"] == 6 and c.budget["capped"] is True
    assert c.budget["answer_tokens"] == 4 and c.finish_reason == "length"
    assert len(c.token_ids) == 6 + len(end) + 4
    assert c.reasoning is not None and c.answer is not None


def test_hard_limit_bounds_the_whole_completion(engine):
    b = BudgetConfig(min_thinking_tokens=10, max_thinking_tokens=10, extension="")
    p = SamplingConfig(temperature=0.0, max_new_tokens=12, budget=b, ignore_eos=True)
    c = engine.generate([PROMPT], p)[0].completions[0]
    assert len(c.token_ids) == 12 and c.finish_reason == "length"
    assert c.budget["thinking_tokens"] == 10 and c.budget["control_tokens"] == 2


def test_mixed_budgets_in_one_batch_match_single_requests(engine):
    budgets = [BudgetConfig(max_thinking_tokens=3, min_thinking_tokens=3, extension=""),
               BudgetConfig(max_thinking_tokens=9, min_thinking_tokens=9, extension="", answer_cue="Answer:"),
               BudgetConfig(num_extensions=3, extension="Wait", max_thinking_tokens=20),
               None]
    prompts = ["The river flows", "A long time ago in a city", "Numbers", "Plain decoding here"]
    params = [SamplingConfig(temperature=0.0, max_new_tokens=24, budget=b, stop_token_ids=[5, 9, 17])
              for b in budgets]
    together = engine.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, together):
        alone = engine.generate([prompt], p)[0]
        assert out.completions[0].token_ids == alone.completions[0].token_ids
        assert out.completions[0].budget == alone.completions[0].budget
    assert together[0].completions[0].budget["thinking_tokens"] == 3
    assert together[1].completions[0].budget["thinking_tokens"] == 9
    assert together[2].completions[0].budget["extensions"] <= 3
    assert together[3].completions[0].budget is None


def test_sampled_rows_respect_budgets(engine):
    b = BudgetConfig(max_thinking_tokens=8, min_thinking_tokens=8, extension="")
    p = SamplingConfig(temperature=1.0, seed=3, n=4, max_new_tokens=20, budget=b, ignore_eos=True)
    out = engine.generate([PROMPT], p)[0]
    end = _ids(engine, b.think_end)
    assert len(out.completions) == 4
    for c in out.completions:
        assert c.token_ids[8:8 + len(end)] == end and c.budget["thinking_tokens"] == 8
    assert len({tuple(c.token_ids) for c in out.completions}) > 1  # samples differ
    again = engine.generate([PROMPT], p)[0]
    assert [c.token_ids for c in again.completions] == [c.token_ids for c in out.completions]


@pytest.mark.parametrize("budget", [
    BudgetConfig(num_extensions=2, extension="Wait"),
    BudgetConfig(min_thinking_tokens=7, max_thinking_tokens=7, extension="Wait", answer_cue="Final Answer:"),
    BudgetConfig(max_thinking_tokens=4, extension="Wait", num_extensions=9, answer_cue="Answer:"),
])
def test_round_driver_matches_the_decode_policy(engine, budget):
    """The vLLM path (rounds through engine.generate) and the per-token policy agree."""
    p = _all_stop(engine, budget)
    ids = _ids(engine, PROMPT)
    direct = engine.generate([ids], p)[0].completions[0]
    rounds = generate_in_rounds(engine, [ids], [p])[0][0]
    assert rounds.token_ids == direct.token_ids
    assert rounds.budget == direct.budget
    assert rounds.finish_reason == direct.finish_reason


def test_round_driver_matches_on_natural_stops(engine):
    """Greedy decoding with a few real stop ids: triggers arise where the model puts them."""
    ids = _ids(engine, "Once upon a time")
    plain = engine.generate([ids], SamplingConfig(temperature=0.0, max_new_tokens=30, ignore_eos=True))[0]
    stops = sorted(set(plain.completions[0].token_ids[2:6]))  # tokens the model does produce
    for b in (BudgetConfig(num_extensions=2, extension="Wait", max_thinking_tokens=25),
              BudgetConfig(max_thinking_tokens=12, answer_cue="Answer:", max_answer_tokens=5)):
        p = SamplingConfig(temperature=0.0, max_new_tokens=40, stop_token_ids=stops, budget=b)
        direct = engine.generate([ids], p)[0].completions[0]
        rounds = generate_in_rounds(engine, [ids], [p])[0][0]
        assert rounds.token_ids == direct.token_ids and rounds.budget == direct.budget


def test_budget_tokens_include_delimiter_and_stops(engine):
    b = BudgetConfig()
    p = SamplingConfig(stop_token_ids=[7])
    toks = budget_tokens(engine, b, p)
    assert len(toks.think_end) > 1  # this tokenizer splits the default delimiter
    assert toks.think_end[0] not in toks.triggers  # only the whole delimiter ends thinking
    assert toks.think_end[0] in toks.masked and 7 in toks.triggers
    assert engine.eos_ids <= toks.triggers
    one = BudgetConfig(think_end=engine.tokenizer.decode([toks.think_end[0]]))
    assert budget_tokens(engine, one, p).think_end[0] in budget_tokens(engine, one, p).triggers


SEEDED = dict(temperature=1.0, seed=11, ignore_eos=True)


def _sampled_delimiter(engine):
    """A prompt, a seeded sample and a two-token string the model writes in it by itself."""
    for prompt in ("Once upon a time", "The river flows", "In the year", "A king"):
        ids = _ids(engine, prompt)
        g = engine.generate([ids], SamplingConfig(max_new_tokens=16, **SEEDED))[0]
        toks = g.completions[0].token_ids
        for i in range(1, 10):
            text = engine.tokenizer.decode(toks[i:i + 2])
            if _ids(engine, text) == toks[i:i + 2] and not any(toks[j:j + 2] == toks[i:i + 2] for j in range(i)):
                return ids, toks, i, text
    pytest.skip("no two-token delimiter found in the tiny model's samples")


def teacher_forced(engine, prompt: list[int], completion: list[int]) -> list[float]:
    """Log-probs of ``completion`` after ``prompt``, from one forward pass over both."""
    import torch

    x = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = engine.model(input_ids=x).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return [float(lp[len(prompt) - 1 + k, t]) for k, t in enumerate(completion)]


def test_multi_token_delimiter_written_by_the_model_ends_thinking(engine):
    ids, toks, i, delim = _sampled_delimiter(engine)
    b = BudgetConfig(think_start="", think_end=delim, max_answer_tokens=3)
    p = SamplingConfig(max_new_tokens=20, budget=b, **SEEDED)
    c = engine.generate([ids], p)[0].completions[0]
    assert c.token_ids[:i + 2] == toks[:i + 2]  # the model's own tokens, delimiter included
    assert c.budget["thinking_tokens"] == i and c.budget["control_tokens"] == 2
    assert c.reasoning == engine.tokenizer.decode(toks[:i], skip_special_tokens=True)


def test_round_driver_recognises_a_multi_token_delimiter(engine):
    """Greedy: the model's first two tokens are the delimiter; both paths agree exactly."""
    ids = _ids(engine, "Once upon a time")
    g = engine.generate([ids], SamplingConfig(temperature=0.0, max_new_tokens=2, ignore_eos=True))[0]
    pair = g.completions[0].token_ids
    delim = engine.tokenizer.decode(pair)
    if _ids(engine, delim) != pair:
        pytest.skip("the greedy pair does not re-encode to itself")
    p = SamplingConfig(temperature=0.0, max_new_tokens=10, ignore_eos=True,
                       budget=BudgetConfig(think_start="", think_end=delim, max_answer_tokens=4))
    direct = engine.generate([ids], p)[0].completions[0]
    rounds = generate_in_rounds(engine, [ids], [p])[0][0]
    assert direct.budget["control_tokens"] == 2 and direct.budget["thinking_tokens"] == 0
    assert rounds.token_ids == direct.token_ids and rounds.budget == direct.budget


def test_overruled_multi_token_delimiter_is_taken_back(engine):
    """With an extension due, the delimiter's first token is retracted (out of the text, the
    attention and the positions) and the extension follows the thinking before it."""
    ids, toks, i, delim = _sampled_delimiter(engine)
    b = BudgetConfig(think_start="", think_end=delim, num_extensions=1, extension="Wait", max_thinking_tokens=16)
    p = SamplingConfig(max_new_tokens=24, budget=b, logprobs=0, **SEEDED)
    events = []
    engine.add_request("retract", ids, p, on_event=events.append)
    while engine.has_unfinished():
        engine.step()
    c = events[-1].completion
    wait = _ids(engine, "Wait")
    head = toks[:i] + wait
    assert c.token_ids[:len(head)] == head and c.budget["extensions"] == 1
    # every log-prob is the model's on exactly the kept prefix: nothing retracted leaks
    ref = teacher_forced(engine, ids, c.token_ids)
    assert c.logprobs == pytest.approx(ref, abs=1e-4)
    # the stream never showed the retracted token as reasoning
    reasoning = "".join(e.text for e in events if e.phase == "reasoning")
    assert reasoning == c.reasoning


def test_min_tokens_hold_with_a_budget(engine):
    """``min_new_tokens`` counts the whole completion: the answer may not stop before it."""
    b = BudgetConfig(max_thinking_tokens=2, extension="")
    p = _all_stop(engine, b, min_new_tokens=12, max_new_tokens=30)
    c = engine.generate([PROMPT], p)[0].completions[0]
    assert c.num_tokens >= 12 and c.finish_reason == "stop"
    rounds = generate_in_rounds(engine, [_ids(engine, PROMPT)], [p])[0][0]
    assert rounds.num_tokens >= 12


def test_round_driver_draws_a_fresh_seed_each_round(engine):
    from actors.engine.budget import BudgetUsage, _round_params, _Sample

    s = _Sample([1], SamplingConfig(seed=5), None, 5, [], BudgetUsage())
    seeds = {_round_params(s, max_new_tokens=4).seed for _ in range(5)}
    assert len(seeds) == 5


def test_budget_config_rejects_inconsistent_settings():
    with pytest.raises(ValueError):
        BudgetConfig(min_thinking_tokens=10, max_thinking_tokens=5)
    with pytest.raises(ValueError):
        BudgetConfig(num_extensions=2, extension="")
    with pytest.raises(ValueError):
        BudgetConfig(max_thinking_tokens=-1)


def test_held_back_thinking_released_at_the_cap_streams_as_reasoning(engine):
    """Tokens held back as a possible delimiter start are thinking when the cap ends thinking:
    the stream's reasoning equals the completion's."""
    ids = _ids(engine, "Once upon a time")
    g = engine.generate([ids], SamplingConfig(temperature=0.0, max_new_tokens=1, ignore_eos=True))[0]
    first = g.completions[0].token_ids[0]
    delim = engine.tokenizer.decode([first]) + "Q"
    if _ids(engine, delim)[:1] != [first] or len(_ids(engine, delim)) < 2:
        pytest.skip("no delimiter starting with the model's greedy token")
    p = SamplingConfig(temperature=0.0, max_new_tokens=16, ignore_eos=True,
                       budget=BudgetConfig(think_start="", think_end=delim, max_thinking_tokens=5, max_answer_tokens=3))
    events = []
    engine.add_request("cap-held", ids, p, on_event=events.append)
    while engine.has_unfinished():
        engine.step()
    c = events[-1].completion
    assert c.budget["thinking_tokens"] == 5 and c.budget["capped"]
    assert "".join(e.text for e in events if e.phase == "reasoning") == c.reasoning
    assert [t for e in events if e.phase == "reasoning" for t in e.token_ids] == c.token_ids[:5]
