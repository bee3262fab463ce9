"""The sandbox worker: one research job at a time, from a plain dict to a plain dict.

A job carries everything a worker on any node needs: the whole (edited) codebase as text
files, the hashes of its protected files, the entry command, the job's variables and limits,
the data to prepare (a module and its options: prepared once per node, deterministic, so every
node builds the same data) and the frozen evaluator to run afterwards. The worker

1. writes the codebase into a private scratch directory owned by its slot's uid;
2. runs the entry command in a :class:`~actors.sandbox.Sandbox` (training data read-only at
   ``/data``, artefacts in ``$OUT_DIR``, no evaluation data anywhere in sight);
3. re-hashes the protected files (an idea that rewrote one during its run fails);
4. runs the evaluator as a trusted program under the same limits; where the evaluator must
   call the idea's model, it gets a ready sandboxed command for the frozen model server, run
   over a read-only view of the job directory;
5. reports status, value, metrics, output tails, times and resources; with ``outcome_dir``
   the outcome is also written there (shared storage), so a job id is never run twice and a
   restarted driver finds results of jobs that finished while it was away.

Every exception of its own is reported as ``infra_failed`` (retryable elsewhere); what the
idea does is reported as ``idea_failed`` with the stage. The worker survives both.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import psutil

from actors.sandbox import Cgroup, Limits, Mount, RunOutcome, Sandbox, make_private_dir, scratch_root
from selftaught.config import fingerprint

log = logging.getLogger(__name__)

MAX_CODEBASE_BYTES = 8 * 2**20
_READY: set[Path] = set()  # data and mount directories this process has prepared and opened up


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_data(spec: dict[str, Any] | None) -> Path | None:
    """The environment's data on this node: ``spec = {"module": ..., "options": {...}}``,
    prepared once into the node's cache (under a file lock; ``prepare`` is idempotent)."""
    if not spec:
        return None
    from filelock import FileLock

    from selftaught.models import cache_dir

    root = cache_dir() / "envs" / spec["module"].replace(".", "-") / fingerprint(spec.get("options") or {})
    if root in _READY and root.is_dir():  # this process prepared it already: no lock, no walk
        return root
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        importlib.import_module(spec["module"]).prepare(root, dict(spec.get("options") or {}))
    for p in [root, *root.rglob("*")]:  # readable by the sandbox's unprivileged uid
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    _READY.add(root)
    return root


def resolve_mount(value: str) -> Path:
    """``model:<packaged name or checkpoint>`` or a path, as a local directory the sandbox's
    unprivileged uid can read (models saved 0600, as transformers does, are opened up to
    read-only for others; a path we cannot open up is an error that says so)."""
    if value.startswith("model:"):
        from selftaught.models import resolve_model_path

        p = resolve_model_path(value.split(":", 1)[1])
    else:
        p = Path(value).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"mount source {value!r} does not exist on {socket.gethostname()}")
    if p not in _READY:
        _world_readable(p)
        _READY.add(p)
    return p


def _world_readable(root: Path) -> None:
    import stat

    for p in [root, *(root.rglob("*") if root.is_dir() else ())]:
        st = p.stat()
        want = stat.S_IROTH | (stat.S_IXOTH if p.is_dir() else 0)
        if st.st_mode & want != want:
            try:
                os.chmod(p, st.st_mode | want)
            except PermissionError:
                raise PermissionError(f"{p} is not readable by other users, which sandboxed jobs run as; "
                                      f"run `chmod -R o+rX {root}`") from None


class SandboxWorker:
    """Runs research jobs in sandboxes. Plain class; the scheduler makes it a Ray actor."""

    def __init__(self, slot: int = 0, keep_scratch: bool = False, sweep: bool = True):
        """``sweep``: clear what dead workers left on this node (scratch, cgroups); long-lived
        workers do it once at start, short-lived helpers (smoke runs) skip it."""
        self.slot = slot
        self.sandbox = Sandbox()
        self.keep_scratch = keep_scratch
        self.jobs_run = 0
        if sweep:
            _sweep_stale_scratch()
            if self.sandbox.root:
                Cgroup.sweep()

    def close(self) -> None:
        self.sandbox.close()

    def ping(self) -> dict[str, Any]:
        return {"slot": self.slot, "pid": os.getpid(), "host": socket.gethostname(), "jobs_run": self.jobs_run,
                "node_id": _node_id()}

    def gpu_ids(self) -> list[int]:
        try:
            import ray

            if ray.is_initialized():
                return [int(g) for g in ray.get_gpu_ids()]
        except Exception:  # noqa: BLE001 - outside Ray: no GPUs assigned
            pass
        return []

    # ------------------------------------------------------------------ one job
    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        """Execute one job; never raises (infra trouble comes back as ``infra_failed``)."""
        t0 = time.time()
        outcome_dir = Path(job["outcome_dir"]) if job.get("outcome_dir") else None
        if outcome_dir is not None and (outcome_dir / "outcome.json").exists():
            done = json.loads((outcome_dir / "outcome.json").read_text())
            done["reused"] = True
            return done
        scratch = scratch_root() / f"{job['job_id']}-{os.getpid()}"
        try:
            out = self._run(job, scratch)
        except _BadCodebase as e:  # the edit produced something we will not run
            out = {"status": "idea_failed", "stage": "apply", "error": str(e), "logs": {}}
        except Exception as e:  # noqa: BLE001 - the worker's own trouble, not the idea's
            log.exception("job %s: worker error", job.get("job_id"))
            out = {"status": "infra_failed", "stage": "worker", "error": f"{type(e).__name__}: {e}",
                   "logs": {"worker": traceback.format_exc()[-4000:]}}
        finally:
            if not self.keep_scratch:
                shutil.rmtree(scratch, ignore_errors=True)
        self.jobs_run += 1
        out.update(job_id=job["job_id"], seconds=round(time.time() - t0, 3), slot=self.slot,
                   host=socket.gethostname(), pid=os.getpid())
        if outcome_dir is not None and out["status"] != "infra_failed":
            outcome_dir.mkdir(parents=True, exist_ok=True)
            tmp = outcome_dir / f".outcome.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(out, default=str))
            tmp.replace(outcome_dir / "outcome.json")
        return out

    def _run(self, job: dict[str, Any], scratch: Path) -> dict[str, Any]:
        code = scratch / "code"
        self._write_codebase(job["files"], code)
        artifacts = job.get("artifacts", "out")
        (code / artifacts).mkdir(parents=True, exist_ok=True)
        make_private_dir(code, self.sandbox.uid)
        data = prepare_data(job.get("data"))
        gpus = self.gpu_ids()
        limits = Limits(**job.get("limits", {}))
        mounts, env = [], dict(job.get("env", {}))
        if data is not None and (data / "train").exists():
            mounts.append(Mount(str(data / "train"), "/data"))
            env["DATA_DIR"] = "/data"
        mount_env = {}
        for var, value in (job.get("mounts") or {}).items():
            src = resolve_mount(value)
            dst = f"/mnt/{var.lower()}"
            mounts.append(Mount(str(src), dst))
            env[var], mount_env[var] = dst, str(src)
        env["OUT_DIR"] = f"/job/{artifacts}"
        resources = {"cpus": limits.cpus, "gpus": gpus, "host": socket.gethostname(), "slot": self.slot,
                     "node_id": _node_id()}

        run = self.sandbox.run(job["entry"], code, mounts, env, limits, gpus)
        logs = {"run": _tail(run)}
        resources.update(run_s=run.seconds, cpu_s=run.cpu_s, max_rss_mb=run.max_rss_mb, limits_by=run.limits_by)
        base = {"logs": logs, "resources": resources, "run": run.to_dict()}
        tampered = self._tampered(code, job.get("protected") or {})
        if tampered:
            return {**base, "status": "idea_failed", "stage": "protected",
                    "error": f"protected files changed during the run: {', '.join(tampered)}"}
        if _killed_from_outside(run):
            return {**base, "status": "infra_failed", "stage": "run",
                    "error": f"the job was killed from outside the sandbox (signal {-run.rc}): worker or node going away"}
        if not run.ok:
            return {**base, "status": "idea_failed", "stage": "run", "error": f"the job failed ({run.describe()})"}
        ev = job.get("evaluator")
        if not ev:
            return {**base, "status": "ok", "value": None, "metrics": {}}
        return {**base, **self._evaluate(job, ev, code, artifacts, data, scratch, limits, gpus, mount_env, logs,
                                         resources)}

    def _evaluate(self, job, ev, code: Path, artifacts: str, data: Path | None, scratch: Path, limits: Limits,
                  gpus: list[int], mount_env: dict[str, str], logs: dict, resources: dict) -> dict[str, Any]:
        """The frozen evaluator, as a trusted program, on what the job left behind."""
        _drop_links(code)  # the job is over: nothing it left may point the evaluator elsewhere
        eval_dir = scratch / "eval"
        eval_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(scratch, 0o711)
        os.chmod(eval_dir, 0o700)  # the evaluator's output is out of the sandbox uid's reach
        result_file = eval_dir / "result.json"
        cmd = [sys.executable, "-m", ev["module"], "--artifacts", str(code / artifacts),
               "--codebase", str(code), "--out", str(result_file)]
        if data is not None and (data / "val").exists():
            cmd += ["--val", str(data / "val")]
        if ev.get("model_server"):
            server_limits = Limits(**{**job.get("limits", {}), "wall_s": float(ev.get("time_limit_s", 120))})
            server_env = self.sandbox.base_env(server_limits, gpus, {})
            argv = self.sandbox.argv([*ev["model_server"], "--artifacts", f"/job/{artifacts}"], str(code), [],
                                     server_env, gpus, server_limits, workdir_writable=False)
            cmd += ["--model-cmd", json.dumps(argv)]
        cmd += [str(a) for a in ev.get("args", [])]
        eval_limits = Limits(**{**job.get("limits", {}), "wall_s": float(ev.get("time_limit_s", 120))})
        env = {"PYTHONPATH": _project_root(), **mount_env}
        out = self.sandbox.run(cmd, eval_dir, (), env, eval_limits, gpus, isolate=False)
        logs["evaluate"] = _tail(out)
        resources.update(eval_s=out.seconds)
        if _killed_from_outside(out):
            return {"status": "infra_failed", "stage": "evaluate", "evaluate": out.to_dict(),
                    "error": f"the evaluator was killed from outside (signal {-out.rc})"}
        if not out.ok or not result_file.exists():
            return {"status": "idea_failed", "stage": "evaluate", "evaluate": out.to_dict(),
                    "error": f"the evaluator rejected the artefacts ({out.describe()}): "
                             f"{out.stderr_tail.strip().splitlines()[-1] if out.stderr_tail.strip() else ''}"}
        try:
            res = json.loads(result_file.read_text())
            value = float(res["value"])
            if not math.isfinite(value):
                raise ValueError(f"value {value} is not finite")
        except (ValueError, KeyError, TypeError) as e:
            return {"status": "idea_failed", "stage": "evaluate", "error": f"evaluator result unusable: {e}",
                    "evaluate": out.to_dict()}
        return {"status": "ok", "value": value, "metrics": res.get("metrics", {}), "evaluate": out.to_dict()}

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _write_codebase(files: dict[str, str], dest: Path) -> None:
        total = sum(len(v.encode()) for v in files.values())
        if total > MAX_CODEBASE_BYTES:
            raise _BadCodebase(f"codebase of {total} bytes exceeds {MAX_CODEBASE_BYTES}")
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        for rel, text in files.items():
            target = (dest / rel).resolve()
            if root not in target.parents:
                raise _BadCodebase(f"codebase path {rel!r} escapes the job directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)

    @staticmethod
    def _tampered(code: Path, protected: dict[str, str]) -> list[str]:
        bad = []
        for rel, digest in protected.items():
            p = code / rel
            if not p.is_file() or p.is_symlink() or file_sha256(p) != digest:
                bad.append(rel)
        return bad


def _killed_from_outside(o: RunOutcome) -> bool:
    """Ended by SIGKILL/SIGTERM that none of our limits sent: the worker, its node or the
    host's OOM killer is going away, not the idea failing (an idea that kills itself gains
    nothing: the retry is bounded and an infrastructure failure scores 0)."""
    import signal

    return o.killed is None and o.rc in (-signal.SIGKILL, -signal.SIGTERM)


class _BadCodebase(ValueError):
    """The job's files cannot be written as given (too large, a path outside the job)."""


def _drop_links(root: Path) -> None:
    """Remove symlinks, fifos, sockets and device nodes under ``root``: the trusted evaluator
    (running with the worker's rights) must only ever open the job's own regular files."""
    import stat

    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            try:
                mode = os.lstat(p).st_mode
            except OSError:
                continue
            if stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                os.unlink(p)


def _sweep_stale_scratch() -> None:
    """Job directories of workers that died (their pid is gone) are removed at start-up."""
    for d in scratch_root().glob("*-*"):
        if not d.is_dir():
            continue
        try:
            pid = int(d.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if not psutil.pid_exists(pid) and time.time() - d.stat().st_mtime > 60:
            shutil.rmtree(d, ignore_errors=True)


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - outside Ray
        return None


def _tail(o: RunOutcome, limit: int = 6000) -> str:
    parts = []
    if o.stdout_tail.strip():
        parts.append(o.stdout_tail[-limit // 2:])
    if o.stderr_tail.strip():
        parts.append("[stderr]\n" + o.stderr_tail[-limit // 2:])
    if o.killed:
        parts.append(f"[killed: {o.killed} limit after {o.seconds:.1f}s]")
    return "\n".join(parts)


def _project_root() -> str:
    return str(Path(__file__).resolve().parents[1])


def sandbox_worker_class():
    """``ray.remote(SandboxWorker)``; the scheduler sets resources and placement per slot."""
    import ray

    return ray.remote(SandboxWorker)
