"""Pipelines as Ray jobs on a running multi-node cluster: ``selftaught submit`` uploads the code,
the job attaches to the cluster, and the run directory lands on the shared storage (here a
directory both local "nodes" see), never in the job's temporary working directory. A relative
run directory with no storage set is refused inside the job with a clear message. Also the
storage rule itself, without a cluster."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selftaught.net import free_port
from selftaught.runtime import resolve_run_dir
from selftaught.submit import _submit_when_ready

ROOT = Path(__file__).resolve().parents[1]
TOY = ["data.wiki_limit=200", "tokenizer.vocab_size=512", "model.size=nano", "train.token_budget=4096",
       "train.seq_len=64", "train.micro_batch_size=8", "train.eval_every=8", "train.eval_tokens=512",
       "train.cpus_per_worker=1", "sample.num_prompts=2", "sample.sampling.max_new_tokens=4",
       "train.progress=false"]

CLUSTER = r'''
import sys, time
from ray.cluster_utils import Cluster
port, agent_port, worker_agent_port = int(sys.argv[1]), int(sys.argv[3]), int(sys.argv[4])
# the agents' HTTP ports are set: their default (52365) may be held by another Ray on this machine
c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                  "dashboard_port": port, "dashboard_host": "127.0.0.1",
                                                  "dashboard_agent_listen_port": agent_port})
# and the worker unpacks the job's code into its own folder: "nodes" on one machine share the
# session directory, and two agents unpacking into one folder race (a real node has its own disk)
c.add_node(num_cpus=2, dashboard_agent_listen_port=worker_agent_port, runtime_env_dir_name="runtime_resources_w1")
print("READY", flush=True)
try:
    time.sleep(float(sys.argv[2]))
finally:
    c.shutdown()
'''


def test_run_dir_goes_on_the_shared_storage(tmp_path, monkeypatch):
    monkeypatch.delenv("SELFTAUGHT_STORAGE", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert resolve_run_dir("runs/x") == str(Path("runs/x").resolve())
    assert resolve_run_dir("runs/x", str(tmp_path)) == str(tmp_path / "runs/x")
    assert resolve_run_dir("/abs/run", str(tmp_path)) == "/abs/run"  # absolute paths are the user's choice
    monkeypatch.setenv("SELFTAUGHT_STORAGE", str(tmp_path / "shared"))
    assert resolve_run_dir("runs/x") == str(tmp_path / "shared" / "runs/x")
    with pytest.raises(ValueError, match="mount"):
        resolve_run_dir("runs/x", "s3://bucket/runs")
    monkeypatch.delenv("SELFTAUGHT_STORAGE")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "raysubmit_1"}}))
    with pytest.raises(ValueError, match="SELFTAUGHT_STORAGE"):  # inside a job: refused, not lost
        resolve_run_dir("runs/x")


@pytest.mark.slow
def test_pipeline_runs_as_a_ray_job_with_outputs_on_shared_storage(tmp_path):
    from ray.job_submission import JobSubmissionClient

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for k in ("RAY_ADDRESS", "SELFTAUGHT_STORAGE", "PYTHONPATH"):
        env.pop(k, None)
    cluster = subprocess.Popen([sys.executable, "-c", CLUSTER, str(port), "600", str(free_port()), str(free_port())], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert cluster.stdout.readline().strip() == "READY", cluster.stderr.read()[-3000:]
        address = f"http://127.0.0.1:{port}"
        client = JobSubmissionClient(address)
        storage = tmp_path / "shared"
        sets = [x for o in [*TOY, "run_dir=runs/qs"] for x in ("--set", o)]
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "selftaught.cli", "submit", "--address", address,
                              "--storage", str(storage), "--timeout", "400", "--", "run", "-c",
                              "examples/quickstart.yaml", *sets], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=480)
        took = time.monotonic() - t0
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
        assert "SUCCEEDED" in out.stdout and f"run directory: {storage / 'runs/qs'}" in out.stdout
        run = storage / "runs" / "qs"
        stages = {p.parent.name for p in run.glob("*/_STAGE.json")}
        assert {"tokenizer", "tokens", "init_model", "pretrain", "samples"} <= stages, sorted(stages)
        assert (run / "pretrain" / "model" / "config.json").exists()
        ckpts = list((run / "ray_train").rglob("checkpoint_*"))
        assert ckpts, "Ray Train's checkpoints are on the shared storage"
        print(f"quickstart as a job: {took:.0f} s, {len(ckpts)} checkpoints on the storage")

        # the stock command without storage: the job fails at once and says why
        job = _submit_when_ready(client, dict(
            entrypoint="python -m selftaught.cli run -c examples/quickstart.yaml",
            runtime_env={"working_dir": str(ROOT), "excludes": [".venv*", "runs", ".git"],
                         "env_vars": {"HF_HUB_OFFLINE": "1"}}))
        end = time.monotonic() + 120
        while str(client.get_job_status(job)).split(".")[-1] not in ("SUCCEEDED", "FAILED", "STOPPED"):
            assert time.monotonic() < end
            time.sleep(1)
        assert str(client.get_job_status(job)).endswith("FAILED")
        assert "SELFTAUGHT_STORAGE" in client.get_job_logs(job)
    finally:
        cluster.terminate()
        try:
            cluster.wait(timeout=60)
        except subprocess.TimeoutExpired:
            cluster.kill()
