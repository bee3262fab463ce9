"""The training loop core (plain process) and the same loop under Ray Train with 2 workers."""
import json

import numpy as np
import pytest

from selftaught.models import build_model, load_tokenizer
from tests.conftest import wiki_texts
from trainers.config import TrainConfig
from trainers.data import PackedStream, eval_windows, tokenize_documents
from trainers.loop import train_causal_lm


@pytest.fixture(scope="module")
def docs(tiny_lm_dir):
    tok = load_tokenizer(tiny_lm_dir)
    return tokenize_documents(tok, wiki_texts(300) + ["", "   "])


def test_tokenize_skips_empty_and_appends_eos(tiny_lm_dir, docs):
    tok = load_tokenizer(tiny_lm_dir)
    assert len(docs) == 300 and all(d[-1] == tok.eos_token_id for d in docs)


def test_packed_stream_shards_and_epochs(docs):
    a = PackedStream(docs, 32, seed=1, rank=0, world=2)
    b = PackedStream(docs, 32, seed=1, rank=1, world=2)
    xa, xb = a.next_batch(4), b.next_batch(4)
    assert xa.shape == (4, 33) and not np.array_equal(xa.numpy(), xb.numpy())
    small = PackedStream(docs[:3], 16)
    while small.epoch < 2:  # epochs turn over on a fresh permutation
        small.next_batch(2)
    assert small.epoch == 2
    with pytest.raises(ValueError):
        eval_windows(docs[:1], 10_000, 100)


def test_budget_is_exact_and_loss_falls(tmp_path, tiny_lm_dir, docs):
    tok = load_tokenizer(tiny_lm_dir)
    cfg = TrainConfig(token_budget=8 * 64 * 30, seq_len=64, micro_batch_size=8, lr=3e-3,
                      eval_every=10, log_every=5, eval_tokens=2048)
    summary = train_causal_lm(build_model("nano", tok), docs[20:], docs[:20], cfg, out_dir=tmp_path)
    assert summary["steps"] == 30 and summary["tokens_seen"] == cfg.token_budget
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.5
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 30 and rows[-1]["tokens_seen"] == cfg.token_budget
    with pytest.raises(ValueError, match="smaller than one optimizer step"):
        TrainConfig(token_budget=10, seq_len=64).total_steps()


def test_ray_train_two_workers(ray_cluster, tmp_path, tiny_lm_dir, docs):
    from trainers.ray_train import fit

    cfg = TrainConfig(token_budget=2 * 4 * 64 * 6, seq_len=64, micro_batch_size=4, num_workers=2,
                      cpus_per_worker=1, eval_every=3, log_every=3, eval_tokens=1024)
    summary = fit(cfg, tiny_lm_dir, docs[20:], docs[:20], tmp_path / "out", tmp_path / "ray")
    assert summary["steps"] == 6 and summary["tokens_seen"] == cfg.token_budget
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
    assert (tmp_path / "out" / "model" / "config.json").exists()
    assert (tmp_path / "out" / "metrics.jsonl").exists()
