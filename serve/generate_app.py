"""The engine's own schema over HTTP (``selftaught serve-generate``): ``POST /generate``.

``{"prompt": str | [int], "sampling": {...}}`` (or ``"prompts"`` for several) returns the
engine's output schema (``completions`` with text, token ids, finish reason, budget
accounting, log-probs). It sits behind the same API keys, body cap and limits as the
OpenAI-compatible app, answers errors in the same shape, and runs on the same engine loop:
concurrent requests share the running batch (continuous batching), each with its own settings.
"""
# No ``from __future__ import annotations``: FastAPI must see real types on the wrapped methods.
import asyncio
import json
from typing import Any

from fastapi import FastAPI, Request
from pydantic import ValidationError
from ray import serve

from actors.engine.base import GenerationOutput, RequestError
from selftaught.config import EngineConfig, SamplingConfig
from serve import openai_protocol as proto
from serve.auth import authorize, hash_key
from serve.common import install_error_handlers, read_capped
from serve.config import ServeConfig

api = FastAPI(title="selftaught-generate", description="The generation engine's own schema")
install_error_handlers(api)


class _PrefixIsRoot:
    """``POST /generate`` (the route prefix itself) is the root route, not a redirect to it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") and scope["path"] == scope.get("root_path"):
            scope = {**scope, "path": scope["path"] + "/", "raw_path": scope["path"].encode() + b"/"}
        await self.app(scope, receive, send)


api.add_middleware(_PrefixIsRoot)


@serve.deployment(name="generator")
@serve.ingress(api)
class GeneratorDeployment:
    def __init__(self, cfg: dict, key_hashes: list[str]):
        from actors.engine.runner import EngineLoop
        from actors.generator import EngineHost

        self.cfg = ServeConfig(**cfg)
        self.key_hashes = list(key_hashes)
        self.host = EngineHost(self.cfg.engine, num_cpus=self.cfg.engine.cpus_per_actor)
        self.loop = EngineLoop(self.host.engine)

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", **self.host.info(), "engine": dict(self.host.engine.stats)}

    def _sampling(self, raw: Any, n_prompts: int) -> SamplingConfig:
        try:
            s = SamplingConfig(**(raw or {}))
        except (ValidationError, TypeError) as e:
            if isinstance(e, ValidationError):
                raise proto.validation_error(e) from None
            raise proto.OpenAIError(f"sampling must be an object of sampling settings ({e})", param="sampling") from None
        c = self.cfg
        if s.max_new_tokens > c.max_tokens_limit:
            raise proto.OpenAIError(f"max_new_tokens={s.max_new_tokens} exceeds this server's limit of "
                                    f"{c.max_tokens_limit}", param="sampling.max_new_tokens")
        if s.n > c.max_n:
            raise proto.OpenAIError(f"n={s.n} exceeds this server's limit of {c.max_n}", param="sampling.n")
        if n_prompts > c.max_prompts:
            raise proto.OpenAIError(f"{n_prompts} prompts exceed this server's limit of {c.max_prompts}",
                                    param="prompts")
        proto.check_stops(s.stop, param="sampling.stop")
        if s.budget is not None:
            proto.check_budget_texts(s.budget, param="sampling.budget")
        return s

    async def _one(self, prompt: Any, sampling: SamplingConfig, index: int) -> dict[str, Any]:
        comps, usage = await self.loop.generate(prompt, sampling)
        failed = [c for c in comps if c.finish_reason == "error"]
        if failed:
            raise proto.OpenAIError(failed[0].error or "generation failed", status=500, type="server_error")
        out = GenerationOutput(prompt=prompt if isinstance(prompt, str) else "", prompt_token_ids=[],
                               completions=comps, request_index=index,
                               metrics={"prompt_tokens": usage[0].get("prompt_tokens", 0) if usage else 0,
                                        "completion_tokens": sum(c.num_tokens for c in comps)})
        return out.to_dict()

    @api.post("/")
    async def generate(self, request: Request):
        authorize(request.headers, self.key_hashes)
        try:
            body = json.loads(await read_capped(request))
        except (ValueError, UnicodeDecodeError):
            raise proto.OpenAIError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise proto.OpenAIError("the request body must be a JSON object")
        prompts = body.get("prompts", [body["prompt"]] if "prompt" in body else None)
        if not prompts or not isinstance(prompts, list):
            raise proto.OpenAIError("give 'prompt' (a string or token ids) or 'prompts' (a list)", param="prompt")
        if any(not isinstance(p, (str, list)) for p in prompts):
            raise proto.OpenAIError("each prompt must be a string or a list of token ids", param="prompt")
        sampling = self._sampling(body.get("sampling"), len(prompts))
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._one(p, sampling, i)) for i, p in enumerate(prompts)]
        except* RequestError as eg:
            raise proto.OpenAIError(str(eg.exceptions[0]), param="prompt") from None
        except* proto.OpenAIError as eg:
            raise eg.exceptions[0] from None
        outs = [t.result() for t in tasks]
        return {"outputs": outs} if "prompts" in body else outs[0]


def build_generate_app(engine_cfg: EngineConfig, num_replicas: int = 1, serve_cfg: ServeConfig | None = None):
    """The deployment for ``engine_cfg``; keys and limits come from ``serve_cfg`` (defaults:
    no key, the OpenAI app's limits). Keys are resolved here and only their digests travel."""
    cfg = (serve_cfg or ServeConfig()).model_copy(update={"engine": engine_cfg, "num_replicas": num_replicas})
    hashes = sorted(hash_key(k) for k in cfg.api_keys())
    return GeneratorDeployment.options(**cfg.deployment_options()).bind(cfg.model_dump(), hashes)
