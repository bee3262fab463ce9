"""An OpenAI-compatible Ray Serve app over the generation engine (``selftaught serve``).

``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models`` speak the OpenAI API, so the
``openai`` client, litellm and anything built on them work unchanged; ``/health`` answers
load balancers. Each replica holds one engine. Concurrent requests are merged into one engine
batch by ``serve.batch``; the batch handler is an async generator, so streamed requests get
their tokens as they are decoded (the transformers backend reports every token; vLLM answers
a batch at once, so its streams arrive in one piece). Budget forcing (s1) is an extra body
field; chat answers put the thinking in ``reasoning_content`` and the answer in ``content``.
"""
# No ``from __future__ import annotations``: FastAPI must see real types (``Request``) on the
# methods Serve wraps, or it reads them as query parameters.
import asyncio
import inspect
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve

from actors.engine.base import GenerationOutput, first_stop
from actors.engine.budget import budget_tokens
from selftaught.config import BudgetConfig, SamplingConfig
from serve import openai_protocol as proto
from serve.auth import authorize, hash_key
from serve.common import install_error_handlers, read_capped
from serve.config import ServeConfig

log = logging.getLogger(__name__)

api = FastAPI(title="selftaught", description="OpenAI-compatible generation with budget forcing")


install_error_handlers(api)


@dataclass
class Job:
    """One HTTP request: its prompts (several for ``/v1/completions``) and settings."""

    prompts: list[Any]
    params: SamplingConfig
    stream: bool = False
    chat: bool = True
    sent: dict[tuple[int, int], list[str]] = field(default_factory=dict)  # (prompt, sample) -> [reasoning, content]


def sendable(text: str, stops: list[str]) -> str:
    """The part of a partial text that is final: cut at a stop string, minus a tail that could
    still become one, minus an incomplete UTF-8 character."""
    if stops:
        hit = first_stop(text, stops)
        if hit is not None:
            text = text[:hit[0]]
        else:
            text = text[:max(0, len(text) - (max(len(s) for s in stops) - 1))]
    return text.rstrip("\ufffd")


def advance(job: Job, key: tuple[int, int], reasoning: str | None, content: str | None) -> dict[str, str]:
    """The new text since the last call (per field), remembering what was sent."""
    sent = job.sent.setdefault(key, ["", ""])
    delta: dict[str, str] = {}
    for i, (name, text) in enumerate((("reasoning_content", reasoning), ("content", content))):
        if text and len(text) > len(sent[i]) and text.startswith(sent[i]):
            delta[name] = text[len(sent[i]):]
            sent[i] = text
    return delta


def partial_view(job: Job, row: Any, engine: Any) -> tuple[str | None, str | None]:
    """(reasoning, content) of a row being decoded, in the form the endpoint returns."""
    reasoning, text = row.policy.partial(row, engine)
    if reasoning is None:
        return None, sendable(text, job.params.stop)
    reasoning = reasoning.rstrip("\ufffd")
    if not job.chat:  # completions stream the raw text: thinking now, the rest at the end
        return None, reasoning
    return reasoning, sendable(text, job.params.stop)


def final_view(job: Job, c: Any) -> tuple[str | None, str]:
    if job.chat:
        return proto.message_parts(c, job.params.budget is not None)
    return None, c.text


async def isolate_failed_batch(generate, executor, jobs: list[Job], prompts: list, params: list, owner: list,
                               rest: list[list[tuple]]) -> list[list[tuple]]:
    """After a failed engine batch: rerun each request alone, so only the one at fault fails.
    A stream that already received text cannot be restarted consistently: it gets the error.
    Returns, per job, its pending events plus ``final`` (outputs) or ``error``."""
    loop = asyncio.get_running_loop()
    out: list[list[tuple]] = []
    for j, job in enumerate(jobs):
        idx = [i for i, (jj, _) in enumerate(owner) if jj == j]
        if job.sent:
            out.append(rest[j] + [("error", "generation failed in this request's batch after streaming began")])
            continue
        try:
            res = await loop.run_in_executor(executor, lambda idx=idx: generate([prompts[i] for i in idx],
                                                                                [params[i] for i in idx]))
            out.append(rest[j] + [("final", res)])
        except Exception as e:  # noqa: BLE001 - this request is the one at fault
            log.warning("request failed alone: %s", e)
            out.append(rest[j] + [("error", f"generation failed: {e}")])
    return out


@serve.deployment(name="openai")
@serve.ingress(api)
class OpenAIServer:
    def __init__(self, cfg: dict, key_hashes: list[str]):
        from actors.generator import EngineHost

        self.cfg = ServeConfig(**cfg)
        self.key_hashes = list(key_hashes)
        self.host = EngineHost(self.cfg.engine, num_cpus=self.cfg.engine.cpus_per_actor)
        self.engine = self.host.engine
        self.model_id = self.cfg.model_id()
        self.max_len = int(getattr(self.engine, "max_len", None) or self.cfg.engine.max_model_len or 2048)
        self.limits = proto.Limits(max_model_len=self.max_len, default_max_tokens=self.cfg.default_max_tokens,
                                   max_tokens_limit=self.cfg.max_tokens_limit, max_n=self.cfg.max_n,
                                   vocab_size=len(self.engine.tokenizer))
        self.streams_tokens = "on_token" in inspect.signature(self.engine.generate).parameters
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.created = proto.now()
        self.stats = {"batches": 0, "requests": 0, "sequences": 0, "largest_batch": 0}  # on /health
        self._batched.set_max_batch_size(self.cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

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

    def _budget_tokens(self, budget: BudgetConfig):
        """The budget's delimiters as token ids, from the engine's cache (the lengths do not
        depend on the request's stop settings)."""
        return budget_tokens(self.engine, budget, SamplingConfig())

    def _control_tokens(self, budget: BudgetConfig) -> int:
        toks = self._budget_tokens(budget)
        return len(toks.think_end) + len(toks.cue)

    def _prompt_tokens(self, prompt: Any, budget: BudgetConfig | None) -> int:
        if isinstance(prompt, list):
            vocab = len(self.engine.tokenizer)
            if any(not isinstance(t, int) or t < 0 or t >= vocab for t in prompt):
                raise proto.OpenAIError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
            n = len(prompt)
        else:
            n = self.engine.count_tokens(prompt)
        return n + (len(self._budget_tokens(budget).think_start) if budget is not None else 0)

    # ------------------------------------------------------------------ the engine batch
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _batched(self, jobs: list[Job]) -> AsyncIterator[list[list[tuple]]]:
        """Run the requests of ``jobs`` as one engine batch; yield, per job, the events since
        the last yield (``delta`` for streamed text, then ``final`` or ``error``)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        prompts, params, owner = [], [], []
        for j, job in enumerate(jobs):
            for k, p in enumerate(job.prompts):
                prompts.append(p)
                params.append(job.params)
                owner.append((j, k))
        streaming = self.streams_tokens and any(job.stream for job in jobs)

        def on_token(row: Any) -> None:  # engine thread
            j, k = owner[row.request]
            job = jobs[j]
            if not job.stream:
                return
            delta = advance(job, (k, row.sample), *partial_view(job, row, self.engine))
            if delta:
                loop.call_soon_threadsafe(queue.put_nowait, (j, ("delta", k, row.sample, delta)))

        def run() -> list[GenerationOutput]:
            if streaming:
                return self.engine.generate(prompts, params, on_token=on_token)
            return self.engine.generate(prompts, params)

        def drain(first: list) -> list[list[tuple]]:
            items = first
            while not queue.empty():
                items.append(queue.get_nowait())
            per_job: list[list[tuple]] = [[] for _ in jobs]
            for j, ev in items:
                per_job[j].append(ev)
            return per_job

        self.stats["batches"] += 1
        self.stats["requests"] += len(jobs)
        self.stats["sequences"] += len(prompts)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        fut = loop.run_in_executor(self.executor, run)
        while not fut.done():
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, fut}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                first = [getter.result()]
            else:
                getter.cancel()
                first = []
            if first or not queue.empty():
                yield drain(first)
        rest = drain([])
        try:
            outs = fut.result()
        except Exception:  # noqa: BLE001 - find the request at fault: each one runs alone
            log.exception("engine batch of %d requests failed; running them one by one", len(jobs))
            yield await self._isolate(jobs, prompts, params, owner, rest)
            return
        final: list[list[tuple]] = [[] for _ in jobs]
        for i, (j, k) in enumerate(owner):
            final[j].append(outs[i])
        yield [evs + [("final", final[j])] for j, evs in enumerate(rest)]

    async def _isolate(self, jobs: list[Job], prompts: list, params: list, owner: list,
                       rest: list[list[tuple]]) -> list[list[tuple]]:
        self.stats["isolated_batches"] = self.stats.get("isolated_batches", 0) + 1
        return await isolate_failed_batch(self.engine.generate, self.executor, jobs, prompts, params, owner, rest)

    async def _events(self, job: Job) -> AsyncIterator[tuple]:
        async for events in self._batched(job):
            for ev in events:
                yield ev

    async def _outputs(self, job: Job) -> list[GenerationOutput]:
        outs, error = None, None
        async for ev in self._events(job):  # to the end: serve.batch hands every caller its end marker
            if ev[0] == "final":
                outs = ev[1]
            elif ev[0] == "error":
                error = ev[1]
        if error is not None or outs is None:
            raise proto.OpenAIError(error or "the engine returned nothing", status=500, type="server_error")
        return outs

    # ------------------------------------------------------------------ endpoints
    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_id, **self.host.info(), "batching": dict(self.stats)}

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
        try:
            prompt = self.engine.apply_chat_template([m.as_dict() for m in req.messages])
        except Exception as e:  # e.g. a template that rejects the role order
            raise proto.OpenAIError(f"messages do not fit the model's chat template: {e}", param="messages") from None
        params = proto.sampling_for(req, self.limits, self._prompt_tokens(prompt, budget), budget,
                                    self._control_tokens(budget) if budget else 0)
        job = Job([prompt], params, stream=req.stream, chat=True)
        rid, created = proto.new_id("chatcmpl"), proto.now()
        if req.stream:
            return self._sse(self._chat_stream(job, rid, created, req.include_usage()))
        outs = await self._outputs(job)
        return proto.chat_response(rid, created, self.model_id, outs[0], budget is not None)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        req = proto.parse(proto.CompletionRequest, await self._body(request))
        self._check_model(req.model)
        prompts = req.prompts()
        if len(prompts) > self.cfg.max_prompts:
            raise proto.OpenAIError(f"{len(prompts)} prompts exceed this server's limit of "
                                    f"{self.cfg.max_prompts} per request", param="prompt")
        budget = self._budget(req, chat=False)
        longest = max(self._prompt_tokens(p, budget) for p in prompts)
        params = proto.sampling_for(req, self.limits, longest, budget,
                                    self._control_tokens(budget) if budget else 0)
        job = Job(prompts, params, stream=req.stream, chat=False)
        rid, created = proto.new_id("cmpl"), proto.now()
        if req.stream:
            return self._sse(self._completion_stream(job, rid, created, req.include_usage()))
        outs = await self._outputs(job)
        return proto.completion_response(rid, created, self.model_id, outs)

    # ------------------------------------------------------------------ streaming
    @staticmethod
    def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
        async def body():
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _chat_stream(self, job: Job, rid: str, created: int, include_usage: bool):
        n = job.params.n
        for i in range(n):
            yield proto.chat_chunk(rid, created, self.model_id, i, {"role": "assistant", "content": ""})
        async for ev in self._events(job):
            if ev[0] == "delta":
                _, _, s, delta = ev
                yield proto.chat_chunk(rid, created, self.model_id, s, delta)
            elif ev[0] == "error":
                yield proto.OpenAIError(ev[1], status=500, type="server_error").body()
                return
            else:
                out = ev[1][0]
                for s, c in enumerate(out.completions):
                    delta = advance(job, (0, s), *final_view(job, c))
                    extra = {"budget": c.budget} if c.budget is not None else None
                    yield proto.chat_chunk(rid, created, self.model_id, s, delta, c.finish_reason, extra)
                if include_usage:
                    yield proto.usage_chunk(rid, created, self.model_id, "chat.completion.chunk", [out])

    async def _completion_stream(self, job: Job, rid: str, created: int, include_usage: bool):
        n = job.params.n
        async for ev in self._events(job):
            if ev[0] == "delta":
                _, k, s, delta = ev
                yield proto.completion_chunk(rid, created, self.model_id, k * n + s, delta.get("content", ""))
            elif ev[0] == "error":
                yield proto.OpenAIError(ev[1], status=500, type="server_error").body()
                return
            else:
                for k, out in enumerate(ev[1]):
                    for s, c in enumerate(out.completions):
                        _, text = final_view(job, c)
                        delta = advance(job, (k, s), None, text).get("content", "")
                        extra = {"budget": c.budget} if c.budget is not None else None
                        yield proto.completion_chunk(rid, created, self.model_id, k * n + s, delta,
                                                     c.finish_reason, extra)
                if include_usage:
                    yield proto.usage_chunk(rid, created, self.model_id, "text_completion", ev[1])


def build_openai_app(cfg: ServeConfig):
    """The Serve application for ``cfg``. API keys are resolved here, on the driver, and only
    their SHA-256 digests travel to the replicas."""
    hashes = sorted(hash_key(k) for k in cfg.api_keys())
    return OpenAIServer.options(**cfg.deployment_options()).bind(cfg.model_dump(), hashes)


def run_openai_app(cfg: ServeConfig, blocking: bool = False):
    """Start Serve's HTTP proxy on ``cfg.host:cfg.port`` and deploy the app (Ray must be up)."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    handle = serve.run(build_openai_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix,
                       blocking=blocking)
    return handle


def base_url(cfg: ServeConfig) -> str:
    prefix = cfg.route_prefix.rstrip("/")
    return f"http://{cfg.host}:{cfg.port}{prefix}/v1"
