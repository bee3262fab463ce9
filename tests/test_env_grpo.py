"""The GRPO environment: data splits, a smoke run of the codebase, the frozen evaluator."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from envs.grpo import data as grpo_data
from envs.grpo import evaluator as grpo_eval

ROOT = Path(__file__).resolve().parents[1]
ENV_DIR = ROOT / "envs" / "grpo"
SMALL = {"train_size": 60, "val_size": 12}


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from selftaught.models import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grpo_data")
    grpo_data.prepare(out, SMALL)
    return out


@pytest.fixture(scope="module")
def smoke_ckpt(tmp_path_factory, prepared, model_dir) -> tuple[Path, float]:
    """SMOKE=1 run of the unmodified codebase in a private copy, as the sandbox runs it."""
    job = tmp_path_factory.mktemp("grpo_job")
    code = job / "code"
    shutil.copytree(ENV_DIR / "codebase", code)
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "HOME": str(job),
           "DATA_DIR": str(prepared / "train"), "MODEL_DIR": str(model_dir), "OUT_DIR": str(code / "out"),
           "SEED": "0", "TIME_BUDGET_S": "30", "SMOKE": "1", "NUM_THREADS": "2"}
    t0 = time.time()
    run = subprocess.run(["bash", "run.sh"], cwd=code, env=env, capture_output=True, text=True, timeout=180)
    seconds = time.time() - t0
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return code / "out", seconds


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# --------------------------------------------------------------------------- data
def test_prepare_splits_disjoint_and_idempotent(prepared):
    train, val = _rows(prepared / "train" / "problems.jsonl"), _rows(prepared / "val" / "problems.jsonl")
    meta = json.loads((prepared / "val" / "meta.json").read_text())
    tasks = meta["tasks"]
    assert tasks == ["basic_arithmetic", "chain_sum"]
    assert len(val) == meta["counts"]["val"] == 12 * len(tasks)
    assert len(train) == meta["counts"]["train"] > 0
    assert {r["task"] for r in train} == {r["task"] for r in val} == set(tasks)
    # held out: no validation question (nor the same sum in the other phrasing) is in training
    assert not {r["question"] for r in train} & {r["question"] for r in val}
    assert not {grpo_data._key(r) for r in train} & {grpo_data._key(r) for r in val}
    assert set(meta["seeds"]["train"].values()).isdisjoint(meta["seeds"]["val"].values())
    # the job's meta does not reveal the validation seeds
    assert "val" not in json.dumps(json.loads((prepared / "train" / "meta.json").read_text()))
    # validation is interleaved by task, so any prefix is balanced
    assert [r["task"] for r in val[:4]] == tasks * 2
    # every row carries what scoring needs
    r = val[0]
    assert grpo_eval.score(r, f"The answer is {r['answer']}.") == 1.0
    assert grpo_eval.score(r, "no idea") == 0.0
    # idempotent: same options -> nothing rewritten
    mtime = (prepared / "val" / "problems.jsonl").stat().st_mtime_ns
    assert grpo_data.prepare(prepared, SMALL) == meta
    assert (prepared / "val" / "problems.jsonl").stat().st_mtime_ns == mtime


def test_prepare_options_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        grpo_data.prepare(tmp_path, {"nope": 1})
    with pytest.raises(ValueError, match="overlap"):
        grpo_data.prepare(tmp_path, {"train_seed": 0, "val_seed": 10, "train_size": 50, "val_size": 5})
    meta = grpo_data.prepare(tmp_path, {"tasks": ["chain_sum"], "train_size": 20, "val_size": 5})
    assert meta["counts"]["val"] == 5 and meta["tasks"] == ["chain_sum"]


def test_env_yaml_loads():
    import jsonschema

    from envs.spec import CodebaseEnvSpec

    cfg = json.loads((ENV_DIR / "codebase" / "config.json").read_text())
    for name in ("env.yaml", "paper.yaml"):
        spec = CodebaseEnvSpec.load(ENV_DIR / name)
        assert spec.name == "grpo" and spec.evaluator.module == "envs.grpo.evaluator"
        assert "MODEL_DIR" in spec.mounts
        jsonschema.Draft7Validator.check_schema(spec.knobs)
        merged = {**cfg, **spec.base_config}
        jsonschema.validate({k: merged[k] for k in spec.knobs["properties"]}, spec.knobs)
        assert set(spec.data) <= set(grpo_data.DEFAULTS)


# --------------------------------------------------------------------------- smoke run
def test_smoke_run_writes_safetensors_checkpoint(smoke_ckpt, model_dir):
    from safetensors.torch import load_file

    out, seconds = smoke_ckpt
    assert (out / "model.safetensors").is_file()
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    state = load_file(str(out / "model.safetensors"))
    assert "model.embed_tokens.weight" in state
    cfg = json.loads((out / "config.json").read_text())
    base = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == base["hidden_size"]
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 1
    assert seconds < 120, f"smoke run took {seconds:.0f}s"


# --------------------------------------------------------------------------- evaluator
def _eval_argv(artifacts: Path, val: Path, out: Path, n: int = 4) -> list[str]:
    return ["--artifacts", str(artifacts), "--val", str(val), "--codebase", str(artifacts.parent),
            "--out", str(out), "--n", str(n), "--max-new-tokens", "8", "--batch-size", "4",
            "--num-threads", "2", "--time-limit", "120"]


def test_evaluator_scores_checkpoint_deterministically(smoke_ckpt, prepared, model_dir, tmp_path, monkeypatch):
    out, _ = smoke_ckpt
    env = {**os.environ, "MODEL_DIR": str(model_dir), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    first = tmp_path / "a.json"
    run = subprocess.run([sys.executable, "-m", "envs.grpo.evaluator", *_eval_argv(out, prepared / "val", first)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    a = json.loads(first.read_text())
    assert 0.0 <= a["value"] <= 1.0 and a["value"] == a["metrics"]["accuracy"]
    assert a["metrics"]["n"] == 4 and set(a["metrics"]["per_task"]) == {"basic_arithmetic", "chain_sum"}
    # again, in-process: the same answer
    monkeypatch.setenv("MODEL_DIR", str(model_dir))
    second = tmp_path / "b.json"
    assert grpo_eval.main(_eval_argv(out, prepared / "val", second)) == 0
    b = json.loads(second.read_text())
    assert b["value"] == a["value"] and b["metrics"]["per_task"] == a["metrics"]["per_task"]
    assert b["metrics"]["mean_score"] == a["metrics"]["mean_score"]


def _refused(argv: list[str], capsys) -> str:
    assert grpo_eval.main(argv) == 1
    return capsys.readouterr().err


def test_evaluator_refuses_pickles(prepared, model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODEL_DIR", str(model_dir))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(model_dir / "config.json", ckpt / "config.json")
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    res = tmp_path / "r.json"
    err = _refused(_eval_argv(ckpt, prepared / "val", res), capsys)
    assert "pickle" in err and not res.exists()
    # a pickle beside a valid safetensors file is refused too
    (ckpt / "model.safetensors").symlink_to(model_dir / "model.safetensors")
    (ckpt / "pytorch_model.bin").unlink()
    (ckpt / "optimizer.pt").write_bytes(b"x")
    err = _refused(_eval_argv(ckpt, prepared / "val", res), capsys)
    assert "optimizer.pt" in err and not res.exists()
    # only pickles, no weights at all
    (ckpt / "optimizer.pt").unlink()
    (ckpt / "model.safetensors").unlink()
    err = _refused(_eval_argv(ckpt, prepared / "val", res), capsys)
    assert "model.safetensors" in err and not res.exists()


@pytest.mark.parametrize("change", [{"hidden_size": 1024}, {"num_hidden_layers": 12}, {"vocab_size": 50000},
                                    {"model_type": "qwen2"}])
def test_evaluator_refuses_other_models(change, prepared, model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODEL_DIR", str(model_dir))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").symlink_to(model_dir / "model.safetensors")
    cfg = {**json.loads((model_dir / "config.json").read_text()), **change}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    res = tmp_path / "r.json"
    err = _refused(_eval_argv(ckpt, prepared / "val", res), capsys)
    assert next(iter(change)) in err and not res.exists()


def test_evaluator_refuses_wrong_weights(prepared, model_dir, tmp_path, monkeypatch, capsys):
    """A config that claims the base shape over weights of another shape."""
    import torch
    from safetensors.torch import save_file

    monkeypatch.setenv("MODEL_DIR", str(model_dir))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(model_dir / "config.json", ckpt / "config.json")
    save_file({"model.embed_tokens.weight": torch.zeros(8, 4)}, str(ckpt / "model.safetensors"))
    res = tmp_path / "r.json"
    err = _refused(_eval_argv(ckpt, prepared / "val", res), capsys)
    assert "do not match" in err and not res.exists()


def test_evaluator_missing_directory_exits_1(prepared, model_dir, tmp_path):
    env = {**os.environ, "MODEL_DIR": str(model_dir), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    res = tmp_path / "r.json"
    run = subprocess.run([sys.executable, "-m", "envs.grpo.evaluator",
                          *_eval_argv(tmp_path / "nowhere", prepared / "val", res)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "no checkpoint directory" in run.stderr and not res.exists()
