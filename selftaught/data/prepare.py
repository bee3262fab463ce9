"""Build the bundled datasets into Parquet (``selftaught data prepare``), one resumable stage
per dataset: a finished dataset is skipped, and a changed setting or source file rebuilds
only the dataset it belongs to.

Layout under the output directory::

    wiki/train.parquet  wiki/eval.parquet   documents (DOC_SCHEMA), held-out split by id hash
    factbook/documents.parquet              documents (DOC_SCHEMA), one per country
    factbook/questions.parquet              QUESTION_SCHEMA: closed-book four-choice questions
    reasoning/tasks.parquet                 TASK_SCHEMA: reasoning-gym problems with verifiers
    stats.json                              read / kept / skipped counts per dataset
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Literal

import pyarrow as pa
from pydantic import Field, field_validator

from selftaught.config import Strict
from selftaught.data import factbook, reasoning, wiki
from selftaught.data.schema import DOC_SCHEMA, QUESTION_SCHEMA, TASK_SCHEMA, documents_table
from selftaught.storage import RunDir, Stage, file_fingerprint, read_parquet, write_parquet


Dataset = Literal["wiki", "factbook", "reasoning"]


class DataConfig(Strict):
    """Which bundled datasets to build and how large. Each dataset's stage hashes only its own
    settings, so e.g. changing ``reasoning_size`` leaves the corpora alone."""

    datasets: list[Dataset] = ["wiki", "factbook", "reasoning"]
    wiki_limit: int | None = Field(default=None, ge=1)  # None: all 10,033 summaries
    eval_fraction: float = Field(default=0.05, ge=0, lt=1)  # held-out wiki share, stable by id
    factbook_limit: int | None = Field(default=None, ge=1)  # None: all 256 entries
    questions_per_country: int = Field(default=8, ge=1)  # at most one per field
    factbook_fields: list[str] = Field(default_factory=lambda: list(factbook.DEFAULT_FIELDS))
    similar_distractors: bool = True  # closest-looking wrong answers (harder) instead of random
    reasoning_tasks: list[str] = Field(default_factory=lambda: list(reasoning.DEFAULT_TASKS))
    reasoning_size: int = Field(default=200, ge=1)  # problems per task
    seed: int = 0
    # Source overrides (tests, or a user's own copy of the data); None: the installed package.
    wiki_path: str | None = None
    factbook_dir: str | None = None

    @field_validator("factbook_fields")
    @classmethod
    def _known_fields(cls, v: list[str]) -> list[str]:
        unknown = [f for f in v if f not in factbook.FIELDS]
        if unknown or not v:
            raise ValueError(f"unknown or no factbook fields {unknown}; known: {list(factbook.FIELDS)}")
        return v


def _wiki(cfg: DataConfig, run: RunDir) -> tuple[Stage, Callable[[], dict]]:
    src = Path(cfg.wiki_path) if cfg.wiki_path else wiki.wiki_source_path()
    st = run.stage("wiki", {"limit": cfg.wiki_limit, "eval_fraction": cfg.eval_fraction,
                            "version": wiki.FORMAT_VERSION}, inputs={"source": file_fingerprint(src)})

    def build() -> dict:
        rows, stats = wiki.build_wiki(src, cfg.wiki_limit)
        train, held = wiki.split_by_id(rows, cfg.eval_fraction)
        write_parquet(documents_table(train), st.path / "train.parquet")
        write_parquet(documents_table(held), st.path / "eval.parquet")
        return {"train_docs": len(train), "eval_docs": len(held), "stats": dict(stats)}

    return st, build


def _factbook(cfg: DataConfig, run: RunDir) -> tuple[Stage, Callable[[], dict]]:
    src = Path(cfg.factbook_dir) if cfg.factbook_dir else factbook.factbook_source_dir()
    st = run.stage("factbook", {"limit": cfg.factbook_limit, "per_country": cfg.questions_per_country,
                                "fields": cfg.factbook_fields, "similar": cfg.similar_distractors,
                                "seed": cfg.seed, "version": factbook.FORMAT_VERSION},
                   inputs={"source": file_fingerprint(src)})

    def build() -> dict:
        countries, doc_stats = factbook.load_countries(src, cfg.factbook_limit)
        questions, q_stats = factbook.build_questions(countries, cfg.questions_per_country, cfg.seed,
                                                      cfg.factbook_fields, cfg.similar_distractors)
        write_parquet(documents_table(factbook.country_documents(countries)), st.path / "documents.parquet")
        write_parquet(pa.Table.from_pylist(questions, schema=QUESTION_SCHEMA), st.path / "questions.parquet")
        return {"documents": len(countries), "questions": len(questions),
                "stats": {"documents": dict(doc_stats), "questions": dict(q_stats)}}

    return st, build


def _reasoning(cfg: DataConfig, run: RunDir) -> tuple[Stage, Callable[[], dict]]:
    st = run.stage("reasoning", {"tasks": cfg.reasoning_tasks, "size": cfg.reasoning_size, "seed": cfg.seed,
                                 "version": reasoning.FORMAT_VERSION},
                   inputs={"reasoning_gym": reasoning.reasoning_gym_version()})

    def build() -> dict:
        rows, stats = reasoning.build_reasoning(cfg.reasoning_tasks, cfg.reasoning_size, cfg.seed)
        write_parquet(pa.Table.from_pylist(rows, schema=TASK_SCHEMA), st.path / "tasks.parquet")
        return {"tasks": len(rows), "stats": dict(stats)}

    return st, build


STAGES = {"wiki": _wiki, "factbook": _factbook, "reasoning": _reasoning}


def prepare(cfg: DataConfig, out_dir: str | Path) -> dict:
    """Build the configured datasets under ``out_dir`` (skipping those already built with the
    same settings and sources). Returns each dataset's recorded outputs and counts, with
    ``reused`` telling whether this call skipped it; ``stats.json`` keeps the latest entry
    of every dataset ever built there."""
    run = RunDir(out_dir)
    result: dict[str, dict] = {}
    for name in dict.fromkeys(cfg.datasets):  # de-duplicated, in order
        st, build = STAGES[name](cfg, run)
        reused = st.up_to_date()
        if not reused:
            st.begin(keep_partial=False)
            st.finish(**build())
        result[name] = {**st.outputs, "reused": reused}
    stats_path = run.root / "stats.json"
    try:
        merged = json.loads(stats_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        merged = {}
    merged.update(result)
    tmp = stats_path.with_name(f".stats.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged, indent=2))
    tmp.replace(stats_path)
    return result


def load_documents(path: str | Path) -> pa.Table:
    """A corpus Parquet file (or directory of parts) as a :data:`DOC_SCHEMA` table."""
    table = read_parquet(path)
    missing = [c for c in DOC_SCHEMA.names if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: not a document table, missing columns {missing}")
    return table.select(DOC_SCHEMA.names).cast(DOC_SCHEMA)


def load_questions(path: str | Path) -> list[dict]:
    """Factbook questions as dicts, ready for ``format_mcq`` / ``score_mcq``."""
    return read_parquet(path).cast(QUESTION_SCHEMA).to_pylist()


def load_tasks(path: str | Path) -> list[dict]:
    """Reasoning tasks as dicts, ready for ``score_answer``."""
    return read_parquet(path).cast(TASK_SCHEMA).to_pylist()
