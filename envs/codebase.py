"""``CodebaseEnv``: a research environment made of a codebase, an entry command and a frozen
evaluator (the thesis's AIResearchEnv).

For each idea: structured ideas (knob values) are validated against the environment's JSON
schema and written into its config file; free-form ideas go to the implementer (an LLM writes
an edit, a smoke run checks it, errors go back for revision). The edited codebase becomes a
job for the scheduler, which runs it on a sandbox-worker slot and then runs the evaluator on
the job's artefacts. The reward is the evaluator's value: our code computed it from the
artefacts, never from anything the idea's code printed.

Everything is journaled (``journal.sqlite`` in the run directory): a restarted driver reuses
finished results, picks up outcomes of jobs that finished while it was away, and resubmits
the rest, without paying the implementer twice.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import queue
import shutil
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import jsonschema
from pydantic import Field

from actors.sandbox_worker import SandboxWorker
from actors.scheduler import Scheduler, SchedulerConfig
from envs.base import Idea, ResearchEnv, Result, new_id
from envs.edits import matches_any
from envs.journal import Journal
from envs.spec import CodebaseEnvSpec
from selftaught import metrics
from selftaught.config import RayConfig, Strict, fingerprint

log = logging.getLogger(__name__)

ENVS_DIR = Path(__file__).resolve().parent
MAX_IDEA_CHARS = 20_000


class ExecutorConfig(Strict):
    """How ideas are executed: where the run lives, who implements, how jobs are scheduled."""

    run_dir: str | None = None  # default: runs/research/<env>
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    implementer: dict[str, Any] | None = None  # an ImplementerConfig; None: structured ideas only
    implement_concurrency: int = Field(default=4, ge=1)
    seed: int | None = None  # overrides the spec's seed for every job
    smoke: bool = True  # check free-form edits with a smoke run before queueing them
    smoke_concurrency: int = Field(default=2, ge=1)  # smoke runs at once (on the driver's node, CPU only)


class ResearchConfig(Strict):
    """The file ``selftaught research ... -c FILE`` reads: where Ray runs, which environment,
    how ideas are executed."""

    ray: RayConfig = Field(default_factory=RayConfig)
    env: str = "toy"  # a shipped environment (nanogpt, grpo, toy)
    env_dir: str | None = None  # or a directory of your own (env.yaml, codebase/, data.py, evaluator)
    spec_file: str = "env.yaml"  # paper.yaml for the paper-shape variant
    spec_overrides: list[str] = Field(default_factory=list)  # dotted key=value on the env spec
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)

    def load_env(self, run_dir: str | Path | None = None, **kw: Any) -> "CodebaseEnv":
        """This config's environment; ``run_dir`` replaces the executor's (each search arm or
        RL objective runs in its own), ``kw`` goes to :class:`CodebaseEnv` (e.g. ``scheduler``,
        ``executor`` overrides as a dict under ``executor_update``)."""
        ex = self.executor.model_copy(update={**({"run_dir": str(run_dir)} if run_dir is not None else {}),
                                              **kw.pop("executor_update", {})})
        if self.env_dir:
            return load_dir(self.env_dir, self.spec_file, self.spec_overrides, ex, **kw)
        return load_packaged(self.env, self.spec_file, self.spec_overrides, ex, **kw)


class CodebaseEnv(ResearchEnv):
    """A codebase environment over the scheduler (see the module docstring)."""

    def __init__(self, spec: CodebaseEnvSpec, root: str | Path, executor: ExecutorConfig | None = None,
                 scheduler: Scheduler | None = None):
        """``scheduler``: share one (and its worker slots) among environments; it is then
        not shut down by :meth:`close`."""
        self.spec, self.root = spec, Path(root).resolve()
        self.name = spec.name
        self.cfg = executor or ExecutorConfig()
        from selftaught.runtime import resolve_run_dir

        self.run_dir = Path(resolve_run_dir(self.cfg.run_dir or Path("runs") / "research" / spec.name))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.baseline_files = self._baseline_files()
        self.protected_hashes = {p: _sha(t) for p, t in self.baseline_files.items() if self._protected(p)}
        self.fp = fingerprint({"spec": spec.model_dump(mode="json"), "files": fingerprint(self.baseline_files),
                               "seed": self.cfg.seed})
        self.journal = Journal(self.run_dir / "journal.sqlite")
        self._scheduler: Scheduler | None = scheduler
        self._owns_scheduler = scheduler is None
        self._outcomes: "queue.Queue" = queue.Queue()
        self._pool = ThreadPoolExecutor(max_workers=self.cfg.implement_concurrency, thread_name_prefix="implement")
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified whenever a result lands
        self._inflight: dict[str, dict[str, Any]] = {}  # idea id -> {"idea", "t0", "job_id", "attempts"}
        self._by_job: dict[str, str] = {}
        self._finished: dict[str, Result] = {}
        self._collector: threading.Thread | None = None
        self._implementer = None
        self._smoke_slots = threading.Semaphore(self.cfg.smoke_concurrency)
        self._base_dir: Path | None = None  # the baseline written out for the implementer, once
        self._baseline = self._read_baseline()

    # ------------------------------------------------------------------ what the ideator sees
    def context(self) -> str:
        parts = [self.task_text(), "## Baseline codebase"]
        for path in sorted(self.baseline_files):
            if self._editable(path) or self._protected(path):
                tag = " (frozen: may not be edited)" if self._protected(path) else ""
                parts.append(f"### {path}{tag}\n```\n{self.baseline_files[path]}\n```")
        return "\n\n".join(parts)

    def task_text(self) -> str:
        """The task without the code: description, metric, budget, baseline, knobs (the
        implementer gets this plus its own listing of the files, so the code appears once)."""
        parts = [f"# Environment: {self.spec.name}", self.spec.description.strip(),
                 f"Metric: {self.spec.metric} ({'higher' if self.spec.higher_is_better else 'lower'} is better).",
                 f"Each job gets {self._resource_text()} and {self.spec.time_budget_s or self.spec.time_limit_s:.0f} s "
                 "of wall clock."]
        base = self.baseline()
        if base:
            parts.append(f"Baseline (unmodified code): {base['mean']:.4g} ± {base['std']:.2g} over "
                         f"{len(base['values'])} seeds.")
        if self.spec.knobs:
            parts.append("Structured ideas set these knobs (JSON schema):\n" + json.dumps(self.spec.knobs, indent=1))
        return "\n\n".join(parts)

    def idea_schema(self) -> dict[str, Any] | None:
        return self.spec.knobs

    def baseline(self) -> dict[str, Any] | None:
        """The recorded baseline value (``baseline.json`` beside env.yaml), if measured."""
        return self._baseline

    def _read_baseline(self) -> dict[str, Any] | None:
        f = self.root / "baseline.json"
        if not f.exists():
            return None
        return json.loads(f.read_text()).get(self.spec_key()) or None

    def spec_key(self) -> str:
        return fingerprint({k: v for k, v in self.spec.model_dump(mode="json").items() if k != "description"})

    # ------------------------------------------------------------------ edits
    def _baseline_files(self) -> dict[str, str]:
        code = self.root / self.spec.codebase
        if not code.is_dir():
            raise FileNotFoundError(f"{self.spec.name}: no codebase directory at {code}")
        files = read_tree(code, strict=True)
        if self.spec.base_config:
            cfg = json.loads(files.get(self.spec.config_file, "{}"))
            cfg.update(self.spec.base_config)
            files[self.spec.config_file] = json.dumps(cfg, indent=2) + "\n"
        return files

    def _protected(self, path: str) -> bool:  # the implementer's rule, so both agree on what is frozen
        return matches_any(path, self.spec.protected)

    def _editable(self, path: str) -> bool:
        return matches_any(path, self.spec.editable)

    def apply_knobs(self, knobs: dict[str, Any]) -> tuple[dict[str, str], str]:
        """Validate knob values against the schema and write them into the config file."""
        if not self.spec.knobs:
            raise ValueError(f"{self.spec.name} publishes no knobs: send the idea as text")
        jsonschema.validate(knobs, self.spec.knobs)
        files = dict(self.baseline_files)
        cfg = json.loads(files.get(self.spec.config_file, "{}"))
        cfg.update(knobs)
        files[self.spec.config_file] = json.dumps(cfg, indent=2) + "\n"
        return files, unified_diff(self.baseline_files, files)

    def _implementer_obj(self):
        if self._implementer is None:
            from actors.implementer import Implementer, ImplementerConfig

            self._implementer = Implementer(ImplementerConfig.model_validate(self.cfg.implementer))
        return self._implementer

    def implement(self, idea: Idea) -> dict[str, Any]:
        """Free-form idea -> edited files via the implementer (with smoke runs)."""
        impl = self._implementer_obj()
        work = self.run_dir / "implement" / idea.id
        res = impl.implement(idea.text, self._baseline_dir(), work, self.task_text(), list(self.spec.protected),
                             list(self.spec.editable), self.smoke if self.cfg.smoke else None,
                             entry=self.spec.entry)
        out = res.to_dict() if hasattr(res, "to_dict") else dict(res)
        if res.success:
            out["files"] = read_tree(Path(res.winning_dir))
        return out

    def _baseline_dir(self) -> Path:
        """The baseline files on disk for the implementer to copy: written once per env object,
        under the lock, so concurrent implementations never see it half rewritten."""
        with self._lock:
            if self._base_dir is None:
                d = self.run_dir / "baseline_code"
                if not d.exists() or read_tree(d) != self.baseline_files:
                    write_tree(self.baseline_files, d)
                self._base_dir = d
            return self._base_dir

    def smoke(self, code_dir: Path):
        """A cheap sandboxed run of an edited copy (``SMOKE=1``: imports and one step)."""
        from actors.implementer import SmokeOutcome

        files = read_tree(Path(code_dir))
        job = self.job_payload(files, new_id("smoke"), smoke=True)
        with self._smoke_slots:  # smoke runs use this node's CPUs outside the scheduler: few at a time
            worker = SandboxWorker(sweep=False)
            try:
                out = worker.run(job)
            finally:
                worker.close()
        ok = out.get("status") == "ok"
        return SmokeOutcome(ok=ok, log=(out.get("error", "") + "\n" + out.get("logs", {}).get("run", ""))[-4000:],
                            seconds=out.get("seconds", 0.0))

    # ------------------------------------------------------------------ jobs
    def job_payload(self, files: dict[str, str], job_id: str, smoke: bool = False,
                    seed: int | None = None) -> dict[str, Any]:
        s = self.spec
        r = s.resources
        seed = seed if seed is not None else (self.cfg.seed if self.cfg.seed is not None else s.seed)
        limit = s.smoke_time_limit_s if smoke else s.time_limit_s
        env = {**s.env, "SEED": str(seed), "SMOKE": "1" if smoke else "0",
               "TIME_BUDGET_S": str(s.time_budget_s or s.time_limit_s)}
        return {
            "job_id": job_id, "files": files, "protected": self.protected_hashes,
            "entry": list(s.entry), "env": env, "mounts": dict(s.mounts),
            "data": {"module": self.data_module, "options": dict(s.data)} if self.data_module else None,
            "limits": {"wall_s": limit, "memory_mb": r.memory_mb, "max_processes": r.max_processes,
                       "output_limit_mb": r.output_limit_mb, "disk_limit_mb": r.disk_limit_mb, "cpus": r.cpus},
            "artifacts": s.artifacts,
            "evaluator": None if smoke else s.evaluator.model_dump(),
            "outcome_dir": None if smoke else str(self.run_dir / "jobs" / job_id),
        }

    @property
    def data_module(self) -> str | None:
        if self.spec.data_module:
            return self.spec.data_module
        return f"envs.{self.spec.name}.data" if (self.root / "data.py").exists() else None

    def _resource_text(self) -> str:
        r = self.spec.resources
        return f"{r.cpus:g} CPU" + (f", {r.gpus} GPU" if r.gpus else "") + f", {r.memory_mb} MB memory"

    @property
    def scheduler(self) -> Scheduler:
        with self._lock:
            if self._scheduler is None:
                self._scheduler = Scheduler(self.cfg.scheduler)
            return self._scheduler

    # ------------------------------------------------------------------ submit / stream
    def submit(self, ideas: Sequence[Idea | str | dict], seed: int | None = None) -> list[str]:
        """Start executing ideas; returns their ids at once. ``seed`` runs each idea with that
        seed (a copy with a derived id: the caller's ideas are not changed)."""
        ideas = [Idea.coerce(raw) for raw in ideas]
        if seed is not None:
            ideas = [i if i.seed is not None else i.with_seed(seed) for i in ideas]
        if not self.cfg.implementer and any(not i.structured for i in ideas):
            raise ValueError(f"{self.name}: free-form ideas need an implementer (executor.implementer: an LLM); "
                             "without one, send structured ideas (knobs)")
        ids = [idea.id for idea in ideas]
        for idea in ideas:
            self._start(idea)
        return ids

    def _claim(self, idea: Idea) -> bool:
        """Mark an idea in flight; False when it already is (a duplicate submission)."""
        with self._lock:
            if idea.id in self._inflight:
                return False
            self._inflight[idea.id] = {"idea": idea, "t0": time.time(), "attempts": []}
            if self._collector is None or not self._collector.is_alive():
                self._collector = threading.Thread(target=self._collect, name="research-collector", daemon=True)
                self._collector.start()
            return True

    def _start(self, idea: Idea, edit: dict[str, Any] | None = None) -> None:
        """Resume from the journal where possible, else prepare the idea. ``edit`` skips
        preparation (the baseline's unmodified files)."""
        if not self._claim(idea):
            return
        try:
            row = self.journal.get(self.fp, idea.id)
            if row and row["state"] == "finished" and (row["result"] or {}).get("status") != "infra_failed":
                res = Result.from_dict(row["result"])  # paid for and measured: never again
                res.metrics = {**res.metrics, "reused": True}
                with self._lock:
                    self._inflight.pop(idea.id, None)
                    self._finished[idea.id] = res
                    self._changed.notify_all()
                return
            if row is None:
                self.journal.submit(self.fp, self.name, idea.to_dict())
            elif row["state"] == "finished":  # an infrastructure failure earlier: try again
                self.journal.set_state(self.fp, idea.id, "submitted", {"reason": "retry after infra_failed"})
                row = None
            if row and row["state"] in ("queued", "running") and row["job_id"]:
                done = self.run_dir / "jobs" / row["job_id"] / "outcome.json"
                stored = row["edit"] or {}
                if done.exists():  # finished while no driver was listening
                    self.journal.event(self.fp, idea.id, "reconciled", {"job_id": row["job_id"]})
                    self._complete(idea.id, json.loads(done.read_text()), stored)
                    return
                self.journal.event(self.fp, idea.id, "resubmitted", {"job_id": row["job_id"], "reason": "driver restart"})
                self._queue_job(idea, stored, row["job_id"])
                return
            if row and row["edit"] and row["state"] in ("implemented", "queued", "running"):
                self._queue_job(idea, row["edit"])
                return
            if edit is not None:
                self.journal.set_state(self.fp, idea.id, "implemented", None, edit=edit)
                self._queue_job(idea, edit)
                return
        except Exception as e:  # noqa: BLE001 - a corrupt journal row, an unreadable outcome...
            log.exception("idea %s: could not be started", idea.id)
            self._fail(idea.id, "infra_failed", "journal", f"{type(e).__name__}: {e}")
            return
        self._pool.submit(self._prepare, idea)

    def _prepare(self, idea: Idea) -> None:
        """Idea -> edit (structured: deterministic; free-form: the implementer), then queue."""
        try:
            if len(idea.text) > MAX_IDEA_CHARS:
                raise _IdeaFailure("implement", f"idea text longer than {MAX_IDEA_CHARS} characters")
            if idea.structured:
                try:
                    files, diff = self.apply_knobs(idea.knobs or {})
                except (jsonschema.ValidationError, ValueError) as e:
                    raise _IdeaFailure("apply", f"invalid knobs: {getattr(e, 'message', e)}") from None
                edit = {"files": files, "diff": diff, "attempts": []}
            else:
                if not self.cfg.implementer:
                    raise _IdeaFailure("implement", "free-form ideas need an implementer (executor.implementer)")
                self.journal.set_state(self.fp, idea.id, "implementing")
                impl = self.implement(idea)
                with self._lock:
                    self._inflight[idea.id]["attempts"] = impl.get("attempts", [])
                if not impl.get("success"):
                    stage = impl.get("failed_stage") or "implement"
                    infra = bool(impl.get("infra"))
                    raise _IdeaFailure("implement" if infra else stage, impl.get("error", "no working edit"),
                                       infra=infra)
                edit = {"files": impl["files"], "diff": impl.get("diff", ""), "attempts": impl.get("attempts", [])}
            self.journal.set_state(self.fp, idea.id, "implemented", {"diff_lines": edit["diff"].count("\n")},
                                   edit=edit)
            self._queue_job(idea, edit)
        except _IdeaFailure as f:
            self._fail(idea.id, "infra_failed" if f.infra else "idea_failed", f.stage, f.message)
        except Exception as e:  # noqa: BLE001 - our own bug or trouble: the idea is not to blame
            log.exception("idea %s: preparing failed", idea.id)
            self._fail(idea.id, "infra_failed", "implement", f"{type(e).__name__}: {e}")

    def _queue_job(self, idea: Idea, edit: dict[str, Any], job_id: str | None = None) -> None:
        job_id = job_id or new_id("job")
        files = edit.get("files") or self.baseline_files
        touched = [p for p in self.protected_hashes if files.get(p) is None or _sha(files[p]) != self.protected_hashes[p]]
        if touched:
            self._fail(idea.id, "idea_failed", "protected", f"the edit touches frozen files: {', '.join(touched)}")
            return
        payload = self.job_payload(files, job_id, seed=idea.meta.get("seed"))
        with self._lock:
            self._by_job[job_id] = idea.id
            self._inflight[idea.id].update(job_id=job_id, edit=edit)
        self.journal.set_state(self.fp, idea.id, "queued", None, job_id=job_id)
        r = self.spec.resources
        deadline = self.spec.time_limit_s + self.spec.evaluator.time_limit_s + 120
        self.scheduler.submit(job_id, payload, cpus=r.cpus, gpus=r.gpus, custom=r.custom, deadline_s=deadline,
                              sink=self._outcomes)

    def _collect(self) -> None:
        """Hands scheduler outcomes to their ideas; exits when nothing is in flight."""
        while True:
            with self._lock:
                if not self._inflight:
                    self._collector = None
                    return
            try:
                got = self._outcomes.get(timeout=0.5)
            except queue.Empty:
                continue
            with self._lock:
                idea_id = self._by_job.pop(got.job_id, None)
                edit = (self._inflight.get(idea_id) or {}).get("edit", {})
            if idea_id is None:
                continue
            try:
                self._complete(idea_id, {**got.outcome, "tries": got.tries, "queued_s": got.queued_s}, edit)
            except Exception as e:  # noqa: BLE001 - never lose the collector (and every later result)
                log.exception("idea %s: recording its outcome failed", idea_id)
                self._fail(idea_id, "infra_failed", "journal", f"{type(e).__name__}: {e}")

    def _complete(self, idea_id: str, outcome: dict[str, Any], edit: dict[str, Any]) -> None:
        status = outcome.get("status", "infra_failed")
        value = outcome.get("value")
        reward = float(value) if status == "ok" and value is not None else 0.0
        if status == "ok" and not self.spec.higher_is_better:
            reward = -reward
        metrics = dict(outcome.get("metrics") or {})
        base = self.baseline()
        if status == "ok" and base:
            metrics["gain"] = reward - base["mean"]
            metrics["gain_over_std"] = metrics["gain"] / base["std"] if base.get("std") else None
        resources = {**(outcome.get("resources") or {}), "tries": outcome.get("tries", 1),
                     "queued_s": outcome.get("queued_s"), "dispatch_s": outcome.get("dispatch_s")}
        self._finalize(idea_id, Result(idea_id=idea_id, status=status, reward=reward,
                                       stage=outcome.get("stage") if status != "ok" else None,
                                       error=outcome.get("error", ""), metrics=metrics,
                                       logs=outcome.get("logs") or {}, edit=edit.get("diff", ""),
                                       resources=resources, attempts=edit.get("attempts", [])))

    def _fail(self, idea_id: str, status: str, stage: str, message: str) -> None:
        with self._lock:
            attempts = (self._inflight.get(idea_id) or {}).get("attempts", [])
        self._finalize(idea_id, Result(idea_id=idea_id, status=status, stage=stage, error=message,
                                       attempts=attempts))

    def _finalize(self, idea_id: str, res: Result) -> None:
        with self._lock:
            info = self._inflight.pop(idea_id, None)
        if info is None:  # already finished (a late duplicate): the first result stands
            return
        res.env = self.name
        res.wall_s = round(time.time() - info["t0"], 3)
        metrics.IDEAS_EVALUATED.inc(1, {"env": self.name, "status": res.status})  # once per finished idea
        try:
            self.journal.finish(self.fp, idea_id, res.to_dict())
        finally:
            with self._lock:
                self._finished[idea_id] = res
                self._changed.notify_all()

    def stream(self, ids: Sequence[str] | None = None, timeout_s: float | None = None) -> Iterator[Result]:
        """Results of ``ids`` (default: everything submitted) as they finish. Any number of
        callers may stream at once; each sees every result it asks for."""
        with self._lock:
            want = list(dict.fromkeys(ids)) if ids is not None else list({**self._finished, **self._inflight})
        seen: set[str] = set()
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while len(seen) < len(want):
            with self._changed:
                ready = [i for i in want if i not in seen and i in self._finished and i not in self._inflight]
                if not ready:
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self._changed.wait(timeout=min(1.0, left) if left is not None else 1.0)
                    continue
                out = [self._finished[i] for i in ready]
            for res in out:
                seen.add(res.idea_id)
                yield res
        for i in want:
            if i not in seen:
                yield Result(idea_id=i, status="infra_failed", stage="timeout", env=self.name,
                             error=f"no result within {timeout_s}s (still running; ask again later)")

    def cancel(self, ids: Sequence[str]) -> int:
        with self._lock:
            jobs = [self._inflight[i]["job_id"] for i in ids if "job_id" in self._inflight.get(i, {})]
        return self.scheduler.cancel(jobs, reason="cancelled by the caller") if jobs else 0

    def result(self, idea_id: str) -> Result | None:
        with self._lock:
            if idea_id in self._finished:
                return self._finished[idea_id]
        row = self.journal.get(self.fp, idea_id)
        return Result.from_dict(row["result"]) if row and row["result"] else None

    def state(self, idea_id: str) -> str | None:
        row = self.journal.get(self.fp, idea_id)
        return row["state"] if row else None

    # ------------------------------------------------------------------ baseline
    def measure_baseline(self, seeds: Sequence[int] = (0, 1, 2), timeout_s: float | None = None) -> dict[str, Any]:
        """Run the unmodified codebase once per seed; record mean and spread in baseline.json."""
        ideas = [Idea(knobs={}, id=f"baseline-seed{s}", meta={"seed": s}) for s in seeds]
        results = self._run_baseline(ideas, timeout_s)
        values = [r.reward for r in results if r.ok]
        if len(values) != len(results):
            bad = [f"{r.idea_id}: {r.stage} {r.error}" for r in results if not r.ok]
            raise RuntimeError(f"baseline runs failed: {bad}")
        rec = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
               "values": values, "seeds": list(seeds), "metrics": [r.metrics for r in results],
               "measured": time.strftime("%Y-%m-%d"), "job_seconds": [r.resources.get("run_s") for r in results]}
        f = self.root / "baseline.json"
        data = json.loads(f.read_text()) if f.exists() else {}
        data[self.spec_key()] = rec
        f.write_text(json.dumps(data, indent=2) + "\n")
        self._baseline = rec
        return rec

    def _run_baseline(self, ideas: list[Idea], timeout_s: float | None) -> list[Result]:
        base = {"files": self.baseline_files, "diff": "", "attempts": []}
        for idea in ideas:
            self._start(idea, edit=base)
        return self.gather([i.id for i in ideas], timeout_s=timeout_s)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._scheduler is not None and self._owns_scheduler:
            self._scheduler.shutdown()
        self._scheduler = None
        self.journal.close()


class _IdeaFailure(Exception):
    def __init__(self, stage: str, message: str, infra: bool = False):
        super().__init__(message)
        self.stage, self.message, self.infra = stage, message, infra


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def unified_diff(before: dict[str, str], after: dict[str, str]) -> str:
    out: list[str] = []
    for path in sorted(set(before) | set(after)):
        a, b = before.get(path), after.get(path)
        if a == b:
            continue
        out += difflib.unified_diff((a or "").splitlines(keepends=True), (b or "").splitlines(keepends=True),
                                    fromfile=f"a/{path}" if a is not None else "/dev/null",
                                    tofile=f"b/{path}" if b is not None else "/dev/null")
    return "".join(out)


def read_tree(root: Path, strict: bool = False) -> dict[str, str]:
    """The text files under ``root`` (caches skipped). Binary files are not part of an edit:
    skipped, or with ``strict`` (a baseline codebase, which jobs carry as text) an error."""
    files = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc"):
            try:
                files[str(p.relative_to(root))] = p.read_text()
            except UnicodeDecodeError:
                if strict:
                    raise ValueError(f"{p}: a codebase holds text files only (jobs carry it as text)") from None
    return files


def write_tree(files: dict[str, str], root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def env_dir(name: str) -> Path:
    return ENVS_DIR / name


def load_packaged(name: str, spec_file: str = "env.yaml", overrides: list[str] | None = None,
                  executor: ExecutorConfig | dict | None = None, **kw: Any) -> CodebaseEnv:
    """A shipped environment (``envs/<name>/env.yaml``, or ``paper.yaml`` for the paper shape);
    ``kw`` goes to :class:`CodebaseEnv` (e.g. a shared ``scheduler``)."""
    return load_dir(env_dir(name), spec_file, overrides, executor, **kw)


def load_dir(path: str | Path, spec_file: str = "env.yaml", overrides: list[str] | None = None,
             executor: ExecutorConfig | dict | None = None, **kw: Any) -> CodebaseEnv:
    """A user's own environment directory (same layout as the shipped ones)."""
    root = Path(path).resolve()
    if isinstance(executor, dict):
        executor = ExecutorConfig.model_validate(executor)
    return CodebaseEnv(CodebaseEnvSpec.load(root / spec_file, overrides), root, executor, **kw)
