"""The training objective: packed examples isolated, token-weighted accumulation, data edge
cases, the learning-rate schedule."""
import math

import numpy as np
import pytest
import torch

from selftaught.models import build_model, load_tokenizer
from tests.conftest import wiki_texts
from trainers.config import TrainConfig
from trainers.data import tokenize_documents, tokenize_pairs
from trainers.loop import lm_loss_sum, lr_schedule, train_causal_lm
from trainers.mixture import MixtureSampler, TokenSource


@pytest.fixture(scope="module")
def tok(tiny_lm_dir):
    return load_tokenizer(tiny_lm_dir)


def test_packed_examples_do_not_see_each_other(tok):
    texts = wiki_texts(40)
    ids, masks, _ = tokenize_pairs(tok, [(a[:30], b[:30]) for a, b in zip(texts[::2], texts[1::2])], seq_len=64)
    b = MixtureSampler([TokenSource("pairs", ids, masks, kind="examples")], 64, tok.pad_token_id).draw(4)
    model = build_model("nano", tok).eval()
    with torch.no_grad():
        packed, n = lm_loss_sum(model, b.ids, b.mask, b.positions)
        alone, count, examples = 0.0, 0, 0
        for r in range(len(b.ids)):
            starts = [*torch.nonzero(b.positions[r] == 0).flatten().tolist(), b.ids.shape[1]]
            for s, e in zip(starts, starts[1:]):
                if b.mask[r, s:e].any():
                    loss, k = lm_loss_sum(model, b.ids[r:r + 1, s:e], b.mask[r:r + 1, s:e])
                    alone, count, examples = alone + float(loss), count + int(k), examples + 1
        leaky, _ = lm_loss_sum(model, b.ids, b.mask)  # one position run per row: examples see each other
    assert count == int(n) and examples > len(b.ids)  # rows hold several examples
    assert abs(float(packed) - alone) < 1e-4 * count
    assert abs(float(leaky) - alone) > 1e-2


def _examples(docs: list[np.ndarray], L: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Full-window examples whose loss-token counts differ a lot: 2 tokens or all of them."""
    flat = np.concatenate(docs)
    ids = [flat[i * L:(i + 1) * L] for i in range(len(flat) // L)][:40]
    masks = [np.ones(L, np.uint8) if i % 3 == 0 else np.r_[np.zeros(L - 2, np.uint8), np.ones(2, np.uint8)]
             for i in range(len(ids))]
    return ids, masks


def test_accumulated_gradient_equals_the_concatenated_batch(tok):
    ids, masks = _examples(tokenize_documents(tok, wiki_texts(60)), 65)
    base = dict(token_budget=2 * 64 * 4, seq_len=64, lr=1e-2, warmup_frac=0.0, log_every=1, progress=False)
    runs = {}
    for name, mbs, accum in [("whole", 2, 1), ("accum", 1, 2)]:
        model, logs = build_model("nano", tok), []
        cfg = TrainConfig(micro_batch_size=mbs, grad_accum=accum, **base)
        train_causal_lm(model, [TokenSource("ex", ids, masks, kind="examples")], None, cfg, on_log=logs.append)
        runs[name] = ([r["loss"] for r in logs], torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert np.allclose(runs["whole"][0], runs["accum"][0], atol=1e-5)
    assert torch.allclose(runs["whole"][1], runs["accum"][1], atol=1e-5)


def test_never_repeat_check_counts_the_extra_token_per_window(tok):
    flat = np.arange(4 * 64, dtype=np.int32) % 100  # exactly the budget, but a window reads 65 tokens
    cfg = TrainConfig(token_budget=4 * 64, seq_len=64, micro_batch_size=4, progress=False)
    with pytest.raises(ValueError, match="less than"):
        train_causal_lm(build_model("nano", tok), [TokenSource("s", [flat], repeat=False)], None, cfg)


def test_exhausted_examples_source_keeps_its_partial_batch():
    ex = [np.arange(60, dtype=np.int32) + i for i in range(3)]  # one per 65-token window
    s = MixtureSampler([TokenSource("ex", ex, kind="examples", repeat=False)], seq_len=64, pad_id=0)
    s.next_batch(2)
    _, ids, mask = s.next_batch(2)  # one example left: the batch keeps it, the second row is padding
    assert mask[0, :60].all() and not mask[1].any()
    assert s.loss_tokens["ex"] == 3 * 59
    with pytest.raises(RuntimeError, match="exhausted"):
        s.next_batch(2)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_lr_schedule_values(schedule):
    cfg = TrainConfig(lr=1.0, warmup_frac=0.1, min_lr_ratio=0.1, schedule=schedule)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = lr_schedule(cfg, opt, total_steps=20)
    got = []
    for _ in range(20):
        got.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    cos = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 2) / 18)) for t in range(2, 20)]
    want = [0.0, 0.5] + (cos if schedule == "cosine" else [1.0] * 18)
    assert np.allclose(got, want, atol=1e-9)
