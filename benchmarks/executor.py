"""Research-executor overhead: what scheduling, sandboxing and journaling add to a job.

The toy environment's job sleeps a fixed time (knob ``sleep_s``), so its own run time is known
and everything above it is the executor's cost: placement, the actor call, writing the
codebase, the sandbox's start-up, the frozen evaluator, the journal and the result's way back.

    python benchmarks/executor.py                     # embedded Ray on this machine's CPUs
    python benchmarks/executor.py --ideas 24 --slots 4 --sleep 3

Reported, as JSON in ``benchmarks/results/executor.json``:

- ``latency``: ideas submitted one at a time to warm slots: wall time from submit to result,
  minus the sandboxed job's own run time (``overhead_s``), and the part of it spent in the
  sandbox set-up and evaluator (``worker_overhead_s``) versus outside the worker.
- ``throughput``: a batch of ``--ideas`` on ``--slots`` warm slots: makespan against the ideal
  (sum of run times / slots), per-idea overhead, and slot utilisation (the share of slot time
  spent running jobs).
- ``cold_start_s``: the first idea's wall time (placement group + actor start), reported apart.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from envs.base import Idea  # noqa: E402
from envs.codebase import load_packaged  # noqa: E402
from selftaught.config import RayConfig  # noqa: E402
from selftaught.runtime import init_ray  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ideas", type=int, default=12)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--sleep", type=float, default=2.0, help="the job's own run time (seconds)")
    ap.add_argument("--latency-ideas", type=int, default=4)
    ap.add_argument("--cpus-per-job", type=float, default=0.5)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "executor.json"))
    args = ap.parse_args(argv)

    res = init_ray(RayConfig(include_dashboard=False))
    run_dir = tempfile.mkdtemp(prefix="selftaught-bench-executor-")
    env = load_packaged("toy", overrides=[f"resources.cpus={args.cpus_per_job}"],
                        executor={"run_dir": run_dir, "scheduler": {"max_slots": args.slots}})
    try:
        # Cold start: slots are made on demand.
        t0 = time.monotonic()
        warm = env.value([Idea(knobs={"steps": 2, "sleep_s": 0.0}, id=f"warm-{i}") for i in range(args.slots)],
                         timeout_s=300)
        cold = time.monotonic() - t0
        assert all(r.ok for r in warm), [r.error for r in warm]

        lat = []
        for i in range(args.latency_ideas):
            [r] = env.value([Idea(knobs={"steps": 5, "sleep_s": args.sleep}, id=f"lat-{i}")], timeout_s=300)
            assert r.ok, r.error
            lat.append(r)

        batch = [Idea(knobs={"steps": 5, "sleep_s": args.sleep}, id=f"thr-{i}") for i in range(args.ideas)]
        busy0 = env.scheduler.utilisation()["busy_s"]
        t0 = time.monotonic()
        out = env.value(batch, timeout_s=600)
        makespan = time.monotonic() - t0
        busy = env.scheduler.utilisation()["busy_s"] - busy0
        assert all(r.ok for r in out), [r.error for r in out if not r.ok]
    finally:
        env.close()

    def run_s(r):
        return r.resources["run_s"]

    def eval_s(r):
        return r.resources.get("eval_s", 0.0)

    overhead = [r.wall_s - run_s(r) for r in lat]
    run_total = sum(run_s(r) for r in out)
    ideal = run_total / args.slots
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "ray_cpus": res.get("CPU"), "python": platform.python_version()},
        "settings": vars(args),
        "cold_start_s": round(cold, 3),
        "latency": {
            "job_run_s": [round(run_s(r), 3) for r in lat],
            "wall_s": [round(r.wall_s, 3) for r in lat],
            "overhead_s": [round(x, 3) for x in overhead],
            "overhead_s_median": round(statistics.median(overhead), 3),
            "evaluator_s_median": round(statistics.median(eval_s(r) for r in lat), 3),
            "sandbox_start_s_median": round(statistics.median(run_s(r) - args.sleep for r in lat), 3),
            "outside_worker_s_median": round(statistics.median(
                r.wall_s - (r.resources.get("run_s", 0) + eval_s(r)) for r in lat), 3),
        },
        "throughput": {
            "ideas": args.ideas, "slots": args.slots, "makespan_s": round(makespan, 3),
            "ideal_makespan_s": round(ideal, 3),
            "per_idea_overhead_s": round((makespan * args.slots - run_total) / args.ideas, 3),
            "slot_utilisation": round(busy / (makespan * args.slots), 3),
            "job_share_of_slot_time": round(run_total / (makespan * args.slots), 3),
            "ideas_per_minute": round(args.ideas / makespan * 60, 2),
        },
        "target": "overhead per idea at most 1 s above the job's own run time",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
