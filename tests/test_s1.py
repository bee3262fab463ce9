"""The s1 pipeline end to end on a nano model (pool -> curation -> SFT -> budget-forced eval),
plus the trace generator and the SFT format it trains on."""
from __future__ import annotations

import json
from fractions import Fraction

import pytest

from selftaught.config import BudgetConfig


@pytest.fixture(scope="module")
def s1_run(ray_cluster, tiny_lm_dir, tmp_path_factory):
    from pipelines.s1 import S1Config, run

    d = tmp_path_factory.mktemp("s1")
    cfg = S1Config.model_validate({
        "run_dir": str(d), "base_model": str(tiny_lm_dir),
        "pool": {"size_per_task": 6},
        "curation": {"target_size": 8, "quality": {"min_trace_chars": 5},
                     "difficulty": {"tokenizer": str(tiny_lm_dir)}},
        "reference": {"sampling": {"temperature": 0, "max_new_tokens": 4},
                      "engine": {"backend": "transformers", "cpus_per_actor": 1}},
        "sft": {"epochs": 1, "train": {"seq_len": 128, "micro_batch_size": 4, "progress": False}},
        "eval": {"size_per_task": 2, "caps": [0, 4], "extensions": [1], "votes": [1, 2], "max_new_tokens": 24,
                 "max_answer_tokens": 4, "engine": {"backend": "transformers", "cpus_per_actor": 1}}})
    return cfg, d, run(cfg)


def test_pipeline_writes_curve_table_and_report(s1_run):
    cfg, d, result = s1_run
    assert (d / "eval" / "curve.png").stat().st_size > 1000
    res = json.loads((d / "eval" / "results.json").read_text())
    names = [p["setting"] for p in res["points"]]
    assert names == ["cap 0", "cap 4", "natural", "wait x1", "vote@1", "vote@2"]
    pts = {p["setting"]: p for p in res["points"]}
    # exact budget semantics survive the whole path (Ray Data, chat template, per-row budgets)
    assert pts["cap 0"]["thinking_tokens_per_question"] == 0
    assert pts["cap 4"]["thinking_tokens_per_question"] <= 4
    assert pts["vote@2"]["tokens_per_question"] > pts["vote@1"]["tokens_per_question"]
    assert all(0.0 <= p["accuracy"] <= 1.0 and p["questions"] == res["questions"] for p in res["points"])
    assert "| cap 4 |" in (d / "eval" / "results.md").read_text()
    assert "Test-time scaling" in (d / "report.md").read_text()
    cur = json.loads((d / "curation" / "report.json").read_text())
    assert cur["counts"]["input"] == 18 and 1 <= cur["counts"]["selected"] <= 8
    assert cur["solver"]["name"] == "EngineSolver"  # difficulty measured by the base model on engine actors
    assert set(result["points"]) == set(names)


def test_rerun_skips_finished_stages(s1_run, caplog):
    import logging

    from pipelines.s1 import run

    cfg, d, _ = s1_run
    mtime = (d / "sft" / "model" / "config.json").stat().st_mtime
    with caplog.at_level(logging.INFO):
        run(cfg)
    assert (d / "sft" / "model" / "config.json").stat().st_mtime == mtime
    assert sum("up to date, skipped" in r.message for r in caplog.records) == 4


def test_sft_masks_the_prompt_and_marker(s1_run, tiny_lm_dir):
    from pipelines.s1 import sft_examples
    from selftaught.models import load_tokenizer
    from selftaught.storage import read_parquet

    cfg, d, _ = s1_run
    rows = read_parquet(d / "curation" / "selected.parquet").to_pylist()
    tok = load_tokenizer(tiny_lm_dir)
    ids, masks, _ = sft_examples(rows[:1], cfg, tok)
    trained = tok.decode(ids[0][masks[0] == 1])
    assert rows[0]["trace"].splitlines()[0] in trained and str(rows[0]["answer"]) in trained
    assert rows[0]["question"][:20] not in trained and "think" not in trained


def test_arithmetic_traces_are_exact():
    from selftaught.data.traces import arithmetic_steps

    steps, value = arithmetic_steps("( 56 + -33 ) - 84")
    assert steps == ["56 + -33 = 23", "23 - 84 = -61"] and value == -61
    steps, value = arithmetic_steps("2 + 3 * 4 - 6 / 4 =")
    assert steps == ["3 * 4 = 12", "2 + 12 = 14", "6 / 4 = 1.5", "14 - 1.5 = 12.5"] and value == Fraction(25, 2)


def test_traces_for_reasoning_gym_rows_agree_with_the_task():
    from selftaught.data.reasoning import build_reasoning, score_answer
    from selftaught.data.traces import add_traces

    rows, _ = build_reasoning(["chain_sum", "basic_arithmetic"], 15, seed=3,
                              task_config={"basic_arithmetic": {"operators": ["+", "-", "*"], "max_digits": 2}})
    traced, dropped = add_traces(rows + [{**rows[0], "answer": "999999"}, {**rows[1], "metadata": "{}"}])
    assert len(traced) == 30 and dropped["disagrees_with_answer"] == 1 and dropped["no_expression"] == 1
    for r in traced:
        last = r["trace"].splitlines()[-1].split("=")[-1].strip()
        assert score_answer(r, last, extract=False, binary=True) == 1.0


def test_sft_conversation_and_majority():
    from selftaught.data.traces import majority, sft_conversation

    fmt = BudgetConfig()
    conv = sft_conversation({"question": "1 + 2 =", "trace": "1 + 2 = 3", "answer": "3"}, fmt)
    assert conv[1]["content"] == "<|im_start|>think\n1 + 2 = 3\n<|im_start|>answer\n3"
    assert majority(["4", "5", "5", "", "4"]) == "4"  # ties go to the first seen
    assert majority(["", " "]) == ""
    # votes count equal answers together, not equal strings: 3 votes for 1000 beat 2 for 999
    assert majority(["999", "1,000", "999", "1000", "1000.0"]) == "1,000"
    assert majority(["1/2", "0.7", "0.5", "0.7", "\\frac{1}{2}"]) == "1/2"
    assert majority(["Lyon", "Paris.", "paris"]) == "Paris."  # 2 votes after normalisation against 1


def test_eval_seed_range_must_not_meet_the_pool():
    """reasoning-gym item i is drawn from seed + i: overlapping ranges repeat training questions."""
    from pydantic import ValidationError

    from pipelines.s1 import S1Config

    with pytest.raises(ValidationError, match="overlaps"):
        S1Config.model_validate({"pool": {"seed": 1, "size_per_task": 300}, "eval": {"seed": 7}})
    S1Config.model_validate({"pool": {"seed": 1, "size_per_task": 300}, "eval": {"seed": 301}})
