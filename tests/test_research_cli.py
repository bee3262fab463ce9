"""``selftaught research``: value, context and the configs shipped in examples/research."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "selftaught.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_research_value_prints_each_result(tmp_path):
    out = _cli("research", "value", "-e", "toy", "--knobs", '{"lr": 0.1, "steps": 60}', "--knobs", '{"lr": 7}',
               "--set", f"executor.run_dir={tmp_path}", "--set", "ray.num_cpus=2", "--set", "ray.include_dashboard=false")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["status"] for r in rows] == ["ok", "idea_failed"]
    assert rows[0]["reward"] > 0.9 and rows[1]["stage"] == "apply"
    assert "1/2 ideas executed" in out.stderr
    assert (tmp_path / "journal.sqlite").exists()


def test_context_and_example_configs():
    out = _cli("research", "context", "-e", "toy")
    assert out.returncode == 0 and "Fit a straight line" in out.stdout
    from envs.codebase import ResearchConfig
    from selftaught.config import load_yaml
    from serve.env_app import EnvServeAppConfig

    for f in ("openai.yaml", "local-serve.yaml"):
        cfg = ResearchConfig.model_validate(load_yaml(ROOT / "examples" / "research" / f))
        from actors.implementer import ImplementerConfig

        ImplementerConfig.model_validate(cfg.executor.implementer)
    EnvServeAppConfig.model_validate(load_yaml(ROOT / "examples" / "research" / "serve.yaml"))
