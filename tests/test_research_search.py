"""The research search (pipelines/research_search.py) on the toy environment with a mocked
litellm ideator: the exploit/explore split and its annealing, equal budget between arms, the
novelty gate, caps, resume after the driver dies, and the MLflow store."""
from __future__ import annotations

import json
import random
import re
import sqlite3
import threading
from pathlib import Path

import litellm
import pytest

from pipelines.research_search import AnnealConfig, SearchConfig, run
from selftaught.llm import LLMConfig

FIXED = {"lr": 0.1, "steps": 30}  # every answer starts with it: the novelty gate must stop the repeats
# one idea in two wordings: the novelty gate's embedding check (not the exact hash) must stop the second
PARAPHRASES = ["Print the fitted line with more digits so the log shows small changes",
               "Print the fitted line using more digits so that the log shows small changes"]
DOLLAR = {"input_price_per_mtok": 1.0, "output_price_per_mtok": 2.0}


class _Kill(BaseException):
    """Stands for the driver being killed (not an Exception: nothing on the way catches it)."""


@pytest.fixture
def mock_llm(monkeypatch):
    """litellm answers computed from the request's seed: distinct per call, identical for an
    identical request. ``state["kill_at"]`` kills the driver at that call."""
    real = litellm.completion
    state = {"n": 0, "kill_at": None}
    lock = threading.Lock()

    def fake(**kw):
        if kw.get("model") != "openai/mock-ideator":
            return real(**kw)  # the implementer and the judge answer with their own mock_response
        with lock:
            state["n"] += 1
            n = state["n"]
        if state["kill_at"] is not None and n >= state["kill_at"]:
            raise _Kill(f"driver killed at call {n}")
        prompt = kw["messages"][-1]["content"]
        m = re.search(r"JSON list of (\d+) (objects|strings)", prompt)
        k = int(m.group(1)) if m else 1
        rng = random.Random(kw.get("seed"))
        if m and m.group(2) == "strings":  # free-form ideas; batches of 3+ open with two paraphrases
            texts = [f"Variant {rng.randint(0, 10**9)}: print the fitted line with more digits" for _ in range(k)]
            if k >= 3:
                texts[:2] = PARAPHRASES
            return real(**{**kw, "mock_response": json.dumps(texts)})
        ideas = [{"lr": round(rng.uniform(0.05, 0.5), 4), "steps": rng.randint(20, 60)} for _ in range(k)]
        if k > 1:  # batches of two or more repeat FIXED; single-idea refills are fresh
            ideas[0] = FIXED
        if state.get("slow_first") and n == 1:
            ideas[1] = {**ideas[1], "sleep_s": state["slow_first"]}  # outlives its epoch's wait
        return real(**{**kw, "mock_response": json.dumps(ideas)})

    monkeypatch.setattr(litellm, "completion", fake)
    return state


def _cfg(tmp_path, name="run", **kw) -> SearchConfig:
    base = {"run_dir": str(tmp_path / name), "env": "toy",
            "executor": {"scheduler": {"max_slots": 2, "placement_timeout_s": 10}},
            "ideator": {"backend": "litellm", "batch_size": 3, "max_rounds": 1,
                        "llm": {"model": "openai/mock-ideator", "mock_response": "[]", "max_retries": 0, **DOLLAR}},
            "novelty": {"embedder": None}, "batch_size": 3, "epochs": 3,
            "exploit": {"start": 0.5, "end": 0.9}, "refill_rounds": 3, "job_timeout_s": 120}
    base.update(kw)
    return SearchConfig.model_validate(base)


def _env_rows(run_dir: Path, arm: str) -> list[tuple]:
    con = sqlite3.connect(run_dir / arm / "env" / "journal.sqlite")
    try:
        return con.execute("SELECT idea_id, state FROM ideas").fetchall()
    finally:
        con.close()


def _queued_events(run_dir: Path, arm: str) -> dict[str, int]:
    con = sqlite3.connect(run_dir / arm / "env" / "journal.sqlite")
    try:
        rows = con.execute("SELECT idea_id, COUNT(*) FROM events WHERE event='queued' GROUP BY idea_id").fetchall()
    finally:
        con.close()
    return dict(rows)


def _mlflow_children(run_dir: Path) -> list:
    """The search's idea runs, read back through MLflow's own client from the run's store."""
    from mlflow.tracking import MlflowClient

    from selftaught.research_record import tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri(run_dir))
    exp = client.get_experiment_by_name("research-search")
    return client.search_runs([exp.experiment_id], "tags.kind = 'idea'", max_results=1000)


def test_anneal_schedule():
    a = AnnealConfig(start=0.5, end=0.9)
    assert [round(a.share(t, 5), 3) for t in range(5)] == [0.0, 0.5, 0.633, 0.767, 0.9]
    assert AnnealConfig(schedule="constant", start=0.6).share(3, 5) == 0.6
    with pytest.raises(ValueError, match="run_dir"):
        SearchConfig.model_validate({"executor": {"run_dir": "x"}})


def test_example_configs_validate_and_plan_within_their_caps():
    """The offline configs and the thesis-size ones (free-form, hosted models, 8-GPU / 1-GPU
    jobs): valid, priced from litellm's map, and planned without Ray or a call."""
    from pipelines.research_search import plan
    from selftaught.config import load_yaml

    for name in ("search-toy.yaml", "search-nanogpt.yaml"):
        cfg = SearchConfig.model_validate(load_yaml(Path("examples/research") / name))
        assert cfg.ideator.backend == "local" and cfg.arms == ["evolutionary", "best_of_n"]
        p = plan(cfg)
        assert p["ideas"] == "structured" and p["usd_max"] == 0.0 and all(c["fits"] for c in p["caps"].values())
    for name, jobs, gpus in (("search-nanogpt-paper.yaml", 1600, 8), ("search-grpo-paper.yaml", 1000, 1)):
        cfg = SearchConfig.model_validate(load_yaml(Path("examples/research") / name))
        assert cfg.ideas == "free_form" and cfg.executor.implementer and cfg.judge.llm is not None
        p = plan(cfg)
        assert p["jobs"] == jobs and p["per_job"]["gpus"] == gpus and p["unpriced"] == []
        assert 0 < p["usd_max"] <= cfg.caps.total_usd  # the dollars fit even in the worst case
        assert all(v["fits"] for k, v in p["caps"].items() if k.endswith("usd") or k.startswith("role_usd"))
        assert p["caps"]["gpu_hours"]["cap"] < p["gpu_hours_max"]  # device-hours: capped below the worst case
        # every call carries a seed (distinct, cached requests); the provider refuses `seed`, litellm drops it
        from selftaught.config import SamplingConfig
        from selftaught.llm import LLMClient

        for llm in (cfg.ideator.llm, LLMConfig.model_validate(cfg.executor.implementer["llm"]), cfg.judge.llm):
            mock = LLMClient(llm.model_copy(update={"mock_response": "[]", "max_retries": 0, "api_key_env": None}))
            assert mock.chat([[{"role": "user", "content": "hi"}]], SamplingConfig(seed=3, max_new_tokens=8))[0].text == "[]"


def test_search_arms_split_novelty_budget_and_mlflow(ray_cluster, tmp_path, mock_llm):
    cfg = _cfg(tmp_path)
    s = run(cfg)
    run_dir = Path(cfg.run_dir)
    assert s["stopped"] is None
    evo, bon = s["epoch_stats"]["evolutionary"], s["epoch_stats"]["best_of_n"]
    # equal budget: N executed per epoch per arm, same totals
    assert [e["executed"] for e in evo] == [3, 3, 3] == [e["executed"] for e in bon]
    assert s["arms"]["evolutionary"]["jobs"] == s["arms"]["best_of_n"]["jobs"] == 9
    # the split: epoch 0 fresh, then floor(a(t) N) exploit with a annealed 0.5 -> 0.9
    assert evo[0]["planned"] == {"fresh": 3} and evo[0]["modes"] == {"fresh": 3}
    assert evo[1]["exploit_share"] == 0.5 and evo[1]["planned"] == {"exploit": 1, "explore": 2}
    assert evo[2]["exploit_share"] == pytest.approx(0.9) and evo[2]["planned"] == {"exploit": 2, "explore": 1}
    assert evo[2]["modes"] == {"exploit": 2, "explore": 1}
    assert all(e["planned"] == {"fresh": 3} for e in bon)
    # novelty gate: the repeated FIXED idea is rejected with its neighbour and never run again
    from pipelines.research_search import SearchJournal

    j = SearchJournal(run_dir / "search.sqlite")
    for arm in ("evolutionary", "best_of_n"):
        props = j.proposals(arm)
        fixed = [p for p in props if p["knobs"] == FIXED]
        assert fixed[0]["novel"] and len(fixed) > 1
        first_id = fixed[0]["id"]
        for p in fixed[1:]:
            assert not p["novel"] and p["verdict"]["reason"] == "exact_duplicate"
            assert p["verdict"]["neighbour"] == first_id and p["verdict"]["similarity"] == 1.0
        rows = _env_rows(run_dir, arm)
        assert len(rows) == 9 and sum(r[0] == first_id for r in rows) == 1
    # lineage: exploit ideas show ideas of earlier epochs that beat the baseline
    earlier = {p["id"] for p in j.proposals("evolutionary", before=2, novel=True)}
    for p in j.proposals("evolutionary", epoch=2, novel=True):
        if p["mode"] == "exploit":
            assert p["shown_ids"] and set(p["shown_ids"]) <= earlier
    # accounting: jobs and hours per arm in the ledger, dollars per arm per epoch
    led = s["ledger"]
    assert led["total"]["jobs"] == 18 and led["envs"]["toy:evolutionary"]["jobs"] == 9
    assert led["envs"]["toy:best_of_n"]["cpu_hours"] > 0
    assert all(e["usd"] > 0 and e["cpu_hours"] > 0 for e in evo + bon)
    assert led["roles"]["ideator"]["usd"] == pytest.approx(s["arms"]["evolutionary"]["usd"]
                                                          + s["arms"]["best_of_n"]["usd"])
    # report and MLflow: one nested run per executed idea, each with a reward metric
    report = (run_dir / "report.md").read_text()
    assert "evolutionary" in report and "best_of_n" in report and "Baseline" in report
    assert (run_dir / "search.png").stat().st_size > 0 and "```diff" in report
    kids = _mlflow_children(run_dir)
    assert len(kids) == 18
    from mlflow.tracking import MlflowClient

    from selftaught.research_record import tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri(run_dir))
    for k in kids:
        assert "reward" in k.data.metrics and k.data.params["mode"] in ("fresh", "exploit", "explore")
        assert k.data.tags["mlflow.parentRunId"] and k.info.status in ("FINISHED", "FAILED")
        assert "idea.json" in {a.path for a in client.list_artifacts(k.info.run_id)}
    parents = client.search_runs([kids[0].info.experiment_id], "tags.kind = 'arm'")
    assert sorted(p.info.run_name for p in parents) == ["best_of_n", "evolutionary"]
    best = [m.value for m in client.get_metric_history(parents[0].info.run_id, "best_so_far")]
    assert len(best) == 3 and best == sorted(best)  # one point per epoch, never decreasing


def test_resume_after_driver_killed(ray_cluster, tmp_path, mock_llm):
    cfg = _cfg(tmp_path, "resume", epochs=2)
    mock_llm["kill_at"] = 4  # epoch 0: one call per arm; epoch 1 evolutionary: exploit ok, explore killed
    with pytest.raises(_Kill):
        run(cfg)
    run_dir = Path(cfg.run_dir)
    from selftaught.ledger import Ledger

    paid_before = Ledger.for_run(run_dir).snapshot()["roles"]["ideator"]
    calls_before = mock_llm["n"]
    mock_llm["kill_at"] = None
    s = run(cfg)
    assert s["stopped"] is None
    assert [e["executed"] for e in s["epoch_stats"]["evolutionary"]] == [3, 3]
    assert [e["executed"] for e in s["epoch_stats"]["best_of_n"]] == [3, 3]
    for arm in ("evolutionary", "best_of_n"):
        q = _queued_events(run_dir, arm)
        assert len(q) == 6 and set(q.values()) == {1}  # every idea executed exactly once
    role = s["ledger"]["roles"]["ideator"]
    assert role["cache_hits"] >= 1  # the re-proposed exploit call was answered by the cache
    assert paid_before["calls"] == 3 and role["calls"] == 3 + (mock_llm["n"] - calls_before)  # none paid twice
    assert s["ledger"]["total"]["jobs"] == 12  # no compute charged twice
    assert len(_mlflow_children(run_dir)) == 12


# the implementer's answer to every free-form idea: an edit of the training code (not its config)
EDIT = """Print the fit with more digits.

```python
main.py
<<<<<<< SEARCH
print(f"fitted w={w:.4f} b={b:.4f} after {steps} steps")
=======
print(f"fitted w={w:.6f} b={b:.6f} after {steps} steps")
>>>>>>> REPLACE
```
"""


def test_free_form_search_with_implementer_and_llm_judge(ray_cluster, tmp_path, mock_llm):
    """Text ideas -> the novelty gate (MiniLM + FAISS) -> the implementer's edit -> the sandboxed
    job; the judge sorts them (code edits are not config-only, so every one goes to the judge,
    charged to role judge)."""
    price = {"model": "openai/mock-judge", "max_retries": 0, **DOLLAR}
    cfg = _cfg(tmp_path, "free", epochs=1, ideas="free_form", novelty={"embedder": "minilm", "threshold": 0.98},
               executor={"scheduler": {"max_slots": 2, "placement_timeout_s": 10},
                         "implementer": {"samples": 1, "max_revisions": 0, "mock_responses": [EDIT],
                                         "llm": {**price, "model": "openai/mock-implementer"}}},
               judge={"llm": {**price, "mock_response": '{"kind": "algorithmic", "reason": "mocked"}'}})
    s = run(cfg)
    assert s["stopped"] is None and s["estimate"]["judge_usd"] > 0 and s["estimate"]["implementer_usd"] > 0
    assert s["estimate"]["usd"] > s["estimate"]["ideator_usd"]
    for arm in ("evolutionary", "best_of_n"):
        assert s["arms"][arm]["executed"] == 3 and s["arms"][arm]["ok"] == 3
        assert s["arms"][arm]["kinds"] == {"algorithmic": 3} and s["arms"][arm]["judge_usd"] > 0
        assert s["epoch_stats"][arm][0]["kinds"] == {"algorithmic": 3}
    from pipelines.research_search import SearchJournal

    j = SearchJournal(Path(cfg.run_dir) / "search.sqlite")
    for arm in ("evolutionary", "best_of_n"):  # the paraphrase: rejected with its neighbour, never run
        props = j.proposals(arm)
        first, second = (next(p for p in props if p["text"] == t) for t in PARAPHRASES)
        assert first["novel"] and not second["novel"] and second["verdict"]["reason"] == "near_duplicate"
        assert second["verdict"]["neighbour"] == first["id"] and second["verdict"]["similarity"] >= 0.98
        assert second["id"] not in {i for i, _ in _env_rows(Path(cfg.run_dir), arm)}
        assert s["epoch_stats"][arm][0]["rejected"] == 1
    roles = s["ledger"]["roles"]
    judged = roles["judge"]["calls"] + roles["judge"]["cache_hits"]
    assert judged == 6 and roles["judge"]["calls"] >= 5  # the first paraphrase in both arms: one request
    impl = roles["implementer"]  # its own role; the first paraphrase's edit is paid once for both arms
    assert impl["calls"] >= 5 and impl["calls"] + impl["cache_hits"] >= 6 and impl["usd"] > 0
    report = (Path(s["run_dir"]) / "report.md").read_text()
    assert "0 / 3 / 0 (0% hyper-parameter)" in report and "+print(f\"fitted w={w:.6f}" in report
    kids = _mlflow_children(Path(cfg.run_dir))
    assert len(kids) == 6 and all(k.data.params["mode"] == "fresh" for k in kids)


def test_a_misconfigured_ideator_stops_the_run_instead_of_finishing_empty(ray_cluster, tmp_path, mock_llm):
    """A provider that refuses a parameter fails every call alike: the run stops (resumably),
    nothing is marked done and nothing runs."""
    ideator = {"backend": "litellm", "batch_size": 3, "max_rounds": 1,
               "llm": {"model": "anthropic/claude-sonnet-4-5", "mock_response": "[]", "max_retries": 0}}
    s = run(_cfg(tmp_path, "refused", epochs=2, ideator=ideator))
    assert s["stopped"]["cap"] == "ideator" and "seed" in s["stopped"]["message"]
    assert s["arms"]["evolutionary"]["executed"] == 0 and s["epoch_stats"]["evolutionary"] == []
    assert "Stopped early" in (Path(s["run_dir"]) / "report.md").read_text()


def test_a_job_outliving_its_epoch_is_collected_later_and_charged(ray_cluster, tmp_path, mock_llm):
    """The epoch's wait ends while one job still runs: it is not recorded as a failure, it is
    collected by a later wait (its own epoch's figures include it) and its compute is charged."""
    mock_llm["slow_first"] = 6.0
    s = run(_cfg(tmp_path, "slow", epochs=2, job_timeout_s=3.0))
    evo = s["epoch_stats"]["evolutionary"]
    assert s["stopped"] is None and [e["executed"] for e in evo] == [3, 3]
    assert s["arms"]["evolutionary"]["still_running"] == 0
    from pipelines.research_search import SearchJournal

    j = SearchJournal(Path(s["run_dir"]) / "search.sqlite")
    slow = [r for r in j.results("evolutionary") if r["result"]["status"] == "ok" and r["cpu_hours"] * 3600 > 2.5]  # 0.5 CPU x 6 s
    assert len(slow) == 1 and slow[0]["epoch"] == 0 and slow[0]["charged"]


def test_cost_cap_stops_cleanly(ray_cluster, tmp_path, mock_llm):
    cfg = _cfg(tmp_path, "cap", caps={"total_usd": 0.001},
               ideator={"backend": "litellm", "batch_size": 3, "max_rounds": 1,
                        "llm": {"model": "openai/mock-ideator", "mock_response": "[]", "max_retries": 0,
                                "input_price_per_mtok": 1e6, "output_price_per_mtok": 1e6}})
    s = run(cfg)
    assert s["stopped"]["cap"] in ("total_usd", "role_usd[ideator]")
    assert s["estimate"]["usd"] > 0.001 and s["estimate"]["fits"] is False
    assert mock_llm["n"] == 0 and s["ledger"]["total"]["jobs"] == 0
    report = (Path(cfg.run_dir) / "report.md").read_text()
    assert "Stopped early" in report and "total_usd" in report


def test_jobs_cap_stops_mid_epoch_with_the_arms_still_equal(ray_cluster, tmp_path, mock_llm):
    cfg = _cfg(tmp_path, "jobs", caps={"jobs": 4}, epochs=2)
    s = run(cfg)
    assert s["stopped"]["cap"] == "jobs"
    assert s["ledger"]["total"]["jobs"] == 4
    assert s["arms"]["evolutionary"]["executed"] == 2 == s["arms"]["best_of_n"]["executed"]  # 6 wanted, 4 allowed
    assert "Stopped early" in (Path(cfg.run_dir) / "report.md").read_text()
