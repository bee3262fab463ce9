"""Ray runtime: embedded local Ray by default, attach to a cluster when ``RAY_ADDRESS`` is set.

Also sizes actor resource requests from what the cluster really has, so that a pool asked for
"4 actors x 1 CPU" on a 2-core laptop shrinks its per-actor request instead of deadlocking
(actors holding every CPU would starve the tasks that feed them).
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from selftaught.config import RayConfig

log = logging.getLogger(__name__)

# Unix socket paths are limited to 107 bytes; Ray appends ~70 characters to its temp dir.
_MAX_TEMP_DIR_LEN = 36


def _temp_dir(cfg: RayConfig, run_dir: str | Path | None) -> str:
    if cfg.temp_dir:
        return str(Path(cfg.temp_dir).expanduser().resolve())
    if run_dir is not None:
        cand = str(Path(run_dir).expanduser().resolve() / "ray")
        if len(cand) <= _MAX_TEMP_DIR_LEN:
            return cand
    return os.path.join(tempfile.gettempdir(), f"selftaught-ray-{os.getuid()}")


def init_ray(cfg: RayConfig | None = None, run_dir: str | Path | None = None) -> dict:
    """Start or attach to Ray once per process; returns the cluster's resources."""
    import ray

    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return ray.cluster_resources()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        log.info("attaching to Ray cluster at %s", address)
        ray.init(address=address, namespace=cfg.namespace, log_to_driver=True)
    else:
        temp_dir = _temp_dir(cfg, run_dir)
        Path(temp_dir).mkdir(parents=True, exist_ok=True)
        num_cpus = cfg.num_cpus or os.cpu_count() or 1
        log.info("starting embedded Ray: %s CPUs, temp dir %s", num_cpus, temp_dir)
        ray.init(num_cpus=num_cpus, num_gpus=cfg.num_gpus, resources=cfg.resources or None,
                 namespace=cfg.namespace, include_dashboard=cfg.include_dashboard,
                 _temp_dir=temp_dir, log_to_driver=True)
    res = ray.cluster_resources()
    log.info("Ray resources: %s", {k: v for k, v in res.items() if not k.startswith("node:")})
    return res


STORAGE_ENV = "SELFTAUGHT_STORAGE"
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor in a submitted job's driver


def submitted_job_id() -> str | None:
    """The submission id when this process is the driver of a ``ray job submit`` job."""
    import json

    raw = os.environ.get(JOB_ENV)
    if not raw:
        return None
    try:
        return (json.loads(raw).get("metadata") or {}).get("job_submission_id") or "unknown"
    except ValueError:
        return "unknown"


def resolve_run_dir(run_dir: str | Path, storage: str | None = None) -> str:
    """Where a run's directory really is. A relative ``run_dir`` goes under the shared storage
    named by ``storage`` or ``$SELFTAUGHT_STORAGE`` (a path every node mounts: NFS, EFS,
    Filestore, Lustre, a FUSE-mounted bucket), so outputs, checkpoints and journals land where
    every node and the next job see them. Inside a submitted Ray job, a relative run dir with
    no storage set is refused: it would sit in the job's temporary working directory, which
    Ray deletes, and on the head node's disk, which the workers do not see."""
    storage = storage if storage is not None else os.environ.get(STORAGE_ENV) or None
    path = Path(str(run_dir)).expanduser()
    if path.is_absolute():
        return str(path)
    if storage:
        if "://" in storage:
            raise ValueError(f"{STORAGE_ENV}={storage!r}: storage must be a path that every node mounts "
                             "(runs keep SQLite journals and resumable stage folders); mount the bucket "
                             "(e.g. s3fs, gcsfuse) and give its mount point")
        return str(Path(storage).expanduser().resolve() / path)
    if submitted_job_id():
        raise ValueError(f"run_dir {str(run_dir)!r} is relative and this is a submitted Ray job: it would be "
                         f"written into the job's temporary working directory. Set {STORAGE_ENV} to shared "
                         "storage (runtime_env env_vars, or `selftaught submit --storage`), or give an "
                         "absolute run_dir")
    return str(path.resolve())


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def fit_actor_cpus(requested: float, num_actors: int, reserve: float = 0.5) -> float:
    """CPUs per actor such that ``num_actors`` actors fit next to ``reserve`` free CPUs.

    Never above ``requested``; never below 0.1 (Ray accepts fractional CPUs), so a pool on a
    2-core machine shares the cores rather than waiting forever for ones that do not exist.
    """
    total = cluster_cpus()
    if total <= 0:
        return requested
    room = max(total - reserve, 0.1 * num_actors)
    per = min(requested, room / max(num_actors, 1))
    per = max(round(per, 2), 0.1)
    if per < requested:
        log.info("sizing %d actors at %.2f CPUs each (asked %.2f, cluster has %.0f)",
                 num_actors, per, requested, total)
    return per
