"""The litellm client: accounting, retries, concurrency bounds, and real HTTP round trips
against a small OpenAI-compatible server run in-process (litellm's own transport, no fakes)."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import litellm
import pydantic
import pytest

from selftaught.config import SamplingConfig
from selftaught.ledger import BudgetCaps, BudgetExceeded, Ledger
from selftaught.llm import (LLMClient, LLMConfig, LLMError, LLMResult, cache_key, is_retryable, is_sampled,
                            sampling_kwargs)

FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05}


# ---------------------------------------------------------------- offline (mock_response)
def test_mock_response_accounting_and_call_log(tmp_path):
    log = tmp_path / "logs" / "calls.jsonl"
    client = LLMClient(LLMConfig(model="gpt-4o-mini", mock_response="Paris.", call_log=str(log)))
    r = client.complete("What is the capital of France?")
    assert r.text == "Paris." and r.attempts == 1 and r.finish_reason == "stop"
    assert r.prompt_tokens > 0 and r.completion_tokens > 0 and r.total_tokens == r.prompt_tokens + r.completion_tokens
    assert r.cost_known and r.cost_usd > 0  # gpt-4o-mini is in litellm's bundled price map
    r2 = client.complete([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "again"}])
    snap = client.usage.snapshot()
    assert snap["calls"] == 2 and snap["errors"] == 0 and snap["retries"] == 0 and snap["uncosted_calls"] == 0
    assert snap["prompt_tokens"] == r.prompt_tokens + r2.prompt_tokens
    assert snap["total_tokens"] == r.total_tokens + r2.total_tokens
    assert snap["cost_usd"] == pytest.approx(r.cost_usd + r2.cost_usd)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == 2
    assert {"model", "prompt_tokens", "completion_tokens", "cost_usd", "latency_s", "attempts", "error"} <= set(lines[0])
    assert lines[0]["prompt_tokens"] == r.prompt_tokens and lines[0]["error"] is None
    assert lines[1]["cost_usd"] == pytest.approx(r2.cost_usd) and lines[1]["attempts"] == 1


def test_price_override_and_unknown_models():
    priced = LLMClient(LLMConfig(model="openai/my-local-model", mock_response="ok", input_price_per_mtok=1.0,
                                 output_price_per_mtok=2.0))
    r = priced.complete("hi")
    assert r.cost_known and r.cost_usd == pytest.approx((r.prompt_tokens + 2 * r.completion_tokens) / 1e6)
    unknown = LLMClient(LLMConfig(model="openai/my-local-model", mock_response="ok"))
    r = unknown.complete("hi")
    assert not r.cost_known and r.cost_usd == 0.0 and r.prompt_tokens > 0
    assert unknown.usage.snapshot()["uncosted_calls"] == 1


def test_config_validation():
    with pytest.raises(pydantic.ValidationError, match="NAME of an environment variable"):
        LLMConfig(api_key_env="sk-proj-abc123")
    with pytest.raises(pydantic.ValidationError):
        LLMConfig(modle="gpt-4o-mini")  # typos are errors
    with pytest.raises(pydantic.ValidationError):
        LLMConfig(backoff_initial_s=5, backoff_max_s=1)
    with pytest.raises(pydantic.ValidationError):
        LLMClient(LLMConfig(), max_concurrency=0)  # constructor overrides are validated too
    assert LLMClient(LLMConfig(), max_concurrency=3).cfg.max_concurrency == 3


def test_sampling_config_mapping():
    s = SamplingConfig(temperature=0.2, top_p=0.9, top_k=20, max_new_tokens=64, stop=["\n\n"], seed=3,
                       min_new_tokens=4)
    kw = sampling_kwargs(s)
    assert kw == {"temperature": 0.2, "max_tokens": 64, "top_p": 0.9, "stop": ["\n\n"], "seed": 3,
                  "extra_body": {"top_k": 20, "min_tokens": 4}}
    assert "extra_body" not in sampling_kwargs(SamplingConfig()) and "top_p" not in sampling_kwargs(SamplingConfig())
    with pytest.raises(ValueError, match="n separate calls"):
        sampling_kwargs(SamplingConfig(n=2))


# ---------------------------------------------------------------- retries
def _flaky(monkeypatch, failures: int, exc: BaseException, name: str = "completion") -> dict:
    """Make the first `failures` calls of litellm.<name> raise `exc`, then answer for real."""
    real = getattr(litellm, name)
    calls = {"n": 0}
    if name == "completion":
        def fake(**kw):
            calls["n"] += 1
            if calls["n"] <= failures:
                raise exc
            return real(**kw)
    else:
        async def fake(**kw):
            calls["n"] += 1
            if calls["n"] <= failures:
                raise exc
            return await real(**kw)
    monkeypatch.setattr(litellm, name, fake)
    return calls


def _record_backoff(client: LLMClient) -> list[float]:
    delays: list[float] = []
    real = client._backoff

    def rec(attempt, e):
        delays.append(real(attempt, e))
        return delays[-1]

    client._backoff = rec  # type: ignore[method-assign]
    return delays


def test_retries_transient_errors_with_backoff(monkeypatch):
    err = litellm.exceptions.RateLimitError("slow down", llm_provider="openai", model="gpt-4o-mini")
    calls = _flaky(monkeypatch, 2, err)
    client = LLMClient(LLMConfig(model="gpt-4o-mini", mock_response="ok", max_retries=3, backoff_jitter=0.5,
                                 backoff_initial_s=0.02, backoff_max_s=1.0))
    delays = _record_backoff(client)
    t0 = time.perf_counter()
    r = client.complete("hi")
    assert r.text == "ok" and r.attempts == 3 and calls["n"] == 3
    assert 0.01 <= delays[0] <= 0.02 and 0.02 <= delays[1] <= 0.04  # doubling, jitter takes up to half off
    assert time.perf_counter() - t0 >= sum(delays) and r.latency_s >= sum(delays)
    assert client.usage.snapshot()["retries"] == 2 and client.usage.snapshot()["errors"] == 0


def test_backoff_schedule_is_capped():
    client = LLMClient(LLMConfig(backoff_initial_s=0.5, backoff_max_s=3.0, backoff_jitter=0.0))
    e = RuntimeError("x")
    assert [client._backoff(a, e) for a in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert is_retryable(litellm.exceptions.Timeout("t", model="m", llm_provider="openai"))
    assert not is_retryable(litellm.exceptions.AuthenticationError("no", llm_provider="openai", model="m"))
    assert not is_retryable(ValueError("a bug, not a transient failure"))


def test_gives_up_after_last_attempt_and_never_retries_client_errors(monkeypatch, tmp_path):
    log = tmp_path / "calls.jsonl"
    timeout = litellm.exceptions.Timeout("timed out", model="gpt-4o-mini", llm_provider="openai")
    calls = _flaky(monkeypatch, 10, timeout)
    client = LLMClient(LLMConfig(model="gpt-4o-mini", mock_response="ok", max_retries=2, call_log=str(log), **FAST))
    with pytest.raises(LLMError, match="gave up after 3 attempts") as info:
        client.complete("hi")
    assert info.value.attempts == 3 and info.value.retryable and calls["n"] == 3
    assert isinstance(info.value.cause, litellm.exceptions.Timeout) and "Timeout" in info.value.reason

    for bad in (litellm.exceptions.BadRequestError("bad", model="gpt-4o-mini", llm_provider="openai"),
                litellm.exceptions.AuthenticationError("no key", llm_provider="openai", model="gpt-4o-mini")):
        calls = _flaky(monkeypatch, 10, bad)
        t0 = time.perf_counter()
        with pytest.raises(LLMError, match="not retryable") as info:
            client.complete("hi")
        assert calls["n"] == 1 and info.value.attempts == 1 and not info.value.retryable
        assert time.perf_counter() - t0 < 0.5
    snap = client.usage.snapshot()
    assert snap["calls"] == 3 and snap["errors"] == 3 and snap["retries"] == 2
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["attempts"] for x in lines] == [3, 1, 1] and all(x["error"] for x in lines)
    assert "Timeout" in lines[0]["error"] and "BadRequestError" in lines[1]["error"]


def test_complete_many_returns_or_raises_item_errors(monkeypatch):
    real = litellm.completion

    def picky(**kw):
        if "bad" in kw["messages"][-1]["content"]:
            raise litellm.exceptions.BadRequestError("refused", model=kw["model"], llm_provider="openai")
        return real(**kw)

    monkeypatch.setattr(litellm, "completion", picky)
    client = LLMClient(LLMConfig(model="gpt-4o-mini", mock_response="ok", max_concurrency=2))
    out = client.complete_many(["a", "bad 1", "b", "bad 2"], return_exceptions=True)
    assert [type(o).__name__ for o in out] == ["LLMResult", "LLMError", "LLMResult", "LLMError"]
    with pytest.raises(LLMError, match="refused"):
        client.complete_many(["a", "bad"])
    assert client.complete_many([]) == []


# ---------------------------------------------------------------- concurrency
def test_concurrency_is_bounded_across_threads_and_order_kept(monkeypatch):
    real = litellm.completion
    state = {"now": 0, "peak": 0}
    lock = threading.Lock()

    def slow(**kw):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.03)
        with lock:
            state["now"] -= 1
        return real(**{**kw, "mock_response": kw["messages"][-1]["content"].upper()})

    monkeypatch.setattr(litellm, "completion", slow)
    client = LLMClient(LLMConfig(model="gpt-4o-mini", mock_response="x", max_concurrency=3))
    prompts = [f"p{i}" for i in range(12)]
    out = client.complete_many(prompts)
    assert [o.text for o in out] == [p.upper() for p in prompts]
    assert state["peak"] == 3

    # two batches from two threads share the client's bound
    state["peak"] = 0
    results: dict[int, list] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, client.complete_many(prompts)))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state["peak"] == 3 and all([o.text for o in results[i]] == [p.upper() for p in prompts] for i in (0, 1))
    assert client.usage.snapshot()["calls"] == 36


def test_async_bounded_ordered_and_retried(monkeypatch):
    real = litellm.acompletion
    state = {"now": 0, "peak": 0}

    async def slow(**kw):
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.02)
        state["now"] -= 1
        return await real(**{**kw, "mock_response": kw["messages"][-1]["content"][::-1]})

    monkeypatch.setattr(litellm, "acompletion", slow)
    client = LLMClient(LLMConfig(model="gpt-4o-mini", mock_response="x", max_concurrency=2))
    prompts = [f"ab{i}" for i in range(8)]
    out = asyncio.run(client.acomplete_many(prompts))
    assert [o.text for o in out] == [p[::-1] for p in prompts] and state["peak"] == 2
    out = asyncio.run(client.acomplete_many(prompts[:3]))  # a fresh event loop gets its own bound
    assert len(out) == 3 and client.usage.snapshot()["calls"] == 11

    monkeypatch.setattr(litellm, "acompletion", real)
    err = litellm.exceptions.ServiceUnavailableError("busy", llm_provider="openai", model="gpt-4o-mini")
    calls = _flaky(monkeypatch, 1, err, name="acompletion")
    flaky = LLMClient(LLMConfig(model="gpt-4o-mini", mock_response="ok", **FAST))
    r = asyncio.run(flaky.acomplete("hi"))
    assert r.text == "ok" and r.attempts == 2 and calls["n"] == 2

    bad = litellm.exceptions.BadRequestError("bad", model="gpt-4o-mini", llm_provider="openai")
    _flaky(monkeypatch, 1, bad, name="acompletion")
    out = asyncio.run(flaky.acomplete_many(["x", "y"], return_exceptions=True))
    assert isinstance(out[0], LLMError) and out[1].text == "ok"


# ---------------------------------------------------------------- real HTTP (litellm's transport)
class _Handler(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible /v1/chat/completions: answers with the reversed last message.
    `server.script` holds actions consumed one per request before the normal answer:
    ("status", code, headers) or ("sleep", seconds)."""

    server: Any

    def _send(self, code: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        with srv.lock:
            srv.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            action = srv.script.pop(0) if srv.script else None
        if not self.path.endswith("/chat/completions"):
            return self._send(404, {"error": {"message": "no such route"}})
        if action and action[0] == "status":
            return self._send(action[1], {"error": {"message": f"scripted {action[1]}", "type": "x"}}, action[2])
        if action and action[0] == "sleep":
            time.sleep(action[1])
        text = body["messages"][-1]["content"][::-1]
        payload = {"id": "c1", "object": "chat.completion", "created": 0, "model": srv.echo_model or body["model"],
                   "choices": [{"index": 0, "finish_reason": "length" if body.get("max_tokens") == 1 else "stop",
                                "message": {"role": "assistant", "content": text}}]}
        if not srv.omit_usage:
            payload["usage"] = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        self._send(200, payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.handle_error = lambda request, address: None  # clients that timed out hang up mid-answer
    srv.lock, srv.requests, srv.script, srv.echo_model, srv.omit_usage = threading.Lock(), [], [], None, False
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_http_round_trip_usage_and_cost(server, monkeypatch):
    client = LLMClient(LLMConfig(model="openai/local-test", api_base=server.base, max_retries=0, timeout_s=10))
    r = client.complete("abc", temperature=0.0)
    assert r.text == "cba" and (r.prompt_tokens, r.completion_tokens) == (7, 3) and r.model == "openai/local-test"
    assert not r.cost_known and r.cost_usd == 0.0
    sent = server.requests[-1]
    assert sent["path"] == "/v1/chat/completions" and sent["body"]["model"] == "local-test"
    assert sent["body"]["temperature"] == 0.0 and sent["body"]["max_tokens"] == 512
    assert sent["auth"] == "Bearer none"  # never a provider key picked up from the environment

    # a server naming a known model is still priced as the model asked for (unknown here)
    server.echo_model = "gpt-4o-mini"
    assert not client.complete("x").cost_known

    # usage missing from the response: counted locally
    server.omit_usage = True
    r = client.complete("hello world, how are you")
    assert r.prompt_tokens > 3 and r.completion_tokens > 0

    # the key comes from the named environment variable
    monkeypatch.setenv("SELFTAUGHT_TEST_KEY", "secret-123")
    keyed = LLMClient(LLMConfig(model="openai/local-test", api_base=server.base, api_key_env="SELFTAUGHT_TEST_KEY"))
    keyed.complete("k")
    assert server.requests[-1]["auth"] == "Bearer secret-123"
    missing = LLMClient(LLMConfig(model="openai/x", api_base=server.base, api_key_env="SELFTAUGHT_NO_SUCH_KEY"))
    with pytest.raises(LLMError, match="SELFTAUGHT_NO_SUCH_KEY"):
        missing.complete("hi")
    assert missing.usage.snapshot()["errors"] == 1


def test_http_sampling_config_reaches_server(server):
    client = LLMClient(LLMConfig(model="openai/local-test", api_base=server.base,
                                 extra={"extra_body": {"repetition_penalty": 1.1}}))
    s = SamplingConfig(temperature=0.3, top_k=5, max_new_tokens=1, stop=["END"], seed=11)
    r = client.complete("abc", sampling=s, extra_body={"min_p": 0.05})
    body = server.requests[-1]["body"]
    assert body["max_tokens"] == 1 and body["top_k"] == 5 and body["stop"] == ["END"] and body["seed"] == 11
    assert body["repetition_penalty"] == 1.1 and body["min_p"] == 0.05  # extra_body merged, not replaced
    assert body["temperature"] == 0.3 and r.finish_reason == "length"


def test_http_retries_5xx_429_and_timeouts_but_not_auth(server):
    client = LLMClient(LLMConfig(model="openai/local-test", api_base=server.base, max_retries=3, timeout_s=5, **FAST))
    server.script = [("status", 500, {}), ("status", 503, {})]
    r = client.complete("abc")
    assert r.text == "cba" and r.attempts == 3 and len(server.requests) == 3  # no hidden SDK retries

    # a server's Retry-After wins over the exponential schedule, still capped at backoff_max_s
    hinted = LLMClient(LLMConfig(model="openai/local-test", api_base=server.base, backoff_initial_s=0.01,
                                 backoff_max_s=0.3))
    delays = _record_backoff(hinted)
    server.script = [("status", 429, {"Retry-After": "0.2"}), ("status", 429, {"Retry-After": "60"})]
    t0 = time.perf_counter()
    assert hinted.complete("abc").attempts == 3 and time.perf_counter() - t0 >= 0.5
    assert delays == [0.2, 0.3]

    server.requests.clear()
    server.script = [("status", 401, {})]
    with pytest.raises(LLMError, match="not retryable") as info:
        client.complete("abc")
    assert len(server.requests) == 1 and isinstance(info.value.cause, litellm.exceptions.AuthenticationError)

    slow = LLMClient(LLMConfig(model="openai/local-test", api_base=server.base, max_retries=1, timeout_s=0.3, **FAST))
    server.script = [("sleep", 1.0)]
    r = slow.complete("abc")
    assert r.attempts == 2 and r.text == "cba"
    server.script = [("sleep", 1.0), ("sleep", 1.0)]
    with pytest.raises(LLMError, match="gave up after 2 attempts") as info:
        slow.complete("abc")
    assert info.value.retryable and slow.usage.snapshot()["retries"] == 2


def test_http_async_round_trip(server):
    client = LLMClient(LLMConfig(model="openai/local-test", api_base=server.base, max_concurrency=2, **FAST))
    server.script = [("status", 502, {})]
    out = asyncio.run(client.acomplete_many(["abc", "xyz", "123"]))
    assert [o.text for o in out] == ["cba", "zyx", "321"] and sum(o.attempts for o in out) == 4
    assert client.usage.snapshot()["prompt_tokens"] == 21


class _Throttled(Exception):
    """A 429 carrying a Retry-After header, as litellm's errors keep them."""

    status_code = 429

    def __init__(self, retry_after: str):
        super().__init__("throttled")
        self.headers = {"retry-after": retry_after}


def test_sync_and_async_calls_share_one_retry_policy(monkeypatch):
    """The same schedule, predicate and give-up rule for complete() and acomplete()."""
    outcomes = {}
    for name in ("completion", "acompletion"):
        calls = _flaky(monkeypatch, 10, _Throttled("0.03"), name=name)
        client = LLMClient(LLMConfig(model="gpt-4o-mini", mock_response="ok", max_retries=2,
                                     backoff_initial_s=0.01, backoff_max_s=0.02))
        delays = _record_backoff(client)
        call = client.complete if name == "completion" else (lambda p: asyncio.run(client.acomplete(p)))
        with pytest.raises(LLMError, match="gave up after 3 attempts") as info:
            call("hi")
        # Retry-After honoured (capped at backoff_max_s), then the last error raised as LLMError
        outcomes[name] = (calls["n"], delays, info.value.attempts, info.value.retryable,
                          client.usage.snapshot()["retries"], client.usage.snapshot()["errors"])
        calls = _flaky(monkeypatch, 10, ValueError("a bug"), name=name)
        with pytest.raises(LLMError, match="not retryable") as info:
            call("hi")
        assert calls["n"] == 1 and info.value.attempts == 1 and isinstance(info.value.cause, ValueError)
    assert outcomes["completion"] == outcomes["acompletion"] == (3, [0.02, 0.02], 3, True, 2, 1)


# ---------------------------------------------------------------- cache and cost caps
# $1 per token both ways: litellm's mock answers report 10 prompt + 20 completion tokens, so a
# call costs exactly $30 and its reservation is ~ceil(counted prompt x 1.2) + max_tokens.
DOLLAR = {"input_price_per_mtok": 1e6, "output_price_per_mtok": 1e6}


def _mock_cfg(tmp_path, **kw) -> LLMConfig:
    return LLMConfig(**{"model": "openai/local-test", "mock_response": "ok", "max_tokens": 20, **DOLLAR,
                        "cache": str(tmp_path / "llm_cache.sqlite"), **kw})


def _counting(monkeypatch, name: str = "completion", delay: float = 0.0) -> dict:
    """Count requests that reach litellm.<name> (optionally slowed down)."""
    real = getattr(litellm, name)
    calls = {"n": 0}
    lock = threading.Lock()
    if name == "completion":
        def fake(**kw):
            with lock:
                calls["n"] += 1
            time.sleep(delay)
            return real(**kw)
    else:
        async def fake(**kw):
            calls["n"] += 1
            await asyncio.sleep(delay)
            return await real(**kw)
    monkeypatch.setattr(litellm, name, fake)
    return calls


def test_cache_key_covers_the_request_but_not_the_key():
    base = {"model": "openai/m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.0,
            "max_tokens": 5, "api_base": "http://h/v1", "api_key": "secret-1", "timeout": 60, "num_retries": 0}
    k = cache_key(base)
    assert k == cache_key({**base, "api_key": "other", "timeout": 5})  # not what decides the answer
    assert len({k, *(cache_key({**base, **change}) for change in (
        {"seed": 1}, {"temperature": 0.5}, {"max_tokens": 6}, {"n": 2}, {"model": "openai/m2"},
        {"api_base": "http://other/v1"}, {"messages": [{"role": "user", "content": "hi!"}]},
        {"response_format": {"type": "json_object"}}, {"extra_body": {"top_k": 5}}, {"stop": ["x"]}))}) == 11
    assert cache_key({**base, "seed": 1}) != cache_key({**base, "seed": 2})
    # tags tell apart draws of a sampled request only
    assert cache_key(base, tag=1) == k
    sampled = {**base, "temperature": 0.7}
    assert cache_key(sampled, tag=1) != cache_key(sampled) and cache_key({**sampled, "seed": 3}, tag=1) == \
        cache_key({**sampled, "seed": 3})
    assert is_sampled(sampled) and not is_sampled(base) and not is_sampled({**sampled, "seed": 0})
    hdr = {**base, "extra_headers": {"Authorization": "Bearer a", "anthropic-beta": "x"}}
    assert cache_key(hdr) == cache_key({**hdr, "extra_headers": {"Authorization": "Bearer b", "anthropic-beta": "x"}})


def test_cache_hit_costs_nothing_and_is_recorded(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    ledger = Ledger.for_run(tmp_path / "run")
    log = tmp_path / "calls.jsonl"
    client = LLMClient(_mock_cfg(tmp_path, call_log=str(log)), ledger=ledger, role="ideator")
    first = client.complete("propose an idea", temperature=0.7)  # sampled, still cached by request
    second = client.complete("propose an idea", temperature=0.7)
    assert calls["n"] == 1 and not first.cached and second.cached
    assert (second.text, second.finish_reason, second.prompt_tokens, second.completion_tokens, second.cost_usd) == \
        (first.text, first.finish_reason, first.prompt_tokens, first.completion_tokens, first.cost_usd) == \
        ("ok", "stop", 10, 20, pytest.approx(30.0))
    assert second.attempts == 0 and second.spent_usd == 0.0 and first.spent_usd == pytest.approx(30.0)
    u = client.usage.snapshot()
    assert u["calls"] == 1 and u["cost_usd"] == pytest.approx(30.0) and u["cache_hits"] == 1
    assert u["saved_usd"] == pytest.approx(30.0)
    role = ledger.snapshot()["roles"]["ideator"]
    assert (role["calls"], role["cache_hits"], role["usd"], role["saved_usd"]) == (1, 1, 30.0, 30.0)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(x["cached"], x["cost_usd"], x["saved_usd"], x["role"]) for x in lines] == \
        [(False, 30.0, 0.0, "ideator"), (True, 0.0, 30.0, "ideator")]

    # anything that changes the request is a miss
    for kw in ({"temperature": 0.3}, {"seed": 7}, {"seed": 8}, {"max_tokens": 25}):
        assert not client.complete("propose an idea", **kw).cached
    assert not client.complete([{"role": "system", "content": "be bold"},
                                {"role": "user", "content": "propose an idea"}]).cached
    assert client.complete("propose an idea", seed=8).cached
    assert calls["n"] == 6

    # opt-outs: per call, and per config for sampled calls
    assert not client.complete("propose an idea", temperature=0.7, use_cache=False).cached and calls["n"] == 7
    picky = LLMClient(_mock_cfg(tmp_path, cache_sampled=False), ledger=ledger, role="ideator")
    assert not picky.complete("propose an idea", temperature=0.7).cached  # sampled, no seed: not cached
    assert picky.complete("propose an idea", seed=8).cached  # seeded: cached
    assert picky.complete("propose an idea", temperature=0.7, use_cache=True).cached
    assert calls["n"] == 8


def test_cache_survives_a_new_client_and_process(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    LLMClient(_mock_cfg(tmp_path)).complete("idea 1", temperature=0.0)
    resumed = LLMClient(_mock_cfg(tmp_path))  # a resumed run: new client, new connection
    assert resumed.complete("idea 1", temperature=0.0).cached and calls["n"] == 1
    code = ("import sqlite3, sys, json\ncon = sqlite3.connect(sys.argv[1])\n"
            "print(json.dumps([json.loads(r)['text'] for (r,) in con.execute('SELECT result FROM llm_cache')]))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "llm_cache.sqlite")], capture_output=True,
                         text=True, check=True, timeout=60)
    assert json.loads(out.stdout) == ["ok"]  # on disk, readable by any other process


def test_failures_are_not_cached_and_free_their_reservation(tmp_path, monkeypatch):
    ledger = Ledger(tmp_path / "ledger.sqlite", caps={"total_usd": 1000})
    bad = litellm.exceptions.BadRequestError("refused", model="openai/local-test", llm_provider="openai")
    calls = _flaky(monkeypatch, 1, bad)
    client = LLMClient(_mock_cfg(tmp_path), ledger=ledger, role="judge")
    with pytest.raises(LLMError, match="refused"):
        client.complete("score this")
    r = client.complete("score this")
    assert not r.cached and calls["n"] == 2 and client.complete("score this").cached
    role = ledger.snapshot()["roles"]["judge"]
    assert (role["errors"], role["calls"], role["cache_hits"], role["reserved_usd"]) == (1, 1, 1, 0.0)


def test_concurrent_identical_calls_pay_once(tmp_path, monkeypatch):
    calls = _counting(monkeypatch, delay=0.2)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    client = LLMClient(_mock_cfg(tmp_path, max_concurrency=8), ledger=ledger, role="ideator")
    barrier = threading.Barrier(6)
    out: list = []

    def go():
        barrier.wait()
        out.append(client.complete("the same idea", temperature=0.0))

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls["n"] == 1 and sorted(r.cached for r in out) == [False] + [True] * 5
    assert ledger.snapshot()["roles"]["ideator"]["usd"] == pytest.approx(30.0)

    # in a batch, repeats of a sampled prompt are separate draws (each its own entry) ...
    out = client.complete_many(["draw", "draw", "draw"], temperature=1.0)
    assert calls["n"] == 4 and [r.cached for r in out] == [False, False, False]
    # ... which a resumed run gets back from the cache, while greedy repeats pay once
    assert all(r.cached for r in client.complete_many(["draw", "draw", "draw"], temperature=1.0))
    greedy = client.complete_many(["g", "g", "g"], temperature=0.0)
    assert calls["n"] == 5 and sum(not r.cached for r in greedy) == 1


def test_usd_cap_stops_before_overrun(tmp_path):
    ledger = Ledger.for_run(tmp_path, caps=BudgetCaps(total_usd=100.0))
    client = LLMClient(_mock_cfg(tmp_path, cache=None), ledger=ledger, role="ideator")
    paid = 0
    with pytest.raises(BudgetExceeded, match="total_usd") as info:
        for i in range(10):
            client.complete(f"idea {i}")
            paid += 1
    snap = ledger.snapshot()
    assert paid == 3 and snap["total"]["usd"] == pytest.approx(90.0) and snap["total"]["usd"] <= 100.0
    assert info.value.used == pytest.approx(90.0) and info.value.requested > 10.0  # the 4th could pass the cap
    assert snap["total"]["reserved_usd"] == 0.0 and client.usage.snapshot()["calls"] == 3
    assert not isinstance(info.value, LLMError)  # a run-level stop, not a failed call

    # many threads racing for the same budget never overrun it either
    ledger2 = Ledger(tmp_path / "l2.sqlite", caps={"total_usd": 200.0})
    racer = LLMClient(_mock_cfg(tmp_path, cache=None, max_concurrency=6), ledger=ledger2, role="ideator")
    outcomes: list = []

    def go(i):
        try:
            outcomes.append(racer.complete(f"race {i}"))
        except BudgetExceeded as e:
            outcomes.append(e)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = ledger2.snapshot()
    assert snap["total"]["usd"] <= 200.0 and snap["total"]["reserved_usd"] == 0.0
    assert sum(isinstance(o, LLMResult) for o in outcomes) == snap["total"]["calls"] >= 5
    assert any(isinstance(o, BudgetExceeded) for o in outcomes)
    with pytest.raises(BudgetExceeded):  # a batch stops at the cap even with return_exceptions
        racer.complete_many([f"more {i}" for i in range(4)], return_exceptions=True)


def test_role_caps_share_one_ledger(tmp_path):
    ledger = Ledger.for_run(tmp_path, caps={"role_usd": {"judge": 50.0}, "total_usd": 1000.0})
    judge = LLMClient(_mock_cfg(tmp_path, cache=None), ledger=ledger, role="judge")
    ideator = LLMClient(_mock_cfg(tmp_path, cache=None, role="ideator"), ledger=ledger)
    judge.complete("score 1")
    with pytest.raises(BudgetExceeded, match=r"role_usd\[judge\]"):
        judge.complete("score 2")
    for i in range(3):
        ideator.complete(f"idea {i}")
    roles = ledger.snapshot()["roles"]
    assert roles["judge"]["usd"] == pytest.approx(30.0) and roles["ideator"]["calls"] == 3
    # a client built from config alone (e.g. inside a Ray actor) finds the same ledger and caps by path
    by_path = LLMClient(_mock_cfg(tmp_path, cache=None, role="judge", ledger=ledger.path))
    with pytest.raises(BudgetExceeded):
        by_path.complete("score 3")


def test_compute_caps_for_the_executor(tmp_path):
    ledger = Ledger.for_run(tmp_path, caps=BudgetCaps(gpu_hours=1.0, jobs=2))
    r = ledger.reserve_compute("gpu", gpu_hours=0.75)
    assert not ledger.can_start("gpu", gpu_hours=0.5)
    ledger.add_compute("gpu", gpu_hours=0.25, reservation=r)
    assert ledger.can_start("gpu", gpu_hours=0.5)
    ledger.add_compute("cpu", cpu_hours=3.0)
    with pytest.raises(BudgetExceeded, match="jobs"):
        ledger.check_compute("gpu", gpu_hours=0.1)
    assert ledger.snapshot()["envs"]["cpu"]["cpu_hours"] == 3.0


def test_unknown_price_is_an_error_with_a_ledger(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    unpriced = LLMConfig(model="openai/my-local-model", mock_response="ok")
    with pytest.raises(LLMError, match="input_price_per_mtok and output_price_per_mtok") as info:
        LLMClient(unpriced, ledger=ledger)
    assert info.value.reason == "unknown price"
    with pytest.raises(LLMError, match="no price known"):
        LLMClient(unpriced, require_price=True)
    with pytest.raises(LLMError, match="declare both"):
        LLMClient(unpriced, ledger=ledger, input_price_per_mtok=1.0)
    free = LLMClient(unpriced, ledger=ledger, input_price_per_mtok=0, output_price_per_mtok=0)  # a local server
    r = free.complete("hi")
    assert r.cost_known and r.cost_usd == 0.0 and ledger.snapshot()["roles"]["default"]["calls"] == 1
    known = LLMClient(LLMConfig(model="gpt-4o-mini", mock_response="ok"), ledger=ledger)  # litellm prices it
    assert known.complete("hi").cost_usd > 0
    # a per-call model override is checked too
    with pytest.raises(LLMError, match="no price known"):
        known.complete("hi", model="openai/my-local-model")
    # without a ledger: the old behaviour, an uncosted call
    assert not LLMClient(unpriced).complete("hi").cost_known


def test_async_path_uses_cache_and_ledger(tmp_path, monkeypatch):
    calls = _counting(monkeypatch, name="acompletion", delay=0.05)
    ledger = Ledger.for_run(tmp_path, caps={"total_usd": 130.0})
    client = LLMClient(_mock_cfg(tmp_path, max_concurrency=4), ledger=ledger, role="implementer")

    async def main():
        same = await asyncio.gather(*(client.acomplete("edit the code", temperature=0.0) for _ in range(3)))
        batch = await client.acomplete_many(["a", "b", "a"], temperature=1.0)
        return same, batch

    same, batch = asyncio.run(main())
    assert sum(r.cached for r in same) == 2 and not any(r.cached for r in batch)  # the second "a": its own draw
    assert calls["n"] == 4
    role = ledger.snapshot()["roles"]["implementer"]
    assert role["cache_hits"] == 2 and role["usd"] == pytest.approx(30.0 * role["calls"])
    with pytest.raises(BudgetExceeded):
        asyncio.run(client.acomplete("one more edit"))
    assert ledger.snapshot()["total"]["usd"] <= 130.0
    assert asyncio.run(client.acomplete("edit the code", temperature=0.0)).cached  # hits need no budget


def test_chat_samples_are_separate_cache_entries(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    client = LLMClient(_mock_cfg(tmp_path))
    conv = [[{"role": "user", "content": "tell a story"}]]
    out = client.chat(conv, SamplingConfig(temperature=1.0, n=3, max_new_tokens=20))
    assert calls["n"] == 3 and out[0].metrics["cost_usd"] == pytest.approx(90.0)
    again = client.chat(conv, SamplingConfig(temperature=1.0, n=3, max_new_tokens=20))
    assert calls["n"] == 3 and again[0].metrics["cost_usd"] == 0.0 and len(again[0].completions) == 3
