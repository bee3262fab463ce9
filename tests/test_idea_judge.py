"""The hyper-parameter vs algorithmic judge (selftaught/idea_judge.py): the free rule, the
answer parser, and LLM calls charged to role ``judge`` and cached (litellm mock_response)."""
from __future__ import annotations

import pytest

from selftaught.idea_judge import IdeaJudge, JudgeConfig, edited_files, parse_kind, rule_kind
from selftaught.ledger import Ledger

CONFIG_ONLY = "--- a/config.json\n+++ b/config.json\n@@ -1 +1 @@\n-{\"lr\": 0.01}\n+{\"lr\": 0.02}\n"
MODEL_EDIT = CONFIG_ONLY + "--- a/model.py\n+++ b/model.py\n@@ -1 +1 @@\n-x = relu(x)\n+x = gelu(x)\n"
PRICE = {"input_price_per_mtok": 1.0, "output_price_per_mtok": 2.0}


def test_rule_needs_no_call_for_knobs_and_config_only_edits():
    assert edited_files(MODEL_EDIT) == ["config.json", "model.py"]
    assert rule_kind({"knobs": {"lr": 0.1}}, None, "config.json") == "hyperparameter"
    assert rule_kind({"text": "use GELU"}, CONFIG_ONLY, "config.json") == "hyperparameter"
    assert rule_kind({"text": "use GELU"}, MODEL_EDIT, "config.json") is None
    assert rule_kind({"text": "anything"}, None, "config.json") is None


def test_parse_kind():
    assert parse_kind('Sure. {"kind": "algorithmic", "reason": "new activation"}') == ("algorithmic", "new activation")
    assert parse_kind('{"kind": "hyperparameter"}')[0] == "hyperparameter"
    assert parse_kind("it is algorithmic")[0] == "unknown"
    assert parse_kind('{"kind": "both"}')[0] == "unknown"
    assert parse_kind('In {braces}: {"kind": "hyperparameter", "reason": "lr"} {done}') == ("hyperparameter", "lr")


def test_llm_judge_is_charged_to_its_role_and_cached(tmp_path):
    ledger = str(tmp_path / "ledger.sqlite")
    cfg = JudgeConfig(llm={"model": "openai/mock-judge", "max_retries": 0, **PRICE,
                           "mock_response": '{"kind": "algorithmic", "reason": "changes the activation"}'})
    judge = IdeaJudge(cfg, cache=str(tmp_path / "cache.sqlite"), ledger=ledger)
    idea = {"text": "swap ReLU for GELU in the MLP"}
    first = judge.classify(idea, MODEL_EDIT, "config.json")
    assert first["kind"] == "algorithmic" and first["source"] == "judge" and first["usd"] > 0
    again = IdeaJudge(cfg, cache=str(tmp_path / "cache.sqlite"), ledger=ledger).classify(idea, MODEL_EDIT,
                                                                                          "config.json")
    assert again["kind"] == "algorithmic" and again["usd"] == 0.0  # a resumed run: answered by the cache
    roles = Ledger(ledger).snapshot()["roles"]
    assert roles["judge"]["calls"] == 1 and roles["judge"]["cache_hits"] == 1
    assert roles["judge"]["usd"] == pytest.approx(first["usd"])
    assert judge.classify({"knobs": {"lr": 0.1}}, None, "config.json")["source"] == "rule"
    assert IdeaJudge(JudgeConfig()).classify(idea, MODEL_EDIT, "config.json")["kind"] == "unknown"
    assert judge.worst_case_usd(10) > 0 and IdeaJudge(JudgeConfig()).worst_case_usd(10) == 0.0
