"""s1K-style curation: quality / difficulty / diversity, the ablations, files and report."""
from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from pydantic import ValidationError

from pipelines.curation import (ColumnSolver, CurationConfig, DifficultyConfig, DiversityConfig, EngineSolver,
                                LLMSolver, QualityConfig, Solver, assign_domains, curate, difficulty_filter,
                                gather_samples, is_correct, load_pool, quality_filter, select,
                                write_curation)
from selftaught.text import normalize_answer

TRACE = "Let us think about this carefully, step by step. "


def row(i, question=None, trace=None, answer="5", **kw):
    return {"id": f"r{i}", "question": question if question is not None else f"What is problem number {i}?",
            "trace": trace if trace is not None else TRACE + f"So the answer is {answer}.", "answer": answer, **kw}


def pool(sizes: dict[str, int], seed: int = 0) -> list[dict]:
    """Rows in several domains with distinct trace lengths (``trace_tokens`` = word count)."""
    rng = random.Random(seed)
    rows, k = [], 0
    for domain, n in sizes.items():
        for _ in range(n):
            words = rng.randint(5, 400)
            rows.append({"id": f"{domain}-{k}", "task": domain, "question": f"Question {k} about {domain}?",
                         "trace": " ".join(["step"] * (words - 1) + ["7"]), "answer": "7"})
            k += 1
    return rows


# ---------------------------------------------------------------------------------- quality
def test_quality_filter_counts_every_reason():
    rows = [
        row(0), row(1, answer="12"),                                        # kept
        {**row(2), "question": None}, {**row(3), "question": 42}, "not a row",      # malformed
        {**row(4), "trace": 17},
        row(5, answer=""), {**row(6), "answer": None},                       # missing_answer
        row(7, question="2+2?"),                                             # question_too_short
        row(8, question="x" * 201),                                          # question_too_long
        row(9, trace="ok"), {k: v for k, v in row(10).items() if k != "trace"},  # trace_too_short
        row(11, trace=TRACE + "see https://example.com/fig.png"),            # pattern:https?://
        row(12, question="Broken \ufffd text in this question?"),            # pattern:\ufffd
        row(13, question="  what IS problem   number 0? "),                   # duplicate of r0
        row(14, trace=TRACE + "So the answer is 8.", answer="7"),            # incorrect_trace
    ]
    original = json.dumps(rows, sort_keys=True)
    cfg = QualityConfig(max_question_chars=200, require_correct_trace=True)
    kept, removed = quality_filter(rows, cfg)
    assert [r["id"] for r in kept] == ["r0", "r1"]
    assert removed == {"malformed": 4, "missing_answer": 2, "question_too_short": 1, "question_too_long": 1,
                       "trace_too_short": 2, "pattern:https?://": 1, "pattern:\ufffd": 1, "duplicate": 1,
                       "incorrect_trace": 1}
    assert sum(removed.values()) + len(kept) == len(rows)
    assert json.dumps(rows, sort_keys=True) == original  # input untouched

    # the first copy of a question that passes everything is the one kept
    kept, removed = quality_filter([row(14, trace="too short"), row(15, question="What is problem number 14?")],
                                   QualityConfig())
    assert [r["id"] for r in kept] == ["r15"] and removed == {"trace_too_short": 1}
    # switched off: only rows later stages cannot handle are removed
    kept, removed = quality_filter(rows, QualityConfig(enabled=False))
    assert len(kept) == len(rows) - 4 and removed == {"malformed": 4}
    with pytest.raises(ValidationError, match="regular expression"):
        QualityConfig(reject_patterns=["(unclosed"])


def test_correctness_uses_the_reasoning_gym_verifier():
    from selftaught.data.reasoning import build_reasoning

    rows, _ = build_reasoning(["basic_arithmetic"], size=20)
    assert len(rows) == 20
    for r in rows:
        assert is_correct(r, f"Computing... <answer>{r['answer']}</answer>")
        assert not is_correct(r, f"Computing... <answer>{r['answer']}1</answer>")
        assert not is_correct(r, "")
    # the verifier, not the answer column, decides for rows that carry reasoning-gym metadata
    r = {**rows[1], "answer": "999999"}
    assert is_correct(r, f"Answer: {rows[1]['answer']}") and not is_correct(r, "Answer: 999999")
    # without metadata: normalised comparison with the answer column
    plain = {k: v for k, v in r.items() if k != "metadata"}
    assert is_correct(plain, "so \\boxed{999,999.0}") and not is_correct(plain, f"Answer: {rows[1]['answer']}")
    assert is_correct({"answer": "\\boxed{12}"}, "Answer: 12") and not is_correct({"answer": "2 or 3"}, "Answer: 3")
    assert normalize_answer(" $1,000.50$. ") == "1000.5" and normalize_answer("\\text{Paris}") == "paris"
    # an unknown task falls back to the answer column instead of failing
    odd = {"id": "x", "task": "no_such_task", "metadata": json.dumps({"size": 1, "seed": 0, "index": 0}),
           "answer": "12"}
    assert is_correct(odd, "Final answer: 12") and not is_correct(odd, "Final answer: 13")

    # the quality filter's correctness check on real rows: half the traces end wrong
    traced = [{**r, "trace": TRACE + f"<answer>{r['answer'] if i % 2 else 'wrong'}</answer>"}
              for i, r in enumerate(rows)]
    kept, removed = quality_filter(traced, QualityConfig(require_correct_trace=True, min_question_chars=5))
    assert removed == {"incorrect_trace": 10} and all(int(r["id"].rsplit("/", 1)[1]) % 2 for r in kept)


# ---------------------------------------------------------------------------------- difficulty
def test_difficulty_filter_with_stored_answers():
    rows = [row(0, ref="The answer is 5."), row(1, ref="The answer is 6."), row(2, ref=None),
            row(3, ref=["Answer: 4", "Answer: 5"], answer="5"), row(4, trace="just five words here: 5")]
    solver = ColumnSolver("ref")
    assert isinstance(solver, Solver)
    kept, removed = difficulty_filter(rows, solver, DifficultyConfig(min_trace_tokens=6))
    assert removed == {"short_trace": 1, "solved": 2}
    assert [(r["id"], r["solved_by"]) for r in kept] == [("r1", 0), ("r2", 0)]
    assert kept[0]["trace_tokens"] == len(rows[1]["trace"].split()) and "solved_by" not in rows[0]
    # a higher bar keeps rows solved only sometimes; two columns are two reference models
    kept, removed = difficulty_filter(rows, ColumnSolver(["ref", "answer"]),
                                      DifficultyConfig(drop_if_solved_by_at_least=2))
    assert removed == {"solved": 2} and {r["id"]: r["solved_by"] for r in kept} == {"r1": 1, "r2": 1, "r4": 1}
    kept, removed = difficulty_filter(rows, solver, DifficultyConfig(enabled=False))
    assert len(kept) == 5 and removed == {} and all("trace_tokens" in r for r in kept)


def test_difficulty_filter_with_llm_solver(monkeypatch):
    import litellm

    from selftaught.llm import LLMClient, LLMConfig

    real = litellm.completion

    def picky(**kw):
        if "refuse" in kw["messages"][-1]["content"]:
            raise litellm.exceptions.BadRequestError("refused", model=kw["model"], llm_provider="openai")
        return real(**kw)

    monkeypatch.setattr(litellm, "completion", picky)
    client = LLMClient(LLMConfig(model="gpt-4o-mini", mock_response="Thinking... <answer>42</answer>",
                                 max_concurrency=4))
    rows = [row(0, answer="42"), row(1, answer="41"), row(2, answer="42.0"),
            row(3, question="Please refuse this question.", answer="42")]
    solver = LLMSolver(client)
    kept, removed = difficulty_filter(rows, solver, DifficultyConfig(num_samples=2))
    assert removed == {"solved": 2}
    assert [(r["id"], r["solved_by"]) for r in kept] == [("r1", 0), ("r3", 0)]
    assert solver.failures == 2  # the refused row, twice: counted as unsolved, not lost
    assert client.usage.snapshot()["calls"] == 8

    _, report = curate(rows, CurationConfig(target_size=10, difficulty=DifficultyConfig(num_samples=1)), solver)
    assert report["solver"] == {"name": "LLMSolver", "failures": 1}
    assert report["removed"]["difficulty"] == {"solved": 2} and report["counts"]["after_difficulty"] == 2


def test_engine_solver_on_ray_keeps_order(ray_cluster, tiny_lm_dir):
    from actors.engine import create_engine
    from selftaught.config import EngineConfig, SamplingConfig
    from selftaught.data.reasoning import extract_answer, format_reasoning_prompt
    from selftaught.models import load_tokenizer

    engine_cfg = EngineConfig(backend="transformers", model=str(tiny_lm_dir), device="cpu", max_batch_size=4)
    # The untrained model says only newlines when greedy; seeded sampling (row i uses seed + i,
    # one generator per row and sample) gives distinct texts, whatever the batching.
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8, ignore_eos=True, seed=7)
    rows = [row(i, question=f"Compute {' + '.join(['1'] * (i + 1))} for question {i}.") for i in range(6)]
    eng = create_engine(engine_cfg)
    local = [[c.text for c in eng.chat([[{"role": "user", "content": format_reasoning_prompt(r)}]],
                                       sampling.model_copy(update={"n": 2, "seed": 7 + i}))[0].completions]
             for i, r in enumerate(rows)]
    assert len({t for ts in local for t in ts}) > 6
    # make one row "solved" by what the model says for it, so the scores must line up with the rows
    k = next(i for i, ts in enumerate(local) if normalize_answer(extract_answer(ts[0])))
    for i, r in enumerate(rows):
        r["answer"] = extract_answer(local[i][0]) if i == k else f"zz none {i}"

    class Recording:
        def __init__(self, inner):
            self.inner, self.failures, self.outputs = inner, 0, None

        def solve(self, rows, num_samples):
            self.outputs = self.inner.solve(rows, num_samples)
            return self.outputs

    solver = Recording(EngineSolver(engine_cfg, sampling, num_actors=1, batch_size=2))
    cfg = DifficultyConfig(num_samples=2, tokenizer=str(tiny_lm_dir))
    kept, removed = difficulty_filter(rows, solver, cfg)
    assert solver.outputs == local  # input order, n samples each
    assert removed == {"solved": 1} and [r["id"] for r in kept] == [r["id"] for r in rows if r["id"] != f"r{k}"]
    assert all(r["solved_by"] == 0 for r in kept)
    tok = load_tokenizer(tiny_lm_dir)
    assert [r["trace_tokens"] for r in kept] == \
        [len(tok(r["trace"], add_special_tokens=False)["input_ids"]) for r in kept]
    assert kept[0]["trace_tokens"] != len(kept[0]["trace"].split())
    # records coming back in any order are put back in order
    recs = [{"_curation_index": i, "sample_index": s, "generated_text": f"{i}.{s}"} for i in range(3) for s in range(2)]
    random.Random(0).shuffle(recs)
    assert gather_samples(recs, 3) == [["0.0", "0.1"], ["1.0", "1.1"], ["2.0", "2.1"]]


# ---------------------------------------------------------------------------------- selection
def _select(rows, selection="s1", target=30, seed=0, **div):
    cfg = CurationConfig(target_size=target, seed=seed, selection=selection, diversity=DiversityConfig(**div))
    return select(rows, cfg)


def test_diversity_sampling_is_uniform_over_domains():
    rows = pool({"big": 400, "mid": 40, "small": 15})
    for seed in range(3):
        for mode in ("s1", "diversity"):
            counts = Counter(r["domain"] for r in _select(rows, mode, seed=seed))
            assert sum(counts.values()) == 30 and set(counts) == {"big", "mid", "small"}
            assert max(counts.values()) - min(counts.values()) <= 8, counts
        assert Counter(r["task"] for r in _select(rows, "random", seed=seed))["big"] >= 20
    # a domain that runs out leaves the draw; asking for everything returns everything once
    every = _select(rows, "s1", target=1000)
    assert len(every) == len(rows) and len({r["id"] for r in every}) == len(rows)
    assert Counter(r["domain"] for r in _select(rows, "s1", target=100))["small"] == 15
    # rows without the domain column form their own "unknown" domain
    assert [r["domain"] for r in assign_domains([{"task": None}, {"task": ""}, {"x": 1}, {"task": "a"}],
                                                DiversityConfig())] == ["unknown"] * 3 + ["a"]


def test_length_weighting_prefers_long_traces():
    rows = pool({"only": 200}, seed=1)
    by_length = sorted((len(r["trace"].split()) for r in rows), reverse=True)
    weighted = _select(rows, "s1", target=20)
    flat = _select(rows, "s1", target=20, length_weighting=False)
    assert min(r["trace_tokens"] for r in weighted) >= by_length[35]
    mean = lambda rs: sum(r["trace_tokens"] for r in rs) / len(rs)  # noqa: E731
    assert mean(weighted) > 1.5 * mean(flat)
    assert [r["id"] for r in _select(rows, "length", target=5)] == \
        [r["id"] for r in sorted(rows, key=lambda r: -len(r["trace"].split()))[:5]]


def test_selection_is_deterministic_in_seed():
    rows = pool({"a": 50, "b": 30, "c": 10})
    for mode in ("s1", "diversity", "random", "length"):
        first = [r["id"] for r in _select(rows, mode, seed=3)]
        assert first == [r["id"] for r in _select(rows, mode, seed=3)]
        assert first == [r["id"] for r in _select(list(rows), mode, seed=3)]
        if mode != "length":
            assert first != [r["id"] for r in _select(rows, mode, seed=4)]


def test_each_ablation_mode():
    rows = pool({"big": 120, "mid": 20, "small": 10}, seed=2)
    for i, r in enumerate(rows):  # the reference model solves every third row
        r["ref"] = "Answer: 7" if i % 3 == 0 else "Answer: 6"
    rows += [row(900, question="hi?"), row(901, trace="short")]  # quality removes these
    solver = ColumnSolver("ref")
    solved = {r["id"] for i, r in enumerate(rows[:150]) if i % 3 == 0}
    out = {}
    for mode in ("s1", "random", "diversity", "difficulty", "length"):
        selected, report = curate(rows, CurationConfig(target_size=24, selection=mode), solver)
        out[mode] = (selected, report)
        assert len(selected) == 24 and report["selection"] == mode
        assert report["removed"]["quality"] == {"question_too_short": 1, "trace_too_short": 1}
        uses_difficulty = mode in ("s1", "difficulty")
        assert report["stages"]["difficulty"] == uses_difficulty and ("difficulty" in report["removed"]) == \
            uses_difficulty
        assert report["domains"]["input"] == {"big": 120, "mid": 20, "small": 10, "unknown": 2}
        assert report["domains"]["selected"] == dict(sorted(Counter(r["domain"] for r in selected).items()))
    # difficulty removes every solved row; the others keep them
    for mode in ("s1", "difficulty"):
        sel, rep = out[mode]
        assert rep["removed"]["difficulty"] == {"solved": 50} and rep["counts"]["after_difficulty"] == 100
        assert not {r["id"] for r in sel} & solved and all(r["solved_by"] == 0 for r in sel)
    assert {r["id"] for r in out["random"][0]} & solved
    # domain-uniform modes are balanced, uniform ones follow the pool
    for mode in ("s1", "diversity"):
        assert min(out[mode][1]["domains"]["selected"].values()) >= 4
    assert out["random"][1]["domains"]["selected"]["big"] >= 15
    assert out["difficulty"][1]["domains"]["selected"]["big"] >= 15
    # length: the 24 longest traces of the quality-filtered pool
    longest = sorted((len(r["trace"].split()) for r in rows[:150]), reverse=True)[:24]
    assert sorted((r["trace_tokens"] for r in out["length"][0]), reverse=True) == longest
    rep = out["length"][1]
    assert rep["mean_trace_tokens"]["selected"] == round(sum(longest) / 24, 2)
    assert rep["mean_trace_tokens"]["selected"] > rep["mean_trace_tokens"]["candidates"]
    # s1 with its diversity switched off samples uniformly (= "random" on the same candidates)
    no_div = CurationConfig(target_size=24, diversity=DiversityConfig(enabled=False))
    assert [r["id"] for r in curate(rows, no_div, solver)[0]] == \
        [r["id"] for r in curate(rows, no_div.model_copy(update={"selection": "difficulty"}), solver)[0]]
    # s1 without a solver: only the trace-length rule of the difficulty filter applies
    sel, rep = curate(rows, CurationConfig(target_size=24, difficulty=DifficultyConfig(min_trace_tokens=100)))
    assert rep["solver"] == {"name": None, "failures": 0} and set(rep["removed"]["difficulty"]) == {"short_trace"}
    assert all(r["trace_tokens"] >= 100 and r["solved_by"] is None for r in sel)
    # an ablation whose criterion is switched off would measure nothing
    with pytest.raises(ValidationError, match="diversity.enabled"):
        CurationConfig(selection="diversity", diversity=DiversityConfig(enabled=False))
    with pytest.raises(ValidationError, match="difficulty.enabled"):
        CurationConfig(selection="difficulty", difficulty=DifficultyConfig(enabled=False))
    with pytest.raises(ValidationError):
        CurationConfig(selection="longest")


# ---------------------------------------------------------------------------------- files
def test_load_pool_maps_columns_and_counts_malformed(tmp_path):
    from selftaught.storage import write_parquet

    recs = [{"problem": "What is 2 + 3, exactly?", "thinking": TRACE + "5", "solution": 5, "source": "math",
             "qwen": "Answer: 5"},
            {"problem": None, "thinking": TRACE, "solution": 1, "source": "math", "qwen": None},
            {"problem": "What is the capital of France?", "thinking": TRACE + "Paris", "solution": None,
             "source": "geo", "qwen": None},
            {"problem": "Name the largest planet of the Solar System.", "thinking": None, "solution": 9,
             "source": None, "qwen": "Jupiter"}]
    path = write_parquet(recs, tmp_path / "pool.parquet")
    rows, malformed = load_pool(path, {"question": "problem", "trace": "thinking", "answer": "solution",
                                       "task": "source"})
    assert malformed == 2
    assert rows == [{"qwen": "Answer: 5", "id": "0", "question": "What is 2 + 3, exactly?", "trace": TRACE + "5",
                     "answer": "5", "task": "math"},
                    {"qwen": "Jupiter", "id": "3", "question": "Name the largest planet of the Solar System.",
                     "trace": None, "answer": "9", "task": None}]
    with pytest.raises(ValueError, match="trace"):
        load_pool(path, {"question": "problem", "answer": "solution"})
    with pytest.raises(ValueError, match="unknown fields"):
        load_pool(path, {"prompt": "problem"})


def test_write_curation_files_match_the_report(tmp_path):
    rows = pool({"a": 30, "b": 10}, seed=3)
    for i, r in enumerate(rows):
        r["ref"] = "Answer: 7" if i % 4 == 0 else "no idea"
    rows.append(row(99, question="See https://example.com for the figure."))
    selected, report = curate(rows, CurationConfig(target_size=12, seed=1), ColumnSolver("ref"))
    report["load_malformed"] = 3
    out = write_curation(tmp_path / "s1k", selected, report)
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "selected.parquet"]
    from selftaught.storage import read_parquet

    table = read_parquet(out / "selected.parquet")
    assert table.column("id").to_pylist() == [r["id"] for r in selected]
    assert {"domain", "trace_tokens", "solved_by", "question", "trace", "answer"} <= set(table.column_names)
    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["counts"] == {"input": 41, "after_quality": 40, "after_difficulty": 30, "selected": 12}
    assert saved["removed"] == {"quality": {"pattern:https?://": 1}, "difficulty": {"solved": 10}}
    assert saved["config"]["target_size"] == 12 and saved["config"]["selection"] == "s1"
    assert sum(saved["domains"]["selected"].values()) == 12
    md = (out / "report.md").read_text()
    assert "| quality | pattern:https?:// | 1 |" in md and "| difficulty | solved | 10 |" in md
    d = saved["domains"]
    for name in ("a", "b"):
        assert f"| {name} | {d['input'][name]} | {d['candidates'][name]} | {d['selected'][name]} |" in md
    assert "target_size: 12" in md
    assert "3 rows without a question or answer were skipped" in md


def test_math_answers_are_compared_by_value():
    """math-verify next to the string rule and reasoning-gym's verifiers: equivalent forms of
    one number count, lists, words and partial matches do not."""
    from selftaught.data.reasoning import build_reasoning, math_equivalent, score_answer

    for pred, gold in (("1/2", "0.5"), ("\\frac{1}{2}", "0.5"), ("$\\frac12$", "1/2"), ("0.50", "1/2"),
                       ("\\dfrac{3}{4}", "0.75"), ("-5.0", "-5"), ("2x+1", "1+2x")):
        assert math_equivalent(pred, gold), (pred, gold)
    for pred, gold in (("1, 2, 3", "3, 2, 1"), ("x+1", "1"), ("2 or 3", "3"), ("-5", "5"), ("1/3", "0.33"),
                       ("Paris", "paris"), ("1 2 3", "6")):
        assert not math_equivalent(pred, gold), (pred, gold)
    assert is_correct({"answer": "0.5"}, "so the answer is \\boxed{\\frac{1}{2}}")
    assert is_correct({"answer": "\\frac{1}{2}"}, "<answer>0.5</answer>")
    assert is_correct({"answer": "1/2"}, "Answer: 0.5") and not is_correct({"answer": "1/2"}, "Answer: 0.4")
    assert is_correct({"answer": "Paris"}, "Answer: paris.") and not is_correct({"answer": "2 or 3"}, "Answer: 3")
    # a reasoning-gym row answered as a fraction its verifier does not read
    row = build_reasoning(["basic_arithmetic"], size=1)[0][0]
    n = int(row["answer"])
    answer = f"<answer>\\frac{{{2 * n}}}{{2}}</answer>"
    assert score_answer(row, answer, binary=True) == 1.0 and is_correct(row, answer)
    assert score_answer(row, f"<answer>\\frac{{{2 * n + 1}}}{{2}}</answer>", binary=True) == 0.0
