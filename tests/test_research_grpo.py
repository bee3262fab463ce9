"""The grpo environment through the real executor: a structured idea runs sandboxed with the
packaged model mounted read-only at $MODEL_DIR, saves a safetensors checkpoint, and the frozen
evaluator scores it on held-out problems (a short budget and a small evaluation here; the
default is 120 s of training and 200 problems)."""
from __future__ import annotations

import pytest

from envs.codebase import load_packaged

SHORT = ["time_budget_s=8", "time_limit_s=120",
         'evaluator.args=["--n","8","--max-new-tokens","16","--batch-size","8","--prompt","short","--time-limit","100"]',
         "evaluator.time_limit_s=110"]


@pytest.mark.timeout(400)
def test_structured_idea_on_grpo(ray_cluster, tmp_path):
    env = load_packaged("grpo", overrides=SHORT, executor={"run_dir": str(tmp_path / "grpo")})
    try:
        knobs = {"lr": 1e-5, "group_size": 2, "prompts_per_step": 2, "max_new_tokens": 8, "max_steps": 1}
        [res] = env.value([{"knobs": knobs}], timeout_s=360)
        assert res.status == "ok", (res.stage, res.error, res.logs)
        assert 0.0 <= res.reward <= 1.0 and res.metrics["n"] == 8
        assert '"max_steps": 1' in res.edit
        assert res.resources["max_rss_mb"] > 100  # the model really ran in the sandbox
    finally:
        env.close()
