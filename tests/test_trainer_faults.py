"""Failures under Ray Train: an error on one rank ends the run promptly; a killed worker is
restarted from Ray Train's checkpoint and follows the uninterrupted trajectory."""
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from selftaught.models import load_tokenizer
from tests.conftest import wiki_texts
from trainers.config import TrainConfig
from trainers.data import tokenize_documents
from trainers.loop import train_causal_lm
from trainers.ray_train import fit

CFG = dict(seq_len=64, micro_batch_size=4, log_every=1, progress=False, lr=3e-3)


@pytest.fixture(scope="module")
def docs(tiny_lm_dir):
    return tokenize_documents(load_tokenizer(tiny_lm_dir), wiki_texts(120))


@pytest.mark.timeout(300)
def test_error_on_one_rank_fails_the_run_promptly(ray_cluster, tmp_path, tiny_lm_dir, docs):
    def fail_on_rank_1(step: int, rank: int) -> None:
        if rank == 1 and step == 2:
            raise ValueError("injected failure on rank 1")

    cfg = TrainConfig(token_budget=2 * 4 * 64 * 6, num_workers=2, cpus_per_worker=1, **CFG)
    with pytest.raises(Exception, match="injected failure on rank 1"):
        fit(cfg, tiny_lm_dir, docs, None, tmp_path / "out", tmp_path / "ray", name="fails", on_step=fail_on_rank_1)


@pytest.mark.timeout(400)
def test_killed_worker_resumes_from_ray_checkpoint(ray_cluster, tmp_path, tiny_lm_dir, docs):
    marker = str(tmp_path / "killed")

    def kill_once(step: int, rank: int) -> None:
        import os
        import signal
        import time

        if step == 4 and not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(8)  # Ray Train registers a reported checkpoint at its next poll (every 2 s)
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = TrainConfig(token_budget=4 * 64 * 6, checkpoint_every=2, max_failures=1, num_workers=1, **CFG)
    s = fit(cfg, tiny_lm_dir, docs, None, tmp_path / "out", tmp_path / "ray", name="killed", on_step=kill_once)
    assert s["finished"] and s["resumed_from_step"] == 2 and (tmp_path / "killed").exists()
    ref: list[dict] = []
    train_causal_lm(AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32), docs, None, cfg,
                    on_log=ref.append)
    got = [json.loads(x)["loss"] for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert np.allclose(got, [r["loss"] for r in ref], atol=1e-5)


def _losses(d):
    return [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]


def _shard_log(path):
    def on_shard(rank: int, shards: dict) -> None:  # one line per worker start
        (idx,) = shards.values()
        with open(f"{path}-shards-rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(idx.tolist()) + "\n")
    return on_shard


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_killed_worker_of_two_restarts_the_group_on_the_same_shards(ray_cluster, tmp_path, tiny_lm_dir, docs):
    marker = str(tmp_path / "killed")

    def kill_rank_1_once(step: int, rank: int) -> None:
        import os
        import signal
        import time

        if rank == 1 and step == 4 and not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(8)  # Ray Train registers a reported checkpoint at its next poll (every 2 s)
            os.kill(os.getpid(), signal.SIGKILL)

    # two workers of one CPU each leave the (4-CPU) session cluster room for Ray Data's shard tasks
    cfg = TrainConfig(token_budget=2 * 4 * 64 * 6, checkpoint_every=2, max_failures=1, num_workers=2,
                      cpus_per_worker=1, **CFG)
    s = fit(cfg, tiny_lm_dir, docs, None, tmp_path / "out", tmp_path / "ray", name="killed2",
            on_step=kill_rank_1_once, on_shard=_shard_log(tmp_path / "out"))
    assert s["finished"] and s["world_size"] == 2 and s["resumed_from_step"] == 2 and (tmp_path / "killed").exists()
    ref = fit(cfg, tiny_lm_dir, docs, None, tmp_path / "ref", tmp_path / "ray", name="uninterrupted2",
              on_shard=_shard_log(tmp_path / "ref"))
    assert ref["finished"] and ref["resumed_from_step"] == 0
    assert np.allclose(_losses(tmp_path / "out"), _losses(tmp_path / "ref"), atol=1e-5)
    # each worker received only its shard through Ray Train's dataset integration (rank r: the
    # documents r, r + 2, ...), the same before and after the restart and in the other run
    n = len(docs)
    for run, starts in (("out", 2), ("ref", 1)):  # the killed run's group started twice
        for rank in range(2):
            held = [json.loads(x) for x in (tmp_path / f"{run}-shards-rank{rank}.jsonl").read_text().splitlines()]
            assert len(held) == starts and all(h == list(range(rank, n, 2)) for h in held), (run, rank)
