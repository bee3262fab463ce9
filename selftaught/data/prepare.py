"""``selftaught data prepare``: build the bundled corpora into Parquet, one resumable stage per
dataset (a changed setting rebuilds only its dataset; a finished one is skipped).

Layout under the output directory::

    wiki/train.parquet  wiki/eval.parquet           documents (DOC_SCHEMA)
    factbook/documents.parquet                      documents (DOC_SCHEMA)
    factbook/questions.parquet                      id, doc_id, country, field, question, choices, answer_index, answer
    reasoning/tasks.parquet                         id, task, question, answer, metadata
    stats.json                                      read / kept / skipped counts per dataset
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import Field

from selftaught.config import Strict
from selftaught.data.schema import documents_table
from selftaught.storage import RunDir, Stage, file_fingerprint, read_parquet, write_parquet

log = logging.getLogger(__name__)

Dataset = Literal["wiki", "factbook", "reasoning"]


class DataConfig(Strict):
    datasets: list[Dataset] = ["wiki", "factbook", "reasoning"]
    wiki_limit: int | None = Field(default=None, ge=1)
    eval_fraction: float = Field(default=0.05, gt=0, lt=1)  # held-out wiki share (stable by id)
    factbook_limit: int | None = Field(default=None, ge=4)
    questions_per_country: int = Field(default=7, ge=1)  # at most one per field
    reasoning_tasks: list[str] = ["gsm_symbolic", "basic_arithmetic", "simple_equations"]
    reasoning_size: int = Field(default=200, ge=1)
    seed: int = 0
    # source overrides (tests, or a user's own copy of the data)
    wiki_path: str | None = None
    factbook_dir: str | None = None


QUESTION_SCHEMA = pa.schema([("id", pa.string()), ("doc_id", pa.string()), ("country", pa.string()),
                             ("field", pa.string()), ("question", pa.string()),
                             ("choices", pa.list_(pa.string())), ("answer_index", pa.int32()),
                             ("answer", pa.string())])
TASK_SCHEMA = pa.schema([("id", pa.string()), ("task", pa.string()), ("question", pa.string()),
                         ("answer", pa.string()), ("metadata", pa.string())])


def _wiki(cfg: DataConfig, run: RunDir) -> Stage:
    from selftaught.data.wiki import build_wiki, split_by_id, wiki_source_path

    src = Path(cfg.wiki_path) if cfg.wiki_path else wiki_source_path()
    st = run.stage("wiki", {"limit": cfg.wiki_limit, "eval_fraction": cfg.eval_fraction},
                   inputs={"source": file_fingerprint(src)})
    if st.up_to_date():
        return st
    st.begin(keep_partial=False)
    rows, stats = build_wiki(src, cfg.wiki_limit)
    train, held = split_by_id(rows, cfg.eval_fraction)
    write_parquet(documents_table(train), st.path / "train.parquet")
    write_parquet(documents_table(held), st.path / "eval.parquet")
    st.finish(train_docs=len(train), eval_docs=len(held), stats=stats.to_dict())
    return st


def _factbook(cfg: DataConfig, run: RunDir) -> Stage:
    from selftaught.data.factbook import build_factbook, build_questions, factbook_source_dir

    src = Path(cfg.factbook_dir) if cfg.factbook_dir else factbook_source_dir()
    st = run.stage("factbook", {"limit": cfg.factbook_limit, "per_country": cfg.questions_per_country,
                                "seed": cfg.seed}, inputs={"source": file_fingerprint(src)})
    if st.up_to_date():
        return st
    st.begin(keep_partial=False)
    docs, countries, stats = build_factbook(src, cfg.factbook_limit)
    questions = build_questions(countries, cfg.questions_per_country, cfg.seed, stats=stats)
    write_parquet(documents_table(docs), st.path / "documents.parquet")
    write_parquet(pa.Table.from_pylist(questions, schema=QUESTION_SCHEMA), st.path / "questions.parquet")
    st.finish(documents=len(docs), questions=len(questions), stats=stats.to_dict())
    return st


def _reasoning(cfg: DataConfig, run: RunDir) -> Stage:
    from selftaught.data.reasoning import build_reasoning

    st = run.stage("reasoning", {"tasks": cfg.reasoning_tasks, "size": cfg.reasoning_size, "seed": cfg.seed})
    if st.up_to_date():
        return st
    st.begin(keep_partial=False)
    rows, stats = build_reasoning(cfg.reasoning_tasks, cfg.reasoning_size, cfg.seed)
    write_parquet(pa.Table.from_pylist(rows, schema=TASK_SCHEMA), st.path / "tasks.parquet")
    st.finish(tasks=len(rows), stats=stats.to_dict())
    return st


BUILDERS = {"wiki": _wiki, "factbook": _factbook, "reasoning": _reasoning}


def prepare(cfg: DataConfig, out_dir: str | Path) -> dict:
    """Build the configured datasets under ``out_dir``; returns (and writes) their stats."""
    run = RunDir(out_dir)
    stats = {}
    for name in cfg.datasets:
        st = BUILDERS[name](cfg, run)
        stats[name] = st.outputs
    stats_path = run.root / "stats.json"
    merged = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    merged.update(stats)
    stats_path.write_text(json.dumps(merged, indent=2))
    return stats


def load_documents(path: str | Path) -> pa.Table:
    return read_parquet(path)
