"""The litellm client: accounting, retries, concurrency bounds, and a real HTTP round trip."""
import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import litellm
import pytest

from selftaught.llm import LLMClient, LLMConfig, LLMError


def test_mock_response_and_accounting(tmp_path):
    log = tmp_path / "calls.jsonl"
    client = LLMClient(LLMConfig(model="gpt-4o-mini", mock_response="Paris.", call_log=str(log)))
    r = client.complete("What is the capital of France?")
    assert r.text == "Paris." and r.attempts == 1 and r.prompt_tokens > 0 and r.completion_tokens > 0
    assert r.cost_known and r.cost_usd > 0  # gpt-4o-mini is in litellm's bundled price map
    client.complete([{"role": "user", "content": "again"}])
    snap = client.usage.snapshot()
    assert snap["calls"] == 2 and snap["errors"] == 0
    assert snap["cost_usd"] == pytest.approx(2 * r.cost_usd, rel=0.5)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["prompt_tokens"] == r.prompt_tokens


def test_price_override_for_unknown_models():
    client = LLMClient(LLMConfig(model="openai/my-local-model", mock_response="ok", input_price_per_mtok=1.0,
                                 output_price_per_mtok=2.0))
    r = client.complete("hi")
    assert r.cost_known and r.cost_usd == pytest.approx((r.prompt_tokens + 2 * r.completion_tokens) / 1e6)


def _flaky(monkeypatch, failures, exc):
    real = litellm.completion
    calls = {"n": 0}

    def fake(**kw):
        calls["n"] += 1
        if calls["n"] <= failures:
            raise exc
        return real(**kw)

    monkeypatch.setattr(litellm, "completion", fake)
    return calls


def test_retries_transient_errors_with_backoff(monkeypatch):
    err = litellm.exceptions.RateLimitError("slow down", llm_provider="openai", model="gpt-4o-mini")
    calls = _flaky(monkeypatch, 2, err)
    client = LLMClient(LLMConfig(model="gpt-4o-mini", mock_response="ok", backoff_initial_s=0.01, max_retries=3))
    t0 = time.perf_counter()
    r = client.complete("hi")
    assert r.attempts == 3 and calls["n"] == 3 and time.perf_counter() - t0 >= 0.01
    assert client.usage.snapshot()["retries"] == 2


def test_gives_up_and_does_not_retry_client_errors(monkeypatch):
    err = litellm.exceptions.Timeout("timed out", model="gpt-4o-mini", llm_provider="openai")
    _flaky(monkeypatch, 10, err)
    client = LLMClient(LLMConfig(model="gpt-4o-mini", mock_response="ok", backoff_initial_s=0.0, max_retries=2))
    with pytest.raises(LLMError, match="gave up after 3 attempts") as info:
        client.complete("hi")
    assert info.value.attempts == 3
    bad = litellm.exceptions.BadRequestError("bad", model="gpt-4o-mini", llm_provider="openai")
    calls = _flaky(monkeypatch, 10, bad)
    with pytest.raises(LLMError, match="not retryable"):
        client.complete("hi")
    assert calls["n"] == 1
    out = client.complete_many(["a", "b"], return_exceptions=True)
    assert all(isinstance(o, LLMError) for o in out)
    assert client.usage.snapshot()["errors"] == 4


def test_concurrency_is_bounded_and_order_kept(monkeypatch):
    real = litellm.completion
    state = {"now": 0, "peak": 0}
    lock = threading.Lock()

    def slow(**kw):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
        return real(**{**kw, "mock_response": kw["messages"][0]["content"].upper()})

    monkeypatch.setattr(litellm, "completion", slow)
    client = LLMClient(LLMConfig(model="gpt-4o-mini", mock_response="x", max_concurrency=3))
    prompts = [f"p{i}" for i in range(12)]
    out = client.complete_many(prompts)
    assert [o.text for o in out] == [p.upper() for p in prompts]
    assert state["peak"] == 3


def test_async_many():
    client = LLMClient(LLMConfig(model="gpt-4o-mini", mock_response="ok", max_concurrency=2))
    out = asyncio.run(client.acomplete_many(["a", "b", "c"]))
    assert [o.text for o in out] == ["ok"] * 3 and client.usage.snapshot()["calls"] == 3


class _OpenAIHandler(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible chat endpoint: answers with the reversed user message."""

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self.path.endswith("/chat/completions"):
            self.send_response(404)
            self.end_headers()
            return
        text = body["messages"][-1]["content"][::-1]
        payload = {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                   "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": text}}],
                   "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_real_http_round_trip_to_openai_compatible_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OpenAIHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        client = LLMClient(LLMConfig(model="openai/local-test", api_base=f"http://127.0.0.1:{port}/v1",
                                     max_retries=0, timeout_s=10))
        r = client.complete("abc")
        assert r.text == "cba" and (r.prompt_tokens, r.completion_tokens) == (7, 3)
        assert not r.cost_known and r.cost_usd == 0.0
        missing = LLMClient(LLMConfig(model="openai/x", api_base=f"http://127.0.0.1:{port}/v1",
                                      api_key_env="SELFTAUGHT_NO_SUCH_KEY"))
        with pytest.raises(LLMError, match="SELFTAUGHT_NO_SUCH_KEY"):
            missing.complete("hi")
    finally:
        server.shutdown()
