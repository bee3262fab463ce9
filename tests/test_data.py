"""Bundled datasets: schema, determinism, question validity, scoring, bad records, resume.
Real data from the installed packages, small limits (the whole file runs in seconds)."""
import json
import random
import re
import shutil

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from selftaught.data.factbook import (FIELDS, build_factbook, build_questions, factbook_source_dir, format_mcq,
                                      load_countries, parse_choice, pick_distractors, candidates, score_mcq)
from selftaught.data.prepare import DataConfig, load_documents, load_questions, load_tasks, prepare
from selftaught.data.reasoning import (build_reasoning, entry_of, extract_answer, format_reasoning_prompt,
                                       score_answer)
from selftaught.data.schema import DOC_SCHEMA, documents_table, make_doc
from selftaught.data.wiki import build_wiki, split_by_id
from selftaught.text import normalize_answer

# --------------------------------------------------------------------------- schema


def test_documents_table_validates_each_row():
    good = make_doc("x/1", "some text", "One", "x", {"k": 1})
    assert documents_table([good]).schema.equals(DOC_SCHEMA)
    bad_rows = [{**good, "text": 1}, {**good, "text": "  "}, {**good, "metadata": "{not json"},
                {**good, "metadata": "[1]"}, {**good, "extra": "x"}]
    for bad in bad_rows:
        with pytest.raises(ValueError):
            documents_table([bad])
    with pytest.raises(ValueError, match="duplicate"):
        documents_table([good, good])


# --------------------------------------------------------------------------- wiki


def test_wiki_documents_follow_schema_and_split_is_stable():
    rows, stats = build_wiki(limit=50)
    table = documents_table(rows)
    assert table.schema.equals(DOC_SCHEMA) and len(table) == 50 == stats["kept"]
    assert all(r["id"] == f"wiki/{r['title']}" and r["source"] == "wiki" and r["text"] for r in rows)
    assert json.loads(rows[0]["metadata"])["category"]  # the source's "topic"
    assert rows == build_wiki(limit=50)[0]
    train, held = split_by_id(rows, 0.2)
    _, held2 = split_by_id(rows[::-1] + [make_doc("wiki/new", "t", "new", "wiki")], 0.2)
    assert {r["id"] for r in held} <= {r["id"] for r in held2} and len(train) + len(held) == 50


def test_wiki_bad_records_are_counted_not_fatal(tmp_path):
    src = tmp_path / "w.json"
    fine = "A perfectly fine summary of a topic, long enough to keep."
    src.write_text(json.dumps({"Good": {"title": "Good", "extract": fine, "topic": "Arts"},
                               "Empty": {"title": "Empty", "extract": ""}, "None": {"extract": None},
                               "Bad": ["not", "a", "record"], "Worse": {"extract": 42}, "Null": None,
                               "Dup": {"title": "Dup", "extract": fine},
                               "NoTitle": {"extract": "Its title comes from the key of the record."}}))
    rows, stats = build_wiki(src)
    assert [r["title"] for r in rows] == ["Good", "NoTitle"]
    assert json.loads(rows[0]["metadata"]) == {"category": "Arts"}
    assert stats == {"read": 8, "kept": 2, "skipped_empty": 2, "skipped_malformed": 3, "skipped_duplicate": 1}
    src.write_text("{broken")
    with pytest.raises(ValueError, match="cannot read"):
        build_wiki(src)


# --------------------------------------------------------------------------- factbook


@pytest.fixture(scope="module")
def countries():
    return load_countries(limit=40)[0]


def test_factbook_documents(countries):
    docs, stats = build_factbook(limit=5)
    assert documents_table(docs).num_rows == 5 == stats["kept"]
    assert docs[0]["text"].startswith(f"# {docs[0]['title']}\n") and "## Geography" in docs[0]["text"]
    assert not re.search(r"<(?:[a-z]+|/[a-z]+)[^>]*>|&[a-z]+;", "".join(d["text"] for d in docs))
    assert json.loads(docs[0]["metadata"])["region"] == "africa"


def test_factbook_questions_are_answerable_from_the_document(countries):
    qs, stats = build_questions(countries, per_country=9, seed=3)
    assert len(qs) == stats["kept"] > 250 and stats["skipped_answer_not_in_document"] == 0
    text = {c.doc_id: f" {normalize_answer(c.text)} " for c in countries}
    for q in qs:
        assert len(q["choices"]) == 4 and len({normalize_answer(c) for c in q["choices"]}) == 4
        assert q["choices"][q["answer_index"]] == q["answer"]
        assert f" {normalize_answer(q['answer'])} " in text[q["doc_id"]]
        assert q["country"] in q["question"]
    assert {"capital", "currency", "official_language", "government_type", "climate", "terrain", "area",
            "population"} <= {q["field"] for q in qs}
    assert qs == build_questions(countries, per_country=9, seed=3)[0]  # deterministic
    assert qs != build_questions(countries, per_country=9, seed=4)[0]
    assert {q["answer_index"] for q in qs} == {0, 1, 2, 3}
    few, few_stats = build_questions(countries, per_country=2, seed=3)
    assert len(few) == 2 * len(countries) and few_stats["skipped_over_quota"] > 0


def test_distractors_are_never_also_true():
    pool = candidates(FIELDS["climate"], ["tropical marine", "temperate", "arid", "polar", "tropical"])
    rng = random.Random(0)
    # "tropical marine" contains the answer, "temperate" is in the country's own text
    got = pick_distractors(FIELDS["climate"], "tropical", "tropical; temperate in highlands", pool, rng)
    assert got is None  # only "arid" and "polar" remain
    pool = candidates(FIELDS["currency"], ["euro (EUR)", "euros (EUR)", "Swiss francs (CHF)", "yen (JPY)",
                                           "pounds (GBP)"])
    got = pick_distractors(FIELDS["currency"], "euros (EUR)", "euros (EUR) per US dollar -", pool, rng)
    assert sorted(got) == ["Swiss francs (CHF)", "pounds (GBP)", "yen (JPY)"]


def test_mcq_prompt_and_scoring(countries):
    q = next(q for q in build_questions(countries, seed=0)[0] if q["field"] == "capital")
    prompt = format_mcq(q)
    assert prompt.startswith(q["question"]) and all(f"\n{x}. " in prompt for x in "ABCD")
    right, wrong = "ABCD"[q["answer_index"]], "ABCD"[(q["answer_index"] + 1) % 4]
    for response in (right, f"({right})", f"{right}. {q['answer']}", f"The answer is {right}.", q["answer"]):
        assert score_mcq(q, response) == 1.0, response
    for response in (wrong, f"Answer: {wrong}", q["choices"][(q["answer_index"] + 1) % 4]):
        assert score_mcq(q, response) == 0.0, response
    assert parse_choice(q, "no idea") is None and parse_choice(q, "B or C") is None
    assert parse_choice(q, "A city in the north, so C") == 2  # "A" as an article is no choice


def test_factbook_broken_files_are_counted(tmp_path):
    (tmp_path / "europe").mkdir()
    for p in sorted(factbook_source_dir().glob("europe/*.json"))[:5]:
        shutil.copy(p, tmp_path / "europe" / p.name)
    (tmp_path / "europe" / "zz.json").write_text("{broken json")
    (tmp_path / "europe" / "zy.json").write_text("[]")
    (tmp_path / "europe" / "zx.json").write_text("{}")
    (tmp_path / "europe" / "zw.json").write_bytes(b"\xff\xfe\x00bad")
    docs, stats = build_factbook(tmp_path)
    assert len(docs) == 5
    assert stats == {"read": 9, "kept": 5, "skipped_empty": 1, "skipped_malformed": 3}


# --------------------------------------------------------------------------- reasoning


def test_reasoning_tasks_score_with_their_verifiers():
    rows, stats = build_reasoning(["basic_arithmetic", "gsm_symbolic", "simple_equations"], size=4, seed=1)
    assert len(rows) == 12 == stats["kept"] and len({r["id"] for r in rows}) == 12
    assert rows == build_reasoning(["basic_arithmetic", "gsm_symbolic", "simple_equations"], size=4, seed=1)[0]
    assert rows != build_reasoning(["basic_arithmetic", "gsm_symbolic", "simple_equations"], size=4, seed=2)[0]
    for r in rows:
        assert score_answer(r, f"Let me think.\nAnswer: {r['answer']}") == 1.0
        assert score_answer(r, f"... so \\boxed{{{r['answer']}}}") == 1.0
        assert score_answer(r, f"<answer>{r['answer']}</answer>") == 1.0
        wrong = f"Answer: {int(r['answer']) + 1}"
        assert score_answer(r, wrong) == (0.01 if r["task"] == "gsm_symbolic" else 0.0)  # gsm: format credit
        assert score_answer(r, wrong, binary=True) == 0.0 and score_answer(r, "") == 0.0
        assert r["question"] in format_reasoning_prompt(r)
    r = next(r for r in rows if r["task"] == "basic_arithmetic")
    regenerated = {**r, "metadata": json.dumps({**json.loads(r["metadata"]), "exact": False})}
    assert entry_of(regenerated) == entry_of(r) and score_answer(regenerated, r["answer"]) == 1.0
    with pytest.raises(ValueError, match="unknown reasoning-gym"):
        build_reasoning(["no_such_task"], 1)


def test_extract_answer():
    assert extract_answer("so x = 3, and then 4") == "4"
    assert extract_answer("we get \\boxed{\\frac{1}{2}} at last") == "\\frac{1}{2}"
    assert extract_answer("**Final answer:** 42.") == "42"
    assert extract_answer("<answer>7</answer> then Answer: 8") == "7"
    assert extract_answer("no digits here") == "no digits here"


# --------------------------------------------------------------------------- prepare


def test_data_config_rejects_typos():
    with pytest.raises(ValidationError):
        DataConfig(wiki_limt=5)
    with pytest.raises(ValidationError):
        DataConfig(factbook_fields=["capitol"])
    with pytest.raises(ValidationError):
        DataConfig(datasets=["wikipedia"])


def test_prepare_resumes_and_reruns_only_changed_dataset(tmp_path):
    cfg = DataConfig(wiki_limit=60, factbook_limit=10, questions_per_country=3,
                     reasoning_tasks=["basic_arithmetic"], reasoning_size=5)
    out = prepare(cfg, tmp_path)
    assert out["wiki"]["train_docs"] + out["wiki"]["eval_docs"] == 60 and not out["wiki"]["reused"]
    assert out["factbook"]["stats"]["documents"]["kept"] == 10 == out["factbook"]["documents"]
    assert load_documents(tmp_path / "wiki" / "train.parquet").num_rows == out["wiki"]["train_docs"]
    assert load_documents(tmp_path / "factbook" / "documents.parquet").schema.equals(DOC_SCHEMA)
    questions = load_questions(tmp_path / "factbook" / "questions.parquet")
    assert len(questions) == out["factbook"]["questions"] == 30 and len(questions[0]["choices"]) == 4
    tasks = load_tasks(tmp_path / "reasoning" / "tasks.parquet")
    assert len(tasks) == 5 and score_answer(tasks[0], tasks[0]["answer"]) == 1.0
    assert json.loads((tmp_path / "stats.json").read_text())["reasoning"]["tasks"] == 5

    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.parquet")}
    again = prepare(cfg, tmp_path)
    assert all(v["reused"] for v in again.values())
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # nothing rebuilt

    third = prepare(cfg.model_copy(update={"reasoning_size": 6}), tmp_path)
    assert [k for k, v in third.items() if not v["reused"]] == ["reasoning"]
    changed = {p.relative_to(tmp_path).parts[0] for p, t in mtimes.items() if p.stat().st_mtime_ns != t}
    assert changed == {"reasoning"} and pq.read_table(tmp_path / "reasoning" / "tasks.parquet").num_rows == 6

    only_wiki = prepare(DataConfig(datasets=["wiki"], wiki_limit=60), tmp_path)
    assert list(only_wiki) == ["wiki"] and only_wiki["wiki"]["reused"]
    assert set(json.loads((tmp_path / "stats.json").read_text())) == {"wiki", "factbook", "reasoning"}
