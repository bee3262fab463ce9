"""Typed description of a codebase environment (``envs/<name>/env.yaml``).

A codebase environment is a directory holding:

- ``codebase/``: the baseline code an idea edits. A private copy is made per job; the entry
  command (``bash run.sh``) runs in it inside a sandbox and must leave its artefacts
  (a checkpoint, predictions) in ``$OUT_DIR``.
- ``data.py``: ``prepare(out_dir: Path, options: dict) -> dict``, idempotent; it writes
  ``out_dir/train`` (mounted read-only into the job at ``$DATA_DIR``) and ``out_dir/val``
  (seen only by the evaluator).
- ``evaluator.py``: the frozen evaluator, run by the worker after the job as
  ``python -m envs.<name>.evaluator --artifacts DIR --val DIR --codebase DIR --out FILE
  [--model-cmd JSON]``. It writes ``{"value": float, "metrics": {...}}`` to ``--out``; a
  non-zero exit means the artefacts were unusable (the idea failed at stage ``evaluate``).
  ``--model-cmd`` is given when the spec names a ``model_server``: a ready argv that starts
  that frozen file of the codebase inside a sandbox over the job's copy (read-only), so the
  evaluator can query the idea's model without the idea's code ever seeing the evaluation data.

Job environment (what the idea's code sees): ``DATA_DIR``, ``OUT_DIR``, ``SEED``,
``TIME_BUDGET_S``, ``SMOKE`` (``1`` for the implementer's smoke run: imports and one step,
seconds), ``NUM_THREADS``, the variables named in ``mounts`` and, on GPU jobs,
``CUDA_VISIBLE_DEVICES``. Nothing else of the caller's environment (no API keys).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from selftaught.config import Strict, load_yaml


class JobResources(Strict):
    """What one job needs. ``gpus`` are gang-scheduled: an 8-GPU job starts only when all 8
    are reserved on one node."""

    cpus: float = Field(default=1.0, gt=0)
    gpus: int = Field(default=0, ge=0)
    memory_mb: int = Field(default=4096, ge=64)  # the sandbox's memory limit
    max_processes: int = Field(default=256, ge=8)  # processes and threads the job may hold
    output_limit_mb: int = Field(default=64, ge=1)  # bytes of stdout+stderr kept and allowed
    disk_limit_mb: int = Field(default=2048, ge=1)  # size of the job directory after the run
    custom: dict[str, float] = Field(default_factory=dict)  # extra Ray resources per job


class EvaluatorSpec(Strict):
    module: str  # e.g. envs.nanogpt.evaluator
    time_limit_s: float = Field(default=120.0, gt=0)
    model_server: list[str] | None = None  # argv of a frozen codebase file run sandboxed, e.g. ["python", "eval_server.py"]
    args: list[str] = Field(default_factory=list)  # extra evaluator arguments (e.g. sizes)


class CodebaseEnvSpec(Strict):
    """One research environment: what runs, with which resources, how it is scored."""

    name: str
    description: str  # shown to the ideator: the task, the metric, the budget, the rules
    metric: str = "value"  # human name of the value (e.g. "1 / validation loss")
    codebase: str = "codebase"
    entry: list[str] = Field(default_factory=lambda: ["bash", "run.sh"])
    time_limit_s: float = Field(default=120.0, gt=0)  # wall clock of the job (the sandbox kills it then)
    time_budget_s: float | None = Field(default=None, gt=0)  # what the job is told ($TIME_BUDGET_S)
    smoke_time_limit_s: float = Field(default=60.0, gt=0)
    resources: JobResources = Field(default_factory=JobResources)
    artifacts: str = "out"  # $OUT_DIR, relative to the job's codebase copy
    protected: list[str] = Field(default_factory=list)  # codebase paths an edit may not touch (globs)
    editable: list[str] = Field(default_factory=lambda: ["*.py", "*.sh", "*.json"])  # shown to the implementer
    config_file: str = "config.json"  # where structured ideas (knobs) are written
    base_config: dict[str, Any] = Field(default_factory=dict)  # merged into config_file of the baseline (paper-shape sizes)
    knobs: dict[str, Any] | None = None  # JSON schema (an object) of the knob space
    seed: int = 0
    mounts: dict[str, str] = Field(default_factory=dict)  # ENV_VAR -> "model:<packaged name>" | path, read-only
    data: dict[str, Any] = Field(default_factory=dict)  # options for data.prepare
    data_module: str | None = None  # importable module with prepare(); default envs.<name>.data
    env: dict[str, str] = Field(default_factory=dict)  # extra job variables (non-secret)
    evaluator: EvaluatorSpec
    higher_is_better: bool = True

    @model_validator(mode="after")
    def _check(self) -> "CodebaseEnvSpec":
        from actors.sandbox import check_env_name

        for name in [*self.env, *self.mounts]:
            check_env_name(name)
        for field in ("codebase", "artifacts", "config_file"):
            value = getattr(self, field)
            if value.startswith("/") or ".." in Path(value).parts:
                raise ValueError(f"{field} must be a path inside the environment, got {value!r}")
        if self.knobs is not None and self.knobs.get("type") != "object":
            raise ValueError("knobs must be a JSON schema of type 'object'")
        if self.time_budget_s is not None and self.time_budget_s >= self.time_limit_s:
            raise ValueError("time_budget_s must leave room below time_limit_s (start-up, saving)")
        return self

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> "CodebaseEnvSpec":
        """Read ``env.yaml`` (or a paper-shape file) with dotted ``key=value`` overrides."""
        from selftaught.config import apply_overrides

        return cls.model_validate(apply_overrides(load_yaml(path), overrides or []))
