"""Elastic pools on a local autoscaling Ray cluster: Ray's own autoscaler with its
``fake_multinode`` provider (a node is a raylet started on this machine), a 1-CPU head and a
worker type ``{"CPU": 1, "pool": 1}`` with 1 to 3 workers, idle nodes removed after 6 s.

- a Ray Data generation pool (``EngineConfig.max_actors``) grows while blocks are queued: the
  autoscaler adds nodes for its actors, every row comes back exactly once, and the nodes go back
  to ``min_workers`` after the work;
- the research scheduler's slots grow to ``max_slots`` on new nodes under queued jobs and are
  released after ``idle_shutdown_s`` (with their nodes);
- a Serve app with autoscaling (1 to 2 replicas, one per node) scales up under concurrent load
  and back down.

Each cluster runs in its own process (``benchmarks/elastic.py``, the same scenarios at a smaller
size): the test session's embedded Ray is a different cluster. The launcher never runs
``ray stop``; it ends exactly the processes it started.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "elastic.py"


def _run(tmp_path: Path, *args: str, timeout_s: int = 420) -> dict:
    """One scenario of benchmarks/elastic.py in a fresh process; its JSON."""
    out = tmp_path / "elastic.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(SCRIPT), *args, "--out", str(out), "--deadline-s", str(timeout_s - 60)]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:  # the script's own deadline failed: end its cluster here
        from benchmarks.elastic import kill_temp_dir_processes

        text = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        for line in text.splitlines():
            if line.startswith("ELASTIC_TEMP_DIR "):
                kill_temp_dir_processes(line.split(" ", 1)[1].strip())
        raise
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def test_local_autoscaling_config_is_valid():
    """The launcher's config passes Ray's cluster schema (fractional idle timeout included)."""
    from ray.autoscaler._private.util import validate_config

    from benchmarks.elastic import LocalAutoscalingCluster, pool_node_types

    cfg = LocalAutoscalingCluster(pool_node_types(1, 3), idle_timeout_minutes=0.1).config("127.0.0.1:6390")
    validate_config(cfg)
    assert cfg["provider"]["type"] == "fake_multinode" and cfg["provider"]["gcs_address"] == "127.0.0.1:6390"
    assert cfg["idle_timeout_minutes"] == 0.1 and cfg["max_workers"] == 3
    assert cfg["available_node_types"]["pool"]["resources"]["pool"] == 1
    assert cfg["available_node_types"]["ray.head.default"]["max_workers"] == 0
    # cluster.yaml's node types through the same builder (tests/test_cluster_up.py runs it)
    import yaml

    from tests.fake_cluster import fake_config

    launcher = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster.yaml").read_text())
    fake = fake_config(launcher, idle_timeout_minutes=0.1, max_workers={"gpu_1x": 2})
    validate_config(fake)
    assert fake["max_workers"] == launcher["max_workers"] and fake["available_node_types"]["gpu_1x"]["max_workers"] == 2
    assert fake["available_node_types"]["gpu_8x"]["resources"]["gpu_8x"] == 1


def test_elastic_generation_pool_asks_for_whole_actors(ray_cluster, tiny_lm_dir):
    """``max_actors`` makes an ActorPoolStrategy(min, max) whose actors ask for their full
    ``cpus_per_actor`` (8 here, more than this 4-CPU cluster has: a pending actor is what the
    autoscaler acts on), while a fixed pool is shrunk to fit the cluster."""
    import ray.data

    from actors.generator import generate_dataset
    from selftaught.config import EngineConfig

    base = dict(backend="transformers", model=str(tiny_lm_dir), cpus_per_actor=8.0, resources={"pool": 1})
    items = ray.data.from_items([{"prompt": "a"}])
    elastic = generate_dataset(items, EngineConfig(**base, num_actors=1, max_actors=3))._logical_plan.dag
    fixed = generate_dataset(items, EngineConfig(**base, num_actors=1))._logical_plan.dag
    assert (elastic.compute.min_size, elastic.compute.max_size) == (1, 3)
    assert elastic.ray_remote_args["num_cpus"] == 8.0 and elastic.ray_remote_args["resources"] == {"pool": 1}
    assert (fixed.compute.min_size, fixed.compute.max_size) == (1, 1)
    assert fixed.ray_remote_args["num_cpus"] < 4


@pytest.mark.slow
def test_data_pool_grows_with_the_cluster_and_shrinks_back(tmp_path, tiny_lm_dir):
    res = _run(tmp_path, "--scenarios", "data", "--model", str(tiny_lm_dir), "--rows", "2400",
               "--new-tokens", "16", "--max-workers", "3")["data_pool"]
    # every row exactly once, each fully generated
    assert res["rows_out"] == res["unique_rows"] == 2400
    assert res["missing_rows"] == 0 and res["duplicate_rows"] == 0 and res["bad_rows"] == 0
    # the autoscaler added nodes for the pool, and the pool grew onto them
    assert res["initial_worker_nodes"] == 1
    assert res["peak_worker_nodes"] >= 2 and res["node_joins_s"], res["timeline"]
    assert res["peak_actors"] >= 2 and len(res["actor_ready_s"]) >= 2, res["timeline"]
    assert res["peak_worker_nodes"] <= 3 and res["peak_actors"] <= 3
    assert sum(w["rows"] for w in res["windows"]) == 2400
    # after the work: pool gone, idle nodes removed down to min_workers (bounded wait)
    assert res["pool_gone"] and res["at_min_workers"] and res["final_worker_nodes"] == 1
    assert res["node_removals_s"] and res["scale_down_after_last_row_s"]["back_to_min_workers"] < 60


@pytest.fixture(scope="module")
def scheduler_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("elastic-sched"), "--scenarios", "scheduler", "--jobs", "6",
                "--max-workers", "3")["scheduler"]


@pytest.mark.slow
def test_scheduler_slots_grow_to_max_slots_on_new_nodes(scheduler_run):
    res = scheduler_run
    assert res["statuses"] == ["ok"] * 6 and res["tries"] == [1] * 6
    # six queued jobs, three slots at most: made on demand, one per node, nodes added for them
    assert res["slots_created"] == res["peak_slots"] == 3
    assert res["distinct_job_nodes"] == 3 and res["peak_worker_nodes"] == 3
    assert len(res["node_joins_s"]) == 2 and len(res["worker_ready_s"]) == 3


@pytest.mark.slow
def test_scheduler_releases_idle_slots_and_their_nodes(scheduler_run):
    res = scheduler_run
    assert res["slots_released_after_last_result_s"] is not None, res["timeline"]
    assert res["slots_released_after_last_result_s"] < res["idle_shutdown_s"] + 10
    assert res["back_to_min_after_last_result_s"] is not None and res["final_worker_nodes"] == 1


@pytest.mark.slow
def test_serve_replicas_scale_up_under_load_and_back_down(tmp_path, tiny_lm_dir):
    res = _run(tmp_path, "--scenarios", "serve", "--model", str(tiny_lm_dir), timeout_s=480)["serve"]
    assert res["errors"] == 0 and res["requests_ok"] > 0, res["error_samples"]
    # up: a second replica, on a node the autoscaler added for it
    assert res["scaled_up"] and res["peak_replicas_running"] == 2, res["timeline"]
    assert len(res["node_joins_s"]) == 1 and res["peak_worker_nodes"] == 2
    # down: back to min_replicas once the load is gone, and the node with it
    assert res["scaled_down"] and res["final_replicas_running"] == 1, res["timeline"]
    assert res["final_worker_nodes"] == 1 and res["node_removals_s"]
