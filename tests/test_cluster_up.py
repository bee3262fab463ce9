"""cluster.yaml brought up on this machine: its node types, declared resources, bounds and idle
timeout run on Ray's own autoscaler with the ``fake_multinode`` provider (each worker node a
local raylet). A task asking for an 8-GPU node gets a node of type ``gpu_8x`` with exactly the
resources cluster.yaml declares; demand beyond a type's ``max_workers`` launches no more; idle
nodes are removed. The cloud parts (instances, images, setup commands) are not run here: they
install from the network (tests/test_cluster_yaml.py checks them with Ray's launcher code)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fake_cluster import FakeCluster, fake_config

ROOT = Path(__file__).resolve().parents[1]

DRIVER = r'''
import json, sys, time
import ray

ray.init(address=sys.argv[1], log_to_driver=False)
declared = json.loads(sys.argv[2])
T0 = time.monotonic()

def workers():
    out = {}
    for n in ray.nodes():
        if n["Alive"] and n["Resources"].get("CPU", 0) > 0:
            t = next((k for k in declared if n["Resources"].get(k)), "cpu_worker")
            out.setdefault(t, []).append(n)
    return out

def wait(cond, timeout, what):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: {({k: len(v) for k, v in workers().items()})}")
        time.sleep(1)
    return round(time.monotonic() - T0, 1)

res = {}
# one task that needs a whole 8-GPU node: the autoscaler launches a gpu_8x node for it
@ray.remote(num_cpus=1, num_gpus=8, resources={"gpu_8x": 1})
def on_big_node():
    return ray.get_runtime_context().get_node_id()

node = ray.get(on_big_node.remote(), timeout=180)
res["gpu_8x_up_s"] = round(time.monotonic() - T0, 1)
big = next(n for n in ray.nodes() if n["NodeID"] == node)
res["gpu_8x_resources"] = {k: v for k, v in big["Resources"].items()
                           if not k.startswith(("node:", "memory", "object_store_memory", "accelerator_type"))}

# three tasks that each need a 1-GPU node, where the type allows two: two nodes come, the
# third task waits for a free one and no third node is launched
@ray.remote(num_cpus=1, num_gpus=1, resources={"gpu_1x": 1})
def on_small_node(s):
    time.sleep(s)
    return ray.get_runtime_context().get_node_id()

refs = [on_small_node.remote(30) for _ in range(3)]
res["gpu_1x_two_s"] = wait(lambda: len(workers().get("gpu_1x", [])) >= 2, 180, "two gpu_1x nodes")
time.sleep(15)
res["gpu_1x_after_15s"] = len(workers().get("gpu_1x", []))
res["gpu_1x_resources"] = {k: v for k, v in workers()["gpu_1x"][0]["Resources"].items() if k in ("CPU", "GPU", "gpu_1x")}
ran_on = ray.get(refs, timeout=240)
res["tasks_done"], res["distinct_gpu_1x_nodes"] = len(ran_on), len(set(ran_on))

# no demand: every worker goes idle and is removed (idle_timeout_minutes)
res["all_removed_s"] = wait(lambda: not workers(), 240, "idle workers removed")
print("RESULT " + json.dumps(res), flush=True)
'''


@pytest.mark.slow
def test_cluster_yaml_node_types_bounds_and_idle_removal_on_the_autoscaler(tmp_path):
    launcher = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    # gpu_1x's bound lowered to 2 so that exceeding it costs three raylets, not seventeen
    cfg = fake_config(launcher, idle_timeout_minutes=0.1, max_workers={"gpu_1x": 2})
    declared = {t: v["resources"] for t, v in launcher["available_node_types"].items()}
    # declared CPUs are logical: keep Ray from prestarting a worker process per declared CPU
    env = {"RAY_prestart_worker_first_driver": "0", "RAY_enable_worker_prestart": "0",
           "RAY_AUTH_MODE": "disabled"}  # one machine, one user: no token between its "nodes"
    with FakeCluster(cfg, env=env) as c:
        drv_env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
        drv_env.pop("RAY_ADDRESS", None)
        out = subprocess.run([sys.executable, "-c", DRIVER, c.address, json.dumps(declared)], cwd=tmp_path,
                             env=drv_env, capture_output=True, text=True, timeout=600)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        assert line, out.stdout[-2000:] + out.stderr[-3000:] + c.monitor_log()[-3000:]
    res = json.loads(line[len("RESULT "):])
    print(res)
    assert res["gpu_8x_resources"] == {"CPU": 192.0, "GPU": 8.0, "gpu_8x": 1.0}
    assert res["gpu_1x_resources"] == {"CPU": 8.0, "GPU": 1.0, "gpu_1x": 1.0}
    assert res["gpu_1x_after_15s"] == 2  # the type's max_workers holds against unmet demand
    assert res["tasks_done"] == 3 and res["distinct_gpu_1x_nodes"] == 2  # the third waited for a node
    assert res["all_removed_s"] > res["gpu_1x_two_s"]
