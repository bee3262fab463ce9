"""LLM client for remote models on litellm: API providers, any OpenAI-compatible server
(vLLM, our own Serve endpoints), with retries, timeouts, bounded concurrency, and token and
cost accounting per call.

    client = LLMClient(LLMConfig(model="openai/selftaught", api_base="http://127.0.0.1:8000/v1"))
    result = client.complete("What is 2+2?")
    client.usage.snapshot()  # calls, tokens, cost, retries, errors
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pydantic import Field

from selftaught.config import Strict

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch the cost map

log = logging.getLogger(__name__)

Messages = list[dict[str, Any]]


class LLMConfig(Strict):
    model: str = "openai/gpt-4o-mini"  # a litellm model string
    api_base: str | None = None
    api_key_env: str | None = None  # name of the environment variable holding the key
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=4, ge=0)
    backoff_initial_s: float = Field(default=1.0, ge=0)
    backoff_max_s: float = Field(default=30.0, ge=0)
    max_concurrency: int = Field(default=8, ge=1)
    temperature: float = Field(default=0.7, ge=0)
    max_tokens: int = Field(default=512, ge=1)
    input_price_per_mtok: float | None = Field(default=None, ge=0)  # USD, for models litellm does not know
    output_price_per_mtok: float | None = Field(default=None, ge=0)
    mock_response: str | None = None  # offline dry runs and tests
    call_log: str | None = None  # JSONL file, one line per call
    extra: dict[str, Any] = Field(default_factory=dict)  # passed to litellm.completion


class LLMError(RuntimeError):
    """A call that failed for good (non-retryable, or retries exhausted)."""

    def __init__(self, message: str, attempts: int, cause: BaseException | None = None):
        super().__init__(message)
        self.attempts, self.cause = attempts, cause


@dataclass
class LLMResult:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    cost_known: bool
    latency_s: float
    model: str
    attempts: int


@dataclass
class Usage:
    """Thread-safe totals over a client's calls."""

    calls: int = 0
    errors: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    uncosted_calls: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, r: LLMResult | None, attempts: int, error: bool = False) -> None:
        with self._lock:
            self.calls += 1
            self.retries += max(attempts - 1, 0)
            if error or r is None:
                self.errors += 1
                return
            self.prompt_tokens += r.prompt_tokens
            self.completion_tokens += r.completion_tokens
            self.cost_usd += r.cost_usd
            self.uncosted_calls += 0 if r.cost_known else 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {f: getattr(self, f) for f in ("calls", "errors", "retries", "prompt_tokens",
                                                  "completion_tokens", "cost_usd", "uncosted_calls")}


def _retryable(e: BaseException) -> bool:
    from litellm import exceptions as E

    if isinstance(e, (E.RateLimitError, E.Timeout, E.APIConnectionError, E.ServiceUnavailableError,
                      E.InternalServerError, E.BadGatewayError)):
        return True
    if isinstance(e, (E.AuthenticationError, E.BadRequestError, E.NotFoundError, E.PermissionDeniedError,
                      E.ContextWindowExceededError, E.UnprocessableEntityError)):
        return False
    status = getattr(e, "status_code", None)
    return isinstance(status, int) and (status == 429 or status >= 500)


class LLMClient:
    def __init__(self, cfg: LLMConfig | None = None, **overrides: Any):
        self.cfg = (cfg or LLMConfig()).model_copy(update=overrides) if overrides else (cfg or LLMConfig())
        self.usage = Usage()
        self._log_lock = threading.Lock()
        self._sem = threading.BoundedSemaphore(self.cfg.max_concurrency)

    # ------------------------------------------------------------------ request building
    def _kwargs(self, prompt: str | Messages, overrides: dict[str, Any]) -> dict[str, Any]:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        kw: dict[str, Any] = {"model": self.cfg.model, "messages": messages, "timeout": self.cfg.timeout_s,
                              "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens,
                              "num_retries": 0, **self.cfg.extra}
        if self.cfg.api_base:
            kw["api_base"] = self.cfg.api_base
        if self.cfg.api_key_env:
            key = os.environ.get(self.cfg.api_key_env)
            if not key:
                raise LLMError(f"environment variable {self.cfg.api_key_env} (api_key_env) is not set", 0)
            kw["api_key"] = key
        elif self.cfg.api_base:
            kw["api_key"] = "none"  # local OpenAI-compatible servers ignore it; the SDK wants one
        if self.cfg.mock_response is not None:
            kw["mock_response"] = self.cfg.mock_response
        kw.update(overrides)
        return kw

    def _backoff(self, attempt: int) -> float:
        base = min(self.cfg.backoff_max_s, self.cfg.backoff_initial_s * 2 ** (attempt - 1))
        return base * (0.5 + random.random() / 2)  # jitter: spread synchronized retries

    def _result(self, resp: Any, kw: dict, latency: float, attempts: int) -> LLMResult:
        import litellm

        choice = resp.choices[0]
        text = choice.message.content or ""
        usage = getattr(resp, "usage", None)
        pt = getattr(usage, "prompt_tokens", None)
        ct = getattr(usage, "completion_tokens", None)
        if pt is None:
            pt = litellm.token_counter(model=self.cfg.model, messages=kw["messages"])
        if ct is None:
            ct = litellm.token_counter(model=self.cfg.model, text=text)
        cost, known = 0.0, False
        if self.cfg.input_price_per_mtok is not None or self.cfg.output_price_per_mtok is not None:
            cost = (pt * (self.cfg.input_price_per_mtok or 0) + ct * (self.cfg.output_price_per_mtok or 0)) / 1e6
            known = True
        else:
            try:
                cost, known = float(litellm.completion_cost(completion_response=resp)), True
            except Exception:  # model not in litellm's price map (local servers): cost unknown
                pass
        return LLMResult(text=text, finish_reason=choice.finish_reason, prompt_tokens=int(pt),
                         completion_tokens=int(ct), cost_usd=cost, cost_known=known, latency_s=latency,
                         model=getattr(resp, "model", None) or self.cfg.model, attempts=attempts)

    def _record(self, r: LLMResult | None, attempts: int, latency: float, error: str | None = None) -> None:
        self.usage.add(r, attempts, error is not None)
        if not self.cfg.call_log:
            return
        line = {"time": time.time(), "model": self.cfg.model, "attempts": attempts, "latency_s": latency,
                "error": error}
        if r is not None:
            line.update(prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                        cost_usd=r.cost_usd, finish_reason=r.finish_reason)
        with self._log_lock:
            Path(self.cfg.call_log).parent.mkdir(parents=True, exist_ok=True)
            with open(self.cfg.call_log, "a") as f:
                f.write(json.dumps(line) + "\n")

    # ------------------------------------------------------------------ sync API
    def complete(self, prompt: str | Messages, **overrides: Any) -> LLMResult:
        """One call with retries on transient failures (429, 5xx, timeouts, connection errors)."""
        import litellm

        kw = self._kwargs(prompt, overrides)
        t0 = time.perf_counter()
        with self._sem:
            for attempt in range(1, self.cfg.max_retries + 2):
                try:
                    resp = litellm.completion(**kw)
                    r = self._result(resp, kw, time.perf_counter() - t0, attempt)
                    self._record(r, attempt, r.latency_s)
                    return r
                except Exception as e:  # noqa: BLE001 - classified below
                    if not _retryable(e) or attempt > self.cfg.max_retries:
                        self._record(None, attempt, time.perf_counter() - t0, f"{type(e).__name__}: {e}")
                        why = "not retryable" if not _retryable(e) else f"gave up after {attempt} attempts"
                        raise LLMError(f"{self.cfg.model}: {type(e).__name__} ({why}): {e}", attempt, e) from e
                    delay = self._backoff(attempt)
                    log.warning("%s: %s, retry %d in %.1fs", self.cfg.model, type(e).__name__, attempt, delay)
                    time.sleep(delay)
        raise AssertionError("unreachable")

    def complete_many(self, prompts: Sequence[str | Messages], return_exceptions: bool = False,
                      **overrides: Any) -> list[LLMResult | LLMError]:
        """Calls in parallel (at most ``max_concurrency`` in flight), results in input order."""
        def one(p):
            try:
                return self.complete(p, **overrides)
            except LLMError as e:
                if return_exceptions:
                    return e
                raise

        with ThreadPoolExecutor(max_workers=self.cfg.max_concurrency) as pool:
            return list(pool.map(one, prompts))

    # ------------------------------------------------------------------ async API
    async def acomplete(self, prompt: str | Messages, _sem: asyncio.Semaphore | None = None,
                        **overrides: Any) -> LLMResult:
        import litellm

        kw = self._kwargs(prompt, overrides)
        sem = _sem or asyncio.Semaphore(self.cfg.max_concurrency)
        t0 = time.perf_counter()
        async with sem:
            for attempt in range(1, self.cfg.max_retries + 2):
                try:
                    resp = await litellm.acompletion(**kw)
                    r = self._result(resp, kw, time.perf_counter() - t0, attempt)
                    self._record(r, attempt, r.latency_s)
                    return r
                except Exception as e:  # noqa: BLE001
                    if not _retryable(e) or attempt > self.cfg.max_retries:
                        self._record(None, attempt, time.perf_counter() - t0, f"{type(e).__name__}: {e}")
                        raise LLMError(f"{self.cfg.model}: {type(e).__name__}: {e}", attempt, e) from e
                    await asyncio.sleep(self._backoff(attempt))
        raise AssertionError("unreachable")

    async def acomplete_many(self, prompts: Sequence[str | Messages], return_exceptions: bool = False,
                             **overrides: Any) -> list[LLMResult | LLMError]:
        sem = asyncio.Semaphore(self.cfg.max_concurrency)
        return await asyncio.gather(*(self.acomplete(p, _sem=sem, **overrides) for p in prompts),
                                    return_exceptions=return_exceptions)
