"""The engine inside Ray: generator actors, Ray Data map_batches on an actor pool, Serve."""

import os

import httpx
import pytest

from selftaught.config import EngineConfig, SamplingConfig
from tests.conftest import free_port

GREEDY = SamplingConfig(temperature=0, max_new_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def engine_cfg(tiny_lm_dir):
    return EngineConfig(backend="transformers", model=str(tiny_lm_dir), max_batch_size=4)


@pytest.fixture(scope="module")
def local_outputs(engine_cfg):
    from actors.engine import create_engine

    eng = create_engine(engine_cfg)
    return {p: eng.generate([p], GREEDY)[0].completions[0].text for p in ["alpha", "beta", "gamma"]}


def test_generator_actor_pool(ray_cluster, engine_cfg, local_outputs):
    from actors.generator import start_generators

    actors = start_generators(engine_cfg, num_actors=2)
    outs = ray_cluster.get([a.generate.remote(["alpha", "beta"], GREEDY.model_dump()) for a in actors])
    for out in outs:
        assert [o["completions"][0]["text"] for o in out] == [local_outputs["alpha"], local_outputs["beta"]]
    info = ray_cluster.get(actors[0].info.remote())
    assert info["backend"] == "transformers"
    for a in actors:
        ray_cluster.kill(a)


def test_ray_data_map_batches(ray_cluster, engine_cfg, local_outputs):
    import json

    import ray.data

    from actors.generator import generate_dataset

    rows = [{"prompt": p, "id": i, "sampling": json.dumps({"n": 2, "temperature": 1.0, "seed": i})
             if p == "gamma" else ""} for i, p in enumerate(["alpha", "beta", "gamma"])]
    budget = {"min_thinking_tokens": 3, "max_thinking_tokens": 3, "extension": "", "max_answer_tokens": 2}
    rows.append({"prompt": "delta", "id": 3, "sampling": json.dumps({"max_new_tokens": 12, "budget": budget})})
    ds = generate_dataset(ray.data.from_items(rows), engine_cfg, GREEDY, num_actors=1, batch_size=2,
                          sampling_column="sampling")
    out = sorted(ds.take_all(), key=lambda r: (r["id"], r["sample_index"]))
    assert [r["id"] for r in out] == [0, 1, 2, 2, 3]
    assert out[0]["generated_text"] == local_outputs["alpha"]
    assert out[1]["generated_text"] == local_outputs["beta"]
    assert all(r["completion_tokens"] == 6 and r["finish_reason"] == "length" for r in out[:4])
    assert out[0]["generated_budget"] == "" and out[0]["generated_answer"] == out[0]["generated_text"]
    used = json.loads(out[4]["generated_budget"])  # a budget-forced row batched with plain ones
    assert used["thinking_tokens"] == 3 and used["capped"] and used["answer_tokens"] <= 2
    assert out[4]["generated_text"].startswith(out[4]["generated_reasoning"])


def test_serve_generate_app(ray_cluster, engine_cfg, local_outputs):
    from ray import serve

    from serve.config import ServeConfig
    from serve.generate_app import build_generate_app

    os.environ["SELFTAUGHT_TEST_GEN_KEYS"] = "gen-key"
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_generate_app(engine_cfg.model_copy(update={"cpus_per_actor": 0.5}),
                                 serve_cfg=ServeConfig(api_key_env="SELFTAUGHT_TEST_GEN_KEYS", max_tokens_limit=64)),
              name="gen", route_prefix="/gen")
    url = f"http://127.0.0.1:{port}/gen"
    try:
        r = httpx.post(url, json={"prompt": "alpha"}, timeout=60)  # the same keys as /v1
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with httpx.Client(timeout=60, headers={"Authorization": "Bearer gen-key"}) as c:
            r = c.post(url, json={"prompt": "alpha", "sampling": GREEDY.model_dump()})
            assert r.status_code == 200, r.text
            assert r.json()["completions"][0]["text"] == local_outputs["alpha"]
            r = c.post(url, json={"prompts": ["beta", "gamma"], "sampling": GREEDY.model_dump()})
            assert [o["completions"][0]["text"] for o in r.json()["outputs"]] == \
                [local_outputs["beta"], local_outputs["gamma"]]
            assert c.get(url + "/health").json()["status"] == "ok"
            bad = [c.post(url, content=b"{not json"),
                   c.post(url, json={"prompt": "x", "sampling": {"temperature": -1}}),
                   c.post(url, json={"nothing": 1}),
                   c.post(url, json={"prompt": "x", "sampling": {"max_new_tokens": 65}})]  # over the limit
            assert [b.status_code for b in bad] == [400, 400, 400, 400]
            assert "temperature" in bad[1].json()["error"]["message"]  # the OpenAI error shape
            assert c.post(url, json={"prompt": [1, 10**9]}).status_code == 400
            assert c.get(url + "/nope").json()["error"]["code"] == "not_found"
    finally:
        serve.delete("gen")
        serve.shutdown()
