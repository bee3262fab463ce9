"""The training loop core in one process: budgets, masks, resume equivalence, DeepSpeed vs DDP."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selftaught.models import build_model, load_tokenizer
from tests.conftest import wiki_texts
from trainers.config import TrainConfig
from trainers.data import eval_windows, tokenize_documents
from trainers.loop import masked_lm_loss, train_causal_lm
from trainers.mixture import TokenSource

BASE = dict(seq_len=64, micro_batch_size=4, grad_accum=2, lr=3e-3, eval_every=5, log_every=1,
            eval_tokens=1024, progress=False)


@pytest.fixture(scope="module")
def tok(tiny_lm_dir):
    return load_tokenizer(tiny_lm_dir)


@pytest.fixture(scope="module")
def docs(tok):
    return tokenize_documents(tok, wiki_texts(300) + ["", "   "])


def _losses(out_dir):
    return [json.loads(x)["loss"] for x in (out_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(x)]


def test_tokenize_skips_empty_and_appends_eos(tok):
    skipped = {}
    docs = tokenize_documents(tok, wiki_texts(5) + ["", None], skipped=skipped)
    assert len(docs) == 5 and all(d[-1] == tok.eos_token_id for d in docs) and skipped == {"empty": 2}
    with pytest.raises(ValueError):
        eval_windows(docs[:1], 10_000, 100)


def test_masked_loss_is_the_mean_over_unmasked_targets(tok):
    model = build_model("nano", tok)
    ids = torch.randint(0, len(tok), (2, 9))
    mask = torch.zeros(2, 9, dtype=torch.uint8)
    mask[0, 3:6] = 1
    mask[1, 8] = 1
    logits = model(input_ids=ids[:, :-1]).logits
    per_tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none").view(2, 8)
    sel = mask[:, 1:].bool()
    assert torch.allclose(masked_lm_loss(model, ids, mask), per_tok[sel].mean(), atol=1e-6)


def test_budget_is_exact_and_loss_falls(tmp_path, tok, docs):
    cfg = TrainConfig(token_budget=8 * 64 * 30, **{**BASE, "grad_accum": 1, "micro_batch_size": 8, "eval_every": 10})
    summary = train_causal_lm(build_model("nano", tok), docs[20:], docs[:20], cfg, out_dir=tmp_path)
    assert summary["steps"] == 30 and summary["tokens_seen"] == cfg.token_budget and summary["finished"]
    assert summary["sources"]["train"]["tokens"] == cfg.token_budget
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.5
    assert (tmp_path / "model" / "config.json").exists() and (tmp_path / "curves.png").exists()
    with pytest.raises(ValueError, match="smaller than one optimizer step"):
        train_causal_lm(build_model("nano", tok), docs, None, TrainConfig(token_budget=10, seq_len=64))


def _with_dropout(model, p: float = 0.2):
    """Attention dropout draws from the RNG, so a resume that did not restore it would diverge."""
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = p
    return model


def test_resume_follows_the_uninterrupted_trajectory(tmp_path, tok, docs):
    sources = [TokenSource("real", docs[20:150]), TokenSource("synthetic", docs[150:], repeat=False, weight=0.5)]
    cfg = TrainConfig(token_budget=8 * 64 * 12, checkpoint_every=4, **BASE)
    full = train_causal_lm(_with_dropout(build_model("nano", tok)), sources, docs[:20], cfg, out_dir=tmp_path / "full")
    # the interrupted run stops after step 6 (newest checkpoint: step 6), a new process resumes
    part = train_causal_lm(_with_dropout(build_model("nano", tok)), sources, docs[:20],
                           cfg.model_copy(update={"stop_after_steps": 6}), out_dir=tmp_path / "cut")
    assert not part["finished"] and part["steps"] == 6
    resumed = train_causal_lm(_with_dropout(build_model("nano", tok, seed=99)), sources, docs[:20], cfg,
                              out_dir=tmp_path / "cut")
    assert resumed["resumed_from_step"] == 6 and resumed["finished"]
    assert np.allclose(_losses(tmp_path / "full"), _losses(tmp_path / "cut"), atol=1e-6)
    assert resumed["sources"] == full["sources"]
    assert len(list((tmp_path / "cut" / "checkpoints").glob("step-*"))) == cfg.keep_checkpoints


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, tok, docs):
    out = tmp_path_factory.mktemp("ddp")
    cfg = TrainConfig(token_budget=8 * 64 * 6, **BASE)
    return cfg, out, train_causal_lm(build_model("nano", tok), docs[20:], docs[:20], cfg, out_dir=out)


@pytest.mark.parametrize("stage, offload", [(0, False), (1, False), (2, False), (3, False), (2, True)])
def test_deepspeed_zero_agrees_with_ddp(tmp_path, tok, docs, ddp_reference, stage, offload):
    cfg, ddp_dir, ddp = ddp_reference
    zero = cfg.model_copy(update={"engine": "deepspeed", "zero_stage": stage, "offload_optimizer": offload})
    ds = train_causal_lm(build_model("nano", tok), docs[20:], docs[:20], zero, out_dir=tmp_path / "ds")
    assert np.allclose(_losses(ddp_dir), _losses(tmp_path / "ds"), atol=1e-4)
    assert abs(ddp["final_eval_loss"] - ds["final_eval_loss"]) < 1e-4
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ds" / "model") is not None


def test_never_repeat_only_budget_larger_than_data_is_refused(tok, docs):
    with pytest.raises(ValueError, match="less than the"):
        train_causal_lm(build_model("nano", tok), [TokenSource("s", docs[:3], repeat=False)], None,
                        TrainConfig(token_budget=10**7, seq_len=64))


def test_loop_runs_under_torchrun_without_ray():
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    out = subprocess.run([str(torchrun), "--nproc_per_node", "2", "benchmarks/torchrun_smoke.py"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["steps"] == 5
