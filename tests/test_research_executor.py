"""The research executor on the embedded Ray: structured ideas end to end on the toy
environment, streaming, gang placement and its timeout, infrastructure retries after a worker
dies, protected files, and resuming from the journal after the driver goes away."""
from __future__ import annotations

import json
import time

import pytest

from envs.base import Idea, make_env
from envs.codebase import ExecutorConfig, load_packaged
from envs.journal import Journal


@pytest.fixture
def toy(ray_cluster, tmp_path):
    env = load_packaged("toy", executor=ExecutorConfig(run_dir=str(tmp_path / "run"),
                                                       scheduler={"max_slots": 2, "placement_timeout_s": 5}))
    yield env
    env.close()


def test_structured_ideas_end_to_end(toy):
    good, weak, bad = {"knobs": {"lr": 0.1, "steps": 80}}, {"knobs": {"lr": 0.01, "steps": 3}}, {"knobs": {"lr": 9}}
    results = toy.value([good, weak, bad], timeout_s=120)
    assert [r.status for r in results] == ["ok", "ok", "idea_failed"]
    assert results[0].reward > 0.95 > results[1].reward > 0  # the evaluator's honest ordering
    assert results[0].metrics["val_mse"] < 0.05
    assert results[2].stage == "apply" and "maximum" in results[2].error
    assert '"lr": 0.1' in results[0].edit and results[0].edit.startswith("--- a/config.json")
    r = results[0].resources
    assert r["limits_by"] in ("cgroup-v1", "cgroup-v2", "rlimit") and r["run_s"] > 0 and r["eval_s"] > 0
    assert results[0].wall_s > 0


def test_registry_and_context(ray_cluster, tmp_path):
    env = make_env("toy", executor={"run_dir": str(tmp_path / "r")})
    try:
        ctx = env.context()
        assert "Fit a straight line" in ctx and "main.py" in ctx and '"lr"' in ctx
        assert "evaluator" not in ctx.lower() or "frozen evaluator" in ctx.lower()
        assert env.idea_schema()["type"] == "object"
        task = env.task_text()  # what the implementer gets beside its own file listing: no code twice
        assert ctx.startswith(task) and "### main.py" not in task and "Fit a straight line" in task
        assert "### main.py" in ctx and "gw = sum" not in task
        with pytest.raises(ValueError, match="implementer"):
            env.submit(["a free-form idea with no implementer configured"])
    finally:
        env.close()
    with pytest.raises(KeyError, match="unknown environment"):
        make_env("no-such-env")


def test_results_stream_in_completion_order(toy):
    slow = Idea(knobs={"sleep_s": 3.0})
    fast = Idea(knobs={"steps": 10})
    ids = toy.submit([slow, fast])
    order = [r.idea_id for r in toy.stream(ids, timeout_s=120)]
    assert order == [fast.id, slow.id]  # the straggler does not hold the fast result back


def test_gang_placement_timeout_is_an_infra_failure(ray_cluster, tmp_path):
    env = load_packaged("toy", overrides=["resources.gpus=8"],
                        executor={"run_dir": str(tmp_path / "gpu"), "scheduler": {"placement_timeout_s": 3}})
    try:
        t0 = time.monotonic()
        [res] = env.value([{"knobs": {"steps": 2}}], timeout_s=60)
        assert res.status == "infra_failed" and res.stage == "placement"
        assert "GPU" in res.error and time.monotonic() - t0 < 30
    finally:
        env.close()


def test_a_gang_is_reserved_whole_used_first_and_held_and_cancel_frees_its_slot(ray_cluster, tmp_path):
    """Rollout groups: one placement group of N bundles, all or nothing; jobs run on its slots,
    which survive idleness; a cancelled running job gets a fresh worker in the same bundle."""
    env = load_packaged("sim", overrides=["resources.gpus=0", "resources.cpus=0.25",
                                          "base_config.durations={budget_s: 0.3}"],
                        executor={"run_dir": str(tmp_path / "sim"),
                                  "scheduler": {"max_slots": 1, "idle_shutdown_s": 0.5}})
    sched = env.scheduler
    try:
        with pytest.raises(TimeoutError, match="was not placed"):  # 40 CPUs: more than the cluster has
            sched.reserve("too-big", 40, cpus=1.0)
            sched.wait_reserved("too-big", 2)
        sched.release("too-big")
        sched.reserve("group", 3, cpus=0.25)
        assert sched.wait_reserved("group", 60) < 60
        ideas = [Idea(knobs={"lr_scale": 2.0, "warmup_frac": w}) for w in (0.0, 0.1, 0.2)]
        results = env.value(ideas, timeout_s=120)
        assert [r.status for r in results] == ["ok"] * 3 and results[1].reward == pytest.approx(1.0)
        assert {t["gang"] for t in sched.trace} == {"group"} and len({t["slot"] for t in sched.trace}) == 3
        assert all(t["dispatch_s"] < 5 and t["run_s"] > 0.25 for t in sched.trace)
        time.sleep(1.5)  # past idle_shutdown_s: a gang's slots are held anyway
        assert sched.utilisation()["gangs"] == {"group": 3} and sched.utilisation()["slots"] == 3
        slow = env.submit([Idea(knobs={"lr_scale": 1.0, "warmup_frac": 0.3})], seed=7)
        env.cancel([])  # nothing to do
        end = time.monotonic() + 30
        while not sched.utilisation()["busy"] and time.monotonic() < end:
            time.sleep(0.05)
        assert env.cancel(slow) == 1
        [res] = env.gather(slow, timeout_s=30)
        assert res.status == "infra_failed" and res.stage == "cancelled"
        # the bundle gets a fresh worker, and the cancelled idea runs again when resubmitted
        assert sched.wait_reserved("group", 60) < 60
        [again] = env.gather(env.submit([Idea(knobs={"lr_scale": 1.0, "warmup_frac": 0.3})], seed=7), timeout_s=60)
        assert again.status == "ok"
        sched.release("group")
        assert sched.utilisation()["slots"] == 0
    finally:
        env.close()


def test_dead_worker_is_retried_elsewhere(toy):
    import ray

    idea = Idea(knobs={"sleep_s": 4.0, "steps": 40})
    [iid] = toy.submit([idea])
    sched = toy.scheduler
    deadline = time.monotonic() + 60
    victim = None
    while time.monotonic() < deadline and victim is None:
        with sched._lock:
            victim = next((s for s in sched._slots if s.job is not None and s.actor is not None), None)
        time.sleep(0.2)
    assert victim is not None
    time.sleep(1.5)  # inside the job's sleep
    ray.kill(victim.actor, no_restart=True)
    [res] = toy.gather([iid], timeout_s=120)
    assert res.status == "ok" and res.reward > 0.9, (res.stage, res.error, res.logs)
    assert res.resources["tries"] == 2
    assert sched.utilisation()["slots_lost"] == 1 and sched.utilisation()["infra_retries"] == 1


def test_structured_idea_cannot_touch_frozen_entry(toy):
    files, _ = toy.apply_knobs({"lr": 0.2})
    assert files["run.sh"] == toy.baseline_files["run.sh"]
    assert "run.sh" in toy.protected_hashes


def test_journal_resume_reuses_and_reconciles(ray_cluster, tmp_path):
    run = tmp_path / "resume"
    env = load_packaged("toy", executor={"run_dir": str(run)})
    first = env.value([{"knobs": {"steps": 30}}], timeout_s=120)[0]
    assert first.ok
    env.close()

    # A job that finished while no driver listened: its outcome is on disk, the journal says running.
    env2 = load_packaged("toy", executor={"run_dir": str(run)})
    orphan = Idea(knobs={"steps": 31})
    j = Journal(run / "journal.sqlite")
    j.submit(env2.fp, "toy", orphan.to_dict())
    files, diff = env2.apply_knobs(orphan.knobs)
    j.set_state(env2.fp, orphan.id, "running", job_id="job-orphan", edit={"files": files, "diff": diff, "attempts": []})
    (run / "jobs" / "job-orphan").mkdir(parents=True)
    (run / "jobs" / "job-orphan" / "outcome.json").write_text(json.dumps(
        {"status": "ok", "value": 0.5, "metrics": {"val_mse": 1.0}, "logs": {}, "resources": {}}))
    j.close()
    try:
        again, rec = env2.value([{"knobs": {"steps": 30}}, orphan], timeout_s=60)
        assert again.reward == first.reward and again.metrics.get("reused") is True
        assert rec.ok and rec.reward == 0.5  # reconciled from the outcome, never run a second time
        events = [e["event"] for e in env2.journal.events(env2.fp, orphan.id)]
        assert "reconciled" in events and events[-1] == "finished"
        assert env2.scheduler.utilisation()["submitted"] == 0
    finally:
        env2.close()


def test_duplicate_submissions_run_once(toy):
    from concurrent.futures import ThreadPoolExecutor

    idea = {"knobs": {"steps": 12, "sleep_s": 1.0}}
    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda _: toy.submit([idea])[0], range(4)))
    assert len(set(ids)) == 1
    results = [toy.gather([ids[0]], timeout_s=60)[0] for _ in range(2)]  # two callers, same result
    assert results[0].ok and results[0] is results[1]
    assert toy.scheduler.utilisation()["submitted"] == 1
    seeded = toy.submit([idea], seed=5)
    assert seeded[0] != ids[0] and seeded[0].endswith("-s5")


def test_infra_failures_are_retried_on_resubmission(ray_cluster, tmp_path):
    env = load_packaged("toy", executor={"run_dir": str(tmp_path / "infra")})
    try:
        idea = Idea(knobs={"steps": 9})
        env.journal.submit(env.fp, "toy", idea.to_dict())
        env.journal.finish(env.fp, idea.id, {"idea_id": idea.id, "status": "infra_failed", "stage": "placement"})
        [res] = env.value([idea], timeout_s=60)
        assert res.ok and not res.metrics.get("reused")
    finally:
        env.close()


def test_spec_refuses_credentials_and_escaping_paths():
    from envs.spec import CodebaseEnvSpec

    base = {"name": "x", "description": "d", "evaluator": {"module": "m"}}
    with pytest.raises(ValueError, match="credential"):
        CodebaseEnvSpec.model_validate({**base, "env": {"OPENAI_API_KEY": "sk-1"}})
    with pytest.raises(ValueError, match="inside the environment"):
        CodebaseEnvSpec.model_validate({**base, "artifacts": "../out"})
    assert CodebaseEnvSpec.model_validate({**base, "env": {"MAX_TOKENS": "5"}}).env == {"MAX_TOKENS": "5"}
