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

Executing a group (``execution``): ``admission: gang`` reserves the whole group's job slots (G ideas
x the environment's GPUs per idea) as one placement group, all or nothing, held for the run;
``stream`` lets each idea take a slot as one frees. A step waits for its jobs until
``job_timeout_s`` (the deadline), or, with ``straggler_quantile`` q < 1, until a fraction q has
finished plus ``straggler_slack`` times the time that took. Ideas still running then are late:
``late: drop`` cancels them (their GPUs go back at once; their groups learn from the members
that finished); ``late: keep`` lets them run, and a result that is in when the next step trains
is trained on then, its group's advantages recomputed with it (one version stale, corrected by
importance ratios, so it needs ``rl.max_staleness >= 1``); one still running then is cancelled.

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

import hashlib
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
    learner_resources: dict[str, float] = Field(default_factory=dict)  # custom resources, e.g. {"policy_pool": 1}:
    # with the engines' (engine.resources) they keep the policy on its own nodes, apart from the executor's


class GroupExecConfig(Strict):
    """How a step's group of ideas is executed and waited for (module docstring)."""

    admission: Literal["stream", "gang"] = "stream"
    gang_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    reserve_timeout_s: float = Field(default=600.0, gt=0)  # for the gang to be placed
    straggler_quantile: float = Field(default=1.0, gt=0, le=1)  # 1: wait for every job (up to the deadline)
    straggler_slack: float = Field(default=0.0, ge=0)  # after the quantile: wait this times as long again, then cut
    late: Literal["drop", "keep"] = "drop"
    submit_early: bool = True  # with rl.max_staleness >= 1: a prefetched step's jobs queue as soon as sampled
    dedupe: bool = True  # identical ideas in a step run once and share the reward; false: every rollout
    # runs its own job with its own seed (independent samples of a noisy reward, a job per rollout)


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
    job_timeout_s: float = Field(default=600.0, gt=0)  # a step's deadline for its jobs
    execution: GroupExecConfig = Field(default_factory=GroupExecConfig)
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
        if self.ideator.thinking and self.sampling.max_new_tokens <= self.ideator.thinking_tokens:
            raise ValueError("sampling.max_new_tokens bounds thinking and idea together: make it larger than "
                             "ideator.thinking_tokens")
        if self.execution.late == "keep" and self.rl.max_staleness < 1:
            raise ValueError("execution.late: keep trains a late idea one step after it was sampled; "
                             "set rl.max_staleness >= 1 (or late: drop)")
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
        self.gang: dict[str, Any] | None = None  # the reserved rollout group, when admission is gang
        self._submitted: dict[str, float] = {}  # idea id -> when its job was queued early (prefetch)

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

    def reserve_group(self, env) -> dict[str, Any]:
        """``admission: gang``: one placement group for a whole step's jobs, placed all or
        nothing, held for the run (every objective uses it)."""
        if self.gang is None:
            r, n = env.spec.resources, self.cfg.group_size * self.cfg.prompts_per_step
            self.scheduler.reserve("rollouts", n, cpus=r.cpus, gpus=r.gpus, custom=r.custom,
                                   strategy=self.cfg.execution.gang_strategy)
            wait = self.scheduler.wait_reserved("rollouts", self.cfg.execution.reserve_timeout_s)
            self.gang = {"slots": n, "gpus_per_slot": r.gpus, "cpus_per_slot": r.cpus, "reserve_s": wait}
            log.info("reserved the rollout group: %d slots x (%g CPU, %d GPU) in %.1fs", n, r.cpus, r.gpus, wait)
        return self.gang

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
            upd["response_format"] = fmt  # applies to the answer, after the thinking phase
        if self.cfg.ideator.thinking:
            from actors.ideator import THINK_CLOSE, THINK_OPEN
            from selftaught.config import BudgetConfig

            upd["budget"] = BudgetConfig(max_thinking_tokens=self.cfg.ideator.thinking_tokens,
                                         think_start=THINK_OPEN + "\n", think_end=THINK_CLOSE + "\n")
        sampling = self.cfg.sampling.model_copy(update=upd)
        outs = self.pool.chat([messages] * self.cfg.prompts_per_step,
                              [sampling.model_copy(update={"seed": sampling.seed + i})
                               for i in range(self.cfg.prompts_per_step)])
        rollouts = []
        for g, out in enumerate(outs):
            for c in out.completions:
                rollouts.append({"group": f"{step}:{g}", "prompt_ids": list(out.prompt_token_ids),
                                 "completion_ids": list(c.token_ids), "behaviour_logprobs": list(c.logprobs or []),
                                 "loss_mask": sampled_mask(c), "version": version,
                                 # only the answer goes to the executor; the thinking is kept beside it
                                 "idea": c.answer if c.answer is not None else c.text,
                                 "meta": {"finish": c.finish_reason, "thinking": c.reasoning}})
        return rollouts

    def execute(self, env, rollouts: list[dict]) -> dict[str, Any]:
        """Rewards for every rollout from ``env.value``: unparsed or failed ideas 0, infrastructure
        failures flagged (their group is masked), stragglers past the cut marked late (no reward
        yet). Identical ideas run once (unless ``execution.dedupe`` is off)."""
        ideas = self.ideas_of(env, rollouts)
        results: dict[str, Any] = {}
        wait: dict[str, Any] = {"late": 0, "cut_s": 0.0, "quantile_s": None}
        if ideas:
            results, wait = self._wait(env, env.submit(list(ideas.values())))
        for r in rollouts:
            res = results.get(r["meta"].get("idea_id")) if r["meta"].get("valid") else None
            r["late"] = False
            if r["meta"].get("engine_error"):
                r["reward"], r["infra_failure"] = None, True  # masks the group
            elif not r["meta"].get("valid"):
                r["reward"], r["infra_failure"] = 0.0, False
            elif res is None:  # still running at the cut: a straggler
                r["reward"], r["infra_failure"], r["late"] = None, False, True
            elif res.status == "infra_failed":
                r["reward"], r["infra_failure"] = None, True
            else:
                r["reward"], r["infra_failure"] = float(res.reward if res.status == "ok" else 0.0), False
                r["meta"]["status"] = res.status
                r["meta"]["job_s"] = res.resources.get("run_s")
                r["meta"]["reused"] = bool(res.metrics.get("reused"))  # measured before (an earlier step)
        return {**self._hours(env, results.values()), **wait}

    def prefetch(self, env, arm: str, step: int, version: int) -> list[dict]:
        """The next step's rollouts, sampled while this step executes; with ``submit_early``
        their jobs are queued at once, behind this step's, so every slot a finished, failed or
        cut job frees is taken straight away."""
        rollouts = self.sample(env, arm, step, version)
        if self.cfg.execution.submit_early:
            # journaled first: a run that dies now resumes with these rollouts, and finds their jobs
            self.journal.put(arm, step, "sampled", version, rollouts)
            ideas = self.ideas_of(env, rollouts)
            if ideas:
                now = time.monotonic()
                for i in ideas:
                    self._submitted.setdefault(i, now)
                env.submit(list(ideas.values()))
        return rollouts

    def ideas_of(self, env, rollouts: list[dict]) -> dict[str, Any]:
        """Parse each rollout into the idea it proposes (marking unparsed ones invalid); the
        ideas to execute by id. Deterministic: a resumed or prefetched step finds the same ids."""
        from actors.ideator import parse_ideas
        from envs.base import Idea

        schema = env.idea_schema()
        ideas: dict[str, Idea] = {}
        for i, r in enumerate(rollouts):
            if r["meta"].get("finish") == "error":  # the engine failed this sample: not the policy's doing
                r["meta"]["valid"], r["meta"]["engine_error"] = False, True
                continue
            parsed = parse_ideas(r["idea"], schema, require_knobs=self.cfg.ideator.require_knobs)
            if r["meta"].get("finish") == "length" or not parsed.ideas:
                r["meta"]["valid"] = False
                continue
            x = parsed.ideas[0]
            idea = Idea(knobs=x) if isinstance(x, dict) else Idea(text=str(x))
            if not self.cfg.execution.dedupe:  # this rollout's own job (a seed fixed by its place in the run)
                key = f"{self.cfg.seed}:{r['group']}:{i}".encode()
                idea = idea.with_seed(int(hashlib.sha256(key).hexdigest()[:8], 16))
            r["meta"].update(valid=True, idea_id=idea.id, knobs=idea.knobs, seed=idea.seed)
            ideas[idea.id] = idea
        return ideas

    def _wait(self, env, ids: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Results of a step's jobs until the deadline, or the straggler cut; the rest are
        cancelled (``late: drop``) or left running for the next step (``keep``)."""
        import queue as _queue

        ex = self.cfg.execution
        feed: "_queue.Queue" = _queue.Queue()

        def pump():
            try:
                for res in env.stream(ids, timeout_s=self.cfg.job_timeout_s):
                    feed.put(res)
            finally:
                feed.put(None)

        threading.Thread(target=pump, name="rl-results", daemon=True).start()
        now = time.monotonic()
        t0 = min([self._submitted.pop(i, now) for i in ids] or [now])  # the group's start: its first submission
        cut = t0 + self.cfg.job_timeout_s
        need = max(1, math.ceil(ex.straggler_quantile * len(ids)))
        got: dict[str, Any] = {}
        t_q = None
        while len(got) < len(ids):
            left = cut - time.monotonic()
            if left <= 0:
                break
            try:
                res = feed.get(timeout=left)
            except _queue.Empty:
                break
            if res is None:
                break
            if res.status == "infra_failed" and res.stage == "timeout":  # the stream's own bound: not a result
                continue
            got[res.idea_id] = res
            if t_q is None and len(got) >= need and ex.straggler_quantile < 1:
                t_q = time.monotonic() - t0
                cut = min(cut, time.monotonic() + ex.straggler_slack * t_q)
        late = [i for i in ids if i not in got]
        if late and ex.late == "drop":
            env.cancel(late)
        return got, {"late": len(late), "cut_s": time.monotonic() - now, "quantile_s": t_q}

    def carry_late(self, env, arm: str, step: int) -> list[dict]:
        """``late: keep``: the previous step's stragglers whose results are in now, each with its
        finished group-mates as ``train=False`` rows (the group's advantages are recomputed with
        it); those still running are cancelled."""
        if self.cfg.execution.late != "keep" or step == 0:
            return []
        _, _, prev, _ = self.journal.get(arm, step - 1)
        groups: dict[str, list[dict]] = {}
        for r in prev:
            if not r.get("carried"):
                groups.setdefault(r["group"], []).append(r)
        out, stop = [], []
        for rows in groups.values():
            late = [r for r in rows if r.get("late")]
            if not late:
                continue
            if any(r.get("infra_failure") for r in rows):  # a masked group stays masked
                stop += [r["meta"]["idea_id"] for r in late]
                continue
            back = []
            for r in late:
                res = env.result(r["meta"]["idea_id"])
                if res is None or res.status == "infra_failed":
                    stop.append(r["meta"]["idea_id"])
                else:
                    back.append({**r, "reward": float(res.reward if res.status == "ok" else 0.0), "late": False,
                                 "train": True, "carried": True,
                                 "meta": {**r["meta"], "status": res.status, "job_s": res.resources.get("run_s")}})
            if back:
                out += back + [{**r, "train": False, "carried": True} for r in rows if r.get("reward") is not None]
        if stop:
            env.cancel(sorted(set(stop)))
        return out

    @staticmethod
    def _hours(env, results) -> dict[str, Any]:
        from pipelines.research_search import job_hours

        cpu_h = gpu_h = 0.0
        results = list(results)
        for res in results:
            g, c = job_hours(res.to_dict(), env.spec.resources.cpus, env.spec.resources.gpus)
            gpu_h, cpu_h = gpu_h + g, cpu_h + c
        job_s = [res.resources.get("run_s") or 0.0 for res in results]
        return {"jobs": len(results), "cpu_hours": cpu_h, "gpu_hours": gpu_h,
                "slowest_job_s": max(job_s, default=0.0)}

    # ------------------------------------------------------------------ one arm
    def run_arm(self, arm: Objective) -> list[dict]:
        import ray

        from trainers.grpo import learner_actor_class

        c = self.cfg
        rl = c.rl.model_copy(update={"objective": arm})
        learner = learner_actor_class().options(num_cpus=c.policy.learner_cpus, num_gpus=c.policy.learner_gpus,
                                                resources=c.policy.learner_resources or None).remote(
            c.policy.model, c.train.model_dump(), rl.model_dump(), c.steps, c.policy.device,
            c.policy.learner_threads or max(1, int(c.policy.learner_cpus)))
        env = self.env_for(arm)
        if c.execution.admission == "gang":
            self.reserve_group(env)
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
            self.pool.update_weights(learner.weights.remote())  # this arm's policy
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
                    prefetch = _Background(lambda s=step + 1, v=version: self.prefetch(env, arm, s, v))
                t_exec, executed_at = time.perf_counter(), time.time()
                stored = self.journal.get(arm, step)[3]
                if state == "executed" and stored:  # resumed after the executor's wait: its outcome is journaled
                    compute = stored
                else:
                    compute = self.execute(env, rollouts)
                    rollouts = rollouts + self.carry_late(env, arm, step)
                    self.journal.put(arm, step, "executed", v_sampled, rollouts, compute)
                t_upd = time.perf_counter()
                stats = ray.get(learner.update.remote(rollouts), timeout=c.rollout_timeout_s)
                t_sync = time.perf_counter()
                if prefetch is not None:
                    prefetch.wait()  # the engines finish sampling the next step with the weights it began with
                sync = self.pool.update_weights(learner.weights.remote())
                sync_s = time.perf_counter() - t_sync
                ray.get(learner.save.remote(str(ckpt), {"step": step}), timeout=c.rollout_timeout_s)
                rec = {**self._step_stats(rollouts), **compute, **{k: stats.get(k) for k in (
                    "loss", "clip_frac", "kl", "grad_norm", "tokens", "stale", "masked_groups", "version", "stepped")},
                       "carried_in": sum(1 for r in rollouts if r.get("carried") and r.get("train", True)),
                       "sampled_version": v_sampled, "sync_s": sync_s, "engine_versions": [s["version"] for s in sync],
                       "execute_s": t_upd - t_exec, "update_s": t_sync - t_upd,
                       "executed_at": [executed_at, executed_at + (t_upd - t_exec)],
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
        rollouts = [r for r in rollouts if not r.get("carried")]  # this step's own samples
        rewards = [r["reward"] for r in rollouts if r.get("reward") is not None]
        valid = [r for r in rollouts if r["meta"].get("valid")]
        distinct = {_norm(r["meta"].get("knobs")) or r["idea"] for r in valid}
        best = max(rollouts, key=lambda r: r["reward"] if r.get("reward") is not None else -math.inf)
        return {"n": len(rollouts), "mean_reward": sum(rewards) / len(rewards) if rewards else 0.0,
                "max_reward": max(rewards, default=0.0), "valid_frac": len(valid) / max(len(rollouts), 1),
                "distinct_frac": len(distinct) / max(len(rollouts), 1), "best_idea": best["idea"],
                "completion_tokens": sum(len(r["completion_ids"]) for r in rollouts),
                "infra_failures": sum(bool(r.get("infra_failure")) for r in rollouts),
                "late_rollouts": sum(bool(r.get("late")) for r in rollouts)}

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
                   "steps": self.cfg.steps, "max_staleness": self.cfg.rl.max_staleness,
                   "execution": {**self.cfg.execution.model_dump(), "gang": self.gang}, "arms": {}}
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
                "late": sum(r.get("late", 0) for r in rows), "carried_in": sum(r.get("carried_in", 0) for r in rows),
                "step_s_mean": sum(r["step_s"] for r in rows) / len(rows) if rows else None}
        summary["report"] = str(write_rl_report(self.run_dir, summary, curves))
        (self.run_dir / "summary.json").write_text(json.dumps({**summary, "curves": curves}, indent=1, default=str))
        return summary


def sampled_mask(c) -> list[int] | None:
    """1 for each completion token the policy sampled, 0 for those the engine forced (the
    end-of-thinking delimiter of a budget-forced sample): only sampled tokens carry the loss."""
    if not c.budget:
        return None
    t, k = int(c.budget.get("thinking_tokens", 0)), int(c.budget.get("control_tokens", 0))
    if c.budget.get("extension_tokens"):
        raise ValueError("RL rollouts take no budget extensions (their forced tokens sit inside the thinking)")
    return [1] * t + [0] * k + [1] * max(0, len(c.token_ids) - t - k)


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
