"""Each objective on a tiny model under Ray Train with 2 workers (DDP over gloo, and ZeRO-2)."""
import json

import numpy as np
import pytest

from selftaught.models import load_tokenizer
from tests.conftest import wiki_texts
from trainers.config import TrainConfig
from trainers.data import tokenize_chat, tokenize_documents, tokenize_pairs
from trainers.mixture import TokenSource
from trainers.ray_train import fit

CFG = dict(seq_len=64, micro_batch_size=4, num_workers=2, cpus_per_worker=1, eval_every=3, log_every=1,
           eval_tokens=1024, progress=False, lr=3e-3)


@pytest.fixture(scope="module")
def tok(tiny_lm_dir):
    return load_tokenizer(tiny_lm_dir)


@pytest.fixture(scope="module")
def docs(tok):
    return tokenize_documents(tok, wiki_texts(300))


def _losses(d):
    return [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_pretrain_ddp_and_zero2_agree(ray_cluster, tmp_path, tiny_lm_dir, docs):
    cfg = TrainConfig(token_budget=2 * 4 * 64 * 6, **CFG)
    a = fit(cfg, tiny_lm_dir, docs[20:], docs[:20], tmp_path / "ddp", tmp_path / "ray")
    b = fit(cfg.model_copy(update={"engine": "deepspeed", "zero_stage": 2}), tiny_lm_dir, docs[20:], docs[:20],
            tmp_path / "zero2", tmp_path / "ray")
    assert a["world_size"] == b["world_size"] == 2 and a["steps"] == 6 and a["tokens_seen"] == cfg.token_budget
    assert a["final_eval_loss"] < a["initial_eval_loss"]
    assert np.allclose(_losses(tmp_path / "ddp"), _losses(tmp_path / "zero2"), atol=1e-4)
    assert (tmp_path / "zero2" / "model" / "config.json").exists()


def test_continued_pretraining_with_replay(ray_cluster, tmp_path, tiny_lm_dir, docs, caplog):
    import logging

    sources = [TokenSource("target", docs[20:60], weight=0.9), TokenSource("generic", docs[60:], weight=0.1)]
    cfg = TrainConfig(token_budget=2 * 4 * 64 * 20, **CFG)
    with caplog.at_level(logging.INFO, logger="trainers.ray_train"):
        s = fit(cfg, tiny_lm_dir, sources, docs[:20], tmp_path / "cpt", tmp_path / "ray")
    assert "CPU training on 2 of the cluster's 4 CPUs" in caplog.text  # 2 workers x 1 CPU: said, not silent
    seen = s["sources"]
    assert seen["target"]["tokens"] + seen["generic"]["tokens"] == cfg.token_budget
    assert seen["generic"]["tokens"] < seen["target"]["tokens"]


def test_synthesizer_tuning_and_sft(ray_cluster, tmp_path, tiny_lm_dir, tok):
    texts = wiki_texts(120)
    ids, masks, _ = tokenize_pairs(tok, list(zip(texts[::2], texts[1::2])), seq_len=64)
    cond = TokenSource("pairs", ids, masks, kind="examples")
    cfg = TrainConfig(token_budget=2 * 4 * 64 * 4, **CFG)
    s = fit(cfg, tiny_lm_dir, [cond], None, tmp_path / "synth", tmp_path / "ray")
    assert 0 < s["sources"]["pairs"]["loss_tokens"] < s["sources"]["pairs"]["tokens"]

    convs = [[{"role": "user", "content": t[:25]}, {"role": "assistant", "content": t[25:50]}]
             for t in texts]
    ids, masks, skipped = tokenize_chat(tok, convs, seq_len=64)
    assert len(ids) > 50, skipped
    sft = TokenSource("sft", ids, masks, kind="examples", skipped=skipped)
    s = fit(cfg.model_copy(update={"engine": "deepspeed", "zero_stage": 1}), tiny_lm_dir, [sft], None,
            tmp_path / "sft", tmp_path / "ray")
    assert s["finished"] and 0 < s["sources"]["sft"]["loss_tokens"] < s["sources"]["sft"]["tokens"]
    assert (tmp_path / "sft" / "model" / "model.safetensors").exists()
