"""The stepping core of the transformers engine: continuous batching, stream events, log-probs,
aborts, failures that stay with their request, and weight updates in place."""
import pytest
import torch

from actors.engine import create_engine
from actors.engine.base import DecodePolicy, RequestError
from selftaught.config import EngineConfig, SamplingConfig

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_lm_dir):
    return create_engine(EngineConfig(backend="transformers", model=str(tiny_lm_dir), max_batch_size=6))


def ids_of(engine, text):
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def solo(engine, prompt, **kw):
    return engine.generate([prompt], SamplingConfig(**kw))[0].completions[0]


def run(engine, requests: dict, admit_at: dict | None = None, abort_at: dict | None = None) -> dict:
    """Drive the engine by hand: add requests at given steps, collect every event per request."""
    events = {rid: [] for rid in requests}
    admit_at = admit_at or {}
    step = 0
    pending = dict(requests)
    while pending or engine.has_unfinished():
        for rid in [r for r in pending if admit_at.get(r, 0) <= step]:
            prompt, params = pending.pop(rid)
            engine.add_request(rid, prompt, params, on_event=events[rid].append)
        for rid, at in (abort_at or {}).items():
            if at == step:
                engine.abort(rid)
        engine.step()
        step += 1
        assert step < 500
    return events


def teacher_forced(engine, prompt: list[int], completion: list[int]) -> list[float]:
    x = torch.tensor([prompt + completion])
    with torch.no_grad():
        lp = torch.log_softmax(engine.model(input_ids=x).logits[0].float(), -1)
    return [float(lp[len(prompt) - 1 + k, t]) for k, t in enumerate(completion)]


def final(evs):
    assert evs[-1].finished and sum(e.finished for e in evs) == 1
    return evs[-1].completion


def test_requests_join_a_running_batch_and_match_solo_runs(engine):
    """Requests admitted between decode steps, with longer and shorter prompts than the running
    batch's width, decode exactly as they do alone (greedy)."""
    prompts = {"a": "Water", "b": "The history of the Roman Empire is long and " * 3, "c": "In",
               "d": "Paris is the capital"}
    lengths = {"a": 20, "b": 6, "c": 12, "d": 9}
    reqs = {k: (p, SamplingConfig(max_new_tokens=lengths[k], **GREEDY)) for k, p in prompts.items()}
    events = run(engine, reqs, admit_at={"a": 0, "b": 3, "c": 5, "d": 11})
    assert engine.stats["max_running"] >= 2
    for k, p in prompts.items():
        assert final(events[k]).token_ids == solo(engine, p, max_new_tokens=lengths[k], **GREEDY).token_ids


def test_stream_events_add_up_to_the_completion_with_teacher_forced_logprobs(engine):
    reqs = {"g": ("The river flows", SamplingConfig(max_new_tokens=14, logprobs=3, **GREEDY)),
            "s": ("Once upon a time", SamplingConfig(max_new_tokens=10, temperature=1.0, seed=3, n=2,
                                                     logprobs=0, ignore_eos=True))}
    events = run(engine, reqs, admit_at={"s": 2})
    for rid, (prompt, _) in reqs.items():
        p_ids = ids_of(engine, prompt)
        for idx in {e.index for e in events[rid]}:
            evs = [e for e in events[rid] if e.index == idx]
            c = final(evs)
            assert "".join(e.text for e in evs) == c.text
            assert [t for e in evs for t in e.token_ids] == c.token_ids
            assert [x for e in evs if e.logprobs for x in e.logprobs] == c.logprobs
            assert c.logprobs == pytest.approx(teacher_forced(engine, p_ids, c.token_ids), abs=1e-4)
            assert evs[-1].usage == {"prompt_tokens": len(p_ids), "completion_tokens": c.num_tokens}
    top = final(events["g"]).top_logprobs
    assert all(len(alts) == 3 and alts[0][1] >= alts[-1][1] for alts in top)
    # greedy: the chosen token is the most likely one
    assert [alts[0][0] for alts in top] == final(events["g"]).token_ids


def test_stop_strings_are_never_streamed(engine):
    text = solo(engine, "Water", max_new_tokens=16, **GREEDY).text
    needle = text.strip()[3:6]
    events = run(engine, {"x": ("Water", SamplingConfig(max_new_tokens=16, stop=[needle], **GREEDY))})["x"]
    streamed = "".join(e.text for e in events)
    assert needle not in streamed and streamed == final(events).text and final(events).stop_reason == needle


def test_abort_frees_the_row_and_spares_the_others(engine):
    reqs = {"keep": ("Water", SamplingConfig(max_new_tokens=12, **GREEDY)),
            "drop": ("The river", SamplingConfig(max_new_tokens=200, **GREEDY)),
            "queued": ("In", SamplingConfig(max_new_tokens=5, **GREEDY))}
    events = run(engine, reqs, admit_at={"queued": 4}, abort_at={"drop": 5, "queued": 4})
    assert final(events["drop"]).finish_reason == "abort" and final(events["drop"]).num_tokens < 10
    assert final(events["queued"]).finish_reason == "abort"
    assert final(events["keep"]).token_ids == solo(engine, "Water", max_new_tokens=12, **GREEDY).token_ids
    assert not engine.has_unfinished() and engine.running() == 0
    assert engine.abort("drop") is False


class Explodes(DecodePolicy):
    """A decode policy with a bug that shows after a few tokens (or at admission)."""

    def __init__(self, at: int):
        self.at = at

    def start(self, row, engine):
        if self.at < 0:
            raise RuntimeError("bad start")

    def after_token(self, row, token, engine):
        if row.n_generated == self.at:
            raise RuntimeError("policy bug")
        return super().after_token(row, token, engine)


@pytest.mark.parametrize("at", [3, -1])
def test_a_failing_request_fails_alone(engine, at):
    good = {f"ok{i}": (p, SamplingConfig(max_new_tokens=8, **GREEDY)) for i, p in enumerate(["Water", "In the", "A"])}
    events = {rid: [] for rid in good}
    for rid, (p, s) in good.items():
        engine.add_request(rid, p, s, on_event=events[rid].append)
    bad = []
    engine.add_request("bad", "The river", SamplingConfig(max_new_tokens=8, **GREEDY), on_event=bad.append,
                       policy=Explodes(at))
    while engine.has_unfinished():
        engine.step()
    c = final(bad)
    assert c.finish_reason == "error" and ("bad start" in c.error or "policy bug" in c.error)
    for rid, (p, s) in good.items():
        assert final(events[rid]).token_ids == solo(engine, p, max_new_tokens=8, **GREEDY).token_ids


def test_bad_requests_are_refused_before_they_run(engine):
    with pytest.raises(RequestError, match="vocabulary"):
        engine.add_request("x", "Water", SamplingConfig(stop_token_ids=[10**9]))
    with pytest.raises(RequestError, match="integers"):
        engine.add_request("y", [1, 2, engine.vocab_size], SamplingConfig())
    with pytest.raises(RequestError, match="positions"):
        engine.add_request("z", "Water", SamplingConfig(max_new_tokens=10**6))
    big = solo(engine, "Water", max_new_tokens=3, temperature=1.0, seed=10**14, ignore_eos=True)
    assert big.num_tokens == 3
    assert not engine.has_unfinished()


def test_update_weights_switches_outputs_to_the_new_model(tiny_lm_dir, tmp_path):
    from selftaught.models import build_model

    eng = create_engine(EngineConfig(backend="transformers", model=str(tiny_lm_dir)))
    other = build_model("nano", eng.tokenizer, seed=123)
    ref = create_engine(EngineConfig(backend="transformers", model=str(tiny_lm_dir)), model=other,
                        tokenizer=eng.tokenizer)
    params = SamplingConfig(max_new_tokens=10, temperature=1.0, seed=5, logprobs=0, ignore_eos=True)

    def same(a, b):
        return all(x.completions[0].token_ids == y.completions[0].token_ids
                   and x.completions[0].logprobs == pytest.approx(y.completions[0].logprobs, abs=1e-5)
                   for x, y in zip(a, b))

    before = eng.generate(["Water", "The river"], params)
    want = ref.generate(["Water", "The river"], params)
    assert not same(before, want)
    # a request in flight keeps running across the update
    events = []
    eng.add_request("live", "In", SamplingConfig(max_new_tokens=6, **GREEDY), on_event=events.append)
    eng.step()
    info = eng.update_weights({k: v.clone() for k, v in other.state_dict().items()})
    while eng.has_unfinished():
        eng.step()
    assert final(events).num_tokens == 6
    assert info["version"] == 1 and info["tensors"] > 0 and info["seconds"] >= 0
    after = eng.generate(["Water", "The river"], params)
    assert same(after, want)
    # from a checkpoint directory, back to the original weights
    orig = build_model("nano", eng.tokenizer, seed=0)
    orig.save_pretrained(tmp_path / "ck")
    eng.update_weights(tmp_path / "ck")
    again = eng.generate(["Water", "The river"], params)
    assert same(again, before)
    with pytest.raises(ValueError, match="missing"):
        eng.update_weights({"model.norm.weight": other.state_dict()["model.norm.weight"]})
    eng.update_weights({"model.norm.weight": other.state_dict()["model.norm.weight"]}, strict=False)
    with pytest.raises(ValueError, match="shape"):
        eng.update_weights({"model.norm.weight": torch.zeros(3)}, strict=False)
    with pytest.raises(ValueError, match="not in the model"):
        eng.update_weights({"nope": torch.zeros(3)}, strict=False)


def test_json_schema_output_parses_for_100_sampled_requests(engine):
    """Sampled at temperature 1 from an untrained model, every answer is JSON that fits."""
    import json

    import jsonschema

    from selftaught.config import StructuredOutput

    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8}, "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"}}, "required": ["name", "count", "tags", "ok"]}
    fmt = StructuredOutput(type="json_schema", json_schema=schema)
    params = [SamplingConfig(temperature=1.0, seed=i, max_new_tokens=96, response_format=fmt) for i in range(100)]
    outs = engine.generate(["Describe an item as JSON:"] * 100, params)
    for o in outs:
        c = o.completions[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), schema)
    choice = engine.generate(["Pick:"], SamplingConfig(temperature=1.0, seed=3, n=8, max_new_tokens=8,
                                                       response_format=StructuredOutput(type="choice",
                                                                                        choice=["red", "green"])))
    assert {c.text for c in choice[0].completions} <= {"red", "green"}
    with pytest.raises(RequestError, match="response_format"):
        engine.add_request("bad-regex", "x", SamplingConfig(response_format=StructuredOutput(type="regex", regex="(")))


def test_bans_that_empty_a_row_are_lifted_for_that_row_only(engine):
    """Bans are applied to the whole batch at once; a row whose bans leave it nothing to pick
    gets them lifted (it takes its best banned token) while the rows beside it keep theirs."""
    import torch

    from actors.engine.base import DecodePolicy
    from actors.engine.hf import _Row

    rows = [_Row(params=SamplingConfig(temperature=0), prompt_len=1, policy=DecodePolicy()) for _ in range(3)]
    vocab = 16
    logits = torch.arange(vocab, dtype=torch.float32).repeat(3, 1)  # every row's best is the last token
    logits[1] = float("-inf")
    logits[1, 3], logits[1, 5] = 1.0, 2.0  # the model itself allows only 3 and 5 in row 1
    rows[0].banned, rows[1].banned = {15, 14}, {3, 5}
    assert engine._choose(logits, rows, []) == [13, 5, 15]
    assert not rows[0].banned and not rows[1].banned  # bans last one step
