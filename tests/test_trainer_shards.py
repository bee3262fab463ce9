"""Data ingest under Ray Train: every source is a Ray Dataset, each worker receives only its
shard (``ray.train.get_dataset_shard``; the 2-worker split, the same on every run and after a
restart, is checked in test_trainer_faults.py), and one worker follows the trajectory of a plain
process over the whole sources."""
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from selftaught.models import load_tokenizer
from tests.conftest import wiki_texts
from trainers.config import TrainConfig
from trainers.data import tokenize_documents, tokenize_pairs
from trainers.loop import train_causal_lm
from trainers.mixture import MixtureSampler, TokenSource
from trainers.ray_train import fit

CFG = dict(seq_len=64, micro_batch_size=4, log_every=1, progress=False, lr=3e-3)


@pytest.fixture(scope="module")
def sources(tiny_lm_dir):
    tok = load_tokenizer(tiny_lm_dir)
    docs = tokenize_documents(tok, wiki_texts(120))
    texts = wiki_texts(200)[120:]
    ids, masks, _ = tokenize_pairs(tok, zip(texts[0::2], texts[1::2]), 64)
    return [TokenSource("real", docs, weight=0.7),
            TokenSource("pairs", ids, masks, kind="examples", weight=0.3, repeat=False)]


def _losses(d):
    return [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _recorder(path):
    def on_shard(rank: int, shards: dict) -> None:
        with open(f"{path}-rank{rank}.json", "w") as f:
            json.dump({name: idx.tolist() for name, idx in shards.items()}, f)
    return on_shard


def test_sharded_source_reads_like_the_whole_source_with_one_rank():
    docs = [np.arange(i * 100, i * 100 + 7 + i % 5, dtype=np.int32) for i in range(40)]
    masks = [(np.arange(len(d)) % 2).astype(np.uint8) for d in docs]

    def draws(**kw):
        s = MixtureSampler([TokenSource("a", docs, weight=0.5, **kw),
                            TokenSource("b", docs[:20], masks[:20], kind="examples", repeat=False,
                                        **kw)], 15, 0, seed=4)
        return [s.draw(3) for _ in range(40)]

    for x, y in zip(draws(), draws(shard=(0, 1))):
        assert x.source == y.source and torch.equal(x.ids, y.ids) and torch.equal(x.mask, y.mask)
    with pytest.raises(ValueError, match="not this rank's"):
        MixtureSampler([TokenSource("a", docs, shard=(1, 2))], 15, 0, rank=0, world=2)


def test_never_repeat_precheck_counts_the_rank_shard(tiny_lm_dir):
    docs = [np.arange(50, dtype=np.int32) % 500 for _ in range(3)]
    cfg = TrainConfig(token_budget=4 * 64 * 2, **CFG)
    with pytest.raises(ValueError, match="smallest rank's shard holds 150 tokens"):
        train_causal_lm(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), [TokenSource("s", docs, repeat=False,
                        shard=(0, 1))], None, cfg)


@pytest.mark.timeout(300)
def test_one_worker_follows_the_whole_source_trajectory(ray_cluster, tmp_path, tiny_lm_dir, sources):
    cfg = TrainConfig(token_budget=4 * 64 * 6, num_workers=1, cpus_per_worker=1, checkpoint_every=None, **CFG)
    s = fit(cfg, tiny_lm_dir, sources, None, tmp_path / "out", tmp_path / "ray", name="one",
            on_shard=_recorder(tmp_path / "one"))
    held = json.loads((tmp_path / "one-rank0.json").read_text())
    assert {k: len(v) for k, v in held.items()} == {src.name: len(src.ids) for src in sources}
    ref: list[dict] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker (cpus_per_worker=1)
    try:
        r = train_causal_lm(AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32), sources, None,
                            cfg, on_log=ref.append)
    finally:
        torch.set_num_threads(threads)
    assert s["sources"] == r["sources"] and s["exhausted_sources"] == r["exhausted_sources"]
    assert _losses(tmp_path / "out") == [x["loss"] for x in ref]
