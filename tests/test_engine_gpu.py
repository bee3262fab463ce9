"""The engine on CUDA (continuous batching, eager and compiled forward): runs on the accelerator machine."""
import pytest
import torch

from actors.engine import create_engine
from selftaught.config import EngineConfig, SamplingConfig

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_engine_matches_generate(compile):
    from selftaught.models import load_causal_lm

    tok, model = load_causal_lm("smollm2-135m-instruct", device="cuda", dtype=torch.bfloat16)
    engine = create_engine(EngineConfig(backend="transformers", device="cuda", compile=compile, max_batch_size=8,
                                        max_model_len=256), model=model, tokenizer=tok)
    prompts = ["The capital of France is", "List three prime numbers:"]
    outs = engine.generate(prompts, SamplingConfig(temperature=0, max_new_tokens=16, ignore_eos=True))
    for p, o in zip(prompts, outs):
        ids = tok(p, return_tensors="pt", add_special_tokens=False).to("cuda")
        ref = model.generate(**ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        got, want = o.completions[0].token_ids, ref[0, ids["input_ids"].shape[1]:].tolist()
        # bf16 kernels differ between paths; the first tokens must agree exactly
        assert got[:8] == want[:8]
