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
