"""One chat-model protocol: the engine, a pool of engine actors and the litellm client all
answer ``chat(conversations, sampling)`` with the engine's output schema."""
from actors.engine import create_engine
from actors.engine.base import ChatModel, GenerationOutput
from actors.generator import EnginePool
from selftaught.config import EngineConfig, SamplingConfig
from selftaught.llm import LLMClient, LLMConfig

CONVS = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "name a river"}]]


def _check(model, n=2):
    assert isinstance(model, ChatModel)
    outs = model.chat(CONVS, SamplingConfig(temperature=0, max_new_tokens=3, n=n, ignore_eos=True))
    assert [o.request_index for o in outs] == [0, 1]
    assert all(isinstance(o, GenerationOutput) and len(o.completions) == n for o in outs)
    return outs


def test_engine_pool_and_client_satisfy_one_protocol(ray_cluster, tiny_lm_dir):
    cfg = EngineConfig(backend="transformers", model=str(tiny_lm_dir), cpus_per_actor=0.5)
    engine_outs = _check(create_engine(cfg))
    pool = EnginePool.start(cfg, num_actors=2, timeout_s=120)
    try:
        pool_outs = _check(pool)
        assert [[c.token_ids for c in o.completions] for o in pool_outs] == \
            [[c.token_ids for c in o.completions] for o in engine_outs]  # greedy: the same answers
        from selftaught.models import build_model

        local = create_engine(cfg)
        new = build_model("nano", local.tokenizer, seed=7).state_dict()
        assert [r["version"] for r in pool.update_weights(new)] == [1, 1]  # every actor, in place
        local.update_weights(new)
        sp = SamplingConfig(temperature=1.0, seed=3, max_new_tokens=4, logprobs=0, ignore_eos=True)
        want, got = local.chat(CONVS, sp), pool.chat(CONVS, sp)
        assert [o.completions[0].token_ids for o in got] == [o.completions[0].token_ids for o in want]
    finally:
        import ray

        for a in pool.actors:
            ray.kill(a)
    client = LLMClient(LLMConfig(model="openai/mock", mock_response="a river", input_price_per_mtok=1,
                                 output_price_per_mtok=1))
    outs = _check(client)
    assert outs[1].completions[1].text == "a river" and outs[1].metrics["completion_tokens"] > 0
