"""A Ray Serve deployment of the generation engine with dynamic request batching.

``POST /generate`` with ``{"prompt": str | [int], "sampling": {...}}`` (or ``"prompts"`` for
several) returns the engine's output schema. Concurrent requests are merged into one engine
batch by ``serve.batch``; each keeps its own sampling settings. Bad requests get a 400 with
the reason. The OpenAI-compatible app builds on the same deployment pattern.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydantic import ValidationError
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from selftaught.config import EngineConfig, SamplingConfig

log = logging.getLogger(__name__)


@serve.deployment(name="generator", max_ongoing_requests=64)
class GeneratorDeployment:
    def __init__(self, engine_cfg: dict, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.01):
        from actors.generator import EngineHost

        self.host = EngineHost(engine_cfg)
        self.max_prompt_tokens = self.host.engine.max_len if hasattr(self.host.engine, "max_len") else None
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _batched(self, items: list[tuple[Any, SamplingConfig]]) -> list[dict]:
        prompts = [p for p, _ in items]
        params = [s for _, s in items]
        outs = await asyncio.to_thread(self.host.engine.generate, prompts, params)
        return [o.to_dict() for o in outs]

    async def __call__(self, request: Request):
        if request.url.path.rstrip("/").endswith("/health"):
            return JSONResponse({"status": "ok", **self.host.info()})
        try:
            body = await request.json()
        except Exception:
            return JSONResponse({"error": "request body is not valid JSON"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "request body must be a JSON object"}, status_code=400)
        prompts = body.get("prompts", [body["prompt"]] if "prompt" in body else None)
        if not prompts or not isinstance(prompts, list):
            return JSONResponse({"error": "give 'prompt' (string or token ids) or 'prompts' (list)"},
                                status_code=400)
        try:
            sampling = SamplingConfig(**(body.get("sampling") or {}))
        except (ValidationError, TypeError) as e:
            return JSONResponse({"error": f"invalid sampling settings: {e}"}, status_code=400)
        for p in prompts:
            if not isinstance(p, (str, list)):
                return JSONResponse({"error": "each prompt must be a string or a list of token ids"},
                                    status_code=400)
            if self.max_prompt_tokens:
                n = len(p) if isinstance(p, list) else self.host.engine.count_tokens(p)
                if n + sampling.max_new_tokens > self.max_prompt_tokens:
                    return JSONResponse({"error": f"prompt of {n} tokens + max_new_tokens "
                                         f"{sampling.max_new_tokens} exceeds {self.max_prompt_tokens}"},
                                        status_code=400)
        outs = await asyncio.gather(*(self._batched((p, sampling)) for p in prompts))
        return JSONResponse({"outputs": outs} if "prompts" in body else outs[0])


def build_generate_app(engine_cfg: EngineConfig, num_replicas: int = 1, max_batch_size: int = 16):
    opts = {"num_cpus": engine_cfg.cpus_per_actor}
    if engine_cfg.gpus_per_actor:
        opts["num_gpus"] = engine_cfg.gpus_per_actor
    return GeneratorDeployment.options(num_replicas=num_replicas, ray_actor_options=opts).bind(
        engine_cfg.model_dump(), max_batch_size)
