"""``selftaught submit``: a pipeline as a Ray job on a running cluster.

What it adds over ``ray job submit --working-dir . -- selftaught ...``:

- the pipeline config is loaded and validated here first (a typo fails in a second, not after
  the job has been scheduled), and the run directory it will use is printed;
- the runtime environment is the project's: the working directory without virtualenvs, run
  outputs, git data and wheels; ``HF_HUB_OFFLINE=1``; ``SELFTAUGHT_STORAGE`` (the shared run
  storage every node mounts), so outputs and checkpoints never land in the job's temporary
  working directory;
- the driver runs ``python -m selftaught.cli`` from the uploaded code, not whatever version of
  ``selftaught`` is installed on the head;
- with ``--wait`` (the default) the job's logs are followed until it ends, within a bounded
  ``--timeout``, and the exit status says whether it succeeded.
"""
from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

# Never uploaded: environments, outputs, caches, VCS data, wheels (Ray also honours .gitignore).
EXCLUDES = [".venv*", "runs", ".git", "**/__pycache__", "*.whl", ".whl", "*.egg-info", ".pytest_cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass
class SubmitOptions:
    """How to submit: where, with which code and storage, and how long to follow it."""

    address: str | None = None  # the dashboard (http://head:8265); default $RAY_ADDRESS or local
    working_dir: str = "."
    storage: str | None = None  # default $SELFTAUGHT_STORAGE
    env: dict[str, str] = field(default_factory=dict)
    submission_id: str | None = None
    wait: bool = True
    timeout_s: float = 24 * 3600.0
    poll_s: float = 2.0


def runtime_env(opts: SubmitOptions) -> dict:
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **opts.env}
    storage = opts.storage or os.environ.get("SELFTAUGHT_STORAGE")
    if storage:
        env["SELFTAUGHT_STORAGE"] = storage
    return {"working_dir": str(Path(opts.working_dir).resolve()), "excludes": EXCLUDES, "env_vars": env}


def check_command(argv: Sequence[str], storage: str | None) -> str | None:
    """Validate what the job will run where that can be done here: a pipeline config loads and
    its run directory resolves on the storage. Returns that run directory (or None)."""
    from selftaught.cli import build_parser

    if not argv:
        raise SystemExit("error: nothing to submit (e.g. selftaught submit -- run -c examples/sbp/tiny.yaml)")
    args = build_parser().parse_args(list(argv))
    if args.command not in ("run", "sbp") or not getattr(args, "config", None):
        return None
    from selftaught.cli import _pipeline_config

    old = os.environ.get("SELFTAUGHT_STORAGE")
    if storage:
        os.environ["SELFTAUGHT_STORAGE"] = storage
    try:
        cfg, _ = _pipeline_config(args.config, args.overrides)
    finally:
        if storage:
            os.environ.pop("SELFTAUGHT_STORAGE") if old is None else os.environ.__setitem__("SELFTAUGHT_STORAGE", old)
    return getattr(cfg, "run_dir", None)


def submit(argv: Sequence[str], opts: SubmitOptions) -> int:
    """Submit ``selftaught <argv>`` as a job; with ``opts.wait``, follow it and return 0 only if
    it succeeded."""
    from ray.job_submission import JobSubmissionClient

    storage = opts.storage or os.environ.get("SELFTAUGHT_STORAGE")
    run_dir = check_command(argv, storage)
    if run_dir and not storage and not Path(run_dir).is_absolute():
        raise SystemExit("error: set --storage (or SELFTAUGHT_STORAGE) to shared storage for the run directory")
    client = JobSubmissionClient(opts.address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265")
    entrypoint = "python -m selftaught.cli " + shlex.join(list(argv))
    job = _submit_when_ready(client, dict(entrypoint=entrypoint, runtime_env=runtime_env(opts),
                                          submission_id=opts.submission_id,
                                          metadata={"selftaught": " ".join(argv)[:500]}))
    print(f"submitted {job}: {entrypoint}" + (f"\nrun directory: {run_dir}" if run_dir else ""), flush=True)
    if not opts.wait:
        return 0
    return follow(client, job, opts.timeout_s, opts.poll_s)


def _submit_when_ready(client, kwargs: dict, wait_s: float = 120.0) -> str:
    """Submit, retrying while the head's job agent is still starting (a fresh cluster answers
    "No available agent to submit job" for its first seconds); any other error is raised."""
    end = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > end:
                raise
            log.info("the cluster's job agent is not up yet; retrying")
            time.sleep(2.0)


def follow(client, job: str, timeout_s: float, poll_s: float = 2.0, out=sys.stdout) -> int:
    """Print the job's new log lines until it ends or ``timeout_s`` passes (then it is stopped)."""
    seen, end = 0, time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job)).split(".")[-1]
        logs = client.get_job_logs(job)
        if len(logs) > seen:
            out.write(logs[seen:])
            out.flush()
            seen = len(logs)
        if status in TERMINAL:
            info = client.get_job_info(job)
            print(f"job {job}: {status}" + (f" ({info.message})" if info.message and status != "SUCCEEDED" else ""),
                  file=out, flush=True)
            return 0 if status == "SUCCEEDED" else 1
        if time.monotonic() > end:
            client.stop_job(job)
            print(f"job {job}: still {status} after {timeout_s:.0f} s; stopped it", file=out, flush=True)
            return 124
        time.sleep(poll_s)
