"""Typed settings of the OpenAI-compatible Serve app (``selftaught serve``)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from selftaught.config import BudgetConfig, EngineConfig, RayConfig, Strict

ProxyLocation = Literal["EveryNode", "HeadOnly"]  # where Serve runs its HTTP proxies


class AutoscalingSettings(Strict):
    """Ray Serve autoscaling of the engine replicas (each replica holds one engine)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(default=16, gt=0)
    upscale_delay_s: float = Field(default=10.0, ge=0)
    downscale_delay_s: float = Field(default=300.0, ge=0)

    @model_validator(mode="after")
    def _order(self) -> "AutoscalingSettings":
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self


class ServeConfig(Strict):
    """One served model behind ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

    API keys never live in the file: ``api_key_env`` names an environment variable holding
    one key or several separated by commas. When it is set, every ``/v1`` request needs
    ``Authorization: Bearer <key>``; ``/health`` stays open for load balancers.
    """

    engine: EngineConfig = Field(default_factory=EngineConfig)
    served_model_name: str | None = None  # the id clients send; default: engine.model
    api_key_env: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    route_prefix: str = "/"
    # where Serve runs its HTTP proxies: None is Serve's default (every node with a replica);
    # "HeadOnly" when the nodes share one host and port (a local multi-node test cluster)
    proxy_location: ProxyLocation | None = None
    app_name: str = "openai"
    num_replicas: int = Field(default=1, ge=1)  # ignored when autoscaling is set
    autoscaling: AutoscalingSettings | None = None
    max_ongoing_requests: int = Field(default=64, ge=1)
    default_max_tokens: int = Field(default=256, ge=1)
    max_tokens_limit: int = Field(default=8192, ge=1)  # larger max_tokens / budgets are refused
    max_n: int = Field(default=16, ge=1)
    max_prompts: int = Field(default=64, ge=1)  # prompts in one /v1/completions request
    default_budget: BudgetConfig | None = None  # applied to chat requests that send none

    def model_id(self) -> str:
        return self.served_model_name or self.engine.model

    def api_keys(self) -> set[str]:
        """The accepted keys (empty: no key required)."""
        from serve.auth import keys_from_env

        return keys_from_env(self.api_key_env)

    def deployment_options(self) -> dict[str, Any]:
        actor = {"num_cpus": self.engine.cpus_per_actor}
        if self.engine.gpus_per_actor:
            actor["num_gpus"] = self.engine.gpus_per_actor
        if self.engine.resources:
            actor["resources"] = dict(self.engine.resources)
        opts: dict[str, Any] = {"ray_actor_options": actor, "max_ongoing_requests": self.max_ongoing_requests}
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling.model_dump(exclude_none=True)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class ServeAppConfig(Strict):
    """The file ``selftaught serve --config`` reads: where Ray runs and what is served."""

    ray: RayConfig = Field(default_factory=RayConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)


def start_serve(host: str, port: int, proxy_location: ProxyLocation | None = None) -> None:
    """Start Serve's HTTP proxies on ``host:port`` (Ray must be up); ``proxy_location`` None is
    Serve's default (a proxy on every node with a replica), "HeadOnly" where the nodes share one
    host and port (a local multi-node cluster)."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port},
                **({"proxy_location": proxy_location} if proxy_location else {}))
