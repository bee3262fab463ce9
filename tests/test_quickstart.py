"""The main job end to end at toy scale, its resumability, and the CLI around it."""
import json

import yaml

from pipelines.quickstart import QuickstartConfig, run
from selftaught.cli import main
from selftaught.config import resolve

TOY = ["data.wiki_limit=300", "tokenizer.vocab_size=512", "model.size=nano",
       "train.token_budget=12288", "train.seq_len=64", "train.micro_batch_size=8", "train.eval_every=8",
       "train.log_every=4", "train.eval_tokens=1024", "train.cpus_per_worker=1",
       "sample.num_prompts=4", "sample.sampling.max_new_tokens=8", "train.progress=false"]


def test_quickstart_runs_resumes_and_reruns_affected_stages(ray_cluster, tmp_path):
    cfg = resolve(QuickstartConfig, "examples/quickstart.yaml", TOY + [f"run_dir={tmp_path}"])
    out = run(cfg)
    assert out["tokens_seen"] == 12288 and out["final_eval_loss"] < out["initial_eval_loss"]
    report = (tmp_path / "report.md").read_text()
    assert "held-out loss" in report and (tmp_path / "loss.png").stat().st_size > 1000
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["size"] == "nano"
    markers = {p.parent.name: p.stat().st_mtime_ns for p in tmp_path.glob("*/_STAGE.json")}
    assert set(markers) == {"tokenizer", "tokens", "init_model", "pretrain", "samples"}
    assert (tmp_path / "data" / "wiki" / "_STAGE.json").exists()
    run(cfg)  # everything is up to date
    assert {p.parent.name: p.stat().st_mtime_ns for p in tmp_path.glob("*/_STAGE.json")} == markers
    run(cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"num_prompts": 2})}))
    after = {p.parent.name: p.stat().st_mtime_ns for p in tmp_path.glob("*/_STAGE.json")}
    assert [k for k in markers if after[k] != markers[k]] == ["samples"]


def test_cli_config_show_and_bad_override(capsys):
    assert main(["config", "show", "-c", "examples/quickstart.yaml", "--set", "train.lr=1e-4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["lr"] == 1e-4 and shown["pipeline"] == "quickstart"
    assert main(["config", "show", "-c", "examples/quickstart.yaml", "--set", "train.lrr=1"]) == 2
    assert "lrr" in capsys.readouterr().err


def test_cli_models_and_generate(capsys, tiny_lm_dir):
    assert main(["models", "--size", "3b"]) == 0
    assert "3b" in capsys.readouterr().out
    assert main(["generate", "-m", str(tiny_lm_dir), "-p", "Hello", "--set", "sampling.temperature=0",
                 "--set", "sampling.max_new_tokens=3", "--set", "sampling.ignore_eos=true"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt"] == "Hello" and line["completion_tokens"] == 3


def test_cli_data_prepare(tmp_path, capsys):
    assert main(["data", "prepare", "--out", str(tmp_path), "--set", "data.datasets=[wiki]",
                 "--set", "data.wiki_limit=40"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["wiki"]["train_docs"] + stats["wiki"]["eval_docs"] == 40


def test_stop_after_steps_ends_the_pipeline_cleanly_and_the_same_command_resumes(ray_cluster, tmp_path, capsys):
    """A preemption drill (train.stop_after_steps) stops the pipeline after the checkpoint with
    exit code 0 and nothing downstream of the cut stage; the same command then finishes it."""
    args = ["run", "-c", "examples/quickstart.yaml", *(x for o in [f"run_dir={tmp_path}", *TOY] for x in ("--set", o))]
    assert main([*args, "--set", "train.stop_after_steps=2"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["stopped"] == "pretrain"
    assert not (tmp_path / "pretrain" / "_STAGE.json").exists() and not (tmp_path / "samples").exists()
    assert main(args) == 0
    assert json.loads((tmp_path / "pretrain" / "_STAGE.json").read_text())["outputs"]["tokens_seen"] == 12288
