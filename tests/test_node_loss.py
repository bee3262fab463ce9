"""A worker node lost in the middle of SBP synthesis, of a Ray Train run and under a Serve
deployment. Each case runs on a local multi-node Ray (``ray.cluster_utils.Cluster``: a head
with one CPU, two worker nodes with one CPU and a custom resource, so the work lands on the
workers) in its own process (the test session's embedded Ray is a different cluster); the node
holding the work is killed without a drain (its raylet and the node's other Ray processes are
SIGKILLed; its worker processes exit when they lose the raylet) and the test asserts what
survived. Each case prints what was lost and how long recovery took; the
figures are in docs/node_loss.md.

Ray marks a dead node after ``health_check_failure_threshold`` failed health checks
``health_check_period_ms`` apart (defaults 5 x 3 s); the test clusters use 3 x 1 s, so that
detection takes seconds less. Nothing else is tuned. ``SELFTAUGHT_NODE_LOSS_RAY_DEFAULTS=1``
runs the cases with Ray's defaults."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# the cluster every case starts; RESOURCE is the custom resource of the two worker nodes
PRELUDE = r'''
import json, sys, threading, time
import ray
from ray.cluster_utils import Cluster
from ray._private.state import actors as actor_table

ARGS = json.loads(sys.argv[1])
T0 = time.monotonic()
DETECTION = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3} if ARGS["fast_detection"] else {}
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                        "_system_config": DETECTION})
nodes = [cluster.add_node(num_cpus=1, resources={ARGS["resource"]: 1}) for _ in range(2)]
ray.init(address=cluster.address)
CLUSTER_S = time.monotonic() - T0


def actors(prefix, state=None):
    """Actors whose class name starts with ``prefix`` (from the GCS: no dashboard needed)."""
    return [a for a in actor_table().values() if a["ActorClassName"].startswith(prefix)
            and (state is None or a["State"] == state)]


def kill_node(node_id):
    """Kill a worker node without a drain (SIGKILL to its raylet); returns the time."""
    t = time.monotonic()
    cluster.remove_node(next(n for n in nodes if n.node_id == node_id), allow_graceful=False)
    return t


def report(res):
    print("RESULT " + json.dumps({"cluster_start_s": round(CLUSTER_S, 1), **res}, default=str), flush=True)
    ray.shutdown()
    cluster.shutdown()
'''


def _run(script: str, args: dict, tmp_path: Path, timeout: int = 400) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "1"}
    env.pop("RAY_ADDRESS", None)
    args = {**args, "fast_detection": os.environ.get("SELFTAUGHT_NODE_LOSS_RAY_DEFAULTS") != "1"}
    out = subprocess.run([sys.executable, "-c", PRELUDE + script, json.dumps(args)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=timeout)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, out.stdout[-3000:] + out.stderr[-6000:]
    return json.loads(line[len("RESULT "):])


def _print(case: str, res: dict, keys: list[str]) -> None:
    print(f"\n[node loss: {case}] " + ", ".join(f"{k}={res.get(k)}" for k in keys))


# ------------------------------------------------------------------------------ SBP synthesis
SYNTHESIS = r'''
from pathlib import Path
import pyarrow as pa
from pipelines.sbp import SBPConfig, synthesis_stage
from selftaught.models import load_tokenizer
from selftaught.storage import RunDir, Stage, read_parquet, write_parquet
from tests.conftest import wiki_texts
from trainers.data import tokenize_documents

run = RunDir(ARGS["run_dir"])
docs = tokenize_documents(load_tokenizer(ARGS["model"]), wiki_texts(40))
(run.root / "tokens").mkdir(exist_ok=True)  # what the tokens stage leaves: D's token ids
write_parquet(pa.table({"id": [f"doc/{i}" for i in range(len(docs))], "ids": [d.tolist() for d in docs]}),
              run.root / "tokens" / "candidates.parquet")
tokens, synth = Stage("tokens", run.root / "tokens", "t"), Stage("synthesizer", Path(ARGS["model"]), "s")
N, PART = ARGS["num_docs"], ARGS["part_size"]
cfg = SBPConfig.model_validate({
    "run_dir": str(run.root), "corpus": {"unique_docs": 30}, "synth_tune": {"seq_len": 128},
    "synthesis": {"num_docs": N, "part_size": PART,
                  "sampling": {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": ARGS["max_new_tokens"]},
                  "engine": {"backend": "transformers", "device": "cpu", "max_batch_size": 2, "num_actors": 1,
                             "cpus_per_actor": 1, "resources": {ARGS["resource"]: 1}}}})
box = {}


def synthesize():
    try:
        box["stage"] = synthesis_stage(run, cfg, None, tokens, synth)
    except BaseException as e:  # noqa: BLE001 - reported
        box["error"] = repr(e)


th = threading.Thread(target=synthesize, daemon=True)
start = time.monotonic()
th.start()
parts = run.root / "synthesis" / "parts"
GEN = "MapWorker(MapBatches(GenerateBatch))"
seen, victim, killed, info = set(), None, None, {}
while th.is_alive() and time.monotonic() - start < 240:
    listed = actors(GEN)  # before the file check: a late poll must not file part 1's actor under part 0
    if not (parts / "part-00000.parquet").exists():
        seen |= {a["ActorID"] for a in listed}  # part 0 was still running when they were listed
        time.sleep(0.1)
        continue
    fresh = [a for a in listed if a["State"] == "ALIVE" and a["ActorID"] not in seen]
    if fresh:  # part 1's engine actor (its pool is new) is up and taking batches: kill its node
        time.sleep(ARGS["kill_after_s"])
        victim = fresh[0]
        info["parts_at_kill"] = sorted(p.name for p in parts.glob("part-*.parquet"))
        killed = kill_node(victim["Address"]["NodeID"])
        break
    time.sleep(0.1)
states = []
while killed is not None and th.is_alive():  # the victim actor's life after the kill
    a = [x for x in actors(GEN) if x["ActorID"] == victim["ActorID"]]
    if a and (not states or states[-1][0] != a[0]["State"]):
        states.append((a[0]["State"], round(time.monotonic() - killed, 2)))
    time.sleep(0.1)
th.join(300)
done = time.monotonic()
res = {"error": box.get("error"), "killed": killed is not None, **info, "actor_states_after_kill": states,
       "part0_actors": len(seen),
       "kill_after_start_s": round(killed - start, 1) if killed else None,
       "stage_done_after_kill_s": round(done - killed, 1) if killed else None}
if victim is not None:
    after = [x for x in actors(GEN) if x["ActorID"] == victim["ActorID"]][0]
    res.update(victim_node=victim["Address"]["NodeID"], restarted_on=after["Address"]["NodeID"],
               restarts=after["NumRestarts"])
if "stage" in box:
    rows = read_parquet(parts)
    res.update(rows=rows.num_rows, unique_ids=len(set(rows["id"].to_pylist())), ks=sorted(rows["k"].to_pylist()),
               outputs=box["stage"].outputs)
    # the same part generated again without a kill: the documents are the same, not just as many
    part1 = read_parquet(parts / "part-00001.parquet").sort_by("k").to_pylist()
    (parts / "part-00001.parquet").unlink()
    (run.root / "synthesis" / "_STAGE.json").unlink()
    synthesis_stage(run, cfg, None, tokens, synth)
    res["part1_identical_to_a_run_without_the_kill"] = (
        read_parquet(parts / "part-00001.parquet").sort_by("k").to_pylist() == part1)
report(res)
'''


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_synthesis_survives_the_loss_of_its_engine_node(tmp_path, tiny_lm_dir):
    """The node holding part 1's engine actor dies while the actor serves it. Ray Data's actor
    pool restarts the actor on the other node (``max_restarts=-1``) and resubmits the batches it
    held (``max_task_retries=-1``); the part completes with every requested document once, and
    they are the documents a run without the kill writes."""
    n, part = 128, 64
    res = _run(SYNTHESIS, {"resource": "engine_node", "run_dir": str(tmp_path / "run"), "model": str(tiny_lm_dir),
                           "num_docs": n, "part_size": part, "max_new_tokens": 64, "kill_after_s": 0.3}, tmp_path)
    lost = n - res.get("unique_ids", 0)
    res["lost"], res["duplicated"] = lost, res.get("rows", 0) - res.get("unique_ids", 0)
    _print("SBP synthesis", res, ["lost", "duplicated", "rows", "parts_at_kill", "part0_actors",
                                  "actor_states_after_kill", "stage_done_after_kill_s", "restarts",
                                  "cluster_start_s"])
    assert res["error"] is None and res["killed"]
    assert res["parts_at_kill"] == ["part-00000.parquet"]  # killed mid-synthesis, part 1 in flight
    assert res["restarts"] >= 1 and res["restarted_on"] != res["victim_node"]
    assert res["rows"] == n and res["unique_ids"] == n and res["ks"] == list(range(n))
    assert res["outputs"]["generated"] == n and res["outputs"]["kept"] <= n
    assert res["part1_identical_to_a_run_without_the_kill"]


# ------------------------------------------------------------------------------ Ray Train
TRAINING = r'''
import os
from pathlib import Path
from selftaught.models import load_tokenizer
from tests.conftest import wiki_texts
from trainers.config import TrainConfig
from trainers.data import tokenize_documents
from trainers.ray_train import fit

work = Path(ARGS["work"])
docs = tokenize_documents(load_tokenizer(ARGS["model"]), wiki_texts(120))
cfg = TrainConfig(**ARGS["cfg"])
HOLD, STEPS, AT = str(work / "hold"), str(work / "steps.jsonl"), ARGS["hold_at"]


def on_step(step, rank):
    import json, os, time
    import ray
    with open(STEPS, "a") as f:
        f.write(json.dumps({"step": step, "node": ray.get_runtime_context().get_node_id(), "t": time.time()}) + "\n")
    if step == AT and not os.path.exists(HOLD):  # the first attempt waits here for its node to die
        open(HOLD, "w").close()
        time.sleep(120)


box = {}


def train():
    try:
        box["summary"] = fit(cfg, ARGS["model"], docs, None, work / "out", work / "ray", name="nodeloss",
                             on_step=on_step)
    except BaseException as e:  # noqa: BLE001 - reported
        box["error"] = repr(e)


th = threading.Thread(target=train, daemon=True)
start = time.monotonic()
th.start()
snapshot = work / "ray" / "nodeloss" / "checkpoint_manager_snapshot.json"  # Ray Train's registered checkpoints
killed, info = None, {}
while th.is_alive() and time.monotonic() - start < 240:
    if os.path.exists(HOLD) and snapshot.exists():
        latest = (json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}).get("metrics", {})
        if latest.get("step") == ARGS["checkpoint_step"]:  # registered: the restart will find it
            info["victim"] = json.loads(open(STEPS).read().splitlines()[-1])["node"]
            killed_wall, killed = time.time(), kill_node(info["victim"])
            break
    time.sleep(0.1)
th.join(300)
done = time.monotonic()
steps = [json.loads(x) for x in open(STEPS).read().splitlines()]
after = [s for s in steps if killed and s["t"] > killed_wall]
report({"error": box.get("error"), "summary": box.get("summary"), **info, "killed": killed is not None,
        "steps": [(s["step"], s["node"]) for s in steps],
        "kill_after_start_s": round(killed - start, 1) if killed else None,
        "first_step_after_kill_s": round(after[0]["t"] - killed_wall, 1) if after else None,
        "finished_after_kill_s": round(done - killed, 1) if killed else None})
'''


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_resumes_from_shared_storage_after_losing_its_node(tmp_path, tiny_lm_dir):
    """A one-worker Ray Train run pinned to the worker nodes (``worker_resources``) checkpoints
    at step 4, trains step 5, and its node dies before step 6. Ray Train (``max_failures=1``)
    restarts the worker on the other node from the step-4 checkpoint in the storage path (the
    run directory, which every node sees); step 5 is redone and the per-step losses are those of
    an uninterrupted run."""
    import torch
    from transformers import AutoModelForCausalLM

    from selftaught.models import load_tokenizer
    from tests.conftest import wiki_texts
    from tests.test_trainer_faults import CFG, _losses
    from trainers.config import TrainConfig
    from trainers.data import tokenize_documents
    from trainers.loop import train_causal_lm

    spec = dict(token_budget=4 * 64 * 8, checkpoint_every=2, max_failures=1, num_workers=1, cpus_per_worker=1,
                worker_resources={"train_node": 1}, **CFG)
    res = _run(TRAINING, {"resource": "train_node", "work": str(tmp_path), "model": str(tiny_lm_dir), "cfg": spec,
                          "hold_at": 6, "checkpoint_step": 4}, tmp_path)
    s = res["summary"] or {}
    res["steps_redone"] = [k for k, _ in res["steps"]].count(5) - 1
    _print("Ray Train", res, ["steps_redone", "first_step_after_kill_s", "finished_after_kill_s",
                              "kill_after_start_s", "cluster_start_s"])
    assert res["error"] is None and res["killed"] and s["finished"] and s["world_size"] == 1
    assert s["resumed_from_step"] == 4 and s["steps"] == 8
    nodes = {k: n for k, n in res["steps"]}  # the last node each step ran on
    assert [k for k, _ in res["steps"]] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]  # step 5 lost with the node, redone
    assert all(nodes[k] == res["victim"] for k in (1, 2, 3, 4))
    assert all(nodes[k] != res["victim"] for k in (5, 6, 7, 8))
    ref: list[dict] = []
    cfg = TrainConfig(**spec)
    docs = tokenize_documents(load_tokenizer(tiny_lm_dir), wiki_texts(120))
    train_causal_lm(AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32), docs, None, cfg,
                    on_log=ref.append)
    got = _losses(tmp_path / "out")
    assert len(got) == 8 and np.allclose(got, [r["loss"] for r in ref], atol=1e-5)


# ------------------------------------------------------------------------------ Serve
SERVING = r'''
import httpx
from ray import serve
from selftaught.config import EngineConfig
from selftaught.net import free_port
from serve.config import ServeConfig
from serve.openai_app import base_url, run_openai_app

# two replicas of half a worker node each: Serve spreads them over the two nodes, and the
# survivor has room for the replacement
cfg = ServeConfig(engine=EngineConfig(model=ARGS["model"], backend="transformers", device="cpu", cpus_per_actor=0.5,
                                      resources={ARGS["resource"]: 0.5}, max_model_len=128, max_batch_size=8),
                  served_model_name="tiny", port=free_port(), app_name="nodeloss", num_replicas=2,
                  proxy_location="HeadOnly")  # one proxy: the nodes share this host's ports
t = time.monotonic()
run_openai_app(cfg)
url, app_s = base_url(cfg), time.monotonic() - t
REPLICA = "ServeReplica:nodeloss:"
placed = [a["Address"]["NodeID"] for a in actors(REPLICA, "ALIVE")]
log, stop = [], threading.Event()


def client(i):
    with httpx.Client(timeout=60) as c:  # no retries: every failure is counted
        k = 0
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                r = c.post(url + "/completions", json={"model": "tiny", "prompt": f"Once upon a time {i} {k}",
                                                       "max_tokens": ARGS["max_tokens"], "temperature": 0})
                ok, what = r.status_code == 200, r.status_code if r.status_code == 200 else f"{r.status_code}: {r.text[:300]}"
            except Exception as e:  # noqa: BLE001 - counted
                ok, what = False, repr(e)[:300]
            log.append((t0, time.monotonic(), ok, what))
            k += 1


clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(ARGS["clients"])]
for th in clients:
    th.start()
time.sleep(ARGS["warm_s"])
victim = actors(REPLICA, "ALIVE")[0]["Address"]["NodeID"]
killed = kill_node(victim)
states, healthy = [], None


def status():
    name = lambda x: str(getattr(x, "value", x))  # noqa: E731
    app = serve.status().applications[cfg.app_name]
    dep = app.deployments["openai"]
    return [name(app.status), name(dep.status), {name(k): v for k, v in dep.replica_states.items()}]


while time.monotonic() - killed < 180:
    s = status()
    if not states or states[-1][1:] != s:
        states.append([round(time.monotonic() - killed, 2), *s])
    if len(states) > 1 and s[:2] == ["RUNNING", "HEALTHY"] and s[2].get("RUNNING") == 2:
        healthy = time.monotonic()
        break
    time.sleep(0.2)
time.sleep(ARGS["after_s"])
stop.set()
for th in clients:
    th.join(60)
health = httpx.get(url.removesuffix("/v1") + "/health", timeout=30)
rel = lambda t: round(t - killed, 2)  # noqa: E731
report({"app_start_s": round(app_s, 1), "placed": placed, "victim": victim, "states": states,
        "recovered_s": rel(healthy) if healthy else None,
        "replicas_after": [a["Address"]["NodeID"] for a in actors(REPLICA, "ALIVE")],
        "requests": len(log), "ok": sum(x[2] for x in log),
        "before_kill": sum(1 for x in log if x[1] < killed),
        "during_recovery": sum(1 for x in log if x[1] >= killed and (healthy is None or x[0] < healthy)),
        "ok_during_recovery": sum(1 for x in log if x[2] and x[1] >= killed and (healthy is None or x[0] < healthy)),
        "after_recovery": sum(1 for x in log if healthy and x[0] >= healthy),
        "ok_after_recovery": sum(1 for x in log if x[2] and healthy and x[0] >= healthy),
        "in_flight_at_kill": [(rel(x[0]), rel(x[1]), x[2]) for x in log if x[0] < killed <= x[1]],
        "failed": [(rel(x[0]), rel(x[1]), x[3]) for x in log if not x[2]],
        "slowest_during_recovery_s": round(max((x[1] - x[0] for x in log if x[1] >= killed
                                                and (healthy is None or x[0] < healthy)), default=0), 2),
        "health": health.status_code})
'''


@pytest.mark.slow  # about 40-50 s on 2 cores: with the other cluster tests, after the default run
@pytest.mark.timeout(600)
def test_serve_keeps_answering_when_a_replica_node_dies(tmp_path, tiny_lm_dir):
    """Two replicas on two worker nodes; three clients send requests back to back (no client
    retries); one replica's node dies. Requests keep being answered by the other replica while
    Serve starts a replacement; the app is healthy again with two replicas. The only requests
    that may fail are those the proxy had already handed to the dead replica before Ray declared
    its node dead (Serve cannot retry a request that is running); they are counted exactly."""
    clients = 3
    res = _run(SERVING, {"resource": "serve_node", "model": str(tiny_lm_dir), "clients": clients, "max_tokens": 16,
                         "warm_s": 3, "after_s": 2}, tmp_path)
    res["lost"] = len(res["failed"])
    _print("Serve", res, ["lost", "failed", "requests", "ok_during_recovery", "during_recovery", "recovered_s",
                          "states", "slowest_during_recovery_s", "in_flight_at_kill", "app_start_s",
                          "cluster_start_s"])
    assert len(set(res["placed"])) == 2  # one replica per worker node
    assert res["recovered_s"] is not None and res["health"] == 200
    assert len(res["replicas_after"]) == 2 and res["victim"] not in res["replicas_after"]
    assert res["ok_during_recovery"] >= 10  # kept answering while a replica was missing
    assert res["after_recovery"] > 0 and res["ok_after_recovery"] == res["after_recovery"]
    # failures: at most one per client (each has one request in flight), each sent before Serve
    # had marked the dead replica (and with it the deployment) unhealthy
    unhealthy_at = next(t for t, _, dep, _ in res["states"] if dep == "UNHEALTHY")
    assert len(res["failed"]) <= clients
    assert all(start < unhealthy_at for start, _, _ in res["failed"])
