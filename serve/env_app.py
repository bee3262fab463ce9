"""``env.value`` as an HTTP service on Ray Serve (``selftaught research serve``).

Clients submit a batch of ideas for a named environment and get ids back at once; they then
poll (``GET .../results?ids=...&wait_s=N``, a bounded long-poll) or stream results as
server-sent events in completion order. The replica holds one :class:`~envs.codebase.CodebaseEnv`
per environment, whose scheduler runs the jobs on sandbox-worker slots across the cluster, and
whose journal keeps results across restarts. Same API-key scheme and OpenAI-style error shape
as the chat endpoint; batch size and idea length are limited by configuration.

    POST /v1/envs/{env}/ideas        {"ideas": ["text", {"knobs": {...}}, ...], "seed": 0} -> 202 {"ids": [...]}
    GET  /v1/envs/{env}/results      ?ids=a,b&wait_s=30 -> {"results": [...], "pending": [...]}
    GET  /v1/envs/{env}/ideas/{id}   -> {"id", "state", "result"}
    GET  /v1/envs/{env}/stream       ?ids=a,b&timeout_s=600 -> text/event-stream of results
    GET  /v1/envs                    -> names;  GET /v1/envs/{env} -> context, schema, baseline
    GET  /health
"""
# No ``from __future__ import annotations``: FastAPI must see real types on the wrapped methods.
import asyncio
import json
import logging
import math
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from envs.base import Idea
from selftaught.config import RayConfig, Strict
from serve.auth import authorize, hash_key, keys_from_env
from serve.common import install_error_handlers, read_capped
from serve.config import ProxyLocation, start_serve
from serve.openai_protocol import OpenAIError, validation_error

log = logging.getLogger(__name__)

api = FastAPI(title="selftaught env.value", description="Execute research ideas and return measured values")


install_error_handlers(api)


class EnvEntry(Strict):
    """One served environment: a shipped name (or a directory) plus executor settings."""

    name: str
    path: str | None = None  # a user's environment directory; default: the shipped envs/<name>
    spec_file: str = "env.yaml"
    overrides: list[str] = Field(default_factory=list)
    executor: dict[str, Any] = Field(default_factory=dict)  # ExecutorConfig


class EnvServeConfig(Strict):
    envs: list[EnvEntry] = Field(default_factory=lambda: [EnvEntry(name="toy")])
    api_key_env: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8001, ge=1, le=65535)
    route_prefix: str = "/"
    proxy_location: ProxyLocation | None = None  # as ServeConfig.proxy_location
    app_name: str = "env-value"
    max_batch_ideas: int = Field(default=64, ge=1)
    max_idea_chars: int = Field(default=20_000, ge=1)
    max_wait_s: float = Field(default=60.0, gt=0)  # longest long-poll or stream window per request
    num_cpus: float = Field(default=0.5, gt=0)  # of the replica itself (jobs run on their own slots)


class EnvServeAppConfig(Strict):
    ray: RayConfig = Field(default_factory=RayConfig)
    serve: EnvServeConfig = Field(default_factory=EnvServeConfig)


class SubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ideas: list[str | dict[str, Any]]
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)


@serve.deployment(name="env-value")
@serve.ingress(api)
class EnvValueServer:
    def __init__(self, cfg: dict, key_hashes: list[str]):
        self.cfg = EnvServeConfig(**cfg)
        self.key_hashes = list(key_hashes)
        self.entries = {e.name: e for e in self.cfg.envs}
        self.envs: dict[str, Any] = {}
        self.started = time.time()

    @staticmethod
    async def _off_loop(fn, *args):
        """Journal reads and environment set-up touch disk and SQLite: never on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def _aenv(self, name: str):
        if name in self.envs:
            return self.envs[name]
        return await self._off_loop(self._env, name)

    def _env(self, name: str):
        if name not in self.entries:
            raise OpenAIError(f"no environment '{name}' here; served: {', '.join(sorted(self.entries))}",
                              status=404, param="env", code="env_not_found")
        if name not in self.envs:
            from envs.codebase import ExecutorConfig, load_dir, load_packaged

            e = self.entries[name]
            ex = ExecutorConfig.model_validate(e.executor)
            self.envs[name] = (load_dir(e.path, e.spec_file, e.overrides, ex) if e.path
                               else load_packaged(name, e.spec_file, e.overrides, ex))
        return self.envs[name]

    def _ideas(self, body: Any) -> tuple[list[Idea], int | None]:
        try:
            req = SubmitRequest.model_validate(body)
        except ValidationError as e:
            raise validation_error(e) from None
        if not req.ideas:
            raise OpenAIError("'ideas' is empty", param="ideas")
        if len(req.ideas) > self.cfg.max_batch_ideas:
            raise OpenAIError(f"{len(req.ideas)} ideas exceed this server's limit of {self.cfg.max_batch_ideas} "
                              "per request", param="ideas")
        ideas = []
        for i, raw in enumerate(req.ideas):
            try:
                idea = Idea.coerce(raw)
            except (TypeError, ValueError) as e:
                raise OpenAIError(f"ideas[{i}]: {e}", param=f"ideas.{i}") from None
            size = len(idea.text) + len(json.dumps(idea.knobs or {}, default=str)) + \
                len(json.dumps(idea.meta, default=str)) + len(idea.id)
            if size > self.cfg.max_idea_chars:
                raise OpenAIError(f"ideas[{i}] has {size} characters; the limit is {self.cfg.max_idea_chars}",
                                  param=f"ideas.{i}")
            ideas.append(idea)
        return ideas, req.seed

    async def _json(self, request: Request) -> Any:
        authorize(request.headers, self.key_hashes)
        raw = await read_capped(request)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise OpenAIError(f"the request body is not valid JSON ({e})") from None

    @staticmethod
    def _window(value: float, name: str, cap: float) -> float:
        if not math.isfinite(value) or value < 0:
            raise OpenAIError(f"{name} must be a finite number of seconds >= 0", param=name)
        return min(value, cap)

    def _ids(self, ids: str | None, env) -> list[str]:
        out = [i for i in (ids or "").split(",") if i]
        if not out:
            raise OpenAIError("give ids=<id>,<id>,...", param="ids")
        if len(out) > self.cfg.max_batch_ideas * 4:
            raise OpenAIError("too many ids in one request", param="ids")
        unknown = [i for i in out if env.state(i) is None and env.result(i) is None]
        if unknown:
            raise OpenAIError(f"unknown idea ids: {', '.join(unknown[:5])}", status=404, param="ids",
                              code="idea_not_found")
        return out

    # ------------------------------------------------------------------ endpoints
    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "envs": sorted(self.entries), "loaded": sorted(self.envs),
                "uptime_s": round(time.time() - self.started, 1),
                "schedulers": {n: e.scheduler.utilisation() for n, e in self.envs.items() if e._scheduler}}

    @api.get("/v1/envs")
    async def list_envs(self, request: Request) -> dict[str, Any]:
        authorize(request.headers, self.key_hashes)
        return {"object": "list", "data": [{"id": n} for n in sorted(self.entries)]}

    @api.get("/v1/envs/{name}")
    async def describe(self, name: str, request: Request) -> dict[str, Any]:
        authorize(request.headers, self.key_hashes)
        env = await self._aenv(name)
        return {"id": name, "context": env.context(), "schema": env.idea_schema(), "baseline": env.baseline(),
                "metric": env.spec.metric}

    @api.post("/v1/envs/{name}/ideas", status_code=202)
    async def submit(self, name: str, request: Request) -> dict[str, Any]:
        body = await self._json(request)
        env = await self._aenv(name)
        ideas, seed = self._ideas(body)
        try:
            ids = await asyncio.get_running_loop().run_in_executor(None, lambda: env.submit(ideas, seed=seed))
        except ValueError as e:
            raise OpenAIError(str(e), param="ideas") from None
        return {"object": "list", "env": name, "ids": ids}

    @api.get("/v1/envs/{name}/ideas/{idea_id}")
    async def one(self, name: str, idea_id: str, request: Request) -> dict[str, Any]:
        authorize(request.headers, self.key_hashes)
        env = await self._aenv(name)
        res, state = await self._off_loop(lambda: (env.result(idea_id), env.state(idea_id)))
        if res is None and state is None:
            raise OpenAIError(f"unknown idea id {idea_id}", status=404, code="idea_not_found")
        return {"id": idea_id, "state": "finished" if res else state, "result": res.to_dict() if res else None}

    @api.get("/v1/envs/{name}/results")
    async def results(self, name: str, request: Request, ids: str = "", wait_s: float = 0.0) -> dict[str, Any]:
        authorize(request.headers, self.key_hashes)
        wait_s = self._window(wait_s, "wait_s", self.cfg.max_wait_s)
        env = await self._aenv(name)
        want = await self._off_loop(self._ids, ids, env)
        end = time.monotonic() + wait_s

        def finished() -> dict:
            return {i: r for i in want if (r := env.result(i)) is not None}

        while True:
            done = await self._off_loop(finished)
            if len(done) == len(want) or time.monotonic() >= end:
                break
            await asyncio.sleep(0.2)
        pending = await self._off_loop(lambda: [{"id": i, "state": env.state(i)} for i in want if i not in done])
        return {"results": [done[i].to_dict() for i in want if i in done], "pending": pending}

    @api.get("/v1/envs/{name}/stream")
    async def stream(self, name: str, request: Request, ids: str = "", timeout_s: float = 600.0):
        authorize(request.headers, self.key_hashes)
        timeout_s = self._window(timeout_s, "timeout_s", self.cfg.max_wait_s * 10)
        env = await self._aenv(name)
        want = await self._off_loop(self._ids, ids, env)
        end = time.monotonic() + timeout_s

        async def events():
            sent: set[str] = set()
            while len(sent) < len(want) and time.monotonic() < end:
                new = await self._off_loop(lambda: [(i, r) for i in want
                                                    if i not in sent and (r := env.result(i)) is not None])
                for i, r in new:
                    sent.add(i)
                    yield f"data: {json.dumps(r.to_dict(), default=str)}\n\n"
                await asyncio.sleep(0.2)
            for i in want:
                if i not in sent:
                    yield "data: " + json.dumps({"idea_id": i, "status": "pending", "state": env.state(i)}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def build_env_app(cfg: EnvServeConfig):
    hashes = sorted(hash_key(k) for k in keys_from_env(cfg.api_key_env))
    return EnvValueServer.options(ray_actor_options={"num_cpus": cfg.num_cpus}).bind(cfg.model_dump(), hashes)


def run_env_app(cfg: EnvServeConfig, blocking: bool = False):
    """Start Serve's proxy on ``cfg.host:cfg.port`` and deploy the app (Ray must be up)."""
    start_serve(cfg.host, cfg.port, cfg.proxy_location)
    return serve.run(build_env_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=blocking)


def env_base_url(cfg: EnvServeConfig) -> str:
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


