"""LLM client for remote models, built on litellm.

One client covers hosted API providers, any OpenAI-compatible server (a vLLM server, our own
Ray Serve endpoints) and offline dry runs (``mock_response``). Every call, sync or async, goes
through the same retry policy (tenacity: exponential backoff with jitter, Retry-After honoured,
non-retryable errors fail at once), concurrency bound and accounting, so a pipeline can swap a provider for a local
endpoint without changing how it budgets tokens and dollars.

    client = LLMClient(LLMConfig(model="openai/selftaught", api_base="http://127.0.0.1:8000/v1"))
    result = client.complete("What is 2+2?")
    client.usage.snapshot()  # calls, tokens, cost, retries, errors

With ``cache=`` (a SQLite file) identical requests are answered once and then from the file;
with a :class:`~selftaught.ledger.Ledger` every call is attributed to the client's ``role``,
reserves its worst-case cost before it is sent and raises ``BudgetExceeded`` instead of passing
a cap (see ``selftaught.ledger`` and docs/llm.md, "Cache and cost caps").
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import time
import weakref
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import tenacity
from pydantic import Field, field_validator, model_validator

from selftaught.config import SamplingConfig, Strict
from selftaught.ledger import BudgetExceeded, Ledger, LLMCache, Reservation

__all__ = ["BudgetExceeded", "LLMCache", "LLMClient", "LLMConfig", "LLMError", "LLMResult", "Ledger", "Usage",
           "cache_key", "is_retryable", "is_sampled", "sampling_kwargs", "worst_case_cost"]

# Without this every `import litellm` tries to download the model price map first.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

log = logging.getLogger(__name__)

Messages = list[dict[str, Any]]
Prompt = str | Messages

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LLMConfig(Strict):
    """How to reach one remote model and how hard to push it.

    The key itself never lives in a config (configs are saved next to run outputs): only the
    name of the environment variable that holds it.
    """

    model: str = "openai/gpt-4o-mini"  # litellm model string, "<provider>/<name>"
    api_base: str | None = None  # e.g. http://127.0.0.1:8000/v1 for an OpenAI-compatible server
    api_key_env: str | None = None  # NAME of the env var holding the key, e.g. "OPENAI_API_KEY"
    timeout_s: float = Field(default=60.0, gt=0)  # per attempt
    max_retries: int = Field(default=4, ge=0)  # extra attempts after the first, transient errors only
    backoff_initial_s: float = Field(default=1.0, ge=0)
    backoff_max_s: float = Field(default=30.0, ge=0)
    backoff_jitter: float = Field(default=0.5, ge=0, le=1)  # fraction of each delay drawn at random
    max_concurrency: int = Field(default=8, ge=1)  # calls in flight per client (threads; per event loop)
    temperature: float = Field(default=0.7, ge=0)
    max_tokens: int = Field(default=512, ge=1)
    input_price_per_mtok: float | None = Field(default=None, ge=0)  # USD per 1M prompt tokens
    output_price_per_mtok: float | None = Field(default=None, ge=0)  # USD per 1M completion tokens
    mock_response: str | None = None  # answer with this text, no network: dry runs and tests
    call_log: str | None = None  # JSONL file, one line per call (success or final failure)
    extra: dict[str, Any] = Field(default_factory=dict)  # more kwargs for litellm.completion
    # ---- the money layer (docs/llm.md, "Cache and cost caps")
    role: str = "default"  # whom the ledger charges: "ideator", "implementer", "judge", ...
    cache: str | None = None  # SQLite file of answers keyed by the full request; None: no cache
    cache_sampled: bool = True  # also cache sampled calls (temperature > 0, no seed): resumed runs never pay twice
    ledger: str | None = None  # SQLite ledger file (caps stored in it), for clients built from config alone
    require_price: bool = False  # unknown price is an error even without a ledger (always so with one)
    budget_margin: float = Field(default=1.2, ge=1.0)  # locally counted prompt tokens x this, when reserving

    @field_validator("api_key_env")
    @classmethod
    def _env_name_not_key(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.match(v):
            raise ValueError("api_key_env takes the NAME of an environment variable (e.g. OPENAI_API_KEY), "
                             "not the key itself")
        return v

    @model_validator(mode="after")
    def _backoff_order(self) -> "LLMConfig":
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        return self

    @property
    def has_price_override(self) -> bool:
        return self.input_price_per_mtok is not None or self.output_price_per_mtok is not None


def sampling_kwargs(s: SamplingConfig) -> dict[str, Any]:
    """Map the engine-side ``SamplingConfig`` onto chat-completion parameters, so one sampling
    section drives both local engines and remote models.

    Standard OpenAI fields go as parameters; vLLM-only ones (top_k, min_tokens,
    stop_token_ids, ignore_eos) go in ``extra_body``, which OpenAI-compatible servers (vLLM,
    our Serve apps) read and hosted providers may reject, so they are only sent when set.
    """
    if s.n != 1:
        raise ValueError("LLMResult holds one choice: issue n separate calls instead of n>1")
    kw: dict[str, Any] = {"temperature": s.temperature, "max_tokens": s.max_new_tokens}
    if s.top_p != 1.0:
        kw["top_p"] = s.top_p
    if s.stop:
        kw["stop"] = list(s.stop)
    if s.seed is not None:
        kw["seed"] = s.seed
    body: dict[str, Any] = {}
    if s.top_k:
        body["top_k"] = s.top_k
    if s.min_new_tokens:
        body["min_tokens"] = s.min_new_tokens
    if s.stop_token_ids:
        body["stop_token_ids"] = list(s.stop_token_ids)
    if s.ignore_eos:
        body["ignore_eos"] = True
    if s.budget is not None:  # read by our OpenAI-compatible Serve app (serve/openai_app.py)
        body["budget_forcing"] = s.budget.model_dump(exclude_defaults=True)
    if s.logprobs is not None:
        kw["logprobs"] = True
        if s.logprobs:
            kw["top_logprobs"] = s.logprobs
    rf = s.response_format
    if rf is not None:
        if rf.type == "json_schema":
            kw["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": rf.json_schema}}
        elif rf.type == "json_object":
            kw["response_format"] = {"type": "json_object"}
        else:  # vLLM's guided fields (our Serve app and vLLM servers read them)
            body["guided_regex" if rf.type == "regex" else "guided_choice"] = rf.regex if rf.type == "regex" else rf.choice
    if body:
        kw["extra_body"] = body
    return kw


class LLMError(RuntimeError):
    """A call that failed for good: not retryable, retries exhausted, or misconfigured.

    ``reason`` is the underlying error as text, ``cause`` the exception itself, ``retryable``
    whether the last error was of a transient kind (so callers can tell 'try later' from 'fix it').
    """

    def __init__(self, message: str, attempts: int, cause: BaseException | None = None,
                 retryable: bool = False, reason: str = ""):
        super().__init__(message)
        self.attempts, self.cause, self.retryable, self.reason = attempts, cause, retryable, reason


@dataclass
class LLMResult:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    cost_known: bool  # False: neither litellm's price map nor the config priced this model
    latency_s: float  # first attempt to answer, backoff included, queueing excluded
    model: str
    attempts: int  # requests sent; 0 for an answer from the cache
    cached: bool = False  # answered from the cache: cost_usd is what it cost when first paid, nothing now

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def spent_usd(self) -> float:
        """Dollars this call cost now: 0 for a cache hit."""
        return 0.0 if self.cached else self.cost_usd

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Usage:
    """Running totals over one client's calls; safe to update from many threads."""

    FIELDS = ("calls", "errors", "retries", "prompt_tokens", "completion_tokens", "cost_usd",
              "uncosted_calls", "latency_s", "cache_hits", "saved_usd")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = self.errors = self.retries = 0
        self.prompt_tokens = self.completion_tokens = self.uncosted_calls = 0
        self.cost_usd = self.latency_s = 0.0
        self.cache_hits, self.saved_usd = 0, 0.0

    def add_hit(self, result: LLMResult) -> None:
        """Count one answer from the cache: no request, nothing spent, its first cost saved."""
        with self._lock:
            self.cache_hits += 1
            self.saved_usd += result.cost_usd

    def add(self, result: LLMResult | None, attempts: int, latency_s: float) -> None:
        """Count one finished call; ``result=None`` means it failed."""
        with self._lock:
            self.calls += 1
            self.retries += max(attempts - 1, 0)
            self.latency_s += latency_s
            if result is None:
                self.errors += 1
                return
            self.prompt_tokens += result.prompt_tokens
            self.completion_tokens += result.completion_tokens
            self.cost_usd += result.cost_usd
            self.uncosted_calls += 0 if result.cost_known else 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out = {f: getattr(self, f) for f in self.FIELDS}
        out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
        return out

    def __repr__(self) -> str:
        return f"Usage({self.snapshot()})"


def _litellm() -> Any:
    """Import litellm lazily (it is slow to import) and keep it from printing a help banner on
    every exception: this client reports errors itself."""
    import litellm

    litellm.suppress_debug_info = True
    return litellm


def is_retryable(e: BaseException) -> bool:
    """Transient errors worth another attempt: rate limits, timeouts, connection drops, 5xx."""
    from litellm import exceptions as E

    if isinstance(e, (E.AuthenticationError, E.BadRequestError, E.NotFoundError, E.PermissionDeniedError,
                      E.UnprocessableEntityError)):  # ContextWindowExceeded is a BadRequest
        return False
    if isinstance(e, (E.RateLimitError, E.Timeout, E.APIConnectionError, E.ServiceUnavailableError,
                      E.InternalServerError, E.BadGatewayError)):
        return True
    status = getattr(e, "status_code", None)
    if isinstance(status, int):
        return status in (408, 409, 429) or status >= 500
    return isinstance(e, (TimeoutError, ConnectionError))


def _retry_after(e: BaseException) -> float | None:
    """Seconds from a Retry-After header (litellm keeps the response headers on its errors)."""
    for attr in ("litellm_response_headers", "headers"):
        headers = getattr(e, attr, None)
        if headers is None:
            continue
        try:
            value = headers.get("retry-after")
            return max(float(value), 0.0) if value is not None else None
        except (TypeError, ValueError, AttributeError):
            return None
    return None


def _merge(kw: dict[str, Any], updates: dict[str, Any]) -> None:
    """Later settings win, except that ``extra_body`` dicts from config, sampling and call are
    combined rather than replaced."""
    for k, v in updates.items():
        if k == "extra_body" and isinstance(kw.get(k), dict) and isinstance(v, dict):
            v = {**kw[k], **v}
        kw[k] = v


# ---------------------------------------------------------------------------- cache keys and prices
# Request fields that never change the answer (and the key, which must never be part of a key).
_NOT_IN_KEY = frozenset({"api_key", "timeout", "num_retries", "max_retries"})
_SECRET_HEADERS = frozenset({"authorization", "api-key", "x-api-key", "proxy-authorization"})


def _canonical(o: Any) -> Any:
    """JSON-able form of request values: pydantic classes (as response_format) by their schema."""
    if isinstance(o, type) and hasattr(o, "model_json_schema"):
        return {"pydantic": f"{o.__module__}.{o.__qualname__}", "schema": o.model_json_schema()}
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    if isinstance(o, (set, frozenset)):
        return sorted(map(str, o))
    return repr(o)


def is_sampled(kw: dict[str, Any]) -> bool:
    """A request whose answer is a random draw: temperature above 0 (or unset) and no seed."""
    t = kw.get("temperature")
    return (t is None or t > 0) and kw.get("seed") is None


def cache_key(kw: dict[str, Any], tag: str | int | None = None) -> str:
    """sha256 of the canonical JSON of everything in a litellm request that determines the
    answer: model, api_base, messages, every sampling field (seed, n, temperature, max_tokens,
    stop, ...), response_format, extra_body, tools and any other extra kwargs, and
    ``mock_response``. Not the API key (nor auth headers), timeout or retry settings.

    ``tag`` tells apart repeated draws of one *sampled* request (the k-th sample of a prompt);
    it is ignored for deterministic requests (temperature 0 or seeded), whose draws agree.
    """
    body = {k: v for k, v in kw.items() if k not in _NOT_IN_KEY}
    for h in ("extra_headers", "headers"):
        if isinstance(body.get(h), dict):
            body[h] = {k: v for k, v in body[h].items() if k.lower() not in _SECRET_HEADERS}
    if tag is not None and is_sampled(kw):
        body["__cache_tag__"] = str(tag)
    body["__key_version__"] = 1
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_canonical)
    return hashlib.sha256(text.encode()).hexdigest()


def _unpriced(model: str) -> "LLMError":
    return LLMError(f"{model}: no price known for this model (litellm's price map does not list it): set "
                    "input_price_per_mtok and output_price_per_mtok in the LLM config (0 is a valid price, "
                    "e.g. for a local server) so spending can be counted and capped", 0, reason="unknown price")


def _litellm_cost(model: str, pt: int, ct: int, usage: Any = None) -> float | None:
    """litellm's price for these tokens, or None when it cannot price the model."""
    try:
        p, c = _litellm().cost_per_token(model=model, prompt_tokens=pt, completion_tokens=ct, usage_object=usage)
        return float(p) + float(c)
    except Exception:  # noqa: BLE001 - litellm raises various errors for models it cannot price
        return None


def worst_case_cost(model: "str | LLMConfig", prompt_tokens: int, max_tokens: int, *,
                    input_price_per_mtok: float | None = None, output_price_per_mtok: float | None = None) -> float:
    """USD of one call with ``prompt_tokens`` in and all of ``max_tokens`` out: declared prices
    (arguments, else those of an ``LLMConfig`` passed as ``model``) win over litellm's price map.
    Raises ``LLMError`` when neither prices the model."""
    if isinstance(model, LLMConfig):
        input_price_per_mtok = model.input_price_per_mtok if input_price_per_mtok is None else input_price_per_mtok
        output_price_per_mtok = model.output_price_per_mtok if output_price_per_mtok is None else output_price_per_mtok
        model = model.model
    if input_price_per_mtok is not None or output_price_per_mtok is not None:
        return (prompt_tokens * (input_price_per_mtok or 0.0) + max_tokens * (output_price_per_mtok or 0.0)) / 1e6
    cost = _litellm_cost(model, prompt_tokens, max_tokens)
    if cost is None:
        raise _unpriced(model)
    return cost


class LLMClient:
    """Sync and async chat completions with retries, a concurrency bound and a usage ledger.

    One client per model endpoint; share it across threads so the bound and the ledger cover
    all of its traffic.

    ``ledger`` (a :class:`~selftaught.ledger.Ledger` or the path of one; else ``cfg.ledger``)
    attributes every call to ``cfg.role`` (``LLMClient(cfg, role="judge", ledger=ledger)``)
    and enforces the ledger's caps. With a ledger (or ``require_price``) a model without a
    known or declared price is an ``LLMError`` here, before any call.
    """

    def __init__(self, cfg: LLMConfig | None = None, *, ledger: Ledger | str | Path | None = None,
                 **overrides: Any):
        cfg = cfg or LLMConfig()
        # model_validate (not model_copy) so overrides are checked like any config value
        self.cfg = LLMConfig.model_validate({**cfg.model_dump(), **overrides}) if overrides else cfg
        self.usage = Usage()
        self._sem = threading.BoundedSemaphore(self.cfg.max_concurrency)
        self._log_lock = threading.Lock()
        self._async_lock = threading.Lock()
        self._async_sems: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = \
            weakref.WeakKeyDictionary()
        if ledger is None and self.cfg.ledger:
            ledger = self.cfg.ledger
        self.ledger: Ledger | None = ledger if isinstance(ledger, Ledger) or ledger is None else Ledger(ledger)
        self.cache: LLMCache | None = LLMCache(self.cfg.cache) if self.cfg.cache else None
        self._inflight: dict[str, concurrent.futures.Future] = {}
        self._inflight_lock = threading.Lock()
        self._priced: set[str] = set()
        if self.enforce_price:
            self._check_price(self.cfg.model)

    @property
    def role(self) -> str:
        return self.cfg.role

    @property
    def enforce_price(self) -> bool:
        """Whether an unknown price is an error (with a ledger, or ``require_price``)."""
        return self.ledger is not None or self.cfg.require_price

    def _check_price(self, model: str) -> None:
        """Fail unless this model's calls can be priced: both prices declared in the config,
        or litellm's price map lists the model."""
        if model in self._priced:
            return
        cfg = self.cfg
        if cfg.has_price_override:
            if cfg.input_price_per_mtok is None or cfg.output_price_per_mtok is None:
                raise LLMError(f"{model}: only one of input_price_per_mtok / output_price_per_mtok is set; "
                               "declare both (0 is a valid price) when spending is counted", 0,
                               reason="unknown price")
        elif _litellm_cost(model, 1, 1) is None:
            raise _unpriced(model)
        self._priced.add(model)

    # ------------------------------------------------------------------ request building
    def _kwargs(self, prompt: Prompt, sampling: SamplingConfig | None, overrides: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        kw: dict[str, Any] = {"model": cfg.model, "messages": messages, "timeout": cfg.timeout_s,
                              "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
        _merge(kw, cfg.extra)
        if sampling is not None:
            _merge(kw, sampling_kwargs(sampling))
        if cfg.api_base:
            kw["api_base"] = cfg.api_base
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key and cfg.mock_response is None:
                raise LLMError(f"{cfg.model}: environment variable {cfg.api_key_env} (api_key_env) is not set",
                               0, reason="missing api key")
            if key:
                kw["api_key"] = key
        elif cfg.api_base:
            # A local server ignores the key but the OpenAI SDK insists on one; and a custom
            # api_base must never receive a provider key picked up from the environment.
            kw["api_key"] = "none"
        if cfg.mock_response is not None:
            kw["mock_response"] = cfg.mock_response
        _merge(kw, overrides)
        kw["num_retries"] = 0  # the retry policy is ours: litellm and the OpenAI SDK must not add theirs
        kw["max_retries"] = 0
        return kw

    # ------------------------------------------------------------------ results and accounting
    def _backoff(self, attempt: int, e: BaseException) -> float:
        """Exponential backoff with jitter (so parallel callers do not retry in lockstep);
        a server's Retry-After wins, both capped at ``backoff_max_s``."""
        hinted = _retry_after(e)
        if hinted is not None:
            return min(hinted, self.cfg.backoff_max_s)
        base = min(self.cfg.backoff_max_s, self.cfg.backoff_initial_s * 2 ** (attempt - 1))
        return base * (1.0 - self.cfg.backoff_jitter * random.random())

    def _cost(self, model: str, pt: int, ct: int, usage: Any) -> tuple[float, bool]:
        cfg = self.cfg
        if cfg.has_price_override:  # explicit prices win: they are what this deployment costs
            return (pt * (cfg.input_price_per_mtok or 0.0) + ct * (cfg.output_price_per_mtok or 0.0)) / 1e6, True
        # Priced by the model we asked for, never the name a server echoes back (which is what
        # litellm.completion_cost uses): a local server answering "gpt-4o-mini" must not be
        # billed at OpenAI's prices. The usage object, when reported, carries cached tokens.
        cost = _litellm_cost(model, pt, ct, usage)
        return (0.0, False) if cost is None else (cost, True)

    def _result(self, resp: Any, kw: dict[str, Any], latency: float, attempts: int) -> LLMResult:
        litellm = _litellm()
        choice = resp.choices[0]
        text = choice.message.content or ""
        usage = getattr(resp, "usage", None)
        # litellm fills a missing `usage` with zeros; a real prompt is never 0 tokens, so treat
        # 0 as "not reported" and count locally.
        pt = int(getattr(usage, "prompt_tokens", 0) or 0)
        ct = int(getattr(usage, "completion_tokens", 0) or 0)
        if pt == 0:
            usage = None  # not reported: the counts below are ours, price those
            pt = int(litellm.token_counter(model=kw["model"], messages=kw["messages"]))
        if ct == 0 and text:
            usage = None
            ct = int(litellm.token_counter(model=kw["model"], text=text, count_response_tokens=True))
        cost, known = self._cost(kw["model"], pt, ct, usage)
        return LLMResult(text=text, finish_reason=getattr(choice, "finish_reason", None), prompt_tokens=pt,
                         completion_tokens=ct, cost_usd=cost, cost_known=known, latency_s=latency,
                         model=kw["model"], attempts=attempts)

    def _record(self, result: LLMResult | None, attempts: int, latency: float, error: str | None = None) -> None:
        self.usage.add(result, attempts, latency)
        self._log(result, attempts, latency, error)

    def _log(self, result: LLMResult | None, attempts: int, latency: float, error: str | None = None) -> None:
        if not self.cfg.call_log:
            return
        line: dict[str, Any] = {"time": round(time.time(), 3), "model": self.cfg.model, "role": self.role,
                                "attempts": attempts, "latency_s": round(latency, 4), "prompt_tokens": 0,
                                "completion_tokens": 0, "cost_usd": 0.0, "cost_known": False, "finish_reason": None,
                                "cached": False, "saved_usd": 0.0, "error": error}
        if result is not None:
            line.update(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                        cost_usd=result.spent_usd, cost_known=result.cost_known,
                        finish_reason=result.finish_reason, cached=result.cached,
                        saved_usd=result.cost_usd if result.cached else 0.0)
        with self._log_lock:
            path = Path(self.cfg.call_log)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(line) + "\n")

    def _retry_policy(self) -> dict[str, Any]:
        """The one retry policy of sync and async calls, as tenacity arguments: up to
        ``max_retries`` extra attempts, only for :func:`is_retryable` errors, waiting
        :meth:`_backoff` between them; the last error is re-raised for :meth:`_give_up`."""
        cfg = self.cfg

        def wait(state: tenacity.RetryCallState) -> float:
            if state.attempt_number > cfg.max_retries:  # tenacity asks before its stop check: no retry follows
                return 0.0
            return self._backoff(state.attempt_number, state.outcome.exception())

        def before_sleep(state: tenacity.RetryCallState) -> None:
            log.warning("%s: %s; retry %d/%d in %.2fs", cfg.model, type(state.outcome.exception()).__name__,
                        state.attempt_number, cfg.max_retries, state.upcoming_sleep)

        return {"stop": tenacity.stop_after_attempt(cfg.max_retries + 1),
                "retry": tenacity.retry_if_exception(is_retryable), "wait": wait,
                "before_sleep": before_sleep, "reraise": True}

    def _give_up(self, e: BaseException, attempt: int, t0: float) -> LLMError:
        """Record a call that failed for good and describe it as an ``LLMError``."""
        retryable = is_retryable(e)
        reason = f"{type(e).__name__}: {e}"
        self._record(None, attempt, time.perf_counter() - t0, reason)
        why = f"gave up after {attempt} attempts" if retryable else "not retryable"
        return LLMError(f"{self.cfg.model}: {why}: {reason}", attempt, e, retryable, reason)

    def _config_error(self, e: LLMError) -> LLMError:
        self._record(None, 0, 0.0, e.reason)
        return e

    # ------------------------------------------------------------------ budget and cache
    def _worst_case(self, kw: dict[str, Any]) -> float:
        """The most this request can cost: prompt tokens counted locally (times
        ``budget_margin``, as providers' tokenizers differ) plus ``max_tokens`` per choice."""
        model = kw["model"]
        self._check_price(model)
        litellm = _litellm()
        pt = int(litellm.token_counter(model=model, messages=kw["messages"], tools=kw.get("tools")))
        pt = math.ceil(pt * self.cfg.budget_margin)
        mt = kw.get("max_completion_tokens") or kw.get("max_tokens")
        if mt is None:
            try:
                mt = litellm.get_model_info(model).get("max_output_tokens")
            except Exception:  # noqa: BLE001 - not in the map
                mt = None
            if not mt:
                raise LLMError(f"{model}: max_tokens is unset and the model's output limit is unknown; set "
                               "max_tokens so the call's worst-case cost can be reserved", 0,
                               reason="unbounded completion")
        n = int(kw.get("n") or 1)
        cost = self._cost(model, pt, int(mt) * n, None)[0]
        return cost

    def _reserve(self, kw: dict[str, Any]) -> Reservation | None:
        """Hold the call's worst-case cost in the ledger (``BudgetExceeded`` when it does not
        fit); without a ledger, only the price check (``require_price``)."""
        if self.ledger is None:
            if self.enforce_price:
                self._check_price(kw["model"])
            return None
        return self.ledger.reserve_usd(self.role, self._worst_case(kw))

    def _settle(self, res: Reservation | None, result: LLMResult) -> None:
        if self.ledger is not None:
            self.ledger.settle(res, role=self.role, usd=result.cost_usd, prompt_tokens=result.prompt_tokens,
                               completion_tokens=result.completion_tokens)

    def _release(self, res: Reservation | None, error: bool) -> None:
        if self.ledger is not None and res is not None:
            self.ledger.release(res, error=error)

    def _key(self, kw: dict[str, Any], use_cache: bool | None, tag: str | int | None) -> str | None:
        """The request's cache key, or None when this call bypasses the cache."""
        if self.cache is None or use_cache is False:
            return None
        if use_cache is None and not self.cfg.cache_sampled and is_sampled(kw):
            return None
        return cache_key(kw, tag)

    def _hit(self, key: str) -> LLMResult | None:
        """The stored answer for ``key``, counted as a cache hit; None on a miss."""
        t0 = time.perf_counter()
        d = self.cache.get(key) if self.cache is not None else None
        if d is None:
            return None
        fields = {f: d[f] for f in LLMResult.__dataclass_fields__ if f in d}
        result = LLMResult(**{**fields, "cached": True, "attempts": 0, "latency_s": time.perf_counter() - t0})
        self.usage.add_hit(result)
        if self.ledger is not None:
            self.ledger.record_hit(self.role, result.cost_usd)
        self._log(result, 0, result.latency_s)
        return result

    def _store(self, key: str, result: LLMResult) -> None:
        if self.cache is not None:
            self.cache.put(key, {**result.to_dict(), "cached": False}, model=result.model)

    def _claim(self, key: str) -> tuple[bool, concurrent.futures.Future]:
        """Single flight within this client: the first caller of a key makes the call, the
        others wait for it and then read the cache (so identical concurrent calls pay once)."""
        with self._inflight_lock:
            fut = self._inflight.get(key)
            if fut is not None:
                return False, fut
            fut = self._inflight[key] = concurrent.futures.Future()
            return True, fut

    def _unclaim(self, key: str, fut: concurrent.futures.Future) -> None:
        with self._inflight_lock:
            self._inflight.pop(key, None)
        fut.set_result(None)

    # ------------------------------------------------------------------ sync API
    def complete(self, prompt: Prompt, *, sampling: SamplingConfig | None = None, use_cache: bool | None = None,
                 cache_tag: str | int | None = None, **overrides: Any) -> LLMResult:
        """One chat completion. ``prompt`` is a user message or a full message list; keyword
        overrides go to litellm as they are (temperature=0, max_tokens=..., stop=...).

        Transient failures are retried; a call keeps its concurrency slot while it backs off,
        so a rate-limited client slows down instead of piling on more requests.

        With a cache, an identical earlier request is answered from it (``result.cached``);
        ``use_cache=False`` bypasses it for this call (``True`` uses it even for a sampled call
        when ``cache_sampled`` is off), and ``cache_tag`` tells apart repeated draws of one
        sampled request. With a ledger, ``BudgetExceeded`` is raised before a call that could
        pass a cap.
        """
        try:
            kw = self._kwargs(prompt, sampling, overrides)
        except LLMError as e:
            raise self._config_error(e) from None
        key = self._key(kw, use_cache, cache_tag)
        if key is None:
            return self._call(kw)
        while True:
            hit = self._hit(key)
            if hit is not None:
                return hit
            leader, fut = self._claim(key)
            if not leader:
                fut.result()  # the same request is in flight: wait for it, then read the cache
                continue
            try:
                result = self._call(kw)
                self._store(key, result)
                return result
            finally:
                self._unclaim(key, fut)

    def _call(self, kw: dict[str, Any]) -> LLMResult:
        """Send one request (reserve, retry, settle, record)."""
        litellm = _litellm()
        with self._sem:
            try:
                res = self._reserve(kw)
            except LLMError as e:
                raise self._config_error(e) from None
            t0 = time.perf_counter()
            attempt = 0
            try:
                for state in tenacity.Retrying(**self._retry_policy()):
                    with state:
                        attempt = state.retry_state.attempt_number
                        resp = litellm.completion(**kw)
                        result = self._result(resp, kw, time.perf_counter() - t0, attempt)
            except Exception as e:  # noqa: BLE001 - classified in _give_up
                self._release(res, error=True)
                raise self._give_up(e, attempt, t0) from e
            except BaseException:
                self._release(res, error=False)
                raise
            self._settle(res, result)
            self._record(result, attempt, result.latency_s)
            return result

    def complete_many(self, prompts: Sequence[Prompt], *, return_exceptions: bool = False,
                      sampling: SamplingConfig | None = None, **overrides: Any) -> list[LLMResult | LLMError]:
        """Many calls at once, at most ``max_concurrency`` in flight, results in input order.

        With ``return_exceptions=True`` a failed item yields its ``LLMError`` in place; otherwise
        the first failure cancels the calls not yet started and is raised. ``BudgetExceeded``
        is always raised (it is not an ``LLMError``). The k-th repeat of a prompt in the batch
        gets its own cache entry when sampled (``cache_tag`` k), so repeats stay distinct draws.
        """
        if not prompts:
            return []
        tags = _draw_tags(prompts, overrides.pop("cache_tag", None))

        def one(p: Prompt, tag: str | int | None) -> LLMResult | LLMError:
            try:
                return self.complete(p, sampling=sampling, cache_tag=tag, **overrides)
            except LLMError as e:
                if return_exceptions:
                    return e
                raise

        pool = ThreadPoolExecutor(max_workers=min(self.cfg.max_concurrency, len(prompts)),
                                  thread_name_prefix="llm")
        try:
            futures = [pool.submit(one, p, t) for p, t in zip(prompts, tags)]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:
                if f in done and f.exception() is not None:
                    raise f.exception()  # type: ignore[misc]
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def chat(self, conversations: Sequence[Messages],
             sampling: SamplingConfig | Sequence[SamplingConfig] | None = None) -> list[Any]:
        """The :class:`~actors.engine.base.ChatModel` protocol: one ``GenerationOutput`` per
        conversation, ``n`` samples each (``n`` calls, seeds ``seed + i`` when seeded). Remote
        models return no token ids; token counts and cost are in ``metrics``."""
        from actors.engine.base import Completion, GenerationOutput, per_request

        params = per_request(sampling if sampling is not None else SamplingConfig(
            temperature=self.cfg.temperature, max_new_tokens=self.cfg.max_tokens), len(conversations))
        calls = [(i, list(conversations[i]), p.model_copy(update={"n": 1, "seed": None if p.seed is None else
                                                                 (p.seed + s) % 2**63}), s or None)
                 for i, p in enumerate(params) for s in range(p.n)]
        pool = ThreadPoolExecutor(max_workers=max(1, min(self.cfg.max_concurrency, len(calls))),
                                  thread_name_prefix="llm-chat")
        try:
            results = list(pool.map(lambda c: self.complete(c[1], sampling=c[2], cache_tag=c[3]), calls))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        outs = [GenerationOutput(prompt="", prompt_token_ids=[], completions=[], request_index=i,
                                 metrics={"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0})
                for i in range(len(conversations))]
        for (i, _, _, _), r in zip(calls, results):
            o = outs[i]
            o.completions.append(Completion(text=r.text, token_ids=[], finish_reason=r.finish_reason or "stop"))
            o.metrics["prompt_tokens"] = r.prompt_tokens
            o.metrics["completion_tokens"] += r.completion_tokens
            o.metrics["cost_usd"] += r.spent_usd
        return outs

    # ------------------------------------------------------------------ async API
    def _async_sem(self) -> asyncio.Semaphore:
        """The bound for the running event loop (asyncio semaphores belong to one loop)."""
        loop = asyncio.get_running_loop()
        with self._async_lock:
            sem = self._async_sems.get(loop)
            if sem is None:
                sem = self._async_sems[loop] = asyncio.Semaphore(self.cfg.max_concurrency)
            return sem

    async def acomplete(self, prompt: Prompt, *, sampling: SamplingConfig | None = None,
                        use_cache: bool | None = None, cache_tag: str | int | None = None,
                        **overrides: Any) -> LLMResult:
        """``complete`` on ``litellm.acompletion``: same retries, cache, budget and accounting,
        bounded per event loop by ``max_concurrency``."""
        try:
            kw = self._kwargs(prompt, sampling, overrides)
        except LLMError as e:
            raise self._config_error(e) from None
        key = self._key(kw, use_cache, cache_tag)
        if key is None:
            return await self._acall(kw)
        while True:
            hit = await asyncio.to_thread(self._hit, key)  # a hit is written to the ledger: off the loop
            if hit is not None:
                return hit
            leader, fut = self._claim(key)
            if not leader:
                await asyncio.wrap_future(fut)
                continue
            try:
                result = await self._acall(kw)
                await asyncio.to_thread(self._store, key, result)
                return result
            finally:
                self._unclaim(key, fut)

    async def _acall(self, kw: dict[str, Any]) -> LLMResult:
        litellm = _litellm()
        async with self._async_sem():
            try:  # ledger writes may wait on other processes' transactions: off the event loop
                res = await asyncio.to_thread(self._reserve, kw)
            except LLMError as e:
                raise self._config_error(e) from None
            t0 = time.perf_counter()
            attempt = 0
            try:
                async for state in tenacity.AsyncRetrying(**self._retry_policy()):
                    with state:
                        attempt = state.retry_state.attempt_number
                        resp = await litellm.acompletion(**kw)
                        result = self._result(resp, kw, time.perf_counter() - t0, attempt)
            except Exception as e:  # noqa: BLE001 - classified in _give_up
                await asyncio.to_thread(self._release, res, True)
                raise self._give_up(e, attempt, t0) from e
            except BaseException:  # cancelled: the call may or may not have been billed; free its hold
                self._release(res, False)
                raise
            await asyncio.to_thread(self._settle, res, result)
            self._record(result, attempt, result.latency_s)
            return result

    async def acomplete_many(self, prompts: Sequence[Prompt], *, return_exceptions: bool = False,
                             sampling: SamplingConfig | None = None, **overrides: Any) -> list[LLMResult | LLMError]:
        """Async ``complete_many``: ordered results; the first failure cancels the rest unless
        ``return_exceptions=True`` (``BudgetExceeded`` always stops the batch)."""
        tags = _draw_tags(prompts, overrides.pop("cache_tag", None))

        async def one(p: Prompt, tag: str | int | None) -> LLMResult | LLMError:
            try:
                return await self.acomplete(p, sampling=sampling, cache_tag=tag, **overrides)
            except LLMError as e:
                if return_exceptions:
                    return e
                raise

        tasks = [asyncio.ensure_future(one(p, t)) for p, t in zip(prompts, tags)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()  # no-op for finished tasks; stops the rest after a failure
            await asyncio.gather(*tasks, return_exceptions=True)
            raise


def _draw_tags(prompts: Sequence[Prompt], base: str | int | None) -> list[str | int | None]:
    """Cache tags for a batch: ``base`` for a prompt's first occurrence, the occurrence number
    after it, so the k-th repeat of a sampled prompt is its own draw (and its own cache entry)."""
    seen: dict[str, int] = {}
    tags: list[str | int | None] = []
    for p in prompts:
        k = json.dumps(p, sort_keys=True, default=str)
        occ = seen[k] = seen.get(k, -1) + 1
        tags.append(base if occ == 0 else (occ if base is None else f"{base}#{occ}"))
    return tags
