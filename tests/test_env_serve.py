"""env.value on Ray Serve: submit, poll, stream, the Python client, API keys and 4xx errors."""
from __future__ import annotations

import os

import httpx
import pytest

from serve.env_app import EnvEntry, EnvServeConfig, env_base_url, run_env_app
from serve.env_client import EnvValueClient, EnvValueError
from tests.conftest import free_port

KEYS_ENV = "SELFTAUGHT_TEST_ENV_KEYS"


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    from ray import serve

    os.environ[KEYS_ENV] = "k1,k2"
    run_dir = tmp_path_factory.mktemp("envserve")
    cfg = EnvServeConfig(envs=[EnvEntry(name="toy", executor={"run_dir": str(run_dir)})], api_key_env=KEYS_ENV,
                         port=free_port(), app_name="env-value-test", max_batch_ideas=4, max_idea_chars=500,
                         proxy_location="HeadOnly")  # passed through to serve.start
    run_env_app(cfg)
    try:
        yield env_base_url(cfg)
    finally:
        serve.delete(cfg.app_name)
        serve.shutdown()  # the proxy's port goes with it: later apps start their own


def test_value_through_the_client(service):
    client = EnvValueClient(service, api_key="k2", timeout_s=60)
    assert client.envs() == ["toy"]
    desc = client.describe("toy")
    assert desc["schema"]["type"] == "object" and "Fit a straight line" in desc["context"]
    good, weak = client.value("toy", [{"knobs": {"lr": 0.1, "steps": 60}}, {"knobs": {"steps": 2}}], timeout_s=120)
    assert good.ok and weak.ok and good.reward > weak.reward
    ids = client.submit("toy", [{"knobs": {"steps": 7}}, {"knobs": {"steps": 8}}], seed=3)
    streamed = list(client.stream("toy", ids, timeout_s=120))
    assert sorted(r.idea_id for r in streamed) == sorted(ids) and all(r.ok for r in streamed)
    again, pending = client.results("toy", ids)
    assert not pending and {r.idea_id for r in again} == set(ids)
    one = httpx.get(f"{service}/v1/envs/toy/ideas/{ids[0]}", headers={"Authorization": "Bearer k1"}, timeout=30).json()
    assert one["state"] == "finished" and one["result"]["status"] == "ok"


def test_errors_are_openai_shaped(service):
    ok = {"Authorization": "Bearer k1"}

    def post(body, headers=ok, env="toy", raw=False):
        return httpx.post(f"{service}/v1/envs/{env}/ideas", content=body if raw else None,
                          json=None if raw else body, headers=headers, timeout=30)

    r = post({"ideas": [{"knobs": {"steps": 1}}]}, headers={})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert post({"ideas": []}).status_code == 400
    r = post({"ideas": [{"knobs": {"steps": i}} for i in range(1, 6)]})
    assert r.status_code == 400 and "limit of 4" in r.json()["error"]["message"]
    r = post({"ideas": ["x" * 600]})
    assert r.status_code == 400 and "limit is 500" in r.json()["error"]["message"]
    r = post(b"{not json", raw=True)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = post({"ideas": ["a free-form idea"]})  # this service has no implementer configured
    assert r.status_code == 400 and "implementer" in r.json()["error"]["message"]
    r = post({"ideas": [{"knobs": {"steps": 1}}], "seed": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    assert post({"ideas": [{"knobs": {"steps": 1}}]}, env="nope").status_code == 404
    for bad in ({"text": 5}, {"text": "x", "id": "../../escape"}, {"knobs": {"steps": 1}, "meta": 3}, {"text": " "}):
        r = post({"ideas": [bad]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "ideas.0", (bad, r.text)
    r = httpx.get(f"{service}/v1/envs/toy/results", params={"ids": "idea-x", "wait_s": "nan"}, headers=ok, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "wait_s"
    r = httpx.get(f"{service}/v1/envs/toy/results", params={"ids": "idea-unknown"}, headers=ok, timeout=30)
    assert r.status_code == 404
    with pytest.raises(EnvValueError) as e:
        EnvValueClient(service, api_key="wrong").envs()
    assert e.value.status == 401
    # a bad request never hurts the good one sent beside it
    good = EnvValueClient(service, api_key="k1").value("toy", [{"knobs": {"steps": 9}}], timeout_s=120)
    assert good[0].ok
    assert httpx.get(f"{service}/health", timeout=30).json()["status"] == "ok"
