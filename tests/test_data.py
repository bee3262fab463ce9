"""Bundled datasets: schema, determinism, question validity, scoring, bad records, resume."""
import json
import shutil

import pyarrow.parquet as pq
import pytest

from selftaught.data.factbook import (build_factbook, build_questions, factbook_source_dir, format_mcq,
                                      parse_choice, score_mcq)
from selftaught.data.prepare import DataConfig, prepare
from selftaught.data.reasoning import build_reasoning, extract_answer, score_answer
from selftaught.data.schema import DOC_SCHEMA, documents_table
from selftaught.data.wiki import build_wiki, split_by_id
from selftaught.text import normalize_answer


def test_wiki_documents_follow_schema():
    rows, stats = build_wiki(limit=50)
    table = documents_table(rows)
    assert table.schema.equals(DOC_SCHEMA) and len(table) == 50 == stats.kept
    meta = json.loads(rows[0]["metadata"])
    assert "topic" in meta and rows[0]["id"].startswith("wiki/")
    train, held = split_by_id(rows, 0.2)
    train2, held2 = split_by_id(rows[::-1], 0.2)
    assert {r["id"] for r in held} == {r["id"] for r in held2} and len(train) + len(held) == 50


def test_wiki_bad_records_are_counted_not_fatal(tmp_path):
    src = tmp_path / "w.json"
    src.write_text(json.dumps({"Good": {"title": "Good", "extract": "A perfectly fine summary of a topic."},
                               "Empty": {"title": "Empty", "extract": ""},
                               "Bad": ["not", "a", "record"], "Worse": {"extract": 42},
                               "Dup": {"title": "Dup", "extract": "A perfectly fine summary of a topic."}}))
    rows, stats = build_wiki(src)
    assert [r["title"] for r in rows] == ["Good"]
    assert (stats.read, stats.kept, stats.skipped_empty, stats.skipped_malformed, stats.skipped_duplicate) == \
        (5, 1, 1, 2, 1)
    with pytest.raises(ValueError, match="documents_table|must be a string"):
        documents_table([{"id": "x", "text": 1, "title": "", "source": "", "metadata": "{}"}])


@pytest.fixture(scope="module")
def factbook():
    return build_factbook(limit=40)


def test_factbook_questions_are_answerable_from_the_document(factbook):
    docs, countries, _ = factbook
    qs = build_questions(countries, per_country=7, seed=3)
    assert len(qs) > 100
    text = {d["id"]: normalize_answer(d["text"]) for d in docs}
    fields = set()
    for q in qs:
        assert len(q["choices"]) == 4 and len({normalize_answer(c) for c in q["choices"]}) == 4
        assert q["choices"][q["answer_index"]] == q["answer"]
        assert normalize_answer(q["answer"]) in text[q["doc_id"]]
        fields.add(q["field"])
    assert {"capital", "currency", "area"} <= fields
    assert qs == build_questions(countries, per_country=7, seed=3)  # deterministic
    france = next(q for q in qs if q["id"].endswith("/capital"))
    prompt = format_mcq(france)
    assert "A. " in prompt and "D. " in prompt
    letter = "ABCD"[france["answer_index"]]
    assert score_mcq(france, f"{letter}") == 1.0 and score_mcq(france, france["answer"]) == 1.0
    wrong = "ABCD"[(france["answer_index"] + 1) % 4]
    assert score_mcq(france, f"The answer is {wrong}.") == 0.0 and parse_choice(france, "no idea") is None


def test_factbook_broken_files_are_counted(tmp_path):
    src = factbook_source_dir()
    for p in sorted(src.glob("europe/*.json"))[:5]:
        (tmp_path / "europe").mkdir(exist_ok=True)
        shutil.copy(p, tmp_path / "europe" / p.name)
    (tmp_path / "europe" / "zz.json").write_text("{broken json")
    (tmp_path / "europe" / "zy.json").write_text("[]")
    docs, countries, stats = build_factbook(tmp_path)
    assert len(docs) == 5 and stats.skipped_malformed == 1 and stats.skipped_empty == 1


def test_reasoning_tasks_score_with_their_verifiers():
    rows, stats = build_reasoning(["basic_arithmetic", "gsm_symbolic"], size=4, seed=1)
    assert len(rows) == 8 == stats.kept
    assert rows == build_reasoning(["basic_arithmetic", "gsm_symbolic"], size=4, seed=1)[0]
    for r in rows:
        assert score_answer(r, f"Let me think.\nAnswer: {r['answer']}") == 1.0
        assert score_answer(r, "\\boxed{" + r["answer"] + "}") == 1.0
        assert score_answer(r, "Answer: 123456789") < 0.5
    assert extract_answer("so x = 3, and then 4") == "4"
    with pytest.raises(ValueError, match="unknown reasoning-gym"):
        build_reasoning(["no_such_task"], 1)


def test_prepare_resumes_and_reruns_only_changed_dataset(tmp_path):
    cfg = DataConfig(datasets=["wiki", "factbook", "reasoning"], wiki_limit=60, factbook_limit=10,
                     reasoning_tasks=["basic_arithmetic"], reasoning_size=5)
    stats = prepare(cfg, tmp_path)
    assert stats["wiki"]["train_docs"] + stats["wiki"]["eval_docs"] == 60
    assert pq.read_table(tmp_path / "factbook" / "questions.parquet").num_rows == stats["factbook"]["questions"]
    assert json.loads((tmp_path / "stats.json").read_text())["reasoning"]["tasks"] == 5
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.parquet")}
    prepare(cfg, tmp_path)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # nothing rebuilt
    prepare(cfg.model_copy(update={"reasoning_size": 6}), tmp_path)
    changed = {p.relative_to(tmp_path).parts[0] for p, t in mtimes.items() if p.stat().st_mtime_ns != t}
    assert changed == {"reasoning"}
