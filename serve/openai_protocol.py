"""The OpenAI wire format for the Serve app: request models, validation, response shapes.

Pure functions and pydantic models (no Ray), so the protocol is tested without a cluster.
Requests follow the OpenAI API; fields the engine cannot honour (tools, penalties, echo) are
refused with a 400 naming the field rather than silently ignored, since a client that sends
them expects their effect. Fields no version of the API defines are ignored with a warning, as
vLLM does, so newer clients keep working. Extra body fields (``extra_body`` in the ``openai``
client) carry engine settings: ``budget_forcing`` (a :class:`BudgetConfig`), ``top_k``,
``min_tokens``, ``stop_token_ids``, ``ignore_eos``, and vLLM's ``guided_json``,
``guided_regex`` and ``guided_choice`` for structured output.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from actors.engine.base import Completion, GenerationOutput
from selftaught.config import BudgetConfig, SamplingConfig, StructuredOutput

log = logging.getLogger(__name__)


MAX_STOP_CHARS = 256
MAX_BODY_BYTES = 8 * 2**20  # a request body larger than this is refused before it is parsed
MAX_BUDGET_TEXT = 256  # characters of a budget's extension string, delimiters and answer cue


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(e: ValidationError) -> OpenAIError:
    """The first pydantic error as a 400 that names the offending field."""
    first = e.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ()))
    return OpenAIError(f"{loc}: {first.get('msg')}" if loc else str(first.get("msg")), param=loc or None)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, refusal ... carry nothing we use

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


# Fields of the OpenAI API this server knows and accepts (with or without effect).
_KNOWN_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "modalities",
                  "prediction", "audio", "reasoning_effort", "web_search_options", "safety_identifier",
                  "prompt_cache_key", "verbosity"}


class _Common(_Open):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI's API
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # extra body: engine settings
    top_k: int | None = Field(default=None, ge=-1)
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = Field(default=None, max_length=64)
    ignore_eos: bool = False
    budget_forcing: BudgetConfig | Literal[False] | None = None
    guided_json: dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    response_format: dict[str, Any] | None = None

    def structured(self) -> StructuredOutput | None:
        """The requested output constraint: OpenAI's ``response_format`` or vLLM's guided fields."""
        given = [x for x in (self.guided_json, self.guided_regex, self.guided_choice) if x is not None]
        rf = self.response_format or {}
        kind = rf.get("type", "text") if isinstance(rf, dict) else None
        if kind not in ("text", "json_object", "json_schema"):
            raise OpenAIError(f"response_format type {kind!r} is not one of text, json_object, json_schema",
                              param="response_format")
        if len(given) + (kind != "text") > 1:
            raise OpenAIError("give one of response_format, guided_json, guided_regex, guided_choice",
                              param="response_format")
        try:
            if kind == "json_schema":
                spec = rf.get("json_schema") or {}
                schema = spec.get("schema") if isinstance(spec, dict) else None
                if not isinstance(schema, dict):
                    raise OpenAIError("response_format.json_schema.schema must be a JSON schema object",
                                      param="response_format")
                return StructuredOutput(type="json_schema", json_schema=schema)
            if kind == "json_object":
                return StructuredOutput(type="json_object")
            if self.guided_json is not None:
                return StructuredOutput(type="json_schema", json_schema=self.guided_json)
            if self.guided_regex is not None:
                return StructuredOutput(type="regex", regex=self.guided_regex)
            if self.guided_choice is not None:
                return StructuredOutput(type="choice", choice=self.guided_choice)
        except ValidationError as e:
            raise validation_error(e) from None
        return None

    def logprob_count(self) -> int | None:
        """``SamplingConfig.logprobs`` for this request (None: none asked)."""
        return None

    def unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise OpenAIError(f"{name} is not supported by this server; send 0 or leave it out", param=name)
        if self.logit_bias:
            raise OpenAIError("logit_bias is not supported by this server", param="logit_bias")
        unknown = sorted(set(self.model_extra or {}) - _KNOWN_IGNORED)
        if unknown:
            log.warning("ignoring unknown request fields %s", unknown)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        check_stops(stops)
        return [s for s in stops if s]


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None

    def logprob_count(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            raise OpenAIError("top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> None:
        super().unsupported()
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise OpenAIError(f"{name} (function calling) is not supported by this server", param=name)
        if self.tool_choice not in (None, "none") or self.function_call not in (None, "none"):
            raise OpenAIError("tool_choice needs tools, which this server does not support", param="tool_choice")

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = None

    def logprob_count(self) -> int | None:
        return self.logprobs

    def unsupported(self) -> None:
        super().unsupported()
        if self.echo:
            raise OpenAIError("echo is not supported by this server", param="echo")
        if self.suffix:
            raise OpenAIError("suffix (insertion) is not supported by this server", param="suffix")
        if self.best_of not in (None, self.n):
            raise OpenAIError("best_of must equal n (no server-side ranking)", param="best_of")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise OpenAIError("prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # one prompt as token ids
        return list(p)

    def token_limit(self) -> int | None:
        return self.max_tokens


def parse(cls: type[_Common], body: Any) -> _Common:
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object")
    try:
        req = cls.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
    req.unsupported()
    return req


def check_stops(stops: list[str], param: str = "stop") -> None:
    """Stop strings are matched against every decoded token's tail: their number and length
    are bounded (the same rule for every endpoint)."""
    if len(stops) > 16:
        raise OpenAIError("at most 16 stop sequences", param=param)
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise OpenAIError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters", param=param)


def check_budget_texts(budget: BudgetConfig, param: str = "budget_forcing") -> None:
    """A budget's strings are tokenized and forced into completions: their length is bounded."""
    for name in ("extension", "answer_cue", "think_start", "think_end"):
        if len(getattr(budget, name)) > MAX_BUDGET_TEXT:
            raise OpenAIError(f"{param}.{name} may have at most {MAX_BUDGET_TEXT} characters",
                              param=f"{param}.{name}")


class Limits(BaseModel):
    """What one request may ask of the server (from ``ServeConfig``)."""

    max_model_len: int
    default_max_tokens: int
    max_tokens_limit: int
    max_n: int
    vocab_size: int | None = None  # token ids (stop_token_ids) must lie in [0, vocab_size)


def sampling_for(req: _Common, limits: Limits, prompt_tokens: int, budget: BudgetConfig | None,
                 control_tokens: int = 0) -> SamplingConfig:
    """The engine settings of a request, refusing what cannot be served: ``n`` over the limit,
    budgets or ``max_tokens`` over ``max_tokens_limit``, prompts that leave no room in the
    context (OpenAI's ``context_length_exceeded``). Without ``max_tokens`` a budget-forced
    request may use its thinking cap plus the delimiters plus its answer limit."""
    if req.n > limits.max_n:
        raise OpenAIError(f"n={req.n} exceeds this server's limit of {limits.max_n}", param="n")
    if budget is not None:
        check_budget_texts(budget)
    if limits.vocab_size is not None:
        bad = [t for t in req.stop_token_ids or [] if not 0 <= t < limits.vocab_size]
        if bad:
            raise OpenAIError(f"stop_token_ids {bad[:3]} are outside this model's vocabulary [0, {limits.vocab_size})",
                              param="stop_token_ids")
    cap = limits.max_tokens_limit
    if budget is not None:
        for name in ("max_thinking_tokens", "min_thinking_tokens", "max_answer_tokens"):
            v = getattr(budget, name)
            if v is not None and v > cap:
                raise OpenAIError(f"budget_forcing.{name}={v} exceeds this server's limit of {cap} tokens",
                                  param=f"budget_forcing.{name}")
    room = limits.max_model_len - prompt_tokens
    if room <= 0:
        raise OpenAIError(f"the prompt has {prompt_tokens} tokens; this model's context is "
                          f"{limits.max_model_len} tokens", param="messages", code="context_length_exceeded")
    asked = req.token_limit()
    if asked is not None:
        if asked > cap:
            raise OpenAIError(f"max_tokens={asked} exceeds this server's limit of {cap}", param="max_tokens")
        if asked > room:
            raise OpenAIError(f"the prompt has {prompt_tokens} tokens and max_tokens is {asked}: this "
                              f"model's context is {limits.max_model_len} tokens", param="max_tokens",
                              code="context_length_exceeded")
        max_new = asked
    elif budget is not None:
        think = budget.max_thinking_tokens if budget.max_thinking_tokens is not None else max(
            limits.default_max_tokens, budget.min_thinking_tokens + limits.default_max_tokens // 2)
        max_new = min(room, cap, think + control_tokens + (budget.max_answer_tokens or limits.default_max_tokens))
    else:
        max_new = min(room, limits.default_max_tokens)
    if budget is not None and budget.min_thinking_tokens >= max_new:
        raise OpenAIError(f"budget_forcing.min_thinking_tokens={budget.min_thinking_tokens} leaves no room "
                          f"for an answer within max_tokens={max_new}", param="budget_forcing.min_thinking_tokens")
    top_k = req.top_k if req.top_k and req.top_k > 0 else 0
    try:
        return SamplingConfig(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=top_k, max_new_tokens=max_new,
            min_new_tokens=min(req.min_tokens, max_new), stop=req.stops(),
            stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos, seed=req.seed,
            n=req.n, budget=budget, logprobs=req.logprob_count(), response_format=req.structured())
    except ValidationError as e:
        raise validation_error(e) from None


# ---------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def message_parts(c: Completion, budget: bool) -> tuple[str | None, str]:
    """(reasoning, content) of a completion: with budget forcing the content is the answer."""
    if budget and c.answer is not None:
        return c.reasoning, c.answer
    return None, c.text


def usage(outputs: list[GenerationOutput]) -> dict[str, Any]:
    prompt = sum(o.metrics.get("prompt_tokens", len(o.prompt_token_ids)) for o in outputs)
    comps = [c for o in outputs for c in o.completions]
    completion = sum(c.num_tokens for c in comps)
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if any(c.budget for c in comps):
        out["completion_tokens_details"] = {
            "reasoning_tokens": sum((c.budget or {}).get("thinking_tokens", 0) for c in comps)}
    return out


LogprobEntry = tuple[str, float, list[tuple[str, float]]]  # token text, its log-prob, top alternatives


def chat_logprobs(entries: list[LogprobEntry] | None) -> dict[str, Any] | None:
    """OpenAI's chat ``logprobs`` object: per content token, its text, log-prob, UTF-8 bytes and
    the top alternatives."""
    if entries is None:
        return None
    item = lambda t, lp: {"token": t, "logprob": lp, "bytes": list(t.encode())}  # noqa: E731
    return {"content": [{**item(t, lp), "top_logprobs": [item(a, b) for a, b in alts]} for t, lp, alts in entries]}


def completion_logprobs(entries: list[LogprobEntry] | None, offset: int = 0) -> dict[str, Any] | None:
    """The legacy completions ``logprobs`` object: parallel lists and character offsets."""
    if entries is None:
        return None
    offsets, pos = [], offset
    for t, _, _ in entries:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [dict(alts) for _, _, alts in entries], "text_offset": offsets}


def chat_response(rid: str, created: int, model: str, out: GenerationOutput, budget: bool,
                  logprobs: list[list[LogprobEntry] | None] | None = None) -> dict[str, Any]:
    choices = []
    for i, c in enumerate(out.completions):
        reasoning, content = message_parts(c, budget)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        choice: dict[str, Any] = {"index": i, "message": message, "finish_reason": c.finish_reason,
                                  "logprobs": chat_logprobs(logprobs[i]) if logprobs else None}
        if c.budget is not None:
            choice["budget"] = c.budget
        choices.append(choice)
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage([out])}


def completion_response(rid: str, created: int, model: str, outputs: list[GenerationOutput],
                        logprobs: list[list[list[LogprobEntry] | None]] | None = None) -> dict[str, Any]:
    choices = []
    for k, out in enumerate(outputs):
        n = len(out.completions)
        for s, c in enumerate(out.completions):
            lp = completion_logprobs(logprobs[k][s]) if logprobs else None
            choice: dict[str, Any] = {"index": k * n + s, "text": c.text, "finish_reason": c.finish_reason,
                                      "logprobs": lp}
            if c.budget is not None:
                choice["budget"] = c.budget
            choices.append(choice)
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage(outputs)}


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict[str, Any],
               finish_reason: str | None = None, extra: dict[str, Any] | None = None,
               logprobs: list[LogprobEntry] | None = None) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "finish_reason": finish_reason,
              "logprobs": chat_logprobs(logprobs), **(extra or {})}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def completion_chunk(rid: str, created: int, model: str, index: int, text: str,
                     finish_reason: str | None = None, extra: dict[str, Any] | None = None,
                     logprobs: list[LogprobEntry] | None = None, offset: int = 0) -> dict[str, Any]:
    choice = {"index": index, "text": text, "finish_reason": finish_reason,
              "logprobs": completion_logprobs(logprobs, offset), **(extra or {})}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def usage_chunk(rid: str, created: int, model: str, obj: str, outputs: list[GenerationOutput]) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage(outputs)}
