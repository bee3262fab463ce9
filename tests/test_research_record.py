"""The search's MLflow record (selftaught/research_record.py), through MLflow's own client
on the SQLite store in the run directory."""
from __future__ import annotations

from mlflow.tracking import MlflowClient

from selftaught.research_record import MlflowRecorder, tracking_uri


def test_ideas_are_nested_runs_with_artifacts_and_logging_twice_makes_no_twin(tmp_path):
    rec = MlflowRecorder(tmp_path)
    parent = rec.arm_run("evolutionary", {"batch_size": 3})
    assert MlflowRecorder(tmp_path).arm_run("evolutionary", {"batch_size": 3}) == parent  # reopened: same run
    idea = {"id": "abc123", "mode": "exploit", "knobs": {"lr": 0.1}, "shown_ids": ["x1", "x2"], "text": "raise lr"}
    result = {"status": "ok", "reward": 0.75, "metrics": {"loss": 1.5, "note": "not a number"},
              "edit": "--- a/train.py\n+++ b/train.py\n@@\n-lr=0.01\n+lr=0.1\n", "logs": {"run": "step 1 loss 2"}}
    rid = rec.log_idea(parent, "evolutionary", 1, idea, result, {"cpu_hours": 0.01, "ideator_cost_usd": 0.002})
    # a driver that crashed after logging and before journaling the run id logs it again
    assert MlflowRecorder(tmp_path).log_idea(parent, "evolutionary", 1, idea, result, {}) == rid
    rec.log_epoch(parent, 0, {"best_so_far": 0.5, "mean_reward": 0.4})
    rec.log_epoch(parent, 1, {"best_so_far": 0.75, "mean_reward": None})

    client = MlflowClient(tracking_uri=tracking_uri(tmp_path))
    runs = client.search_runs([rec.experiment_id], "tags.kind = 'idea'")
    assert len(runs) == 1
    r = runs[0]
    assert r.info.run_id == rid and r.info.status == "FINISHED" and r.info.run_name == "abc123"
    assert r.data.tags["mlflow.parentRunId"] == parent
    assert r.data.params["knob.lr"] == "0.1" and r.data.params["shown_ids"] == "x1,x2"
    assert r.data.metrics == {"reward": 0.75, "env.loss": 1.5, "cpu_hours": 0.01, "ideator_cost_usd": 0.002}
    paths = {a.path for a in client.list_artifacts(rid)} | {a.path for a in client.list_artifacts(rid, "logs")}
    assert {"idea.json", "edit.diff.txt", "logs/run.txt"} <= paths
    local = client.download_artifacts(rid, "edit.diff.txt", str(tmp_path / "dl"))
    assert "+lr=0.1" in open(local).read()
    assert [m.value for m in client.get_metric_history(parent, "best_so_far")] == [0.5, 0.75]
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "mlartifacts").is_dir()


def test_research_ui_serves_the_record_to_mlflows_own_server(tmp_path):
    """`selftaught research ui RUN_DIR` starts the real `mlflow ui` on the run's store: its
    REST API (what the web UI calls) lists the idea runs with their params and metrics."""
    import json
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from selftaught.net import free_port

    missing = subprocess.run([sys.executable, "-m", "selftaught.cli", "research", "ui", str(tmp_path / "none")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no MLflow record" in missing.stderr
    rec = MlflowRecorder(tmp_path)
    parent = rec.arm_run("best_of_n", {})
    rid = rec.log_idea(parent, "best_of_n", 0, {"id": "i1", "mode": "fresh", "knobs": {"lr": 0.2}},
                       {"status": "ok", "reward": 0.5, "edit": "--- a/c.json\n+++ b/c.json\n"}, {})
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "selftaught.cli", "research", "ui", str(tmp_path), "--port", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and ui.poll() is None, "mlflow ui did not come up"
                time.sleep(1)
        req = urllib.request.Request(base + "/ajax-api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [rec.experiment_id],
                                                      "filter": "tags.kind = 'idea'"}).encode(),
                                     headers={"Content-Type": "application/json"})
        runs = json.loads(urllib.request.urlopen(req, timeout=30).read())["runs"]
        assert [r["info"]["run_id"] for r in runs] == [rid]
        params = {p["key"]: p["value"] for p in runs[0]["data"]["params"]}
        assert params["knob.lr"] == "0.2" and runs[0]["data"]["metrics"][0]["key"] == "reward"
        listing = json.loads(urllib.request.urlopen(f"{base}/ajax-api/2.0/mlflow/artifacts/list?run_id={rid}",
                                                    timeout=30).read())
        assert {"idea.json", "edit.diff.txt"} <= {f["path"] for f in listing["files"]}
    finally:
        ui.terminate()
        ui.wait(timeout=30)
