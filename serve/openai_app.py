"""An OpenAI-compatible Ray Serve app over the generation engine (``selftaught serve``).

``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models`` speak the OpenAI API, so the
``openai`` client, litellm and anything built on them work unchanged; ``/health`` answers
load balancers. Each replica holds one engine driven by an :class:`~actors.engine.runner.EngineLoop`:
a request joins the running batch at the engine's next decode step (continuous batching, no
batch wait), streams the engine's typed events as they are decoded, and is aborted (its rows
freed) when its client goes away. Requests are validated and tokenized on the replica's own
tokenizer in a worker thread, never on the event loop and never on the engine's tokenizer.
Budget forcing (s1) is an extra body field; chat answers put the thinking in
``reasoning_content`` and the answer in ``content``. ``logprobs`` and structured output
(``response_format`` with a JSON schema, vLLM's ``guided_regex`` / ``guided_choice``) are served.
"""
# No ``from __future__ import annotations``: FastAPI must see real types (``Request``) on the
# methods Serve wraps, or it reads them as query parameters.
import asyncio
import copy
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve

from actors.engine.base import BoundedCache, Completion, GenerationOutput, RequestError, StreamEvent, apply_chat_template
from actors.engine.budget import tokenize_budget
from selftaught.config import BudgetConfig, SamplingConfig
from serve import openai_protocol as proto
from serve.auth import authorize, hash_key
from serve.common import install_error_handlers, read_capped
from serve.config import ServeConfig, start_serve

log = logging.getLogger(__name__)

api = FastAPI(title="selftaught", description="OpenAI-compatible generation with budget forcing")


install_error_handlers(api)


@dataclass
class Job:
    """One HTTP request: its prompts as token ids (several for ``/v1/completions``) and settings."""

    rid: str
    prompts: list[list[int]]
    params: SamplingConfig
    chat: bool = True


class RequestSide:
    """Everything a replica does with a tokenizer on behalf of requests: its own copy of the
    tokenizer, used from one worker thread only, with bounded caches."""

    def __init__(self, tokenizer: Any):
        self.tok = copy.deepcopy(tokenizer)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._budgets = BoundedCache(256)

    async def run(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def chat_ids(self, messages: list[dict]) -> list[int]:
        try:
            return self.encode(apply_chat_template(self.tok, messages))
        except Exception as e:  # e.g. a template that rejects the role order
            raise proto.OpenAIError(f"messages do not fit the model's chat template: {e}", param="messages") from None

    def budget(self, budget: BudgetConfig):
        return self._budgets.get(budget.model_dump_json(), lambda: tokenize_budget(self.tok, budget, set()))

    def entries(self, ids: list[int], lps: list[float] | None, tops: list | None) -> list[proto.LogprobEntry] | None:
        """Token texts for log-prob answers."""
        if lps is None:
            return None
        dec = lambda t: self.tok.decode([t])  # noqa: E731
        return [(dec(t), lp, [(dec(a), b) for a, b in (tops[i] if tops else None) or []])
                for i, (t, lp) in enumerate(zip(ids, lps))]


def _answer_slice(c: Completion) -> slice:
    """The answer's tokens of a completion (after thinking and the delimiter)."""
    if c.budget is None:
        return slice(0, None)
    return slice(c.budget["thinking_tokens"] + c.budget["control_tokens"], None)


@serve.deployment(name="openai")
@serve.ingress(api)
class OpenAIServer:
    def __init__(self, cfg: dict, key_hashes: list[str]):
        from actors.engine.runner import EngineLoop
        from actors.generator import EngineHost

        self.cfg = ServeConfig(**cfg)
        self.key_hashes = list(key_hashes)
        self.host = EngineHost(self.cfg.engine, num_cpus=self.cfg.engine.cpus_per_actor)
        self.engine = self.host.engine
        self.loop = EngineLoop(self.engine)
        self.side = RequestSide(self.engine.tokenizer)
        self.model_id = self.cfg.model_id()
        self.max_len = int(self.engine.max_len)
        self.limits = proto.Limits(max_model_len=self.max_len, default_max_tokens=self.cfg.default_max_tokens,
                                   max_tokens_limit=self.cfg.max_tokens_limit, max_n=self.cfg.max_n,
                                   vocab_size=self.engine.vocab_size)
        self.created = proto.now()
        self.stats = {"requests": 0, "streams": 0, "cancelled": 0, "failed": 0}  # on /health

    # ------------------------------------------------------------------ plumbing
    def _authorize(self, request: Request) -> None:
        authorize(request.headers, self.key_hashes)

    async def _body(self, request: Request) -> Any:
        self._authorize(request)
        raw = await read_capped(request)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise proto.OpenAIError(f"the request body is not valid JSON ({e})") from None

    def _check_model(self, model: str) -> None:
        if model != self.model_id:
            raise proto.OpenAIError(f"the model '{model}' does not exist here; this server serves "
                                    f"'{self.model_id}'", status=404, param="model", code="model_not_found")

    def _budget(self, req: proto._Common, chat: bool) -> BudgetConfig | None:
        if req.budget_forcing is False:
            return None
        if req.budget_forcing is not None:
            return req.budget_forcing
        return self.cfg.default_budget if chat else None

    def _check_ids(self, prompt: list[int]) -> list[int]:
        vocab = self.engine.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in prompt):
            raise proto.OpenAIError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        return list(prompt)

    async def _params(self, req: proto._Common, prompts: list[list[int]], budget: BudgetConfig | None) -> SamplingConfig:
        extra, control = 0, 0
        if budget is not None:
            toks = await self.side.run(self.side.budget, budget)
            extra, control = len(toks.think_start), len(toks.think_end) + len(toks.cue)
        longest = max(len(p) for p in prompts) + extra
        return proto.sampling_for(req, self.limits, longest, budget, control)

    # ------------------------------------------------------------------ running requests
    async def _stream(self, job: Job) -> AsyncIterator[tuple[int, StreamEvent]]:
        """Events of every prompt of the job, merged as they come: (prompt index, event). A
        request the engine refuses is a 400 before anything is sent."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(k: int, agen) -> None:
            try:
                async for ev in agen:
                    queue.put_nowait((k, ev))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((k, e))
            finally:
                queue.put_nowait((k, done))

        gens = [self.loop.stream(p, job.params, f"{job.rid}-{k}") for k, p in enumerate(job.prompts)]
        tasks = [asyncio.ensure_future(pump(k, g)) for k, g in enumerate(gens)]
        open_, finished = len(tasks), False
        try:
            while open_:
                k, item = await queue.get()
                if item is done:
                    open_ -= 1
                elif isinstance(item, RequestError):
                    raise proto.OpenAIError(str(item), param="prompt" if len(job.prompts) > 1 else None)
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield k, item
            finished = True
        finally:
            if not finished:
                self.stats["cancelled"] += 1
            for t in tasks:
                t.cancel()  # the cancellation reaches each engine stream, which aborts its request
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _outputs(self, job: Job) -> list[GenerationOutput]:
        n = job.params.n
        comps: list[list[Completion | None]] = [[None] * n for _ in job.prompts]
        prompt_tokens = [0] * len(job.prompts)
        async for k, ev in self._stream(job):
            if ev.finished:
                comps[k][ev.index] = ev.completion
                prompt_tokens[k] = (ev.usage or {}).get("prompt_tokens", 0)
        failed = [c for cs in comps for c in cs if c is None or c.finish_reason == "error"]
        if failed:
            self.stats["failed"] += 1
            msg = failed[0].error if failed[0] is not None else "the engine returned nothing"
            raise proto.OpenAIError(msg or "generation failed", status=500, type="server_error")
        return [GenerationOutput(prompt="", prompt_token_ids=[], completions=cs, request_index=k,
                                 metrics={"prompt_tokens": prompt_tokens[k]}) for k, cs in enumerate(comps)]

    # ------------------------------------------------------------------ endpoints
    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_id, **self.host.info(),
                "engine": {**self.engine.stats, "running_rows": self.engine.running()},
                "requests": dict(self.stats)}

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "selftaught",
                "root": self.cfg.engine.model, "max_model_len": self.max_len}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"object": "list", "data": [self._model_card()]}

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> dict[str, Any]:
        self._authorize(request)
        self._check_model(model_id)
        return self._model_card()

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        req = proto.parse(proto.ChatCompletionRequest, await self._body(request))
        self._check_model(req.model)
        budget = self._budget(req, chat=True)
        ids = await self.side.run(self.side.chat_ids, [m.as_dict() for m in req.messages])
        params = await self._params(req, [ids], budget)
        job = Job(proto.new_id("chatcmpl"), [ids], params, chat=True)
        self.stats["requests"] += 1
        created = proto.now()
        if req.stream:
            return await self._sse(self._chat_stream(job, created, req.include_usage()))
        out = (await self._outputs(job))[0]
        lps = None
        if params.logprobs is not None:
            lps = [await self.side.run(self.side.entries, c.token_ids[_answer_slice(c)],
                                       c.logprobs[_answer_slice(c)] if c.logprobs is not None else None,
                                       c.top_logprobs[_answer_slice(c)] if c.top_logprobs else None)
                   for c in out.completions]
        return proto.chat_response(job.rid, created, self.model_id, out, budget is not None, lps)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        req = proto.parse(proto.CompletionRequest, await self._body(request))
        self._check_model(req.model)
        raw = req.prompts()
        if len(raw) > self.cfg.max_prompts:
            raise proto.OpenAIError(f"{len(raw)} prompts exceed this server's limit of "
                                    f"{self.cfg.max_prompts} per request", param="prompt")
        prompts = [self._check_ids(p) if isinstance(p, list) else await self.side.run(self.side.encode, p)
                   for p in raw]
        budget = self._budget(req, chat=False)
        params = await self._params(req, prompts, budget)
        job = Job(proto.new_id("cmpl"), prompts, params, chat=False)
        self.stats["requests"] += 1
        created = proto.now()
        if req.stream:
            return await self._sse(self._completion_stream(job, created, req.include_usage()))
        outs = await self._outputs(job)
        lps = None
        if params.logprobs is not None:
            lps = [[await self.side.run(self.side.entries, c.token_ids, c.logprobs, c.top_logprobs)
                    for c in o.completions] for o in outs]
        return proto.completion_response(job.rid, created, self.model_id, outs, lps)

    # ------------------------------------------------------------------ streaming
    async def _sse(self, chunks: AsyncIterator[dict]) -> StreamingResponse:
        """A server-sent-event response. The first chunk is produced before the response
        starts, so a request the engine refuses still gets its 4xx status."""
        try:
            first = await chunks.__anext__()
        except BaseException:
            await chunks.aclose()
            raise

        async def body():
            try:
                yield f"data: {json.dumps(first)}\n\n"
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                await chunks.aclose()  # a client that went away aborts its engine request
        self.stats["streams"] += 1
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _chat_stream(self, job: Job, created: int, include_usage: bool):
        n, budget = job.params.n, job.params.budget is not None
        want_lp = job.params.logprobs is not None
        events = self._stream(job)
        try:
            async for chunk in self._chat_chunks(job, events, created, include_usage, n, budget, want_lp):
                yield chunk
        finally:
            await events.aclose()  # a client that left aborts its engine request

    async def _chat_chunks(self, job: Job, events, created: int, include_usage: bool, n: int, budget: bool,
                           want_lp: bool):
        usage: list[GenerationOutput] = []
        started = False
        async for _, ev in events:
            if not started:  # the engine accepted the request: open the n choices
                started = True
                for i in range(n):
                    yield proto.chat_chunk(job.rid, created, self.model_id, i, {"role": "assistant", "content": ""})
            if ev.error:
                yield proto.OpenAIError(ev.error, status=500, type="server_error").body()
                return
            delta: dict[str, str] = {}
            if ev.text and ev.phase == "answer":
                delta["content"] = ev.text
            elif ev.text and ev.phase == "reasoning":
                delta["reasoning_content" if budget else "content"] = ev.text
            lps = None
            if want_lp and ev.phase == "answer" and ev.token_ids:
                lps = await self.side.run(self.side.entries, ev.token_ids, ev.logprobs, ev.top_logprobs)
            if ev.finished:
                c = ev.completion
                extra = {"budget": c.budget} if c.budget is not None else None
                yield proto.chat_chunk(job.rid, created, self.model_id, ev.index, delta, c.finish_reason, extra, lps)
                pt = (ev.usage or {}).get("prompt_tokens", 0) if not usage else 0  # one prompt, n samples
                usage.append(GenerationOutput("", [], [c], metrics={"prompt_tokens": pt}))
            elif delta or lps:
                yield proto.chat_chunk(job.rid, created, self.model_id, ev.index, delta, logprobs=lps)
        if include_usage:
            yield proto.usage_chunk(job.rid, created, self.model_id, "chat.completion.chunk", usage)

    async def _completion_stream(self, job: Job, created: int, include_usage: bool):
        events = self._stream(job)
        try:
            async for chunk in self._completion_chunks(job, events, created, include_usage):
                yield chunk
        finally:
            await events.aclose()

    async def _completion_chunks(self, job: Job, events, created: int, include_usage: bool):
        n = job.params.n
        want_lp = job.params.logprobs is not None
        offsets: dict[int, int] = {}
        usage: list[GenerationOutput] = []
        seen_prompt: set[int] = set()
        async for k, ev in events:
            if ev.error:
                yield proto.OpenAIError(ev.error, status=500, type="server_error").body()
                return
            index = k * n + ev.index
            lps = None
            if want_lp and ev.token_ids:
                lps = await self.side.run(self.side.entries, ev.token_ids, ev.logprobs, ev.top_logprobs)
            off = offsets.get(index, 0)
            offsets[index] = off + len(ev.text)
            if ev.finished:
                c = ev.completion
                extra = {"budget": c.budget} if c.budget is not None else None
                yield proto.completion_chunk(job.rid, created, self.model_id, index, ev.text, c.finish_reason,
                                             extra, lps, off)
                pt = (ev.usage or {}).get("prompt_tokens", 0) if k not in seen_prompt else 0
                seen_prompt.add(k)
                usage.append(GenerationOutput("", [], [c], metrics={"prompt_tokens": pt}))
            elif ev.text or lps:
                yield proto.completion_chunk(job.rid, created, self.model_id, index, ev.text, logprobs=lps, offset=off)
        if include_usage:
            yield proto.usage_chunk(job.rid, created, self.model_id, "text_completion", usage)


def build_openai_app(cfg: ServeConfig):
    """The Serve application for ``cfg``. API keys are resolved here, on the driver, and only
    their SHA-256 digests travel to the replicas."""
    hashes = sorted(hash_key(k) for k in cfg.api_keys())
    return OpenAIServer.options(**cfg.deployment_options()).bind(cfg.model_dump(), hashes)


def run_openai_app(cfg: ServeConfig, blocking: bool = False):
    """Start Serve's HTTP proxy on ``cfg.host:cfg.port`` and deploy the app (Ray must be up)."""
    start_serve(cfg.host, cfg.port, cfg.proxy_location)
    handle = serve.run(build_openai_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix,
                       blocking=blocking)
    return handle


def base_url(cfg: ServeConfig) -> str:
    prefix = cfg.route_prefix.rstrip("/")
    return f"http://{cfg.host}:{cfg.port}{prefix}/v1"
