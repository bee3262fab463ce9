"""Our metrics end to end: a fresh Ray (its own process, so that its metrics report interval can
be 1 s; the session's embedded Ray keeps Ray's default) runs a tiny generator actor, an
EngineLoop, one research job of the toy environment and a cost ledger; the node's Prometheus
endpoint must then show every ``ray_selftaught_*`` series with the values those calls imply.
And without Ray (not importable, or imported but not initialised) every helper is a no-op."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import asyncio, json, sys, tempfile, time, urllib.request
import ray
from actors.engine import create_engine
from actors.engine.runner import EngineLoop
from actors.generator import EnginePool
from envs.base import Idea
from envs.codebase import load_packaged
from selftaught.config import EngineConfig, SamplingConfig
from selftaught.ledger import Ledger
from selftaught.net import free_port

model, run_dir = sys.argv[1], sys.argv[2]
port = free_port()
ray.init(address="local", num_cpus=3, include_dashboard=False, _metrics_export_port=port)
greedy = SamplingConfig(temperature=0, max_new_tokens=6, ignore_eos=True)
cfg = EngineConfig(backend="transformers", model=model, max_batch_size=4, cpus_per_actor=1)
pool = EnginePool.start(cfg, num_actors=1, timeout_s=120)
env = load_packaged("toy", executor={"run_dir": run_dir + "/research", "scheduler": {"max_slots": 1}})
ids = env.submit([Idea(knobs={"lr": 0.1, "steps": 40}), Idea(knobs={"lr": 9})])  # ok, idea_failed
outs = pool.generate(["alpha", "beta", "gamma"], greedy)  # 3 requests x 6 tokens on the actor

loop = EngineLoop(create_engine(cfg))  # what a Serve replica runs
async def two():
    return await asyncio.gather(*(loop.generate(p, greedy) for p in ("one", "two")))
asyncio.run(two())
loop.close()

ledger = Ledger(run_dir + "/ledger.sqlite")
ledger.settle(ledger.reserve_usd("ideator", 1.0), usd=0.25, prompt_tokens=10, completion_tokens=5)
ledger.add_llm("ideator", usd=0.5)
ledger.record_hit("judge", saved_usd=0.1)
results = env.gather(ids, timeout_s=120)
done = time.monotonic()

want = {"ray_selftaught_engine_requests", "ray_selftaught_generated_tokens", "ray_selftaught_engine_batch_latency_s",
        "ray_selftaught_engine_inflight_requests", "ray_selftaught_engine_queue_depth", "ray_selftaught_jobs_running",
        "ray_selftaught_jobs_queued", "ray_selftaught_scheduler_slots", "ray_selftaught_jobs_finished",
        "ray_selftaught_ideas_evaluated", "ray_selftaught_llm_calls", "ray_selftaught_llm_cost_usd",
        "ray_selftaught_llm_spent_usd"}
from prometheus_client.parser import text_string_to_metric_families
end, text = time.monotonic() + 30, ""
while time.monotonic() < end:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    if want <= names and time.monotonic() - done > 3.5:  # > 3 report intervals after the last record
        break
    time.sleep(0.5)
print("RESULT " + json.dumps({"status": [r.status for r in results], "waited_s": round(time.monotonic() - done, 1),
                              "tokens": sum(c.num_tokens for o in outs for c in o.completions),
                              "metrics": [l for l in text.splitlines() if "selftaught" in l]}))
env.close()
ray.shutdown()
'''


def _samples(lines: list[str]) -> list[tuple[str, dict, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families("\n".join(lines) + "\n")
            for s in f.samples]


def _value(samples, name: str, **labels: str) -> float:
    """Sum over the series of ``name`` whose labels include ``labels`` (several worker processes)."""
    got = [v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]
    assert got, f"no {name}{labels} among {sorted({n for n, _, _ in samples})}"
    return sum(got)


def test_metrics_reach_the_nodes_prometheus_endpoint(tiny_lm_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "RAY_metrics_report_interval_ms": "1000"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_lm_dir), str(tmp_path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=240)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, out.stdout[-2000:] + out.stderr[-4000:]
    res = json.loads(line[len("RESULT "):])
    assert res["status"] == ["ok", "idea_failed"] and res["tokens"] == 18
    s = _samples(res["metrics"])
    model = str(tiny_lm_dir)
    # generator actor: 3 requests of 6 tokens in one batch call, nothing in flight afterwards
    assert _value(s, "ray_selftaught_engine_requests_total", model=model, kind="actor") == 3
    assert _value(s, "ray_selftaught_generated_tokens_total", model=model, kind="actor") == 18
    assert _value(s, "ray_selftaught_engine_batch_latency_s_count", model=model, kind="actor") == 1
    assert _value(s, "ray_selftaught_engine_batch_latency_s_sum", model=model, kind="actor") > 0
    # a gauge last set > 3 report intervals ago is still there: the keep-alive thread re-records it
    assert _value(s, "ray_selftaught_engine_inflight_requests", model=model, kind="actor") == 0
    # the EngineLoop: 2 requests of 6 tokens, queue drained
    assert _value(s, "ray_selftaught_engine_requests_total", kind="serve") == 2
    assert _value(s, "ray_selftaught_generated_tokens_total", kind="serve") == 12
    assert _value(s, "ray_selftaught_engine_queue_depth", kind="serve") == 0
    # the scheduler: the valid idea ran as a job (the invalid one failed before it was queued)
    assert _value(s, "ray_selftaught_jobs_finished_total", status="ok") == 1
    assert _value(s, "ray_selftaught_jobs_running") == 0 and _value(s, "ray_selftaught_jobs_queued") == 0
    assert _value(s, "ray_selftaught_scheduler_slots") == 1  # its slot is kept until idle_shutdown_s
    assert _value(s, "ray_selftaught_ideas_evaluated_total", env="toy", status="ok") == 1
    assert _value(s, "ray_selftaught_ideas_evaluated_total", env="toy", status="idea_failed") == 1
    # the ledger: two paid calls and a cache hit; dollars by this process and so far in the file
    assert _value(s, "ray_selftaught_llm_calls_total", role="ideator", result="paid") == 2
    assert _value(s, "ray_selftaught_llm_calls_total", role="judge", result="cache_hit") == 1
    assert abs(_value(s, "ray_selftaught_llm_cost_usd_total", role="ideator") - 0.75) < 1e-9
    assert abs(_value(s, "ray_selftaught_llm_spent_usd", role="ideator", ledger=tmp_path.name) - 0.75) < 1e-9


NO_RAY = r'''
import sys, threading
sys.modules["ray"] = None  # "import ray" now raises ImportError: a machine without Ray
from selftaught import metrics
from actors.generator import EngineHost
from actors.engine.runner import EngineLoop  # noqa: F401
from selftaught.ledger import Ledger
assert not metrics.ray_active()
host = EngineHost({"backend": "transformers", "model": sys.argv[1], "max_batch_size": 2})
out = host.generate(["alpha", "beta"], {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True})
assert [len(o["completions"][0]["token_ids"]) for o in out] == [3, 3]
ledger = Ledger(sys.argv[2])
ledger.settle(ledger.reserve_usd("ideator", 1.0), usd=0.25)
assert ledger.snapshot()["roles"]["ideator"]["usd"] == 0.25
del sys.modules["ray"]
import ray  # importable, not initialised: still nothing recorded
for m in (metrics.GENERATED_TOKENS, metrics.JOBS_FINISHED):
    m.inc(2, {"model": "m", "kind": "actor", "status": "ok"})
metrics.JOBS_RUNNING.set(3)
metrics.JOBS_QUEUED.add(1)
metrics.ENGINE_BATCH_LATENCY.observe(0.5, {"model": "m", "kind": "actor"})
with metrics.engine_call("m", "actor", 2) as served:
    served(out)
assert not ray.is_initialized()
created = [m.name for m in vars(metrics).values() if isinstance(m, metrics._Metric) and m._impl is not None]
assert not created and not metrics._live, (created, metrics._live)
assert not any(t.name == "selftaught-metrics" for t in threading.enumerate())
print("NO-OP OK")
'''


def test_helpers_are_no_ops_without_ray(tiny_lm_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", NO_RAY, str(tiny_lm_dir), str(tmp_path / "ledger.sqlite")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "NO-OP OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
