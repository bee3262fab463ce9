"""Execution-guided search over research ideas: evolutionary search against best-of-N at equal
budget (thesis ch. 4.5, Algorithm 1; the wording and the code are ours).

Each arm runs ``epochs`` epochs of ``batch_size`` (N) executed ideas in its own environment
run directory (``<run_dir>/<arm>/env``), so results never mix:

- ``evolutionary``: epoch 0 asks for N fresh ideas. Every later epoch t splits N into an
  exploit share a(t) (variants of ideas that beat the baseline, shown with their results) and
  an explore share 1 - a(t) (ideas unlike a random sample of everything tried, packed to the
  ideator's context budget). a(t) follows ``exploit`` (linear from ``start`` at epoch 1 to
  ``end`` at the last epoch, or constant). Without an idea above the baseline yet, the whole
  batch explores.
- ``best_of_n``: N fresh ideas every epoch, no feedback.

Before execution every proposal passes the arm's novelty gate (exact hash + embedding
similarity against every idea the arm proposed before); a rejected proposal is journaled with
its neighbour and similarity and never executed, and the ideator is asked again (up to
``refill_rounds`` rounds per epoch) so that both arms execute N per epoch. When the rounds run
out the epoch executes fewer and, with ``carry_shortfall``, the next epoch asks for the
missing ones too: both arms aim at the same total number of executed jobs.

Money and compute go to the run's ledger (``ledger.sqlite``): the ideator's LLM calls as role
``ideator`` (with the call cache ``llm_cache.sqlite``), each job's GPU/CPU hours with
``add_compute``. A cap (``caps``) that would be passed stops the run cleanly: state journaled,
report written, ``stopped`` naming the cap.

Everything lives in ``search.sqlite``: ideator calls, proposals with verdicts and lineage,
results with their compute, and each arm-epoch's accounting. Rerunning the same command after
a crash resumes: finished epochs are read back, a half-proposed epoch is proposed again (the
call cache answers the calls already paid for), and submitted ideas are found in the env's own
journal by their content-hash ids (never executed twice).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field, model_validator

from actors.ideator import IdeatorConfig
from envs.codebase import ResearchConfig
from selftaught.config import Strict, save
from selftaught.idea_judge import JudgeConfig
from selftaught.ledger import BudgetCaps, BudgetExceeded
from selftaught.storage import SqliteJournal
from selftaught.novelty import NoveltyConfig

log = logging.getLogger(__name__)

ARMS = ("evolutionary", "best_of_n")


class AnnealConfig(Strict):
    """The exploit share a(t) of epochs t >= 1 (epoch 0 is all fresh ideas)."""

    schedule: Literal["linear", "constant"] = "linear"
    start: float = Field(default=0.5, ge=0, le=1)  # at epoch 1
    end: float = Field(default=0.9, ge=0, le=1)  # at the last epoch (linear)

    def share(self, t: int, epochs: int) -> float:
        if t < 1:
            return 0.0
        if self.schedule == "constant" or epochs <= 2:
            return self.start
        return self.start + (self.end - self.start) * (t - 1) / (epochs - 2)


class SearchConfig(ResearchConfig):
    """``selftaught research search -c FILE``: the environment fields of ``ResearchConfig``
    (``executor.run_dir`` is chosen per arm) and the search's own."""

    pipeline: Literal["research_search"] = "research_search"
    run_dir: str = "runs/research/search"
    ideator: IdeatorConfig = Field(default_factory=IdeatorConfig)
    context: Literal["task", "full"] = "task"  # task: env.task_text() (small models); full: env.context()
    # structured: knob objects under the env's schema; free_form: text ideas that the executor's
    # implementer turns into edits (needs executor.implementer); auto: structured when the env
    # has a knob schema
    ideas: Literal["auto", "structured", "free_form"] = "auto"
    novelty: NoveltyConfig = Field(default_factory=NoveltyConfig)
    arms: list[Literal["evolutionary", "best_of_n"]] = Field(default_factory=lambda: list(ARMS))
    batch_size: int = Field(default=4, ge=1)  # N: executed ideas per arm per epoch
    epochs: int = Field(default=3, ge=1)  # epochs per arm, epoch 0 included
    exploit: AnnealConfig = Field(default_factory=AnnealConfig)
    refill_rounds: int = Field(default=3, ge=1)  # ideator rounds per epoch to replace rejected ideas
    carry_shortfall: bool = True  # ideas an epoch could not get are asked for in the next one
    caps: BudgetCaps = Field(default_factory=BudgetCaps)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)  # hyper-parameter vs algorithmic share
    estimate_prompt_tokens: int | None = Field(default=None, ge=1)  # default: measured from the prompt
    job_timeout_s: float | None = Field(default=None, gt=0)  # per epoch batch
    seed: int = 0
    mlflow: bool = True
    top_k: int = Field(default=5, ge=0)  # ideas shown in the report

    @model_validator(mode="after")
    def _check(self) -> "SearchConfig":
        if self.executor.run_dir is not None:
            raise ValueError("executor.run_dir is chosen per arm (<run_dir>/<arm>/env); leave it unset")
        if len(set(self.arms)) != len(self.arms) or not self.arms:
            raise ValueError("arms: one or both of evolutionary, best_of_n, each once")
        if self.ideas == "free_form" and not self.executor.implementer:
            raise ValueError("ideas: free_form needs executor.implementer (the model that turns an idea into an edit)")
        return self


CONFIG = SearchConfig


# --------------------------------------------------------------------------- journal
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS calls (seq INTEGER PRIMARY KEY AUTOINCREMENT, arm TEXT, epoch INTEGER, round INTEGER,
  mode TEXT, seed INTEGER, requested INTEGER, returned INTEGER, usd REAL, tokens INTEGER, report TEXT, time REAL);
CREATE TABLE IF NOT EXISTS proposals (seq INTEGER PRIMARY KEY AUTOINCREMENT, arm TEXT, epoch INTEGER,
  round INTEGER, mode TEXT, idea_id TEXT, idea TEXT, novel INTEGER, verdict TEXT, time REAL);
CREATE TABLE IF NOT EXISTS results (arm TEXT, idea_id TEXT, epoch INTEGER, status TEXT, reward REAL,
  result TEXT, gpu_hours REAL, cpu_hours REAL, charged INTEGER DEFAULT 0, mlflow_run TEXT, time REAL,
  PRIMARY KEY (arm, idea_id));
CREATE TABLE IF NOT EXISTS epochs (arm TEXT, epoch INTEGER, state TEXT, plan TEXT, stats TEXT,
  PRIMARY KEY (arm, epoch));
CREATE TABLE IF NOT EXISTS judgements (arm TEXT, idea_id TEXT, kind TEXT, source TEXT, reason TEXT, usd REAL,
  PRIMARY KEY (arm, idea_id));
"""


class SearchJournal(SqliteJournal):
    """The search's SQLite journal (WAL; one transaction per write)."""

    def __init__(self, path: Path):
        super().__init__(path, _SCHEMA)

    def meta(self, key: str, default: Any = None) -> Any:
        rows = self.x("SELECT value FROM meta WHERE key=?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def set_meta(self, key: str, value: Any) -> None:
        self.x("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, json.dumps(value, default=str)))

    def epoch(self, arm: str, t: int) -> tuple[str | None, dict, dict]:
        rows = self.x("SELECT state, plan, stats FROM epochs WHERE arm=? AND epoch=?", (arm, t))
        if not rows:
            return None, {}, {}
        s, p, st = rows[0]
        return s, json.loads(p or "{}"), json.loads(st or "{}")

    def set_epoch(self, arm: str, t: int, state: str, plan: dict | None = None, stats: dict | None = None) -> None:
        _, p0, s0 = self.epoch(arm, t)
        self.x("INSERT OR REPLACE INTO epochs VALUES (?,?,?,?,?)",
               (arm, t, state, json.dumps(plan if plan is not None else p0), json.dumps(stats or s0, default=str)))

    def proposals(self, arm: str, epoch: int | None = None, before: int | None = None,
                  novel: bool | None = None) -> list[dict]:
        sql, args = "SELECT epoch, round, mode, idea, novel, verdict FROM proposals WHERE arm=?", [arm]
        if epoch is not None:
            sql += " AND epoch=?"
            args.append(epoch)
        if before is not None:
            sql += " AND epoch<?"
            args.append(before)
        if novel is not None:
            sql += " AND novel=?"
            args.append(int(novel))
        return [{**json.loads(i), "epoch": e, "round": r, "mode": m, "novel": bool(n), "verdict": json.loads(v)}
                for e, r, m, i, n, v in self.x(sql + " ORDER BY seq", tuple(args))]

    def kinds(self, arm: str, ids: set[str] | None = None) -> dict[str, int]:
        """Counts of judged kinds (hyperparameter, algorithmic, unknown) of the arm's ideas."""
        out: dict[str, int] = {}
        for i, k in self.x("SELECT idea_id, kind FROM judgements WHERE arm=?", (arm,)):
            if ids is None or i in ids:
                out[k] = out.get(k, 0) + 1
        return out

    def results(self, arm: str, before: int | None = None) -> list[dict]:
        sql, args = "SELECT idea_id, epoch, result, gpu_hours, cpu_hours, charged, mlflow_run FROM results WHERE arm=?", [arm]
        if before is not None:
            sql += " AND epoch<?"
            args.append(before)
        return [{"idea_id": i, "epoch": e, "result": json.loads(r), "gpu_hours": g, "cpu_hours": c,
                 "charged": bool(ch), "mlflow_run": m} for i, e, r, g, c, ch, m in self.x(sql, tuple(args))]


# --------------------------------------------------------------------------- helpers
def _seed(*parts: Any) -> int:
    return int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:15], 16)


def job_hours(res: dict[str, Any], spec_cpus: float, spec_gpus: int) -> tuple[float, float]:
    """(gpu_hours, cpu_hours) of one executed job: its devices times its run + evaluate seconds.
    An idea that never reached its devices (it failed to implement, apply or pass its smoke run)
    held none: 0. Untimed stages of a job that did run fall back to the wall time."""
    r = res.get("resources") or {}
    secs = float(r.get("run_s") or 0.0) + float(r.get("eval_s") or 0.0)
    if secs <= 0:
        ran = res.get("status") == "ok" or res.get("stage") in ("run", "evaluate")
        secs = float(res.get("wall_s") or 0.0) if ran else 0.0
    def count(v: Any, default: float) -> float:  # a number, or a list of device ids
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, (list, tuple)):
            return float(len(v))
        return float(default or 0.0)

    cpus = count(r.get("cpus"), spec_cpus) or float(spec_cpus or 0.0)
    gpus = count(r.get("gpus"), spec_gpus)
    return gpus * secs / 3600.0, cpus * secs / 3600.0


def _ideator_cfg(cfg: SearchConfig, run_dir: Path, ledger_path: str) -> IdeatorConfig:
    ic = cfg.ideator
    upd_llm = {"role": "ideator", "cache": ic.llm.cache or str(run_dir / "llm_cache.sqlite"), "ledger": ledger_path}
    upd: dict[str, Any] = {"llm": ic.llm.model_copy(update=upd_llm),
                           "ensemble": [m.model_copy(update={"llm": m.llm.model_copy(update=upd_llm)})
                                        for m in ic.ensemble]}
    if ic.sampling.seed is None:  # per-call seeds: distinct requests per call, identical on resume
        upd["sampling"] = ic.sampling.model_copy(update={"seed": cfg.seed})
    if ic.seed is None:
        upd["seed"] = cfg.seed
    return ic.model_copy(update=upd)


def ideator_worst_case(cfg: SearchConfig, ic: IdeatorConfig, context_chars: int) -> dict[str, Any]:
    """The most the ideator can cost, one rule for the run's estimate, the check before each
    round and ``--plan``: every epoch's exploit and explore calls, every refill round, every
    top-up round of the ideator (``max_rounds``); each call a prompt of the context plus the
    largest listing (characters / 3, a generous token count) and all of ``max_new_tokens`` out,
    at the priciest model of an ensemble. ``per_call_usd`` is None for an unpriced model."""
    from selftaught.llm import worst_case_cost

    per_epoch = math.ceil(cfg.batch_size / ic.batch_size) * 2 * cfg.refill_rounds * ic.max_rounds
    calls = per_epoch * cfg.epochs * len(cfg.arms)
    prompt = cfg.estimate_prompt_tokens or (min(context_chars, ic.max_context_chars)
                                            + max(ic.explore_budget_chars, ic.exploit_budget_chars) + 2000) // 3
    out: dict[str, Any] = {"calls": calls, "prompt_tokens": prompt, "max_tokens": ic.sampling.max_new_tokens}
    if ic.backend == "local":
        return {**out, "per_call_usd": 0.0, "usd": 0.0}
    try:
        per = max(worst_case_cost(m.llm, int(prompt * m.llm.budget_margin), ic.sampling.max_new_tokens)
                  for m in ic.ensemble) if ic.ensemble else \
            worst_case_cost(ic.llm, int(prompt * ic.llm.budget_margin), ic.sampling.max_new_tokens)
    except Exception as e:  # noqa: BLE001 - no known or declared price
        return {**out, "per_call_usd": None, "usd": None, "error": str(e)}
    return {**out, "per_call_usd": per, "usd": per * calls}


def implementer_worst_case(impl: dict[str, Any] | None, jobs: int) -> float | None:
    """Implementer dollars if every job used every chain and revision at full prompt and
    answer length (None: a model without a known or declared price)."""
    if not impl:
        return 0.0
    from actors.implementer import ImplementerConfig
    from selftaught.llm import worst_case_cost

    ic = ImplementerConfig.model_validate(impl)
    if ic.mock_responses is not None and not ic.llm.has_price_override:
        return 0.0
    calls = jobs * ic.samples * (1 + ic.max_revisions)
    try:
        return calls * worst_case_cost(ic.llm, ic.max_codebase_chars // 3 + 1000, ic.llm.max_tokens)
    except Exception:  # noqa: BLE001 - unpriced: the client refuses its first call anyway
        return None


def plan(cfg: SearchConfig) -> dict[str, Any]:
    """The search's worst case before anything starts, from the config and the env's spec
    alone (no Ray, no call, no cluster): executed jobs, device-hours at the spec's time limits,
    LLM dollars per role at full prompt and answer lengths, and each against its cap.
    ``selftaught research search -c FILE --plan`` prints it."""
    from envs.base import ENVS
    from envs.codebase import env_dir
    from envs.spec import CodebaseEnvSpec
    from selftaught.idea_judge import IdeaJudge

    root = Path(cfg.env_dir) if cfg.env_dir else env_dir(cfg.env) if ENVS.get(cfg.env, "").startswith(
        "envs.codebase:") else None
    if root is None:
        raise ValueError(f"--plan needs a codebase environment (env_dir, or one of the shipped: {sorted(ENVS)})")
    spec = CodebaseEnvSpec.load(root / cfg.spec_file, cfg.spec_overrides)
    free = cfg.ideas == "free_form" or (cfg.ideas == "auto" and not spec.knobs)
    ic = cfg.ideator
    jobs = cfg.batch_size * cfg.epochs * len(cfg.arms)
    # the longest a job may hold its devices (the worker is killed after its limits and the grace)
    hours = (spec.time_limit_s + spec.evaluator.time_limit_s + cfg.executor.scheduler.grace_s) / 3600.0
    context = ic.max_context_chars if cfg.context == "full" else len(spec.description)
    ideator = ideator_worst_case(cfg, ic, context)
    calls = ideator["calls"]
    roles: dict[str, float | None] = {"ideator": ideator["usd"]}
    roles["implementer"] = implementer_worst_case(cfg.executor.implementer, jobs) if free else 0.0
    try:
        roles["judge"] = IdeaJudge(cfg.judge).worst_case_usd(jobs)
    except Exception:  # noqa: BLE001 - no known or declared price: listed under unpriced
        roles["judge"] = None
    usd = None if any(v is None for v in roles.values()) else sum(roles.values())
    out: dict[str, Any] = {
        "env": spec.name, "spec": cfg.spec_file, "ideas": "free_form" if free else "structured",
        "jobs": jobs, "per_job": {"gpus": spec.resources.gpus, "cpus": spec.resources.cpus, "max_hours": hours},
        "gpu_hours_max": jobs * spec.resources.gpus * hours, "cpu_hours_max": jobs * spec.resources.cpus * hours,
        "ideator_calls_max": calls, "usd_max": usd, "usd_max_by_role": roles,
        "unpriced": sorted(r for r, v in roles.items() if v is None)}
    caps, checks = cfg.caps, {}
    for name, need, cap in (("jobs", jobs, caps.jobs), ("gpu_hours", out["gpu_hours_max"], caps.gpu_hours),
                            ("cpu_hours", out["cpu_hours_max"], caps.cpu_hours), ("total_usd", usd, caps.total_usd)):
        if cap is not None:
            checks[name] = {"cap": cap, "worst_case": need, "fits": need is not None and need <= cap}
    for role, cap in caps.role_usd.items():
        checks[f"role_usd[{role}]"] = {"cap": cap, "worst_case": roles.get(role, 0.0),
                                       "fits": roles.get(role, 0.0) is not None and (roles.get(role) or 0.0) <= cap}
    out["caps"] = checks
    return out


class _Stop(Exception):
    def __init__(self, cap: str, message: str):
        super().__init__(message)
        self.cap, self.message = cap, message


# --------------------------------------------------------------------------- the search
class Search:
    def __init__(self, cfg: SearchConfig, after_epoch: Callable[[str, int, dict], None] | None = None):
        from actors.ideator import Ideator
        from selftaught.idea_judge import IdeaJudge
        from selftaught.ledger import Ledger

        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save(cfg, self.run_dir / "config.yaml")
        self.after_epoch = after_epoch
        self.ledger = Ledger.for_run(self.run_dir, cfg.caps)
        self.icfg = _ideator_cfg(cfg, self.run_dir, self.ledger.path)
        # a local engine shares the CPUs with the jobs: give it its own thread budget
        self.ideator = Ideator(self.icfg, num_cpus=self.icfg.engine.cpus_per_actor
                               if self.icfg.backend == "local" else None)
        self.journal = SearchJournal(self.run_dir / "search.sqlite")
        self.judge = IdeaJudge(cfg.judge, cache=str(self.run_dir / "llm_cache.sqlite"), ledger=self.ledger.path)
        self.envs: dict[str, Any] = {}
        self.scheduler = None
        self.recorder = None
        self.parents: dict[str, str] = {}
        self.gates: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup
    def open(self) -> None:
        from actors.scheduler import Scheduler
        from selftaught.runtime import init_ray

        init_ray(self.cfg.ray)
        self.scheduler = Scheduler(self.cfg.executor.scheduler)
        for arm in self.cfg.arms:
            self.envs[arm] = self.cfg.load_env(self.run_dir / arm / "env", scheduler=self.scheduler,
                                               executor_update={"implementer": self._implementer_cfg()})
        env = self.envs[self.cfg.arms[0]]
        self.schema = None if self.cfg.ideas == "free_form" else env.idea_schema()
        if self.cfg.ideas == "structured" and self.schema is None:
            raise ValueError(f"ideas: structured, but environment {env.name!r} has no knob schema")
        if self.schema is None and not self.cfg.executor.implementer:
            raise ValueError(f"environment {env.name!r} takes free-form ideas here (no knob schema, or ideas: "
                             "free_form), which need executor.implementer: set one before paying for ideas")
        self.context = env.task_text() if self.cfg.context == "task" else env.context()
        base = env.baseline()
        self.baseline = float(base["mean"]) if base else None
        self.baseline_std = float(base.get("std") or 0.0) if base else None
        self.baseline_n = len(base.get("values") or []) if base else 0
        if self.cfg.mlflow:
            from selftaught.research_record import MlflowRecorder

            self.recorder = MlflowRecorder(self.run_dir)
            parents = self.journal.meta("mlflow_parents", {})
            for arm in self.cfg.arms:
                if arm not in parents:
                    parents[arm] = self.recorder.arm_run(arm, {"batch_size": self.cfg.batch_size,
                                                               "epochs": self.cfg.epochs, "env": env.name,
                                                               "exploit": self.cfg.exploit.model_dump_json()})
            self.journal.set_meta("mlflow_parents", parents)
            self.parents = parents

    def _implementer_cfg(self) -> dict[str, Any] | None:
        """The executor's implementer, charged to this run's ledger as role ``implementer`` and
        answered from its call cache on resume (the env's journal already skips edits it made)."""
        impl = self.cfg.executor.implementer
        if not impl:
            return impl
        llm = dict(impl.get("llm") or {})
        llm.setdefault("cache", str(self.run_dir / "llm_cache.sqlite"))
        llm.setdefault("ledger", self.ledger.path)
        llm["role"] = "implementer"
        return {**impl, "llm": llm}

    def close(self) -> None:
        for env in self.envs.values():
            try:
                env.close()
            except Exception:  # noqa: BLE001
                log.exception("closing env")
        if self.scheduler is not None:
            self.scheduler.shutdown()

    def estimate(self) -> dict[str, Any]:
        """Worst-case LLM dollars of the whole search: every refill round of the ideator used,
        and (with an LLM judge) one judge call per planned job."""
        c, ic = self.cfg, self.icfg
        out: dict[str, Any] = {**ideator_worst_case(c, ic, len(self.context)), "jobs": c.batch_size * c.epochs * len(c.arms)}
        if ic.backend == "local":
            out["note"] = "local ideator: no ideator dollars"
        try:
            judge_usd = self.judge.worst_case_usd(out["jobs"])
        except Exception:  # noqa: BLE001 - unpriced: its client refuses the first call anyway
            judge_usd = None
        impl_usd = implementer_worst_case(self._implementer_cfg(), out["jobs"]) if self.schema is None else 0.0
        out["ideator_usd"], out["judge_usd"], out["implementer_usd"] = out.get("usd"), judge_usd, impl_usd
        snap = self.ledger.snapshot()["remaining"]
        out["remaining_usd"], out["role_remaining_usd"] = snap["usd"], snap["role_usd"]
        if any(v is None for v in (out.get("usd"), judge_usd, impl_usd)):
            out["usd"], out["fits"] = None, False
            return out
        out["usd"] += judge_usd + impl_usd
        roles = {"ideator": out["ideator_usd"], "judge": judge_usd, "implementer": impl_usd}
        out["fits"] = (snap["usd"] is None or out["usd"] <= snap["usd"] + 1e-12) and all(
            roles.get(r, 0.0) <= left + 1e-12 for r, left in snap["role_usd"].items())
        return out

    # ------------------------------------------------------------------ one arm-epoch
    def _gate(self, arm: str, t: int):
        from selftaught.novelty import NoveltyGate

        gate = NoveltyGate(self.cfg.novelty)
        for p in self.journal.proposals(arm, before=t):
            gate.add(p["id"], p.get("text") or "", p.get("knobs"))
        return gate

    def _history(self, arm: str, t: int) -> list[dict[str, Any]]:
        by_id = {p["id"]: p for p in self.journal.proposals(arm, before=t, novel=True)}
        out = []
        for r in self.journal.results(arm, before=t):
            p = by_id.get(r["idea_id"], {})
            res = r["result"]
            out.append({"id": r["idea_id"], "text": p.get("text") or "", "knobs": p.get("knobs"),
                        "reward": res.get("reward"), "status": res.get("status"), "metrics": res.get("metrics")})
        return out

    def _positives(self, hist: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ok = [h for h in hist if h["status"] == "ok"]
        return ok if self.baseline is None else [h for h in ok if h["reward"] > self.baseline]

    def _check_llm(self, calls: int) -> None:
        """Stop before a round of ideator calls that the caps could not pay for."""
        if self.icfg.backend == "local":
            return
        per = ideator_worst_case(self.cfg, self.icfg, len(self.context))["per_call_usd"]
        if per is not None:  # unpriced: the client refuses the call itself
            self.ledger.check_usd("ideator", per * calls)

    def _target(self, arm: str, t: int) -> tuple[int, int]:
        """(ideas the arm should execute in epoch t, of which owed by earlier epochs' shortfall)."""
        c = self.cfg
        admitted_before = len(self.journal.proposals(arm, before=t, novel=True))  # executed or still running
        owed = max(0, c.batch_size * t - admitted_before) if c.carry_shortfall else 0
        return c.batch_size + owed, owed

    def _plan(self, arm: str, t: int, hist: list[dict[str, Any]]) -> dict[str, Any]:
        c = self.cfg
        target, owed = self._target(arm, t)
        if arm == "best_of_n" or t == 0:
            return {"target": target, "owed": owed, "exploit_share": 0.0 if arm == "evolutionary" else None,
                    "modes": {"fresh": target}}
        a = c.exploit.share(t, c.epochs)
        pos = self._positives(hist)
        n_exp = math.floor(a * target) if pos else 0
        return {"target": target, "owed": owed, "exploit_share": a, "positives": len(pos),
                "modes": {"exploit": n_exp, "explore": target - n_exp}}

    def _propose(self, arm: str, t: int, plan: dict[str, Any], hist: list[dict[str, Any]]) -> None:
        self.journal.x("DELETE FROM proposals WHERE arm=? AND epoch=?", (arm, t))  # a half-proposed epoch
        gate = self._gate(arm, t)
        got = {m: 0 for m in plan["modes"]}
        pos = self._positives(hist)
        bs = self.icfg.batch_size
        for rnd in range(self.cfg.refill_rounds):
            for mode, want in plan["modes"].items():
                need = want - got[mode]
                if need <= 0:
                    continue
                self._check_llm(math.ceil(need / bs))
                shown = pos if mode == "exploit" else hist if mode == "explore" else []
                seed = _seed(self.cfg.seed, arm, t, mode, rnd)
                before = self.ideator.stats()
                ideas = self.ideator.propose(mode, self.context, shown, n=need, schema=self.schema, seed=seed)
                after = self.ideator.stats()
                rep = dict(self.ideator.last)
                usd = after["cost_usd"] - before["cost_usd"]
                tokens = (after["prompt_tokens"] + after["completion_tokens"]
                          - before["prompt_tokens"] - before["completion_tokens"])
                self.journal.x("INSERT INTO calls (arm, epoch, round, mode, seed, requested, returned, usd, tokens, "
                               "report, time) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                               (arm, t, rnd, mode, seed, need, len(ideas), usd, tokens, json.dumps(rep), time.time()))
                if rep.get("fatal") or (rep.get("calls") and rep.get("failed_calls") == rep.get("calls")):
                    # a misconfigured ideator (key, model, a parameter the provider refuses) fails every
                    # call alike, and a round with no answer at all is an outage: stop, resumable, rather
                    # than mark epochs done with nothing executed
                    raise _Stop("ideator", f"ideator calls failed ({rep.get('failed_calls')}/{rep.get('calls')} "
                                           f"in {arm} epoch {t}): {(rep.get('errors') or ['?'])[0]}")
                for d in ideas:
                    v = gate.admit(d["id"], d.get("text") or "", d.get("knobs"))
                    self.journal.x("INSERT INTO proposals (arm, epoch, round, mode, idea_id, idea, novel, verdict, "
                                   "time) VALUES (?,?,?,?,?,?,?,?,?)",
                                   (arm, t, rnd, mode, d["id"], json.dumps(d, default=str), int(v.novel),
                                    json.dumps(v.to_dict()), time.time()))
                    if v.novel and got[mode] < want:
                        got[mode] += 1
            if all(got[m] >= w for m, w in plan["modes"].items()):
                break
        plan["admitted"] = got
        self.journal.set_epoch(arm, t, "proposed", plan)

    def job_worst_case(self) -> tuple[float, float]:
        """(gpu_hours, cpu_hours) one job can hold at most: its devices for the run's and the
        evaluator's time limits plus the scheduler's grace, after which the worker is killed."""
        spec = self.envs[self.cfg.arms[0]].spec
        hours = (spec.time_limit_s + spec.evaluator.time_limit_s + self.cfg.executor.scheduler.grace_s) / 3600.0
        return spec.resources.gpus * hours, spec.resources.cpus * hours

    def epoch_quota(self, t: int) -> tuple[int | None, BudgetExceeded | None]:
        """Jobs each arm may start in epoch t: the same number for every arm, as many as the
        compute caps allow if every job ran to its limits (so a cap is never passed), and the
        refusal to raise once the epoch ran when that is fewer than the arms want. Journaled,
        so a resumed epoch keeps the quota it began with."""
        stored = self.journal.meta(f"quota:{t}")
        if stored is not None:
            return stored["quota"], None if not stored.get("refused") else BudgetExceeded(**stored["refused"])
        want = 0
        for arm in self.cfg.arms:
            _, plan, _ = self.journal.epoch(arm, t)
            want = max(want, int(plan.get("target") or 0) if plan else self._target(arm, t)[0])
        gw, cw = self.job_worst_case()
        n_arms = len(self.cfg.arms)
        quota, refused = 0, None
        for k in range(want, -1, -1):
            try:
                self.ledger.check_compute(None, gpu_hours=gw * k * n_arms, cpu_hours=cw * k * n_arms, jobs=k * n_arms)
                quota = k
                break
            except BudgetExceeded as e:
                refused = refused or e
        if quota == want:
            refused = None
        rec = {"quota": quota, "refused": None if refused is None else
               {"cap": refused.cap, "limit": refused.limit, "used": refused.used, "reserved": refused.reserved,
                "requested": refused.requested}}
        self.journal.set_meta(f"quota:{t}", rec)
        return quota, refused

    def _execute(self, arm: str, t: int, quota: int | None = None) -> None:
        """Run the arm's admitted ideas of epochs up to t that have no result yet (this epoch's,
        and any earlier one's still running when its epoch timed out), at most ``quota`` new ones."""
        from actors.ideator import to_idea

        env = self.envs[arm]
        done = {r["idea_id"] for r in self.journal.results(arm)}
        pending = [p for p in self.journal.proposals(arm, novel=True) if p["epoch"] <= t and p["id"] not in done]
        earlier = [p for p in pending if p["epoch"] < t]  # already started: never refused
        now = [p for p in pending if p["epoch"] == t]
        run = earlier + (now if quota is None else now[:quota])
        if run:
            ideas = [to_idea(p) for p in run]
            for p, i in zip(run, ideas):
                assert i.id == p["id"], (i.id, p["id"])
            ids = env.submit(ideas)  # a still-running idea is not started twice: it is streamed again
            by_id = {p["id"]: p for p in run}
            for res in env.stream(ids, timeout_s=self.cfg.job_timeout_s):
                if res.status == "infra_failed" and res.stage == "timeout":
                    log.warning("%s: %s still running after %ss; collected in a later epoch", arm, res.idea_id,
                                self.cfg.job_timeout_s)
                    continue  # not a result: it stays pending, its compute is charged when it ends
                p = by_id[res.idea_id]
                self._record(arm, p["epoch"], p, res)
        self._charge(arm)
        self._judge(arm)

    def _judge(self, arm: str) -> None:
        """Hyper-parameter or algorithmic, for every executed idea not judged yet (journaled,
        so a resumed run asks again only for what it never recorded; the cache answers those)."""
        judged = {i for (i,) in self.journal.x("SELECT idea_id FROM judgements WHERE arm=?", (arm,))}
        props = {p["id"]: p for p in self.journal.proposals(arm, novel=True)}
        config_file = getattr(self.envs[arm].spec, "config_file", None)
        for r in self.journal.results(arm):
            if r["idea_id"] in judged:
                continue
            try:
                v = self.judge.classify(props.get(r["idea_id"], {}), r["result"].get("edit"), config_file)
            except Exception as e:  # noqa: BLE001 - an outage or the judge's own cap: leave it unjudged, go on
                log.warning("judge: %s left unjudged: %s", r["idea_id"], e)
                continue
            self.journal.x("INSERT OR IGNORE INTO judgements VALUES (?,?,?,?,?,?)",
                           (arm, r["idea_id"], v["kind"], v["source"], v["reason"], v["usd"]))

    def _record(self, arm: str, t: int, prop: dict[str, Any], res) -> None:
        env = self.envs[arm]
        d = res.to_dict()
        gh, ch = job_hours(d, env.spec.resources.cpus, env.spec.resources.gpus)
        self.journal.x("INSERT OR IGNORE INTO results (arm, idea_id, epoch, status, reward, result, gpu_hours, "
                       "cpu_hours, time) VALUES (?,?,?,?,?,?,?,?,?)",
                       (arm, res.idea_id, t, res.status, res.reward, json.dumps(d, default=str), gh, ch, time.time()))

    def _charge(self, arm: str) -> None:
        """Compute of recorded results to the ledger and to MLflow, each exactly once: the ledger
        charge is keyed by the idea and the MLflow run is found by its tag, so a crash between
        either write and the journal's ``charged``/``mlflow_run`` mark repeats nothing."""
        env = self.envs[arm]
        for r in self.journal.results(arm):
            if not r["charged"]:
                self.ledger.add_compute(f"{env.name}:{arm}", gpu_hours=r["gpu_hours"], cpu_hours=r["cpu_hours"],
                                        jobs=1, key=f"search:{arm}:{r['idea_id']}")  # once, even across a crash
                self.journal.x("UPDATE results SET charged=1 WHERE arm=? AND idea_id=?", (arm, r["idea_id"]))
        if self.recorder is None:
            return
        props = {p["id"]: p for p in self.journal.proposals(arm, novel=True)}
        for r in self.journal.results(arm):
            if r["mlflow_run"]:
                continue
            p = props.get(r["idea_id"], {"id": r["idea_id"]})
            rid = self.recorder.log_idea(self.parents[arm], arm, r["epoch"], p, r["result"],
                                         {"gpu_hours": r["gpu_hours"], "cpu_hours": r["cpu_hours"],
                                          "ideator_cost_usd": p.get("cost_usd") or 0.0})
            self.journal.x("UPDATE results SET mlflow_run=? WHERE arm=? AND idea_id=?", (rid, arm, r["idea_id"]))

    def epoch_stats(self, arm: str, t: int) -> dict[str, Any]:
        _, plan, _ = self.journal.epoch(arm, t)
        res = [r for r in self.journal.results(arm) if r["epoch"] == t]
        upto = [r for r in self.journal.results(arm) if r["epoch"] <= t]
        ok = [r["result"]["reward"] for r in res if r["result"]["status"] == "ok"]
        ok_all = [r["result"]["reward"] for r in upto if r["result"]["status"] == "ok"]
        props = self.journal.proposals(arm, epoch=t)
        usd = self.journal.x("SELECT COALESCE(SUM(usd),0), COALESCE(SUM(tokens),0), COUNT(*) FROM calls "
                             "WHERE arm=? AND epoch=?", (arm, t))[0]
        modes: dict[str, int] = {}
        for p in props:
            if p["novel"] and p["id"] in {r["idea_id"] for r in res}:
                modes[p["mode"]] = modes.get(p["mode"], 0) + 1
        return {"epoch": t, "target": plan.get("target"), "exploit_share": plan.get("exploit_share"),
                "planned": plan.get("modes"), "modes": modes, "executed": len(res), "ok": len(ok),
                "best": max(ok, default=None), "mean_reward": sum(ok) / len(ok) if ok else None,
                "best_so_far": max(ok_all, default=None), "proposed": len(props),
                "rejected": sum(not p["novel"] for p in props), "jobs": len(res),
                "gpu_hours": sum(r["gpu_hours"] for r in res), "cpu_hours": sum(r["cpu_hours"] for r in res),
                "usd": float(usd[0]), "tokens": int(usd[1]), "ideator_calls": int(usd[2]),
                "kinds": self.journal.kinds(arm, {r["idea_id"] for r in res}),
                "shortfall": max(0, (plan.get("target") or 0) - len(res))}

    def run_epoch(self, arm: str, t: int, quota: int | None = None) -> dict[str, Any]:
        state, plan, stats = self.journal.epoch(arm, t)
        if state == "done":
            return stats
        hist = self._history(arm, t)
        if state != "proposed":
            plan = self._plan(arm, t, hist)
            self._propose(arm, t, plan, hist)
        self._execute(arm, t, quota)
        stats = self.epoch_stats(arm, t)
        if self.recorder is not None:  # before "done": a crash in between logs it again, never not at all
            self.recorder.log_epoch(self.parents[arm], t, stats)
        self.journal.set_epoch(arm, t, "done", stats=stats)
        log.info("%s epoch %d: %s", arm, t, {k: stats[k] for k in ("executed", "ok", "best_so_far", "usd")})
        if self.after_epoch is not None:
            self.after_epoch(arm, t, stats)
        return stats

    # ------------------------------------------------------------------ whole run
    def run(self) -> dict[str, Any]:
        self.open()
        stopped = None
        try:
            for arm in self.cfg.arms:  # results a crashed run recorded but never charged, logged or judged
                self._charge(arm)
                self._judge(arm)
            est = self.estimate()
            self.journal.set_meta("estimate", est)
            log.info("search estimate: %s", est)
            print(f"# estimate: up to {est.get('usd')} USD over {est['calls']} ideator calls, "
                  f"{est['jobs']} jobs; remaining under the cap: {est.get('remaining_usd')}", flush=True)
            for t in range(self.cfg.epochs):
                quota, refusal = self.epoch_quota(t)
                for arm in self.cfg.arms:
                    self.run_epoch(arm, t, quota)
                if refusal is not None:  # every arm ran the same reduced number; now stop at the cap
                    raise refusal
            for arm in self.cfg.arms:  # ideas still running when their epoch timed out: one more bounded wait
                self._execute(arm, self.cfg.epochs, quota=0)
            self.journal.set_meta("stopped", None)
        except (BudgetExceeded, _Stop) as e:
            stopped = {"cap": e.cap, "message": str(e)}
            for arm in self.cfg.arms:  # results that landed before the stop still count and are logged
                self._charge(arm)
                try:
                    self._judge(arm)
                except (BudgetExceeded, _Stop):
                    pass  # the judge is out of money too: those ideas stay unjudged
            self.journal.set_meta("stopped", stopped)
            log.warning("search stopped by cap %s: %s", e.cap, e)
        except BaseException as e:  # a crash or a kill: the report says so, and the error goes on
            stopped = {"cap": "error", "message": f"{type(e).__name__}: {e}"[:1000]}
            self.journal.set_meta("stopped", stopped)
            raise
        finally:
            try:
                summary = self.report(stopped)
            finally:
                self.close()
        return summary

    def bar(self) -> float | None:
        """The value an idea must beat to count as a real gain, not seed noise: the baseline's
        mean plus two standard deviations of its measured values."""
        b, sd = getattr(self, "baseline", None), getattr(self, "baseline_std", None)
        return None if b is None else b + 2.0 * (sd or 0.0)

    def report(self, stopped: dict | None) -> dict[str, Any]:
        from selftaught.research_record import write_report

        epochs: dict[str, list[dict]] = {}
        arms: dict[str, dict] = {}
        rejected: dict[str, int] = {}
        top = []
        for arm in self.cfg.arms:
            rows = []
            for t in range(self.cfg.epochs):
                state, _, st = self.journal.epoch(arm, t)
                if state is None:
                    break
                rows.append(self.epoch_stats(arm, t))  # from the journal: late results count where they belong
            epochs[arm] = rows
            res = self.journal.results(arm)
            ok = [r["result"]["reward"] for r in res if r["result"]["status"] == "ok"]
            usd = self.journal.x("SELECT COALESCE(SUM(usd),0) FROM calls WHERE arm=?", (arm,))[0][0]
            bar = self.bar()
            done_ids = {r["idea_id"] for r in res}
            still = sum(p["id"] not in done_ids for p in self.journal.proposals(arm, novel=True))
            arms[arm] = {"executed": len(res), "ok": len(ok), "completion_rate": len(ok) / len(res) if res else None,
                         "still_running": still,
                         "beat_baseline": sum(r > self.baseline for r in ok) if self.baseline is not None else None,
                         "clear_bar": sum(r > bar for r in ok) if bar is not None else None,
                         "best": max(ok, default=None), "jobs": len(res),
                         "gpu_hours": sum(r["gpu_hours"] for r in res), "cpu_hours": sum(r["cpu_hours"] for r in res),
                         "usd": float(usd), "kinds": self.journal.kinds(arm),
                         "judge_usd": float(self.journal.x("SELECT COALESCE(SUM(usd),0) FROM judgements WHERE arm=?",
                                                           (arm,))[0][0])}
            props = {p["id"]: p for p in self.journal.proposals(arm, novel=True)}
            rejected[arm] = len(self.journal.proposals(arm, novel=False))
            for r in res:
                if r["result"]["status"] == "ok":
                    p = props.get(r["idea_id"], {})
                    top.append({"arm": arm, "epoch": r["epoch"], "mode": p.get("mode"), "idea_id": r["idea_id"],
                                "reward": r["result"]["reward"], "text": p.get("text"), "knobs": p.get("knobs"),
                                "shown_ids": p.get("shown_ids"), "edit": r["result"].get("edit")})
        top.sort(key=lambda x: -x["reward"])
        env = next(iter(self.envs.values()), None)
        summary = {"run_dir": str(self.run_dir), "env": env.name if env else self.cfg.env,
                   "batch_size": self.cfg.batch_size, "epochs": self.cfg.epochs,
                   "ideator": f"{self.icfg.backend}:{self.ideator.model_name()}",
                   "baseline": getattr(self, "baseline", None), "baseline_std": getattr(self, "baseline_std", None),
                   "baseline_n": getattr(self, "baseline_n", 0), "bar": self.bar(), "stopped": stopped,
                   "estimate": self.journal.meta("estimate"), "arms": arms, "epoch_stats": epochs,
                   "ledger": self.ledger.snapshot(), "mlflow": self.recorder.uri if self.recorder else None}
        summary["report"] = str(write_report(self.run_dir, summary, epochs, top[: self.cfg.top_k], rejected))
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        return summary


def run(cfg: SearchConfig | dict, after_epoch: Callable[[str, int, dict], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the search; returns the summary (also ``summary.json``) with the
    report's path. ``after_epoch(arm, epoch, stats)`` is called after each arm-epoch."""
    cfg = cfg if isinstance(cfg, SearchConfig) else SearchConfig.model_validate(cfg)
    return Search(cfg, after_epoch).run()
