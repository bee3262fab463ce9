"""RL on the ideator end to end (pipelines/research_rl.py): a tiny LM samples toy knob ideas
under the env's schema on a rollout engine actor (SmolLM2-135M-Instruct in
examples/research/rl-tiny.yaml), the sandboxed executor scores them,
the learner actor takes GRPO steps, and its weights reach the engine; a run killed mid-step
resumes without resampling, re-running or re-applying anything."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from pipelines.research_rl import RLRun, RLRunConfig, run


class _Kill(BaseException):
    pass


def _cfg(tmp_path, name, model, **kw) -> RLRunConfig:
    base = {"run_dir": str(tmp_path / name), "env": "toy",
            "spec_overrides": ["knobs.properties.sleep_s.maximum=0.2"],
            "executor": {"scheduler": {"max_slots": 2, "placement_timeout_s": 30}},
            "policy": {"model": model, "engine": {"backend": "transformers", "device": "cpu", "cpus_per_actor": 0.5},
                       "learner_cpus": 0.5},
            "train": {"lr": 1e-5, "schedule": "constant", "warmup_frac": 0.0, "weight_decay": 0.0, "progress": False},
            "sampling": {"temperature": 1.0, "max_new_tokens": 56},
            # a thinking phase first: the engine ends it (a forced delimiter) after 8 tokens at most
            "ideator": {"backend": "local", "thinking": True, "thinking_tokens": 8},
            "group_size": 4, "steps": 2, "job_timeout_s": 120}
    base.update(kw)
    return RLRunConfig.model_validate(base)


def _queued(run_dir: Path, arm: str) -> dict[str, int]:
    con = sqlite3.connect(run_dir / arm / "env" / "journal.sqlite")
    try:
        return dict(con.execute("SELECT idea_id, COUNT(*) FROM events WHERE event='queued' GROUP BY idea_id"))
    finally:
        con.close()


def test_rl_steps_sync_weights_and_resume_mid_step(ray_cluster, tmp_path, monkeypatch, tiny_chat_lm):
    cfg = _cfg(tmp_path, "rl", tiny_chat_lm)
    real_execute = RLRun.execute
    calls = {"n": 0}

    def dying_execute(self, env, rollouts):
        calls["n"] += 1
        if calls["n"] == 2:  # step 1: its rollouts are journaled, the driver dies before executing
            raise _Kill("driver killed mid-step")
        return real_execute(self, env, rollouts)

    monkeypatch.setattr(RLRun, "execute", dying_execute)
    with pytest.raises(_Kill):
        run(cfg)
    from pipelines.research_rl import RLJournal

    j = RLJournal(Path(cfg.run_dir) / "rl.sqlite")
    state, version, sampled, _ = j.get("mean", 1)
    assert state == "sampled" and version == 1 and len(sampled) == 4  # sampled by the updated policy
    assert j.get("mean", 0)[0] == "updated"
    monkeypatch.setattr(RLRun, "execute", real_execute)
    s = run(cfg)
    rows = s["arms"]["mean"]
    assert rows["steps"] == 2 and rows["ideas"] == 8
    state, version, resumed, stats = j.get("mean", 1)
    assert state == "updated" and [r["completion_ids"] for r in resumed] == [r["completion_ids"] for r in sampled]
    assert stats["version"] == 2 and stats["sampled_version"] == 1 and stats["engine_versions"][0] >= 1
    assert stats["valid_frac"] > 0 and 0 <= stats["mean_reward"] <= stats["max_reward"] <= 1
    for r in resumed:  # an idea cut short by max_new_tokens is the policy's failure: reward 0, never a mask
        assert (r["reward"] is not None and not r["infra_failure"]) and (r["meta"]["valid"] or r["reward"] == 0.0)
        # thinking, then the idea: only the idea went to the executor, and the forced end of
        # thinking carries no loss (0s between the sampled thinking and the sampled answer)
        mask = r["loss_mask"]
        assert r["meta"]["thinking"] is not None and len(mask) == len(r["completion_ids"])
        k = mask.index(0)
        assert 0 < k <= 8 and mask[:k] == [1] * k and 1 not in mask[k:k + 2] and "<think>" not in r["idea"]
    assert stats["sync_s"] > 0 and stats["tokens"] > 0 and stats["clip_frac"] == 0.0  # on-policy
    assert set(_queued(Path(cfg.run_dir), "mean").values()) == {1}  # no idea ran twice
    report = (Path(cfg.run_dir) / "report.md").read_text()
    assert "## Objectives at equal budget" in report and (Path(cfg.run_dir) / "rl.png").stat().st_size > 0


def test_paper_shape_configs_validate():
    """Groups of 128 ideas x 8 GPUs (nanoGPT) and 256 x 1 GPU (GRPO), 8,192-token rollouts with
    a thinking phase, gang-reserved on the executor's nodes of examples/research/cluster-rl.yaml."""
    import copy

    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    from envs.spec import CodebaseEnvSpec
    from selftaught.config import load_yaml

    launcher = yaml.safe_load(Path("examples/research/cluster-rl.yaml").read_text())
    validate_config(copy.deepcopy(launcher))  # Ray's own launcher schema (no cloud call)
    prepared = prepare_config(copy.deepcopy(launcher))

    for name, g, gpus in (("rl-nanogpt-paper.yaml", 128, 8), ("rl-grpo-paper.yaml", 256, 1)):
        cfg = RLRunConfig.model_validate(load_yaml(Path("examples/research") / name))
        spec = CodebaseEnvSpec.load(Path("envs") / cfg.env / cfg.spec_file, cfg.spec_overrides)
        assert cfg.group_size == g and spec.resources.gpus == gpus and g * gpus in (1024, 256)
        assert cfg.sampling.max_new_tokens == 8192 and cfg.policy.engine.backend == "vllm"
        assert cfg.executor.scheduler.max_slots == g  # the whole group can run at once
        assert cfg.execution.admission == "gang" and cfg.execution.late == "keep" and cfg.rl.max_staleness >= 1
        assert cfg.ideator.thinking and cfg.ideator.thinking_tokens < cfg.sampling.max_new_tokens
        # the cluster that holds it: the group on the executor's nodes, the policy on its own
        types = prepared["available_node_types"]
        ex = [t for t in types.values() if "executor_pool" in t["resources"]]
        assert all(t["resources"]["GPU"] >= gpus and t["resources"]["executor_pool"] >= spec.resources.custom["executor_pool"]
                   for t in ex)
        assert sum(t["max_workers"] * t["resources"]["executor_pool"] for t in ex) \
            >= g * spec.resources.custom["executor_pool"]
        policy = sum(t["max_workers"] * t["resources"].get("policy_pool", 0) for t in types.values())
        assert policy >= cfg.policy.engine.num_actors + 1 and cfg.policy.learner_resources == {"policy_pool": 1}
    tiny = RLRunConfig.model_validate(load_yaml("examples/research/rl-tiny.yaml"))
    assert tiny.group_size >= 8 and tiny.objectives == ["mean", "entropic"]
