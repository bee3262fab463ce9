"""RL on the ideator from execution reward (thesis appendix C.2, in our own code and words):
``selftaught research rl -c examples/research/rl-tiny.yaml``.

Each step, the policy (the ideator's model on rollout engine actors) samples ``group_size``
ideas for each of ``prompts_per_step`` copies of the environment's prompt, with the engine's
log-probs of every sampled token. The ideas go to ``env.value`` (the sandboxed executor); an
idea that does not parse or fails to execute scores 0, and an infrastructure failure masks its
whole group. The learner (``trainers/grpo.py``: one optimizer step of the trainer loop's engine,
as a Ray actor on its own resources) takes a GRPO step, and its new weights go to every rollout
engine in place (``update_weights``), timed.

``objectives`` lists the objectives to compare (``mean``: the thesis's GRPO; ``max``,
``entropic``: aimed at the group's best idea). Each is an arm with its own learner, fresh from
the same model, its own environment run directory, and the same steps, groups and seeds: an
equal budget of executed ideas, recorded with its CPU/GPU hours and tokens.

Off-policy: with ``rl.max_staleness >= 1`` the next step's rollouts are sampled while the
current step executes and trains (the engines still hold the previous weights), and the update
corrects them with the engine's log-probs; 0 is strictly on-policy.

Resume: ``rl.sqlite`` journals each step's rollouts (as sampled, with their policy version),
rewards and update stats; the learner checkpoints after every step (the trainer loop's format:
model, optimizer, schedule, RNG). A rerun restores the newest checkpoint, syncs the engines to
it, reuses journaled rollouts instead of sampling them again, and finds executed ideas in the
environment's journal by their content ids: no idea runs twice and no step is applied twice.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from actors.ideator import IdeatorConfig
from envs.codebase import ResearchConfig
from selftaught.config import EngineConfig, SamplingConfig, Strict, save
from selftaught.storage import SqliteJournal
from trainers.config import TrainConfig
from trainers.grpo import Objective, RLConfig

log = logging.getLogger(__name__)


class PolicyConfig(Strict):
    """The policy: its model, the rollout engines that sample it, the learner that trains it."""

    model: str = "smollm2-135m-instruct"  # packaged name or a Hugging Face checkpoint directory
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig(backend="transformers", device="cpu"))
    learner_cpus: float = Field(default=1.0, gt=0)
    learner_gpus: float = Field(default=0.0, ge=0)
    learner_threads: int | None = Field(default=None, ge=1)  # torch threads (default: learner_cpus); the
    # engines are idle while the learner steps, so on a small machine it may use more than it reserves
    device: Literal["cpu", "cuda"] = "cpu"  # the learner's device


class RLRunConfig(ResearchConfig):
    """``selftaught research rl -c FILE``: the environment fields of ``ResearchConfig``
    (``executor.run_dir`` is chosen per objective) and the RL run's own."""

    pipeline: Literal["research_rl"] = "research_rl"
    run_dir: str = "runs/research/rl"
    context: Literal["task", "full"] = "task"
    ideator: IdeatorConfig = Field(default_factory=lambda: IdeatorConfig(backend="local"))  # prompt settings
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    objectives: list[Objective] = Field(default_factory=lambda: ["mean"], min_length=1)
    rl: RLConfig = Field(default_factory=RLConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(lr=1e-5, schedule="constant", warmup_frac=0.0,
                                                                   weight_decay=0.0, grad_accum=1, progress=False))
    group_size: int = Field(default=8, ge=2)  # G: ideas per prompt per step
    prompts_per_step: int = Field(default=1, ge=1)  # groups per step
    steps: int = Field(default=10, ge=1)
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=1.0, max_new_tokens=64))
    job_timeout_s: float = Field(default=600.0, gt=0)  # per step's batch of jobs
    rollout_timeout_s: float = Field(default=1800.0, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "RLRunConfig":
        if self.executor.run_dir is not None:
            raise ValueError("executor.run_dir is chosen per objective (<run_dir>/<objective>/env); leave it unset")
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError("objectives: each at most once")
        if self.sampling.n != 1:
            raise ValueError("sampling.n: the group size is group_size")
        return self


CONFIG = RLRunConfig

_SCHEMA = """
CREATE TABLE IF NOT EXISTS steps (arm TEXT, step INTEGER, state TEXT, version INTEGER, rollouts TEXT,
  stats TEXT, time REAL, PRIMARY KEY (arm, step));
"""


class RLJournal(SqliteJournal):
    """Each step of each objective: its rollouts, their state (sampled, executed, updated) and stats."""

    def __init__(self, path: Path):
        super().__init__(path, _SCHEMA)

    def get(self, arm: str, step: int) -> tuple[str | None, int | None, list[dict], dict]:
        rows = self.x("SELECT state, version, rollouts, stats FROM steps WHERE arm=? AND step=?", (arm, step))
        if not rows:
            return None, None, [], {}
        state, version, rollouts, stats = rows[0]
        return state, version, json.loads(rollouts or "[]"), json.loads(stats or "{}")

    def put(self, arm: str, step: int, state: str, version: int, rollouts: list[dict], stats: dict | None = None) -> None:
        self.x("INSERT OR REPLACE INTO steps VALUES (?,?,?,?,?,?,?)",
               (arm, step, state, version, json.dumps(rollouts), json.dumps(stats or {}, default=str), time.time()))

    def done(self, arm: str) -> list[dict]:
        rows = self.x("SELECT step, stats FROM steps WHERE arm=? AND state='updated' ORDER BY step", (arm,))
        return [{"step": s, **json.loads(st)} for s, st in rows]


def _norm(knobs: Any) -> str:
    return json.dumps(knobs, sort_keys=True) if knobs is not None else ""


class RLRun:
    def __init__(self, cfg: RLRunConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save(cfg, self.run_dir / "config.yaml")
        self.journal = RLJournal(self.run_dir / "rl.sqlite")
        self.pool = None
        self.scheduler = None

    # ------------------------------------------------------------------ setup
    def open(self) -> None:
        from actors.generator import EnginePool
        from actors.scheduler import Scheduler
        from selftaught.runtime import init_ray

        init_ray(self.cfg.ray)
        self.scheduler = Scheduler(self.cfg.executor.scheduler)
        ecfg = self.cfg.policy.engine.model_copy(update={"model": self.cfg.policy.model})
        self.pool = EnginePool.start(ecfg, timeout_s=self.cfg.rollout_timeout_s)

    def env_for(self, arm: str):
        return self.cfg.load_env(self.run_dir / arm / "env", scheduler=self.scheduler)

    def close(self) -> None:
        import ray

        if self.pool is not None:
            for a in self.pool.actors:
                ray.kill(a)
        if self.scheduler is not None:
            self.scheduler.shutdown()

    # ------------------------------------------------------------------ rollouts
    def _prompt(self, env) -> tuple[list[dict], dict | None, Any]:
        from actors.ideator import build_prompt, decode_schema

        schema = env.idea_schema()
        context = env.task_text() if self.cfg.context == "task" else env.context()
        p = build_prompt(self.cfg.ideator, "fresh", context, [], 1, schema, one_per_sample=schema is not None)
        fmt = None
        if schema is not None:
            from selftaught.config import StructuredOutput

            fmt = StructuredOutput(type="json_schema", json_schema=decode_schema(schema, self.cfg.ideator.require_knobs))
        return p.messages, schema, fmt

    def sample(self, env, arm: str, step: int, version: int) -> list[dict]:
        """G ideas per prompt copy from the rollout engines, with the log-probs of every sampled token."""
        messages, schema, fmt = self._prompt(env)
        upd: dict[str, Any] = {"n": self.cfg.group_size, "logprobs": 0,
                               # the same seeds in every objective: paired samples (common random numbers)
                               "seed": (self.cfg.seed * 1_000_003 + step * 7919) % (2 ** 62)}
        if fmt is not None:
            upd["response_format"] = fmt
        sampling = self.cfg.sampling.model_copy(update=upd)
        outs = self.pool.chat([messages] * self.cfg.prompts_per_step,
                              [sampling.model_copy(update={"seed": sampling.seed + i})
                               for i in range(self.cfg.prompts_per_step)])
        rollouts = []
        for g, out in enumerate(outs):
            for c in out.completions:
                rollouts.append({"group": f"{step}:{g}", "prompt_ids": list(out.prompt_token_ids),
                                 "completion_ids": list(c.token_ids), "behaviour_logprobs": list(c.logprobs or []),
                                 "version": version, "idea": c.text, "meta": {"finish": c.finish_reason}})
        return rollouts

    def execute(self, env, rollouts: list[dict]) -> dict[str, Any]:
        """Rewards for every rollout from ``env.value``: unparsed or failed ideas 0, infrastructure
        failures flagged (their group is masked). Identical ideas run once."""
        from actors.ideator import parse_ideas
        from envs.base import Idea

        schema = env.idea_schema()
        ideas: dict[str, Idea] = {}
        for r in rollouts:
            if r["meta"].get("finish") == "error":  # the engine failed this sample: not the policy's doing
                r["meta"]["valid"], r["meta"]["engine_error"] = False, True
                continue
            parsed = parse_ideas(r["idea"], schema, require_knobs=self.cfg.ideator.require_knobs)
            if r["meta"].get("finish") == "length" or not parsed.ideas:
                r["meta"]["valid"] = False
                continue
            x = parsed.ideas[0]
            idea = Idea(knobs=x) if isinstance(x, dict) else Idea(text=str(x))
            r["meta"].update(valid=True, idea_id=idea.id, knobs=idea.knobs)
            ideas[idea.id] = idea
        results: dict[str, Any] = {}
        if ideas:
            ids = env.submit(list(ideas.values()))
            for res in env.stream(ids, timeout_s=self.cfg.job_timeout_s):
                results[res.idea_id] = res
        cpu_h = gpu_h = 0.0
        for r in rollouts:
            res = results.get(r["meta"].get("idea_id")) if r["meta"].get("valid") else None
            if r["meta"].get("engine_error"):
                r["reward"], r["infra_failure"] = None, True  # masks the group
            elif not r["meta"].get("valid"):
                r["reward"], r["infra_failure"] = 0.0, False
            elif res is None or res.status == "infra_failed":
                r["reward"], r["infra_failure"] = None, True
            else:
                r["reward"], r["infra_failure"] = float(res.reward if res.status == "ok" else 0.0), False
                r["meta"]["status"] = res.status
        from pipelines.research_search import job_hours

        for res in results.values():
            g, c = job_hours(res.to_dict(), env.spec.resources.cpus, env.spec.resources.gpus)
            gpu_h, cpu_h = gpu_h + g, cpu_h + c
        return {"jobs": len(results), "cpu_hours": cpu_h, "gpu_hours": gpu_h}

    # ------------------------------------------------------------------ one arm
    def run_arm(self, arm: Objective) -> list[dict]:
        import ray

        from trainers.grpo import learner_actor_class

        c = self.cfg
        rl = c.rl.model_copy(update={"objective": arm})
        learner = learner_actor_class().options(num_cpus=c.policy.learner_cpus, num_gpus=c.policy.learner_gpus).remote(
            c.policy.model, c.train.model_dump(), rl.model_dump(), c.steps, c.policy.device,
            c.policy.learner_threads or max(1, int(c.policy.learner_cpus)))
        env = self.env_for(arm)
        ckpt = self.run_dir / arm / "learner"
        try:
            start = 0
            if (ckpt / "rank-0.pt").exists():
                extra = ray.get(learner.load.remote(str(ckpt)), timeout=c.rollout_timeout_s)
                start = int(extra["step"]) + 1
                state, v_sampled, rollouts, _ = self.journal.get(arm, start - 1)
                if state != "updated" and rollouts:  # saved, then killed before the journal said so
                    self.journal.put(arm, start - 1, "updated", v_sampled, rollouts,
                                     {**self._step_stats(rollouts), "recovered": True, "jobs": 0, "cpu_hours": 0.0,
                                      "gpu_hours": 0.0, "sync_s": 0.0, "step_s": 0.0})
            t0 = time.perf_counter()
            self.pool.update_weights(ray.get(learner.weights.remote(), timeout=c.rollout_timeout_s))  # this arm's policy
            log.info("%s: engines synced to the learner in %.2fs; starting at step %d", arm, time.perf_counter() - t0,
                     start)
            prefetch = None
            for step in range(start, c.steps):
                t_step = time.perf_counter()
                version = ray.get(learner.info.remote(), timeout=c.rollout_timeout_s)["version"]
                state, v_sampled, rollouts, _ = self.journal.get(arm, step)
                if not rollouts:
                    rollouts = prefetch.result() if prefetch is not None else self.sample(env, arm, step, version)
                    v_sampled = rollouts[0]["version"] if rollouts else version
                    self.journal.put(arm, step, "sampled", v_sampled, rollouts)
                prefetch = None
                if rl.max_staleness >= 1 and step + 1 < c.steps and not self.journal.get(arm, step + 1)[2]:
                    prefetch = _Background(lambda s=step + 1, v=version: self.sample(env, arm, s, v))
                t_exec = time.perf_counter()
                compute = self.execute(env, rollouts)
                self.journal.put(arm, step, "executed", v_sampled, rollouts)
                t_upd = time.perf_counter()
                stats = ray.get(learner.update.remote(rollouts), timeout=c.rollout_timeout_s)
                t_sync = time.perf_counter()
                if prefetch is not None:
                    prefetch.wait()  # the engines finish sampling the next step with the weights it began with
                sync = self.pool.update_weights(ray.get(learner.weights.remote(), timeout=c.rollout_timeout_s))
                sync_s = time.perf_counter() - t_sync
                ray.get(learner.save.remote(str(ckpt), {"step": step}), timeout=c.rollout_timeout_s)
                rec = {**self._step_stats(rollouts), **compute, **{k: stats.get(k) for k in (
                    "loss", "clip_frac", "kl", "grad_norm", "tokens", "stale", "masked_groups", "version", "stepped")},
                       "sampled_version": v_sampled, "sync_s": sync_s, "engine_versions": [s["version"] for s in sync],
                       "execute_s": t_upd - t_exec, "update_s": t_sync - t_upd,
                       "step_s": time.perf_counter() - t_step}
                self.journal.put(arm, step, "updated", v_sampled, rollouts, rec)
                log.info("%s step %d: mean %.4f max %.4f valid %.2f distinct %.2f loss %s sync %.2fs", arm, step,
                         rec["mean_reward"], rec["max_reward"], rec["valid_frac"], rec["distinct_frac"],
                         rec.get("loss"), sync_s)
            return self.journal.done(arm)
        finally:
            env.close()
            ray.kill(learner)

    @staticmethod
    def _step_stats(rollouts: list[dict]) -> dict[str, Any]:
        rewards = [r["reward"] for r in rollouts if r.get("reward") is not None]
        valid = [r for r in rollouts if r["meta"].get("valid")]
        distinct = {_norm(r["meta"].get("knobs")) or r["idea"] for r in valid}
        best = max(rollouts, key=lambda r: r["reward"] if r.get("reward") is not None else -math.inf)
        return {"n": len(rollouts), "mean_reward": sum(rewards) / len(rewards) if rewards else 0.0,
                "max_reward": max(rewards, default=0.0), "valid_frac": len(valid) / max(len(rollouts), 1),
                "distinct_frac": len(distinct) / max(len(rollouts), 1), "best_idea": best["idea"],
                "completion_tokens": sum(len(r["completion_ids"]) for r in rollouts),
                "infra_failures": sum(bool(r.get("infra_failure")) for r in rollouts)}

    # ------------------------------------------------------------------ whole run
    def run(self) -> dict[str, Any]:
        self.open()
        try:
            curves = {arm: self.run_arm(arm) for arm in self.cfg.objectives}
        finally:
            self.close()
        return self.report(curves)

    def report(self, curves: dict[str, list[dict]]) -> dict[str, Any]:
        from selftaught.research_record import write_rl_report

        summary = {"run_dir": str(self.run_dir), "env": self.cfg.env, "model": self.cfg.policy.model,
                   "group_size": self.cfg.group_size, "prompts_per_step": self.cfg.prompts_per_step,
                   "steps": self.cfg.steps, "max_staleness": self.cfg.rl.max_staleness, "arms": {}}
        for arm, rows in curves.items():
            k = max(1, min(3, len(rows) // 3 or 1))
            summary["arms"][arm] = {
                "steps": len(rows), "jobs": sum(r["jobs"] for r in rows), "ideas": sum(r["n"] for r in rows),
                "cpu_hours": sum(r["cpu_hours"] for r in rows), "gpu_hours": sum(r["gpu_hours"] for r in rows),
                "completion_tokens": sum(r["completion_tokens"] for r in rows),
                "mean_first": sum(r["mean_reward"] for r in rows[:k]) / k if rows else None,
                "mean_last": sum(r["mean_reward"] for r in rows[-k:]) / k if rows else None,
                "max_first": sum(r["max_reward"] for r in rows[:k]) / k if rows else None,
                "max_last": sum(r["max_reward"] for r in rows[-k:]) / k if rows else None,
                "best": max((r["max_reward"] for r in rows), default=None),
                "distinct_last": sum(r["distinct_frac"] for r in rows[-k:]) / k if rows else None,
                "sync_s_mean": sum(r["sync_s"] for r in rows) / len(rows) if rows else None,
                "step_s_mean": sum(r["step_s"] for r in rows) / len(rows) if rows else None}
        summary["report"] = str(write_rl_report(self.run_dir, summary, curves))
        (self.run_dir / "summary.json").write_text(json.dumps({**summary, "curves": curves}, indent=1, default=str))
        return summary


class _Background:
    """A call on a thread, for sampling the next step while this one executes and trains."""

    def __init__(self, fn):
        self._out: list = []
        self._err: list = []

        def go():
            try:
                self._out.append(fn())
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                self._err.append(e)

        self._t = threading.Thread(target=go, name="rl-prefetch", daemon=True)
        self._t.start()

    def wait(self) -> None:
        self._t.join()

    def result(self):
        self._t.join()
        if self._err:
            raise self._err[0]
        return self._out[0]


def run(cfg: RLRunConfig | dict) -> dict[str, Any]:
    cfg = cfg if isinstance(cfg, RLRunConfig) else RLRunConfig.model_validate(cfg)
    return RLRun(cfg).run()
