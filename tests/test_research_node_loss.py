"""A node lost in the middle of a research job: on a local multi-node Ray (ray.cluster_utils),
the job's worker node is removed while it runs; the scheduler sees the worker die, retries the
job once on the surviving node, and the idea gets its honest result (tries == 2). Runs in its
own process: the test session's embedded Ray is a different cluster."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, sys, tempfile, time
from ray.cluster_utils import Cluster
import ray
from envs.base import Idea
from envs.codebase import load_packaged

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
nodes = [cluster.add_node(num_cpus=1, resources={"jobnode": 1}) for _ in range(2)]
ray.init(address=cluster.address)
env = load_packaged("toy", overrides=["resources.cpus=1", "resources.custom={jobnode: 1}"],
                    executor={"run_dir": tempfile.mkdtemp(),
                              "scheduler": {"max_slots": 1, "placement_timeout_s": 60}})
[iid] = env.submit([Idea(knobs={"sleep_s": 5.0, "steps": 40})])
sched, victim, end = env.scheduler, None, time.monotonic() + 60
while victim is None and time.monotonic() < end:
    with sched._lock:
        victim = next((s for s in sched._slots if s.job is not None and s.actor is not None), None)
    time.sleep(0.2)
time.sleep(1.5)
first = ray.get(victim.actor.ping.remote())["node_id"]
cluster.remove_node(next(n for n in nodes if n.node_id == first))
[res] = env.gather([iid], timeout_s=120)
print("RESULT " + json.dumps({"status": res.status, "reward": res.reward, "tries": res.resources.get("tries"),
                              "first": first, "then": res.resources.get("node_id"),
                              "lost": sched.utilisation()["slots_lost"]}))
env.close()
ray.shutdown()
cluster.shutdown()
'''


def test_job_survives_the_loss_of_its_node(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, out.stdout[-2000:] + out.stderr[-4000:]
    res = json.loads(line[len("RESULT "):])
    assert res["status"] == "ok" and res["reward"] > 0.9
    assert res["tries"] == 2 and res["lost"] == 1
    assert res["then"] != res["first"]
