"""What a search costs per executed idea, and what a killed-and-resumed search pays, on the
mock path: the free-form toy search with every LLM answered through litellm's
``mock_response`` (ideas computed from each request's seed, a fixed code edit, a fixed
verdict) and priced at declared hosted-model rates, so tokens and dollars are counted by the
real client, cache and ledger (the mock's constant token usage is replaced by counts from
litellm's tokenizer, as a provider would report them).

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.research_search [--out FILE]

Runs the same config twice in fresh run directories: once straight through, once killed at
the ideator's ``--kill-at``-th call (a BaseException from inside litellm, as a dead driver)
and rerun. Writes JSON: dollars and tokens per role per executed idea, and for the resumed
run the calls paid before and after the kill, cache hits, how often each idea ran, and the
dollars against the uninterrupted run.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

# hosted-model list prices (USD per 1M tokens), declared so the mock calls are priced
IDEATOR_PRICE = {"input_price_per_mtok": 3.0, "output_price_per_mtok": 15.0}
JUDGE_PRICE = {"input_price_per_mtok": 0.15, "output_price_per_mtok": 0.6}
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
TOPICS = ["learning-rate warm-up", "momentum on the updates", "centred inputs", "least-squares init",
          "gradient clipping", "iterate averaging", "a decaying step size", "Nesterov steps"]


class Killed(BaseException):
    """The driver dying mid-call (nothing on the way catches a BaseException)."""


def patch_litellm(state: dict) -> None:
    """Answer the ideator's requests from their seed (distinct per call, identical for an
    identical request); every other model answers with its own ``mock_response``."""
    import litellm

    real = litellm.completion
    lock = threading.Lock()

    def counted(kw: dict):
        """litellm's mock usage is a constant (10 + 20 tokens): count what a provider would."""
        resp = real(**kw)
        text = resp.choices[0].message.content or ""
        resp.usage.prompt_tokens = litellm.token_counter(model="gpt-4o", messages=kw["messages"])
        resp.usage.completion_tokens = litellm.token_counter(model="gpt-4o", text=text, count_response_tokens=True)
        resp.usage.total_tokens = resp.usage.prompt_tokens + resp.usage.completion_tokens
        return resp

    def fake(**kw):
        if kw.get("model") != "openai/mock-ideator":
            return counted(kw)
        with lock:
            state["n"] += 1
            n = state["n"]
        if state.get("kill_at") and n >= state["kill_at"]:
            raise Killed(f"driver killed at ideator call {n}")
        m = re.search(r"JSON list of (\d+)", kw["messages"][-1]["content"])
        rng = random.Random(kw.get("seed"))
        ideas = [f"Try {rng.choice(TOPICS)} with setting {rng.randint(0, 10**6)} and log the fit"
                 for _ in range(int(m.group(1)) if m else 1)]
        return counted({**kw, "mock_response": json.dumps(ideas)})

    litellm.completion = fake


def config(run_dir: Path) -> dict:
    llm = {"max_retries": 0, "max_tokens": 1024}
    return {
        "run_dir": str(run_dir), "env": "toy", "ideas": "free_form", "novelty": {"embedder": None},
        "executor": {"scheduler": {"max_slots": 2, "placement_timeout_s": 30},
                     "implementer": {"samples": 1, "max_revisions": 0, "mock_responses": [EDIT],
                                     "llm": {**llm, **IDEATOR_PRICE, "model": "openai/mock-implementer"}}},
        "ideator": {"backend": "litellm", "batch_size": 3, "max_rounds": 1,
                    "llm": {**llm, **IDEATOR_PRICE, "model": "openai/mock-ideator", "mock_response": "[]"}},
        "judge": {"llm": {**llm, **JUDGE_PRICE, "model": "openai/mock-judge",
                          "mock_response": '{"kind": "algorithmic", "reason": "changes the training script"}'}},
        "batch_size": 3, "epochs": 3, "job_timeout_s": 300}


def runs_per_idea(run_dir: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for arm in ("evolutionary", "best_of_n"):
        con = sqlite3.connect(run_dir / arm / "env" / "journal.sqlite")
        for i, c in con.execute("SELECT idea_id, COUNT(*) FROM events WHERE event='queued' GROUP BY idea_id"):
            out[f"{arm}:{i}"] = c
        con.close()
    return out


def per_idea(summary: dict) -> dict:
    executed = sum(a["executed"] for a in summary["arms"].values())
    roles = summary["ledger"]["roles"]
    return {"executed": executed,
            "usd_per_idea": {r: v["usd"] / executed for r, v in roles.items()},
            "tokens_per_idea": {r: (v["prompt_tokens"] + v["completion_tokens"]) / executed for r, v in roles.items()},
            "usd_total": sum(v["usd"] for v in roles.values()),
            "calls": {r: v["calls"] for r, v in roles.items()},
            "cache_hits": {r: v["cache_hits"] for r, v in roles.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/research-search-mock.json")
    ap.add_argument("--kill-at", type=int, default=4,
                    help="ideator call at which the driver dies (4: epoch 1 explore, after its exploit call was paid)")
    args = ap.parse_args()
    from pipelines.research_search import SearchConfig, run
    from selftaught.ledger import Ledger
    from selftaught.runtime import init_ray

    init_ray()
    state: dict = {"n": 0, "kill_at": None}
    patch_litellm(state)
    root = Path(tempfile.mkdtemp(prefix="search-bench-"))

    t0 = time.time()
    straight = run(SearchConfig.model_validate(config(root / "straight")))
    straight_s = time.time() - t0

    state.update(n=0, kill_at=args.kill_at)
    cfg = SearchConfig.model_validate(config(root / "resumed"))
    t0 = time.time()
    try:
        run(cfg)
        raise SystemExit("the kill did not happen: lower --kill-at")
    except Killed:
        pass
    killed_s = time.time() - t0
    before = Ledger.for_run(cfg.run_dir).snapshot()
    state["kill_at"] = None
    t0 = time.time()
    resumed = run(cfg)
    resume_s = time.time() - t0
    ran = runs_per_idea(Path(cfg.run_dir))

    a, b = per_idea(straight), per_idea(resumed)
    out = {
        "what": "free-form toy search, 2 arms x 3 epochs x 3 ideas; ideator and implementer priced at "
                "$3/$15 per Mtok, judge at $0.15/$0.60; all answers via litellm mock_response",
        "uninterrupted": {**a, "wall_s": round(straight_s, 1)},
        "killed_and_resumed": {
            **b, "killed_at_ideator_call": args.kill_at,
            "wall_s_until_kill": round(killed_s, 1), "wall_s_resume": round(resume_s, 1),
            "paid_before_kill": {r: {"calls": v["calls"], "usd": v["usd"]} for r, v in before["roles"].items()},
            "jobs_charged_before_kill": before["total"]["jobs"], "jobs_charged_total": resumed["ledger"]["total"]["jobs"],
            "ideas_run_more_than_once": sum(c > 1 for c in ran.values()), "ideas_run": len(ran),
            "usd_vs_uninterrupted": b["usd_total"] / a["usd_total"] if a["usd_total"] else None},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
