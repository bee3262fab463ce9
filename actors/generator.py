"""Generator actors: the generation engine inside Ray.

- :class:`GeneratorActor` is a long-lived actor (``ray.remote``) holding one engine; pools of
  them serve synthesis, evaluation and ideation.
- :class:`GenerateBatch` is the same engine as a callable class for Ray Data ``map_batches``
  on an actor pool, so batch synthesis streams through Ray Data with back-pressure.
- :func:`generate_dataset` wires a dataset through a pool sized to the cluster.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Sequence

import numpy as np

from selftaught import metrics
from selftaught.config import EngineConfig, SamplingConfig

log = logging.getLogger(__name__)


def _set_threads(num_cpus: float | None) -> None:
    import torch

    if num_cpus:  # 1.5 CPUs (one actor beside Ray's reserve on 2 cores) is 2 threads, not 1
        torch.set_num_threads(max(1, math.ceil(num_cpus - 1e-6)))


class EngineHost:
    """Loads one engine and answers plain-data requests (dicts in, dicts out)."""

    def __init__(self, engine_cfg: dict | EngineConfig, num_cpus: float | None = None):
        from actors.engine import create_engine

        _set_threads(num_cpus)
        self.cfg = engine_cfg if isinstance(engine_cfg, EngineConfig) else EngineConfig(**engine_cfg)
        self.engine = create_engine(self.cfg)

    def generate(self, prompts: Sequence[Any], sampling: dict | list[dict] | None = None) -> list[dict]:
        with metrics.engine_call(self.cfg.model, "actor", len(prompts)) as served:
            outs = self.engine.generate(list(prompts), _sampling(sampling))
            served(outs)
        return [o.to_dict() for o in outs]

    def chat(self, conversations: Sequence[Sequence[dict]], sampling: dict | list[dict] | None = None) -> list[dict]:
        with metrics.engine_call(self.cfg.model, "actor", len(conversations)) as served:
            outs = self.engine.chat(list(conversations), _sampling(sampling))
            served(outs)
        return [o.to_dict() for o in outs]

    def update_weights(self, weights: Any, strict: bool = True) -> dict:
        """Load new weights into this actor's live engine (a state dict or a checkpoint path)."""
        return self.engine.update_weights(weights, strict=strict)

    def info(self) -> dict:
        return {**self.engine.info(), "pid": os.getpid()}


def _sampling(s: dict | list[dict] | SamplingConfig | None):
    if s is None or isinstance(s, SamplingConfig):
        return s
    if isinstance(s, dict):
        return SamplingConfig(**s)
    return [x if isinstance(x, SamplingConfig) else SamplingConfig(**x) for x in s]


def generator_actor_class():
    """``ray.remote(EngineHost)``; resources are set per pool with ``.options``."""
    import ray

    return ray.remote(EngineHost)


def start_generators(engine_cfg: EngineConfig, num_actors: int | None = None) -> list:
    """Start a pool of generator actors sized to the cluster (never more CPUs than exist)."""
    from selftaught.runtime import fit_actor_cpus

    n = num_actors or engine_cfg.num_actors
    cpus = fit_actor_cpus(engine_cfg.cpus_per_actor, n) if engine_cfg.gpus_per_actor == 0 else engine_cfg.cpus_per_actor
    cls = generator_actor_class().options(num_cpus=cpus, num_gpus=engine_cfg.gpus_per_actor,
                                          resources=engine_cfg.resources or None)
    return [cls.remote(engine_cfg.model_dump(), cpus) for _ in range(n)]


class EnginePool:
    """Generator actors behind one :class:`~actors.engine.base.ChatModel`: a call's requests
    are spread over the actors (each batches its share continuously) and come back in order.
    Every wait is bounded by ``timeout_s``."""

    def __init__(self, actors: list, timeout_s: float = 1800.0):
        if not actors:
            raise ValueError("an engine pool needs at least one actor")
        self.actors, self.timeout_s = list(actors), timeout_s

    @classmethod
    def start(cls, engine_cfg: EngineConfig, num_actors: int | None = None, timeout_s: float = 1800.0) -> "EnginePool":
        return cls(start_generators(engine_cfg, num_actors), timeout_s)

    def _spread(self, method: str, items: Sequence[Any], sampling) -> list:
        import ray

        from actors.engine.base import GenerationOutput, per_request

        params = [p.model_dump() for p in per_request(sampling, len(items))]
        k = len(self.actors)
        shards = [list(range(a, len(items), k)) for a in range(k)]
        refs = [getattr(self.actors[a], method).remote([items[i] for i in idx], [params[i] for i in idx])
                for a, idx in enumerate(shards) if idx]
        outs: list = [None] * len(items)
        for idx, res in zip([s for s in shards if s], ray.get(refs, timeout=self.timeout_s)):
            for i, d in zip(idx, res):
                out = GenerationOutput.from_dict(d)
                out.request_index = i
                outs[i] = out
        return outs

    def chat(self, conversations: Sequence[Sequence[dict]], sampling=None) -> list:
        return self._spread("chat", [list(c) for c in conversations], sampling)

    def generate(self, prompts: Sequence[Any], sampling=None) -> list:
        return self._spread("generate", list(prompts), sampling)

    def update_weights(self, weights: Any, strict: bool = True) -> list[dict]:
        """The same new weights into every actor's engine. ``weights`` may be an ObjectRef (an
        RL learner's ``weights.remote()``): the engines then read it from the object store
        directly, and the driver never holds a copy; anything else is put there once."""
        import ray

        ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
        return ray.get([a.update_weights.remote(ref, strict) for a in self.actors], timeout=self.timeout_s)


class GenerateBatch:
    """Ray Data callable: adds ``generated_text`` (and token counts) to each row.

    The prompt is taken from ``prompt_column``; an optional ``sampling_column`` holds per-row
    sampling overrides as JSON (a ``budget`` among them makes that row budget-forced: rows with
    different budgets share engine batches). With ``n > 1`` each input row yields ``n`` output
    rows (``sample_index`` tells them apart). Budget-forced rows fill ``generated_reasoning``,
    ``generated_answer`` and ``generated_budget`` (the token accounting as JSON); plain rows have
    an empty reasoning and budget and the whole text as answer, so every batch has one schema.

    A row the engine cannot serve (a prompt longer than the context, say) fails alone: the batch
    is retried row by row and the bad row comes out with ``finish_reason`` "error" and the reason
    in ``generated_error``, so it never fails the task (and with it the dataset) for its mates."""

    def __init__(self, engine_cfg: dict, sampling: dict | None = None, prompt_column: str = "prompt",
                 sampling_column: str | None = None, num_cpus: float | None = None,
                 chat: bool = False):
        self.host = EngineHost(engine_cfg, num_cpus)
        self.sampling = SamplingConfig(**(sampling or {}))
        self.prompt_column, self.sampling_column, self.chat = prompt_column, sampling_column, chat

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        prompts = list(batch[self.prompt_column])
        params: list[SamplingConfig] = []
        for i in range(len(prompts)):
            over = {}
            if self.sampling_column and batch.get(self.sampling_column) is not None:
                raw = batch[self.sampling_column][i]
                over = json.loads(raw) if isinstance(raw, str) and raw else (raw or {})
            params.append(SamplingConfig.model_validate({**self.sampling.model_dump(), **over})
                          if over else self.sampling)
        with metrics.engine_call(self.host.cfg.model, "batch", len(prompts)) as served:
            outs = self._serve(prompts, params)
            served(outs)
        cols: dict[str, list] = {k: [] for k in batch}
        extra = {"generated_text": [], "sample_index": [], "prompt_tokens": [], "completion_tokens": [],
                 "finish_reason": [], "generated_reasoning": [], "generated_answer": [], "generated_budget": [],
                 "generated_error": []}
        for i, o in enumerate(outs):
            if isinstance(o, str):  # this row alone failed
                for k in batch:
                    cols[k].append(batch[k][i])
                for k, v in (("generated_text", ""), ("sample_index", 0), ("prompt_tokens", 0),
                             ("completion_tokens", 0), ("finish_reason", "error"), ("generated_reasoning", ""),
                             ("generated_answer", ""), ("generated_budget", ""), ("generated_error", o)):
                    extra[k].append(v)
                continue
            for s, c in enumerate(o.completions):
                for k in batch:
                    cols[k].append(batch[k][i])
                extra["generated_text"].append(c.text)
                extra["sample_index"].append(s)
                extra["prompt_tokens"].append(len(o.prompt_token_ids))
                extra["completion_tokens"].append(c.num_tokens)
                extra["finish_reason"].append(c.finish_reason)
                extra["generated_reasoning"].append(c.reasoning or "")
                extra["generated_answer"].append(c.text if c.answer is None else c.answer)
                extra["generated_budget"].append(json.dumps(c.budget) if c.budget is not None else "")
                extra["generated_error"].append((c.error or "") if c.finish_reason == "error" else "")
        return {**cols, **extra}

    def _serve(self, prompts: list, params: list[SamplingConfig]) -> list:
        """Engine outputs in row order; a row that fails on its own is its error message."""
        try:
            if self.chat:
                return self.host.engine.chat([json.loads(p) if isinstance(p, str) else p for p in prompts], params)
            return self.host.engine.generate([p if isinstance(p, str) else list(p) for p in prompts], params)
        except Exception as e:  # noqa: BLE001 - find the bad row(s) one by one
            if len(prompts) == 1:
                return [f"{type(e).__name__}: {e}"[:1000]]
            log.warning("generation batch of %d failed (%s); retrying row by row", len(prompts), e)
            return [self._serve([p], [s])[0] for p, s in zip(prompts, params)]


def generate_dataset(ds, engine_cfg: EngineConfig, sampling: SamplingConfig | None = None,
                     prompt_column: str = "prompt", batch_size: int | None = None,
                     num_actors: int | None = None, sampling_column: str | None = None,
                     chat: bool = False):
    """Stream a Ray Dataset through a pool of engine actors (``map_batches``): ``num_actors``
    of them, or an elastic pool from ``engine_cfg.num_actors`` to ``engine_cfg.max_actors`` that
    Ray Data grows while blocks are queued and shrinks when idle. A fixed CPU pool is sized to
    fit the cluster; an elastic one asks for its full CPUs, so the autoscaler can add nodes."""
    import ray

    from selftaught.runtime import fit_actor_cpus

    n = num_actors or engine_cfg.num_actors
    most = max(n, engine_cfg.max_actors or n)
    gpus = engine_cfg.gpus_per_actor
    cpus = engine_cfg.cpus_per_actor if gpus or most > n else fit_actor_cpus(engine_cfg.cpus_per_actor, n)
    return ds.map_batches(
        GenerateBatch,
        fn_constructor_kwargs={"engine_cfg": engine_cfg.model_dump(),
                               "sampling": (sampling or SamplingConfig()).model_dump(),
                               "prompt_column": prompt_column, "sampling_column": sampling_column,
                               "num_cpus": cpus, "chat": chat},
        batch_size=batch_size or engine_cfg.max_batch_size,
        compute=ray.data.ActorPoolStrategy(size=n) if most == n else ray.data.ActorPoolStrategy(min_size=n,
                                                                                                max_size=most),
        batch_format="numpy",
        **({"num_cpus": cpus, "num_gpus": gpus} if gpus else {"num_cpus": cpus}),
        **({"resources": engine_cfg.resources} if engine_cfg.resources else {}),
    )
