"""Build the bundled datasets into Parquet (``selftaught data prepare``), one resumable stage
per dataset: a finished dataset is skipped, and a changed setting or source file rebuilds
only the dataset it belongs to.

Layout under the output directory::

    wiki/train.parquet  wiki/eval.parquet   documents (DOC_SCHEMA), held-out split by id hash
    factbook/documents.parquet              documents (DOC_SCHEMA), one per country
    factbook/questions.parquet              QUESTION_SCHEMA: closed-book four-choice questions
    reasoning/tasks.parquet                 TASK_SCHEMA: reasoning-gym problems with verifiers
    corpus/train/ corpus/eval/              your own corpus (``corpus:``), DOC_SCHEMA parts; replaces wiki
    stats.json                              read / kept / skipped counts per dataset
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from selftaught.config import Strict, fingerprint
from selftaught.data import factbook, reasoning, wiki
from selftaught.data.schema import (DOC_SCHEMA, QUESTION_SCHEMA, TASK_SCHEMA, USER_COLUMNS, BuildStats,
                                    documents_table, make_doc)
from selftaught.storage import RunDir, Stage, file_fingerprint, read_parquet, write_parquet


log = logging.getLogger(__name__)

Dataset = Literal["wiki", "factbook", "reasoning"]
PLACEHOLDER = re.compile(r"<.*>")  # an unfilled ``<...>`` in a config file: the user must set it
CORPUS_VERSION = 1  # bump when the rows built from a user corpus change


class DataConfig(Strict):
    """Which bundled datasets to build and how large. Each dataset's stage hashes only its own
    settings, so e.g. changing ``reasoning_size`` leaves the corpora alone."""

    datasets: list[Dataset] = ["wiki", "factbook", "reasoning"]
    wiki_limit: int | None = Field(default=None, ge=1)  # None: all 10,033 summaries
    eval_fraction: float = Field(default=0.05, ge=0, lt=1)  # held-out share (wiki, or `corpus` without `eval`)
    split_seed: int = 0  # salt of the held-out hash; 0 keeps the historical wiki split
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
    # Your own corpus instead of the bundled wiki: a Parquet file, a directory of parts, or a URI
    # pyarrow opens (file://, s3://, gs://, hdfs://). Schema: selftaught.data.schema.USER_COLUMNS.
    corpus: str | None = None
    eval: str | None = None  # its held-out documents; None: cut from `corpus` by a seeded hash

    @field_validator("corpus", "eval")
    @classmethod
    def _filled_in(cls, v: str | None, info) -> str | None:
        if v is not None and (not v.strip() or PLACEHOLDER.fullmatch(v.strip())):
            raise ValueError(f"data.{info.field_name} must be set to your corpus (a Parquet file, a directory of "
                             f"Parquet parts, or a URI such as s3://bucket/corpus/); this config has no default "
                             f"at its scale. Set it in the file or with --set data.{info.field_name}=PATH "
                             f"(got {v!r})")
        return v

    @model_validator(mode="after")
    def _eval_needs_corpus(self) -> "DataConfig":
        if self.eval and not self.corpus:
            raise ValueError("data.eval is the held-out split of data.corpus: set data.corpus too")
        return self

    @field_validator("factbook_fields")
    @classmethod
    def _known_fields(cls, v: list[str]) -> list[str]:
        unknown = [f for f in v if f not in factbook.FIELDS]
        if unknown or not v:
            raise ValueError(f"unknown or no factbook fields {unknown}; known: {list(factbook.FIELDS)}")
        return v


def _wiki(cfg: DataConfig, run: RunDir) -> tuple[Stage, Callable[[], dict]]:
    src = Path(cfg.wiki_path) if cfg.wiki_path else wiki.wiki_source_path()
    seed = {"split_seed": cfg.split_seed} if cfg.split_seed else {}  # 0: already prepared data stays valid
    st = run.stage("wiki", {"limit": cfg.wiki_limit, "eval_fraction": cfg.eval_fraction,
                            "version": wiki.FORMAT_VERSION, **seed},
                   inputs={"source": file_fingerprint(src)})

    def build() -> dict:
        rows, stats = wiki.build_wiki(src, cfg.wiki_limit)
        train, held = wiki.split_by_id(rows, cfg.eval_fraction, _salt(cfg.split_seed))
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


def _salt(seed: int) -> str:
    return f"{seed}:" if seed else ""


def _corpus(cfg: DataConfig, run: RunDir) -> tuple[Stage, Callable[[], dict]]:
    """A user corpus streamed file by file into DOC_SCHEMA parts (memory bounded by one file),
    held-out documents cut by a seeded hash of the id unless ``eval`` names them."""
    assert cfg.corpus is not None
    st = run.stage("corpus", {"corpus": cfg.corpus, "eval": cfg.eval, "eval_fraction": cfg.eval_fraction,
                              "split_seed": cfg.split_seed, "version": CORPUS_VERSION},
                   inputs={"corpus": source_fingerprint(cfg.corpus),
                           "eval": source_fingerprint(cfg.eval) if cfg.eval else None})

    def build() -> dict:
        train, held = st.parts("train"), st.parts("eval")
        held_stats, held_seen = BuildStats("corpus eval", "skipped_duplicate"), set()
        if cfg.eval:
            for i, table in enumerate(read_corpus_files(cfg.eval)):
                held.write(i, documents_table(user_documents(table, held_stats, held_seen)))
        stats, seen = BuildStats("corpus", "skipped_duplicate", "skipped_in_eval"), set()
        counts = {"train_docs": 0, "eval_docs": 0}
        for i, table in enumerate(read_corpus_files(cfg.corpus)):
            rows = user_documents(table, stats, seen, exclude=held_seen)
            salt = _salt(cfg.split_seed)
            t_rows, h_rows = (rows, []) if cfg.eval else wiki.split_by_id(rows, cfg.eval_fraction, salt)
            train.write(i, documents_table(t_rows))
            if not cfg.eval:
                held.write(i, documents_table(h_rows))
            counts["train_docs"] += len(t_rows)
            counts["eval_docs"] += len(h_rows)
        counts["eval_docs"] += held_stats["kept"] if cfg.eval else 0
        for s in (stats, held_stats) if cfg.eval else (stats,):
            s.log()
            bad = {k: v for k, v in s.items() if k.startswith("skipped") and v}
            if bad:
                log.warning("%s: skipped rows %s (malformed: text not a string; empty: missing or blank text)",
                            s.name, bad)
        if not counts["train_docs"] or not counts["eval_docs"]:
            raise ValueError(f"corpus {cfg.corpus}: {counts['train_docs']} training and {counts['eval_docs']} "
                             f"held-out documents after skipping bad rows {dict(stats)}; need both "
                             "(raise data.eval_fraction or give data.eval)")
        return {**counts, "stats": dict(stats), **({"eval_stats": dict(held_stats)} if cfg.eval else {})}

    return st, build


STAGES = {"wiki": _wiki, "factbook": _factbook, "reasoning": _reasoning, "corpus": _corpus}


def prepare(cfg: DataConfig, out_dir: str | Path) -> dict:
    """Build the configured datasets under ``out_dir`` (skipping those already built with the
    same settings and sources). Returns each dataset's recorded outputs and counts, with
    ``reused`` telling whether this call skipped it; ``stats.json`` keeps the latest entry
    of every dataset ever built there."""
    run = RunDir(out_dir)
    result: dict[str, dict] = {}
    names = [d for d in cfg.datasets if not (d == "wiki" and cfg.corpus)] + (["corpus"] if cfg.corpus else [])
    for name in dict.fromkeys(names):  # de-duplicated, in order; a user corpus replaces wiki
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


def corpus_splits(cfg: DataConfig, data_dir: str | Path) -> dict[str, Path]:
    """The train and held-out document Parquet (file or directory of parts) that ``prepare``
    built for a corpus pipeline: the user's ``corpus`` when set, else the bundled wiki."""
    d = Path(data_dir)
    if cfg.corpus:
        return {"train": d / "corpus" / "train", "eval": d / "corpus" / "eval"}
    return {"train": d / "wiki" / "train.parquet", "eval": d / "wiki" / "eval.parquet"}


def _open(source: str):
    """(filesystem, path) for a local path or any URI pyarrow's filesystems understand."""
    from pyarrow import fs

    if "://" in source:
        return fs.FileSystem.from_uri(source)
    return fs.LocalFileSystem(), str(Path(source).expanduser().resolve())


def corpus_files(source: str) -> tuple[object, list]:
    """A corpus source's Parquet files (FileInfo, sorted by path), ignoring hidden and ``_``
    files as Spark and pyarrow do. Missing or empty sources are clear errors."""
    from pyarrow import fs

    filesystem, path = _open(source)
    info = filesystem.get_file_info(path)
    if info.type == fs.FileType.NotFound:
        raise FileNotFoundError(f"corpus {source}: no such file or directory")
    if info.type == fs.FileType.File:
        return filesystem, [info]
    found = filesystem.get_file_info(fs.FileSelector(path, recursive=True))
    files = sorted((f for f in found if f.type == fs.FileType.File and f.path.endswith(".parquet")
                    and not any(p.startswith((".", "_")) for p in f.path[len(path):].split("/") if p)),
                   key=lambda f: f.path)
    if not files:
        raise FileNotFoundError(f"corpus {source}: no .parquet files in it")
    return filesystem, files


def source_fingerprint(source: str) -> str:
    """Identity of a corpus source (paths, sizes, mtimes): a changed corpus rebuilds its stage."""
    _, files = corpus_files(source)
    return fingerprint([(f.path, f.size, f.mtime_ns) for f in files])


def read_corpus_files(source: str):
    """Yield one table per Parquet file of ``source``, with only the columns a corpus uses.
    A file without a ``text`` column is an error that names the file and the schema."""
    import pyarrow.parquet as pq

    filesystem, files = corpus_files(source)
    for f in files:
        names = pq.read_schema(f.path, filesystem=filesystem).names
        if "text" not in names:
            raise ValueError(f"corpus file {f.path}: no 'text' column (has {names}); a corpus needs a string "
                             f"'text' column and may have {[c for c in USER_COLUMNS if c != 'text']}")
        yield pq.read_table(f.path, filesystem=filesystem, columns=[c for c in USER_COLUMNS if c in names])


def _strings(table: pa.Table, column: str) -> list:
    """A column as Python strings (numbers cast), or all None when absent or not castable."""
    import pyarrow.compute as pc

    if column not in table.column_names:
        return [None] * table.num_rows
    col = table[column]
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        try:
            col = pc.cast(col, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            log.warning("corpus column %r has type %s, not a string: ignored", column, col.type)
            return [None] * table.num_rows
    return col.to_pylist()


def user_documents(table: pa.Table, stats: BuildStats, seen: set[str], exclude: set[str] = frozenset(),
                   source: str = "corpus") -> list[dict]:
    """User rows -> DOC_SCHEMA rows. A non-string ``text`` column counts every row as
    ``skipped_malformed``; null or blank text as ``skipped_empty``; a repeated id as
    ``skipped_duplicate``; an id in ``exclude`` (the held-out set) as ``skipped_in_eval``.
    Rows without an id get ``doc/<sha1 of the text>``, so the split hashes their text."""
    stats.add("read", table.num_rows)
    t = table["text"].type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        log.warning("corpus 'text' column has type %s, not a string: %d rows skipped", t, table.num_rows)
        stats.add("skipped_malformed", table.num_rows)
        return []
    rows = []
    for text, doc_id, title, category in zip(*(_strings(table, c) for c in ("text", "id", "title", "category"))):
        if text is None or not text.strip():
            stats.add("skipped_empty")
            continue
        doc_id = doc_id or f"doc/{hashlib.sha1(text.encode()).hexdigest()[:16]}"
        if doc_id in seen:
            stats.add("skipped_duplicate")
            continue
        seen.add(doc_id)
        if doc_id in exclude:
            stats.add("skipped_in_eval")
            continue
        rows.append(make_doc(doc_id, text, title or "", source, {"category": category} if category else {}))
        stats.add("kept")
    return rows


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
