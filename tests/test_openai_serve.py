"""The OpenAI-compatible Serve app, called through the official ``openai`` client, litellm and
raw HTTP: answers, streaming, budget forcing, auth and validation errors."""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from selftaught.config import BudgetConfig, EngineConfig, SamplingConfig
from serve import openai_protocol as proto
from serve.config import ServeConfig
from tests.conftest import free_port

KEYS_ENV = "SELFTAUGHT_TEST_SERVE_KEYS"
MODEL = "tiny-reasoner"
BUDGET = {"min_thinking_tokens": 6, "max_thinking_tokens": 6, "extension": "", "max_answer_tokens": 5}


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_lm_dir):
    from ray import serve

    from serve.openai_app import base_url, run_openai_app

    os.environ[KEYS_ENV] = "key-one, key-two"
    cfg = ServeConfig(engine=EngineConfig(model=str(tiny_lm_dir), backend="transformers", device="cpu",
                                          cpus_per_actor=0.5, max_model_len=128, max_batch_size=8),
                      served_model_name=MODEL, api_key_env=KEYS_ENV, port=free_port(), app_name="openai-test",
                      max_tokens_limit=100, max_n=4, default_max_tokens=12)
    run_openai_app(cfg)
    try:
        yield base_url(cfg)
    finally:
        serve.delete(cfg.app_name)
        serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server, api_key="key-two", max_retries=0, timeout=60)


def _post(url: str, body, key: str | None = "key-one", raw: bool = False):
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = body if raw else json.dumps(body)
    return httpx.post(url, content=data, headers={**headers, "Content-Type": "application/json"}, timeout=60)


MSG = [{"role": "user", "content": "What is 2 + 3?"}]


def test_models_and_health(server, client):
    import httpx

    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(server.removesuffix("/v1") + "/health", timeout=30)  # open without a key
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_chat_completion_through_openai_client(client):
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=7, temperature=0)
    c = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL
    assert isinstance(c.message.content, str) and c.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 7 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=7, temperature=0)
    assert again.choices[0].message.content == c.message.content  # greedy is deterministic


def test_completions_several_prompts_and_samples(client):
    r = client.completions.create(model=MODEL, prompt=["The capital", "Once upon"], n=2, max_tokens=4,
                                  temperature=1.0, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert 4 <= r.usage.completion_tokens <= 16  # four samples of 1..4 tokens each
    assert len({c.text for c in r.choices}) > 1  # sampled, with distinct per-sample seeds


def test_budget_forcing_as_extra_body(client):
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=40, temperature=0,
                                       extra_body={"budget_forcing": BUDGET})
    c = r.choices[0]
    budget = c.model_extra["budget"]
    assert budget["thinking_tokens"] == 6 and budget["capped"]
    assert budget["answer_tokens"] <= 5
    assert "reasoning_content" in c.message.model_extra
    assert r.usage.completion_tokens_details.reasoning_tokens == 6
    assert r.usage.completion_tokens == 6 + budget["control_tokens"] + budget["answer_tokens"]


def test_streaming_matches_the_whole_answer(client):
    kw = dict(model=MODEL, messages=MSG, max_tokens=30, temperature=0, extra_body={"budget_forcing": BUDGET})
    whole = client.chat.completions.create(**kw).choices[0].message
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    reasoning = "".join((ch.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for ch in chunks if ch.choices)
    assert content == whole.content and reasoning == whole.model_extra["reasoning_content"]
    assert len([ch for ch in chunks if ch.choices]) > 3  # token by token, not one blob
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 6
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1


def test_streaming_completions(client):
    whole = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8, temperature=0)
    parts = list(client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8, temperature=0,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text


def test_litellm_and_llm_client_work_unchanged(server):
    import litellm

    from selftaught.llm import LLMClient, LLMConfig

    r = litellm.completion(model=f"openai/{MODEL}", api_base=server, api_key="key-one", messages=MSG,
                           max_tokens=5, temperature=0)
    assert isinstance(r.choices[0].message.content, str) and r.usage.completion_tokens <= 5
    streamed = litellm.completion(model=f"openai/{MODEL}", api_base=server, api_key="key-one", messages=MSG,
                                  max_tokens=5, temperature=0, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in streamed)
    assert text == r.choices[0].message.content
    os.environ["SELFTAUGHT_TEST_ONE_KEY"] = "key-one"
    llm = LLMClient(LLMConfig(model=f"openai/{MODEL}", api_base=server, api_key_env="SELFTAUGHT_TEST_ONE_KEY",
                              max_retries=0))
    res = llm.complete("What is 2 + 3?", sampling=SamplingConfig(
        temperature=0, max_new_tokens=30, budget=BudgetConfig(**BUDGET)))
    assert res.completion_tokens >= 6 + 1  # the forced thinking, the delimiter, an answer


def test_concurrent_requests_are_batched_without_errors(client):
    def one(i: int) -> int:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Count {i}"}],
                                           max_tokens=5, temperature=0)
        return r.usage.completion_tokens

    with ThreadPoolExecutor(8) as pool:
        assert all(1 <= t <= 5 for t in pool.map(one, range(8)))


def test_auth_errors(server, client):
    import openai

    bad = openai.OpenAI(base_url=server, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2)
    r = _post(server + "/chat/completions", {"model": MODEL, "messages": MSG}, key=None)
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]


@pytest.mark.parametrize("body,status,needle", [
    ("{not json", 400, "not valid JSON"),
    ([1, 2], 400, "JSON object"),
    ({"model": MODEL}, 400, "messages"),
    ({"model": "gpt-9", "messages": MSG}, 404, "does not exist"),
    ({"model": MODEL, "messages": MSG, "budget_forcing": {"max_thinking_tokens": -5}}, 400,
     "max_thinking_tokens"),
    ({"model": MODEL, "messages": MSG, "budget_forcing": {"max_thinking_tokens": 10 ** 9}}, 400, "limit"),
    ({"model": MODEL, "messages": MSG, "budget_forcing": {"min_thinking_tokens": 9, "max_thinking_tokens": 3}},
     400, "exceeds"),
    ({"model": MODEL, "messages": MSG, "budget_forcing": {"max_thinking_tokns": 3}}, 400, "max_thinking_tokns"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 400}]}, 400, "context"),
    ({"model": MODEL, "messages": MSG, "max_tokens": 5000}, 400, "max_tokens"),
    ({"model": MODEL, "messages": MSG, "n": 50}, 400, "n=50"),
    ({"model": MODEL, "messages": MSG, "tools": [{"type": "function"}]}, 400, "tools"),
    ({"model": MODEL, "messages": MSG, "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"model": MODEL, "messages": MSG, "stop_token_ids": [999999999]}, 400, "vocabulary"),
    ({"model": MODEL, "messages": MSG, "stop_token_ids": [-1]}, 400, "vocabulary"),
    ({"model": MODEL, "messages": MSG, "seed": 2 ** 70}, 400, "seed"),
    ({"model": MODEL, "messages": MSG, "stop": ["x" * 300]}, 400, "stop sequence"),
    ({"model": MODEL, "messages": MSG, "budget_forcing": {"extension": "Wait" * 100, "num_extensions": 1}}, 400,
     "extension"),
    ({"model": MODEL, "messages": MSG, "user": "u" * (9 * 2 ** 20)}, 413, "exceeds"),
    ({"model": MODEL, "messages": MSG, "seed": 10 ** 14, "stop_token_ids": [999999999], "min_tokens": 2}, 400,
     "vocabulary"),
])
def test_validation_errors_are_4xx_with_a_reason(server, body, status, needle):
    r = _post(server + "/chat/completions", body, raw=isinstance(body, str))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle.lower() in err["message"].lower(), err


def test_unknown_routes_have_openai_shape(server):
    import httpx

    r = httpx.get(server + "/no/such/route", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.delete(server + "/chat/completions", timeout=30)
    assert r.status_code == 405 and "error" in r.json()


def test_large_seeds_are_served(client):
    """Any int64 seed is a valid request (it used to overflow the sampler's generator: a 500)."""
    for seed in (10 ** 14, -(2 ** 63), 2 ** 63 - 1):
        r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=3, seed=seed,
                                           extra_body={"min_tokens": 2})
        assert r.choices[0].finish_reason in ("stop", "length")


def test_bad_requests_fail_alone_among_concurrent_good_ones(server, client):
    """Bad requests sent between good ones get their own 4xx; every good one answers exactly
    as it does alone (greedy), whatever shared the engine's batch with it."""
    good = [f"Count to {i}" for i in range(6)]

    def ask(q):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                           max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        return r.choices[0].message.content

    alone = [ask(q) for q in good]
    bad = [{"model": MODEL, "messages": MSG, "stop_token_ids": [999999999]},
           {"model": MODEL, "messages": MSG, "guided_regex": "(unclosed"},
           {"model": MODEL, "messages": MSG, "guided_json": {"type": "nonsense-type"}},
           {"model": MODEL, "prompt": [[1, 2], [10 ** 7]]}]
    with ThreadPoolExecutor(10) as pool:
        futs = [pool.submit(ask, q) for q in good]
        bads = [pool.submit(_post, server + ("/completions" if "prompt" in b else "/chat/completions"), b)
                for b in bad]
        assert [f.result() for f in futs] == alone
        assert [f.result().status_code for f in bads] == [400] * len(bad)


def test_disconnected_stream_frees_its_row(server):
    """A client that stops reading a stream has its request aborted in the engine."""
    import time

    import httpx

    health = server.removesuffix("/v1") + "/health"
    before = httpx.get(health, timeout=30).json()["engine"]["aborted"]
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 100, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", server + "/completions", json=body, timeout=60,
                      headers={"Authorization": "Bearer key-one"}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(x.startswith("data:") for x in got)
    deadline = time.time() + 30
    while time.time() < deadline:
        h = httpx.get(health, timeout=30).json()
        if h["engine"]["aborted"] > before and h["engine"]["running_rows"] == 0:
            break
        time.sleep(0.2)
    assert h["engine"]["aborted"] > before and h["engine"]["running_rows"] == 0
    assert h["requests"]["cancelled"] >= 1


def test_logprobs_and_structured_output(client):
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens == 5
    assert "".join(x.token for x in lp) == r.choices[0].message.content
    assert all(len(x.top_logprobs) == 2 and x.logprob <= 0 for x in lp)
    assert [x.top_logprobs[0].token for x in lp] == [x.token for x in lp]  # greedy: the top choice
    c = client.completions.create(model=MODEL, prompt="Water", max_tokens=4, temperature=0, logprobs=1,
                                  extra_body={"ignore_eos": True})
    assert len(c.choices[0].logprobs.token_logprobs) == 4 and "".join(c.choices[0].logprobs.tokens) == c.choices[0].text
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}, "unit": {"enum": ["cm", "m"]}},
              "required": ["answer", "unit"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=MODEL, messages=MSG, max_tokens=60, temperature=1.0, seed=1, n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    for ch in r.choices:
        if ch.finish_reason == "stop":
            obj = json.loads(ch.message.content)
            assert set(obj) == {"answer", "unit"} and obj["unit"] in ("cm", "m")
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=10, temperature=1.0,
                                       extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no")


def test_oversize_prompt_has_openai_code(server, client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="word " * 400, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    r = _post(server + "/completions", {"model": MODEL, "prompt": [[1, 2], [10 ** 7]]})
    assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]


# ---------------------------------------------------------------------- protocol, no server
def test_default_token_limit_covers_a_budget():
    limits = proto.Limits(max_model_len=1000, default_max_tokens=50, max_tokens_limit=500, max_n=2)
    req = proto.parse(proto.ChatCompletionRequest, {"model": "m", "messages": MSG})
    budget = BudgetConfig(max_thinking_tokens=200, max_answer_tokens=30)
    assert proto.sampling_for(req, limits, 10, budget, control_tokens=4).max_new_tokens == 234
    assert proto.sampling_for(req, limits, 10, None).max_new_tokens == 50
    assert proto.sampling_for(req, limits, 980, None).max_new_tokens == 20  # what the context leaves


@pytest.mark.parametrize("name", ["serve.yaml", "serve-cluster.yaml"])
def test_example_serve_configs_validate(name):
    from pathlib import Path

    from selftaught.config import resolve
    from serve.config import ServeAppConfig

    cfg = resolve(ServeAppConfig, Path(__file__).resolve().parents[1] / "examples" / "s1" / name)
    opts = cfg.serve.deployment_options()
    if name == "serve-cluster.yaml":
        assert opts["autoscaling_config"]["max_replicas"] == 16 and opts["ray_actor_options"]["num_gpus"] == 1
        assert cfg.serve.default_budget.max_thinking_tokens == 8192
    else:
        assert opts["num_replicas"] == 1
