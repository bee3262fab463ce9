"""The transformers backend against transformers' own ``generate`` and the sampling contract."""
import pytest

from actors.engine import create_engine
from selftaught.config import EngineConfig, SamplingConfig

PROMPTS = ["The history of", "Paris is the capital", "In mathematics, a prime number is",
           "Water"]


@pytest.fixture(scope="module")
def engine(tiny_lm_dir):
    return create_engine(EngineConfig(backend="transformers", model=str(tiny_lm_dir), max_batch_size=3))


def _reference_greedy(engine, prompt: str, n: int) -> list[int]:
    ids = engine.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = engine.model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n,
                                pad_token_id=engine.tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_matches_transformers_generate(engine):
    outs = engine.generate(PROMPTS, SamplingConfig(temperature=0, max_new_tokens=12, ignore_eos=True))
    assert [o.request_index for o in outs] == list(range(len(PROMPTS)))
    for p, o in zip(PROMPTS, outs):
        c = o.completions[0]
        assert c.token_ids == _reference_greedy(engine, p, 12)
        assert c.finish_reason == "length" and c.num_tokens == 12
        assert o.prompt_token_ids == engine.tokenizer(p, add_special_tokens=False)["input_ids"]


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    p = SamplingConfig(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=10, seed=7, ignore_eos=True)
    one = engine.generate(PROMPTS[:1], p)[0].completions[0].token_ids
    many = engine.generate(PROMPTS, p)[0].completions[0].token_ids
    assert one == many
    other = engine.generate(PROMPTS[:1], p.model_copy(update={"seed": 8}))[0].completions[0].token_ids
    assert other != one


def test_n_samples_and_mixed_params(engine):
    params = [SamplingConfig(temperature=1.0, n=3, max_new_tokens=5, seed=1, ignore_eos=True),
              SamplingConfig(temperature=0, max_new_tokens=2, ignore_eos=True)]
    outs = engine.generate(PROMPTS[:2], params)
    assert len(outs[0].completions) == 3 and len(outs[1].completions) == 1
    assert all(c.num_tokens == 5 for c in outs[0].completions)
    assert len({tuple(c.token_ids) for c in outs[0].completions}) > 1  # distinct samples
    assert outs[1].completions[0].num_tokens == 2


def test_stop_token_ids_and_min_new_tokens(engine):
    greedy = engine.generate(PROMPTS[:1], SamplingConfig(temperature=0, max_new_tokens=10, ignore_eos=True))
    toks = greedy[0].completions[0].token_ids
    stop_at = toks[3]
    first = toks.index(stop_at)
    out = engine.generate(PROMPTS[:1], SamplingConfig(temperature=0, max_new_tokens=10,
                                                      stop_token_ids=[stop_at], ignore_eos=True))
    c = out[0].completions[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop_at and c.token_ids == toks[:first + 1]
    # min_new_tokens bans the stop token until enough tokens exist
    forced = engine.generate(PROMPTS[:1], SamplingConfig(temperature=0, max_new_tokens=10, min_new_tokens=8,
                                                         stop_token_ids=[stop_at], ignore_eos=True))
    assert forced[0].completions[0].num_tokens >= 8


def test_stop_strings_truncate_text(engine):
    full = engine.generate(PROMPTS[:1], SamplingConfig(temperature=0, max_new_tokens=12, ignore_eos=True))
    text = full[0].completions[0].text
    needle = text.strip()[2:5]
    assert needle
    out = engine.generate(PROMPTS[:1], SamplingConfig(temperature=0, max_new_tokens=12, stop=[needle],
                                                      ignore_eos=True))
    c = out[0].completions[0]
    assert c.finish_reason == "stop" and c.stop_reason == needle
    assert needle not in c.text and text.startswith(c.text)


def test_token_id_prompts_and_too_long_prompt_error(engine):
    ids = engine.tokenizer("Water", add_special_tokens=False)["input_ids"]
    a = engine.generate([ids], SamplingConfig(temperature=0, max_new_tokens=4, ignore_eos=True))
    b = engine.generate(["Water"], SamplingConfig(temperature=0, max_new_tokens=4, ignore_eos=True))
    assert a[0].completions[0].token_ids == b[0].completions[0].token_ids
    with pytest.raises(ValueError, match="exceed"):
        engine.generate(["x"], SamplingConfig(max_new_tokens=10_000))


def test_chat_template(engine):
    out = engine.chat([[{"role": "user", "content": "hi"}]], SamplingConfig(temperature=0, max_new_tokens=3,
                                                                          ignore_eos=True))
    assert "<|im_start|>assistant" in out[0].prompt and out[0].completions[0].num_tokens == 3


def _nucleus_by_full_sort(scaled, ks, ps):
    """The textbook top-k then top-p over the whole sorted vocabulary."""
    import torch

    V = scaled.shape[-1]
    k_t = torch.tensor([k if k > 0 else V for k in ks]).clamp(max=V)
    kth = torch.sort(scaled, dim=-1, descending=True).values.gather(1, (k_t - 1).view(-1, 1))
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    s, i = torch.sort(scaled, dim=-1, descending=True)
    pr = torch.softmax(s, dim=-1)
    s = s.masked_fill((pr.cumsum(-1) - pr) >= torch.tensor(ps).view(-1, 1), float("-inf"))
    nucleus = torch.full_like(scaled, float("-inf")).scatter(1, i, s)
    # p = 1 leaves a row alone (a cumulative sum can reach 1.0 early in float32 and cut its tail)
    return torch.where(torch.tensor(ps).view(-1, 1) < 1.0, nucleus, scaled)


def test_top_p_from_candidates_keeps_the_same_tokens_as_a_full_sort(monkeypatch):
    import torch

    from actors.engine.hf import TransformersEngine as HFEngine
    from actors.engine.base import RowState

    g = torch.Generator().manual_seed(0)
    V = 5000
    peaked = torch.randn(6, V, generator=g) * 4  # nuclei of a few tokens: served by the candidates
    flat = torch.randn(2, V, generator=g) * 0.01  # nuclei of thousands: the full-sort fallback
    logits = torch.cat([peaked, flat])
    ks = [0, 0, 40, 0, 7, 0, 0, 0]
    ps = [0.9, 1.0, 0.95, 0.5, 1.0, 0.99, 0.9, 0.3]
    rows = [RowState.__new__(RowState) for _ in ks]
    for r, k, p in zip(rows, ks, ps):
        r.params = SamplingConfig(temperature=1.0, top_k=k, top_p=p)
    monkeypatch.setattr(HFEngine, "TOP_P_CANDIDATES", 256)
    for batch in (list(range(8)), list(range(6))):  # with and without a row needing the fallback
        got = HFEngine._top_k_top_p(logits[batch].clone(), [rows[j] for j in batch])
        want = _nucleus_by_full_sort(logits[batch].clone(), [ks[j] for j in batch], [ps[j] for j in batch])
        assert torch.equal(torch.isfinite(got), torch.isfinite(want))
        assert torch.equal(got[torch.isfinite(got)], want[torch.isfinite(want)])
    kept = torch.isfinite(HFEngine._top_k_top_p(logits.clone(), rows)).sum(-1).tolist()
    assert kept[1] == V and kept[4] == 7 and kept[2] <= 40 and kept[6] > 256  # p=1 untouched; top-k; wide


def test_cpu_engines_share_kv_heads_and_match_transformers_sdpa(tiny_lm_dir):
    import torch

    from actors.engine.attention import NAME
    from selftaught.models import load_causal_lm

    engine = create_engine(EngineConfig(backend="transformers", model=str(tiny_lm_dir), device="cpu"))
    cfg = engine.model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # the nano shape is grouped-query
    assert engine.gqa_sdpa and cfg._attn_implementation == NAME
    _, ref = load_causal_lm(str(tiny_lm_dir), device="cpu")
    assert ref.config._attn_implementation == "sdpa"
    ids = torch.randint(3, 200, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: the masked path, where transformers copies KV heads
    mask[1, :2] = 0
    with torch.no_grad():
        got = engine.model(input_ids=ids, attention_mask=mask).logits
        want = ref.eval()(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got[mask.bool()], want[mask.bool()])
    # a model handed to the engine may be shared (a trainer's): its attention is left alone
    handed = create_engine(EngineConfig(backend="transformers", model=str(tiny_lm_dir)), model=ref,
                           tokenizer=engine.tokenizer)
    assert ref.config._attn_implementation == "sdpa" and not getattr(handed, "gqa_sdpa", False)
    p = SamplingConfig(temperature=0, max_new_tokens=8, ignore_eos=True)
    assert [o.completions[0].token_ids for o in engine.generate(PROMPTS, p)] == \
        [o.completions[0].token_ids for o in handed.generate(PROMPTS, p)]
