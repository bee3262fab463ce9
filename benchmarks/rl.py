"""RL rollout groups at 1024 GPUs, simulated: the real scheduler, placement groups, sandboxed
jobs, journal and RL step on a local multi-node Ray cluster whose GPUs are declared, not real.

    python -m benchmarks.rl                 # 16 nodes x 64 GPUs, groups of 128 ideas x 8 GPUs (~15 min)
    python -m benchmarks.rl --small         # 2 nodes x 16 GPUs, groups of 8 x 4 GPUs (about a minute)

The cluster (``ray.cluster_utils.Cluster``): a head node holding the policy pool (custom
resource ``policy_pool``: the rollout engine and the learner ask for it) and ``--nodes`` executor
nodes with ``--gpus-per-node`` logical GPUs each (and ``executor_pool``, which every job asks
for). 128 raylets of 8 GPUs would not fit a 2-core machine, so the default packs 64 GPUs per
node: eight 8-GPU jobs per node, each still one bundle that Ray places whole.

The environment is ``sim`` (envs/sim): a job holds its GPUs for a drawn duration, a fixed
budget with jitter, failures (the idea crashes part-way) and stragglers (it runs 1.5-3x as
long); a chaos thread kills a running job's worker every ``--kill-every`` seconds (an
infrastructure failure: the scheduler retries it in the same reserved bundle). The policy is a
nano LM with SmolLM2's tokenizer: sampling and updates take seconds, so the figures are about
the executor. Scenarios (``--scenarios``):

- ``gang-all``: the group's 128 x 8 GPUs reserved as one placement group; the step waits for
  every job (step time = the slowest job).
- ``gang-cut``: the same, cutting stragglers once 90% are back (plus 10% slack); late ideas dropped.
- ``stream-keep``: no gang: each idea takes a slot as one frees; stragglers cut the same way but
  kept for the next step (staleness 1, importance-corrected), the next group sampled and its
  jobs queued meanwhile.
- ``gang-keep``: the gang of ``gang-cut`` with the pipelining of ``stream-keep``: the next
  group's jobs take the reserved slots that finished, failed or cut jobs free.

Figures per step: GPU-slot utilisation while the step executes (GPU-seconds held by jobs over
GPUs reserved x the wait), scheduling overhead per idea (a free slot to its job started; and a
job's slot time beyond its own run: sandbox, evaluator, Ray), step time against the slowest
job's drawn duration. The weight-sync section times a 135M policy's weights reaching its
engines through the driver and as an object reference. Writes ``benchmarks/results/rl-sim.json``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCENARIOS = {
    "gang-all": {"execution": {"admission": "gang", "straggler_quantile": 1.0}, "max_staleness": 0},
    "gang-cut": {"execution": {"admission": "gang", "straggler_slack": 0.1, "late": "drop"}, "max_staleness": 0},
    "stream-keep": {"execution": {"admission": "stream", "straggler_slack": 0.1, "late": "keep"}, "max_staleness": 1},
    "gang-keep": {"execution": {"admission": "gang", "straggler_slack": 0.1, "late": "keep"}, "max_staleness": 1},
}


def _sim_draw():
    spec = importlib.util.spec_from_file_location("sim_job", ROOT / "envs" / "sim" / "codebase" / "job.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.draw


def policy_dir(out: Path) -> str:
    """A nano LM with SmolLM2's tokenizer and chat template (random weights: valid ideas come
    from decoding under the knob schema)."""
    from selftaught.models import build_model, load_tokenizer, smollm2_path

    tok = load_tokenizer(smollm2_path())
    build_model("nano", tok, seed=0, context=2048).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)


def start_cluster(nodes: int, gpus_per_node: int):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "resources": {"policy_pool": 4},
                                                            "include_dashboard": False})
    for _ in range(nodes):
        cluster.add_node(num_cpus=max(1, gpus_per_node // 16), num_gpus=gpus_per_node,
                         resources={"executor_pool": gpus_per_node})
    return cluster


class Chaos:
    """Kills one running job's worker every ``every_s`` seconds (an infrastructure failure)."""

    def __init__(self, runner, every_s: float | None, seed: int = 0):
        self.runner, self.every_s, self.kills = runner, every_s, 0
        self.rng = random.Random(seed)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._go, daemon=True)

    def __enter__(self):
        if self.every_s:
            self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    def _go(self):
        import ray

        while not self._stop.wait(self.every_s):
            sched = self.runner.scheduler
            if sched is None:
                continue
            with sched._lock:
                busy = [s for s in sched._slots if s.job is not None and s.actor is not None
                        and time.monotonic() - s.started > 1.0]
            if busy:
                ray.kill(self.rng.choice(busy).actor, no_restart=True)
                self.kills += 1


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.fmean(xs), 4) if xs else None


def overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def run_scenario(name: str, args, cluster, model: str, out_dir: Path, durations: dict) -> dict:
    from pipelines.research_rl import RLRun, RLRunConfig

    sc = SCENARIOS[name]
    g = args.group
    cfg = RLRunConfig.model_validate({
        "run_dir": str(out_dir / name), "env": "sim", "ray": {"address": cluster.address},
        "spec_overrides": [f"resources.gpus={args.gpus_per_idea}", f"resources.custom={{executor_pool: {args.gpus_per_idea}}}",
                           f"base_config.durations={json.dumps(durations)}", f"time_limit_s={args.budget_s * 6 + 60:.0f}"],
        "executor": {"scheduler": {"max_slots": g, "placement_timeout_s": 600, "queue_timeout_s": 3600,
                                   "grace_s": 30, "idle_shutdown_s": None, "max_infra_retries": 2}},
        "policy": {"model": model, "engine": {"backend": "transformers", "device": "cpu", "cpus_per_actor": 1,
                                              "max_batch_size": 64, "resources": {"policy_pool": 1}},
                   "learner_cpus": 1, "learner_resources": {"policy_pool": 1}},
        "train": {"lr": 1e-5, "schedule": "constant", "warmup_frac": 0.0, "weight_decay": 0.0, "progress": False,
                  "grad_accum": 4},
        # 128-idea groups: a job lost three times leaves only itself out, not its whole group
        "rl": {"max_staleness": sc["max_staleness"], "mask_infra_groups": False},
        "sampling": {"temperature": 1.0, "max_new_tokens": 64},
        "group_size": g, "steps": args.steps, "job_timeout_s": args.budget_s * 6 + 60,
        "execution": {"straggler_quantile": args.quantile, **sc["execution"], "dedupe": False}, "seed": args.seed,
    })
    runner = RLRun(cfg)
    t0 = time.time()
    with Chaos(runner, args.kill_every, args.seed) as chaos:
        summary = runner.run()
    wall = time.time() - t0
    trace = list(runner.scheduler.trace)
    rows = runner.journal.done("mean")
    draw = _sim_draw()
    reserved = g * args.gpus_per_idea
    steps = []
    for r in rows:
        a, b = r["executed_at"]
        held = sum(t["gpus"] * overlap(t["start"], t["end"], a, b) for t in trace)
        _, _, rollouts, _ = runner.journal.get("mean", r["step"])
        drawn = [draw({"durations": durations, **(x["meta"].get("knobs") or {})}, str(x["meta"].get("seed") or 0))["seconds"]
                 for x in rollouts if not x.get("carried") and (x["meta"].get("job_s") is not None or x.get("late"))]
        steps.append({"step": r["step"], "execute_s": round(b - a, 2), "step_s": round(r["step_s"], 2),
                      "slowest_job_drawn_s": round(max(drawn, default=0.0), 2),
                      # None when the step's jobs were all back before it waited (submitted early)
                      "gpu_util_during_group": round(held / (reserved * (b - a)), 4) if b - a > 0.5 else None,
                      "jobs": r["jobs"], "late": r.get("late", 0), "carried_in": r.get("carried_in", 0),
                      "valid_frac": r["valid_frac"], "mean_reward": round(r["mean_reward"], 4),
                      "update_s": round(r["update_s"], 2), "sync_s": round(r["sync_s"], 3)})
    first, last = min(t["start"] for t in trace), max(t["end"] for t in trace)
    held_all = sum(t["gpus"] * overlap(t["start"], t["end"], first, last) for t in trace)
    slot_over = [t["end"] - t["start"] - t["run_s"] for t in trace if t.get("run_s") is not None]
    return {
        "scenario": name, "execution": sc["execution"], "max_staleness": sc["max_staleness"], "wall_s": round(wall, 1),
        "reserve_s": (summary["execution"].get("gang") or {}).get("reserve_s"),
        "steps": steps,
        "gpu_util_during_group_mean": _mean([s["gpu_util_during_group"] for s in steps]),
        # from the first job's start to the last job's end: sampling, updates and syncs included
        "gpu_util_whole_run": round(held_all / (reserved * (last - first)), 4),
        "dispatch_s_median": pct([t["dispatch_s"] for t in trace], 0.5),
        "dispatch_s_p95": pct([t["dispatch_s"] for t in trace], 0.95),
        "slot_overhead_s_median": pct(slot_over, 0.5), "slot_overhead_s_p95": pct(slot_over, 0.95),
        "jobs_traced": len(trace), "worker_kills": chaos.kills,
        "infra_retries": runner.scheduler.stats["infra_retries"], "cancelled": runner.scheduler.stats["cancelled"],
        "statuses": {s: sum(1 for t in trace if t["status"] == s) for s in sorted({t["status"] for t in trace})},
    }


def weight_sync(model: str, engines: int, repeats: int) -> dict:
    """The policy's weights from the learner actor into ``engines`` rollout engines: fetched to
    the driver and put again, against handing the engines the learner's object reference."""
    import ray

    from actors.generator import EnginePool
    from selftaught.config import EngineConfig
    from trainers.grpo import learner_actor_class

    learner = learner_actor_class().options(num_cpus=1, resources={"policy_pool": 1}).remote(
        model, {"lr": 1e-5, "schedule": "constant", "warmup_frac": 0.0, "progress": False}, {}, 1, "cpu", 1)
    pool = EnginePool.start(EngineConfig(backend="transformers", device="cpu", model=model, num_actors=engines,
                                         cpus_per_actor=0.5, resources={"policy_pool": 1}))
    ray.get(learner.info.remote())
    out = {"model": model, "engines": engines, "via_driver_s": [], "by_reference_s": []}
    for _ in range(repeats):
        t = time.perf_counter()
        pool.update_weights(ray.get(learner.weights.remote()))
        out["via_driver_s"].append(round(time.perf_counter() - t, 3))
        t = time.perf_counter()
        pool.update_weights(learner.weights.remote())
        out["by_reference_s"].append(round(time.perf_counter() - t, 3))
    out["via_driver_s_median"] = statistics.median(out["via_driver_s"])
    out["by_reference_s_median"] = statistics.median(out["by_reference_s"])
    out["ratio"] = round(out["via_driver_s_median"] / out["by_reference_s_median"], 2)
    for a in pool.actors:
        ray.kill(a)
    ray.kill(learner)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="2 nodes x 16 GPUs, groups of 8 x 4 GPUs, 2-s jobs")
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--gpus-per-node", type=int, default=64)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--gpus-per-idea", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=30.0, help="each job's fixed training budget")
    ap.add_argument("--jitter", type=float, default=0.03)
    ap.add_argument("--fail-rate", type=float, default=0.05)
    ap.add_argument("--straggler-rate", type=float, default=0.05)
    ap.add_argument("--straggler-slowdown", type=float, nargs=2, default=[1.5, 3.0])
    ap.add_argument("--kill-every", type=float, default=20.0, help="seconds between worker kills (0: none)")
    ap.add_argument("--quantile", type=float, default=0.9, help="cut stragglers once this fraction is back")
    ap.add_argument("--scenarios", default="gang-all,gang-cut,stream-keep,gang-keep")
    ap.add_argument("--sync-model", default="smollm2-135m-instruct", help="'' skips the weight-sync section")
    ap.add_argument("--sync-engines", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rl-sim.json"))
    args = ap.parse_args(argv)
    if args.small:
        args.nodes, args.gpus_per_node, args.group, args.gpus_per_idea = 2, 16, 8, 4
        args.steps, args.budget_s = min(args.steps, 2), min(args.budget_s, 2.0)
        args.kill_every = min(args.kill_every, 10.0) if args.kill_every else 0.0
        args.quantile = min(args.quantile, 0.75)
        args.straggler_rate, args.straggler_slowdown = max(args.straggler_rate, 0.25), [3.0, 4.0]
    if args.group * args.gpus_per_idea > args.nodes * args.gpus_per_node:
        ap.error("the group needs more GPUs than the cluster has")

    import ray

    durations = {"budget_s": args.budget_s, "jitter": args.jitter, "startup_s": 0.0, "fail_rate": args.fail_rate,
                 "straggler_rate": args.straggler_rate, "straggler_slowdown": list(args.straggler_slowdown)}
    t0 = time.time()
    cluster = start_cluster(args.nodes, args.gpus_per_node)
    cluster_s = time.time() - t0
    res = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
           "settings": {k: v for k, v in vars(args).items()}, "durations": durations,
           "cluster": {"nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
                       "gpus": args.nodes * args.gpus_per_node, "start_s": round(cluster_s, 1)},
           "group": {"ideas": args.group, "gpus_per_idea": args.gpus_per_idea,
                     "gpus": args.group * args.gpus_per_idea}, "scenarios": {}}
    try:
        ray.init(address=cluster.address, namespace="selftaught")
        with tempfile.TemporaryDirectory() as tmp:
            model = policy_dir(Path(tmp) / "policy")
            for name in [s for s in args.scenarios.split(",") if s]:
                res["scenarios"][name] = run_scenario(name, args, cluster, model, Path(tmp) / "runs", durations)
                print(json.dumps({k: v for k, v in res["scenarios"][name].items() if k != "steps"}), flush=True)
                write(args.out, res)  # each scenario kept as it finishes
            if args.sync_model:
                res["weight_sync"] = weight_sync(args.sync_model, args.sync_engines, 3)
    finally:
        ray.shutdown()
        cluster.shutdown()
    write(args.out, res)
    return res


def write(path: str, res: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
