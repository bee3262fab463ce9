"""Model factory: from-scratch shapes and tokenizers, the packaged SmolLM2 and MiniLM."""
import pytest
import torch

from selftaught.models import (MODEL_SIZES, build_model, load_causal_lm, load_embedder, load_tokenizer,
                               model_config, resolve_model_path)
from tests.conftest import wiki_texts


def test_bpe_tokenizer_roundtrip_and_specials(tiny_lm_dir):
    tok = load_tokenizer(tiny_lm_dir)
    text = "Photosynthesis converts light into chemical energy."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id is not None
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("size", list(MODEL_SIZES))
def test_named_sizes_param_count(size):
    """Parameter counts from the shape formula agree with the real module (built on the meta
    device, so even 6B costs nothing); QK-norm is present."""
    from transformers import AutoModelForCausalLM

    vocab = 32_000
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(size, vocab))
    real = sum(p.numel() for p in model.parameters())
    assert real == MODEL_SIZES[size].num_params(vocab)
    assert any("q_norm" in n for n, _ in model.named_parameters())
    if size in ("3b", "6b"):
        assert 2.5e9 < real < 7.5e9


def test_build_and_save_from_scratch(tmp_path, tiny_lm_dir):
    tok = load_tokenizer(tiny_lm_dir)
    model = build_model("nano", tok)
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tok2, m2 = load_causal_lm(tmp_path)
    x = torch.tensor([[1, 2, 3]])
    assert torch.allclose(model(x).logits, m2(x).logits)


def test_smollm2_from_package_answers_offline():
    path = resolve_model_path("smollm2-135m-instruct")
    tok, model = load_causal_lm("smollm2-135m-instruct")
    assert (path / "config.json").exists() and len(tok) >= 49_152
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a packaged model"):
        resolve_model_path(tmp_path / "nothing")


def test_minilm_embedder_groups_related_texts():
    emb = load_embedder("minilm")
    texts = wiki_texts(3) + ["A cat is a small domesticated carnivorous mammal."]
    vecs = emb.encode(["Cats are popular pets kept by people."] + texts, normalize_embeddings=True)
    assert vecs.shape[1] == 384
    sims = vecs[1:] @ vecs[0]
    assert sims.argmax() == len(texts) - 1
