"""Token sources, loss masks and the mixture sampler (no training: fast and exact)."""
import numpy as np
import pytest
import torch

from selftaught.models import load_tokenizer
from trainers.data import tokenize_chat, tokenize_pairs
from trainers.mixture import MixtureSampler, TokenSource, labels_from


def _docs(n, length, start=0):
    return [np.arange(start + i * 1000, start + i * 1000 + length, dtype=np.int32) for i in range(n)]


def test_never_repeat_source_is_seen_at_most_once_and_leaves_the_mixture():
    synth = TokenSource("synthetic", _docs(10, 33), repeat=False, weight=5.0)
    real = TokenSource("real", _docs(3, 50, start=10**6), repeat=True)
    s = MixtureSampler([synth, real], seq_len=32, pad_id=0, seed=0)
    seen_synth = []
    for _ in range(40):
        name, ids, _ = s.next_batch(1)
        if name == "synthetic":
            seen_synth.extend(ids.flatten().tolist())
    assert s.exhausted == ["synthetic"] and s.active == ["real"]
    assert len(seen_synth) == len(set(seen_synth)) == 10 * 33  # every synthetic token once, none twice
    assert s.tokens["real"] > 3 * 50  # the real source repeats


def test_replay_probability_is_honoured():
    s = MixtureSampler([TokenSource("generic", _docs(50, 40), weight=0.1),
                        TokenSource("target", _docs(50, 40, start=10**6), weight=0.9)], 16, 0, seed=3)
    picks = [s.next_batch(2)[0] for _ in range(4000)]
    share = picks.count("generic") / len(picks)
    assert 0.085 < share < 0.115


def test_examples_are_packed_whole_and_padded():
    ex = [np.arange(1, 8, dtype=np.int32), np.arange(10, 20, dtype=np.int32), np.arange(30, 36, dtype=np.int32)]
    masks = [np.r_[np.zeros(3), np.ones(4)].astype(np.uint8), np.ones(10, np.uint8), np.ones(6, np.uint8)]
    src = TokenSource("sft", ex, masks, kind="examples", repeat=False)
    s = MixtureSampler([src], seq_len=15, pad_id=-1 & 0xFFFF, seed=0)
    rows = []
    while True:
        try:
            _, ids, mask = s.next_batch(1)
        except RuntimeError:
            break
        rows.append((ids[0], mask[0]))
    assert sum(int(m.sum()) for _, m in rows) == 4 + 10 + 6  # every loss token exactly once
    for ids, mask in rows:  # no example is split across windows
        vals = [v for v in ids.tolist() if v != 0xFFFF]
        for e in ex:
            inter = set(vals) & set(e.tolist())
            assert not inter or inter == set(e.tolist())
    with pytest.raises(ValueError, match="exceed"):
        MixtureSampler([TokenSource("x", [np.arange(40, dtype=np.int32)], kind="examples")], 15, 0)


def test_sampler_state_restores_exact_position():
    srcs = [TokenSource("a", _docs(7, 21)), TokenSource("b", _docs(5, 13, 10**6), repeat=False)]
    s1 = MixtureSampler(srcs, 8, 0, seed=1)
    for _ in range(5):
        s1.next_batch(2)
    state = s1.state_dict()
    rest1 = [s1.next_batch(2)[1] for _ in range(6)]
    s2 = MixtureSampler(srcs, 8, 0, seed=1)
    s2.load_state_dict(state)
    rest2 = [s2.next_batch(2)[1] for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(rest1, rest2))


def test_ranks_read_disjoint_shards():
    src = [TokenSource("a", _docs(8, 17))]
    a = MixtureSampler(src, 16, 0, rank=0, world=2).next_batch(4)[1]
    b = MixtureSampler(src, 16, 0, rank=1, world=2).next_batch(4)[1]
    assert not set(a.flatten().tolist()) & set(b.flatten().tolist())


def test_bad_sources_are_clear_errors():
    with pytest.raises(ValueError, match="no non-empty"):
        TokenSource("empty", [])
    with pytest.raises(ValueError, match="duplicate"):
        MixtureSampler([TokenSource("a", _docs(2, 5)), TokenSource("a", _docs(2, 5))], 4, 0)
    with pytest.raises(ValueError, match="weight"):
        TokenSource("w", _docs(2, 5), weight=0)


def test_pair_masks_cover_exactly_d2(tiny_lm_dir):
    tok = load_tokenizer(tiny_lm_dir)
    d1, d2 = "The river flows north.", "It reaches the sea in spring."
    ids, masks, skipped = tokenize_pairs(tok, [(d1, d2), ("", "x"), ("only one",), (d1, "y " * 500)], seq_len=64)
    assert skipped == {"empty": 1, "malformed": 1}
    n2 = len(tok(d2, add_special_tokens=False)["input_ids"]) + 1
    assert int(masks[0].sum()) == n2 and masks[0][-n2:].all() and not masks[0][:-n2].any()
    assert ids[0][-1] == tok.eos_token_id
    assert len(ids[1]) == 65 and masks[1].sum() > 0  # long d2 is cut, d1 keeps at most half
    _, _, skipped = tokenize_pairs(tok, [("w " * 200, "v " * 5)], seq_len=4)
    assert skipped == {"d2_cut_off": 1}


def test_chat_masks_cover_only_assistant_turns(tiny_lm_dir):
    tok = load_tokenizer(tiny_lm_dir)
    conv = [{"role": "user", "content": "What is two plus two?"},
            {"role": "assistant", "content": "Four."},
            {"role": "user", "content": "And three plus three?"},
            {"role": "assistant", "content": "Six."}]
    ids, masks, skipped = tokenize_chat(tok, [conv, [{"role": "user", "content": "hi"}], "junk"], seq_len=256)
    assert skipped == {"no_assistant_turn": 1, "malformed": 1}
    text = tok.decode(ids[0][masks[0] == 1])
    assert "Four." in text and "Six." in text and "two plus" not in text and "assistant" not in text
    _, _, skipped = tokenize_chat(tok, [conv], seq_len=8)
    assert skipped == {"too_long": 1}


def test_labels_ignore_exactly_the_masked_tokens():
    ids = torch.arange(10).view(1, 10)
    mask = torch.tensor([[0, 0, 0, 1, 1, 0, 1, 1, 1, 0]], dtype=torch.uint8)
    inputs, labels = labels_from(ids, mask)
    assert inputs.tolist() == [list(range(9))]
    assert labels.tolist() == [[-100, -100, 3, 4, -100, 6, 7, 8, -100]]


def test_chat_masks_can_exclude_the_thinking_marker(tiny_lm_dir):
    """s1 SFT: the start-of-thinking marker is prompt at inference, so it carries no loss."""
    tok = load_tokenizer(tiny_lm_dir)
    marker = "<|im_start|>think\n"
    conv = [{"role": "user", "content": "1 + 2 + 3 ="},
            {"role": "assistant", "content": f"{marker}1 + 2 = 3\n3 + 3 = 6\n<|im_start|>answer\n6"}]
    ids, masks, _ = tokenize_chat(tok, [conv], seq_len=256, assistant_prefix=marker)
    _, masks_all, _ = tokenize_chat(tok, [conv], seq_len=256)
    text = tok.decode(ids[0][masks[0] == 1])
    assert text.lstrip().startswith("1 + 2") and "3 + 3 = 6" in text and "answer" in text
    assert "think" not in text and 0 < masks[0].sum() < masks_all[0].sum()
