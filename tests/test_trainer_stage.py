"""The training stage's fingerprint and early stops (Ray Train replaced by a recording stub)."""
import pytest

from pipelines.stages import StoppedEarly, train_stage
from selftaught.storage import RunDir
from trainers.config import TrainConfig


@pytest.fixture
def fits(monkeypatch):
    calls = []

    def fake_fit(cfg, init_dir, train, eval_docs, out_dir, storage_dir, name="train"):
        calls.append(cfg)
        finished = not cfg.stop_after_steps
        if finished:
            (out_dir / "model").mkdir(parents=True, exist_ok=True)
            (out_dir / "model" / "config.json").write_text("{}")
        return {"finished": finished, "steps": cfg.stop_after_steps or 3, "total_steps": 3}

    monkeypatch.setattr("trainers.ray_train.fit", fake_fit)
    return calls


def test_settings_that_do_not_change_results_keep_the_stage(tmp_path, tiny_lm_dir, fits):
    run, cfg = RunDir(tmp_path), TrainConfig()
    train_stage(run, "pretrain", cfg, tiny_lm_dir, lambda: [], None)
    quiet = cfg.model_copy(update={"progress": False, "max_failures": 3})
    assert train_stage(run, "pretrain", quiet, tiny_lm_dir, lambda: [], None).complete and len(fits) == 1
    train_stage(run, "pretrain", cfg.model_copy(update={"lr": 1e-4}), tiny_lm_dir, lambda: [], None)
    assert len(fits) == 2


def test_stop_after_steps_leaves_the_stage_unfinished(tmp_path, tiny_lm_dir, fits):
    run = RunDir(tmp_path)
    with pytest.raises(StoppedEarly, match="stopped after 1 of 3 steps"):
        train_stage(run, "pretrain", TrainConfig(stop_after_steps=1), tiny_lm_dir, lambda: [], None)
    assert not run.stage("pretrain").path.joinpath("_STAGE.json").exists()
    assert train_stage(run, "pretrain", TrainConfig(), tiny_lm_dir, lambda: [], None).complete
