"""RL rollout groups on a local multi-node Ray with declared GPUs (benchmarks/rl.py --small: 2
nodes x 16 GPUs, groups of 8 ideas x 4 GPUs, the sim environment's 2-s jobs with stragglers and
failures, a worker killed every 10 s): the real scheduler, placement groups, sandboxes, journal
and RL step. Runs in its own process: the test session's embedded Ray is another cluster."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gang_groups_straggler_cut_and_late_ideas_on_a_simulated_gpu_cluster(tmp_path):
    out = tmp_path / "rl-sim.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.rl", "--small", "--sync-model", "", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["cluster"]["gpus"] == 32 and res["group"] == {"ideas": 8, "gpus_per_idea": 4, "gpus": 32}
    sc = res["scenarios"]
    for name, s in sc.items():
        assert len(s["steps"]) == 2 and all(st["jobs"] >= 5 for st in s["steps"]), name  # a job per rollout
        assert 0 < s["gpu_util_whole_run"] <= 1 and s["dispatch_s_median"] < 1.0, name
        # every killed worker's job was retried: an infrastructure failure never scores the idea
        assert s["infra_retries"] >= min(s["worker_kills"], 1) and "infra_failed" not in s["statuses"], name
    # gang admission: the whole group reserved at once, before its jobs run
    assert sc["gang-all"]["reserve_s"] is not None and sc["gang-cut"]["reserve_s"] is not None
    assert sc["stream-keep"]["reserve_s"] is None
    # waiting for every job: the step lasts at least as long as its slowest job
    for st in sc["gang-all"]["steps"]:
        assert st["late"] == 0 and st["execute_s"] >= 0.9 * st["slowest_job_drawn_s"]
    # cutting at the quantile: some step ends before its slowest job, whose idea is dropped (cancelled)
    # (some, not every: on 2 busy cores a cold first step's sandbox start-up can push the cut past
    # a short slowest job's drawn time, since the quantile's time includes that start-up)
    cut = [st for st in sc["gang-cut"]["steps"] if st["late"]]
    assert cut and any(st["execute_s"] < st["slowest_job_drawn_s"] for st in cut), cut
    assert sc["gang-cut"]["cancelled"] >= sum(st["late"] for st in cut)
    # kept late ideas are never cancelled at the cut
    assert sc["stream-keep"]["cancelled"] <= sum(st["late"] for st in sc["stream-keep"]["steps"][:-1])
