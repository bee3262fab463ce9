"""Free-form ideas on the shipped nanoGPT environment, end to end: scripted LLM answers
(litellm mock_response through the real client) holding real edits of its codebase. One
applies, one needs a revision, one breaks the code (caught by the smoke run, never queued),
one touches the frozen evaluator server (refused). The two that work train, are scored by the
frozen one-token-at-a-time evaluator, and come back with a real value."""
from __future__ import annotations

import pytest

from actors.scheduler import Scheduler, SchedulerConfig
from envs.codebase import load_packaged

SILU = '''Use SiLU instead of GELU in the MLP.

model.py
<<<<<<< SEARCH
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))
=======
        return self.dropout(self.c_proj(F.silu(self.c_fc(x))))
>>>>>>> REPLACE
'''
WRONG_SEARCH = '''model.py
<<<<<<< SEARCH
        return self.c_proj(F.relu(self.c_fc(x)))
=======
        return self.c_proj(F.relu(self.c_fc(x)) ** 2)
>>>>>>> REPLACE
'''
RELU2 = '''model.py
<<<<<<< SEARCH
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))
=======
        return self.dropout(self.c_proj(F.relu(self.c_fc(x)) ** 2))
>>>>>>> REPLACE
'''
BROKEN = '''model.py
<<<<<<< SEARCH
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))
=======
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x)[:, :, :7])))
>>>>>>> REPLACE
'''
EVAL_SERVER = '''eval_server.py
<<<<<<< SEARCH
import
=======
import os
import
>>>>>>> REPLACE
'''

SHORT = ["time_budget_s=4", "time_limit_s=60", 'evaluator.args=["--seqs","8","--seq-len","32","--time-limit","40"]',
         "evaluator.time_limit_s=50"]


def _env(name: str, answers: list[str], sched: Scheduler, tmp_path, revisions: int):
    return load_packaged("nanogpt", overrides=SHORT, scheduler=sched, executor={
        "run_dir": str(tmp_path / name),
        "implementer": {"samples": 1, "max_revisions": revisions, "mock_responses": answers,
                        "llm": {"model": "openai/gpt-4o-mini", "input_price_per_mtok": 0.15,
                                "output_price_per_mtok": 0.6, "max_retries": 0}}})


@pytest.mark.timeout(600)
def test_free_form_ideas_on_nanogpt(ray_cluster, tmp_path):
    sched = Scheduler(SchedulerConfig(max_slots=2, placement_timeout_s=120))
    cases = {
        "applies": ([SILU], 0, "Use SiLU in the MLP"),
        "needs_revision": ([WRONG_SEARCH, RELU2], 1, "Use squared ReLU in the MLP"),
        "breaks_the_code": ([BROKEN], 0, "Slice the MLP's hidden layer"),
        "touches_evaluator": ([EVAL_SERVER], 1, "Make the evaluation server faster"),
    }
    envs = {n: _env(n, answers, sched, tmp_path, rev) for n, (answers, rev, _) in cases.items()}
    try:
        ids = {n: envs[n].submit([text])[0] for n, (_, _, text) in cases.items()}
        res = {n: envs[n].gather([ids[n]], timeout_s=500)[0] for n in cases}

        ok = res["applies"]
        assert ok.status == "ok", ok
        assert 0.1 < ok.reward < 1.0 and ok.metrics["val_loss"] > 1.0
        assert "F.silu" in ok.edit and ok.edit.startswith("--- a/model.py")
        assert len(ok.attempts) == 1 and ok.attempts[0]["cost_usd"] > 0 and ok.attempts[0]["prompt_tokens"] > 0

        rev = res["needs_revision"]
        assert rev.status == "ok", rev
        assert [a["stage"] for a in rev.attempts] == ["apply", "ok"]
        assert "** 2" in rev.edit

        broken = res["breaks_the_code"]
        assert broken.status == "idea_failed" and broken.stage == "smoke", broken
        assert broken.reward == 0.0 and not broken.resources  # never queued

        ev = res["touches_evaluator"]
        assert ev.status == "idea_failed" and ev.stage == "protected", ev
        assert sched.utilisation()["submitted"] == 2
    finally:
        for env in envs.values():
            env.close()
        sched.shutdown()
