"""Table schemas shared by every bundled dataset, and the counters every builder keeps.

Every corpus Parquet (``wiki/*.parquet``, ``factbook/documents.parquet``, and any corpus a
pipeline adds later) has exactly these columns, so tokenisation, pairing and synthesis read
any corpus the same way:

| column   | type   | meaning                                                        |
|----------|--------|----------------------------------------------------------------|
| id       | string | stable id, ``<source>/<key>``; unique within a corpus          |
| text     | string | cleaned document text (never empty)                            |
| title    | string | human-readable title                                           |
| source   | string | corpus name (``wiki``, ``factbook``, ...)                      |
| metadata | string | JSON object with source-specific fields (category, region ...) |

Your own corpus (``data.corpus``) needs only a string ``text`` column; ``id`` (string or
integer), ``title`` and ``category`` are optional (:data:`USER_COLUMNS`), other columns are
ignored. A missing id becomes ``doc/<sha1 of the text>``; ``category`` goes into metadata.

Metadata is a JSON *string* rather than a struct so corpora with different fields share one
schema and concatenate without type promotion.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

import pyarrow as pa

log = logging.getLogger(__name__)

T = TypeVar("T")

DOC_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("title", pa.string()),
                        ("source", pa.string()), ("metadata", pa.string())])

USER_COLUMNS = ("id", "text", "title", "category")  # what prepare reads from a user corpus

QUESTION_SCHEMA = pa.schema([("id", pa.string()), ("doc_id", pa.string()), ("country", pa.string()),
                             ("field", pa.string()), ("question", pa.string()),
                             ("choices", pa.list_(pa.string())), ("answer_index", pa.int32()),
                             ("answer", pa.string())])

TASK_SCHEMA = pa.schema([("id", pa.string()), ("task", pa.string()), ("question", pa.string()),
                         ("answer", pa.string()), ("metadata", pa.string())])


class BuildStats(dict):
    """Counts of what a builder read, kept and skipped (and why). A plain ``dict`` so it goes
    straight into ``stats.json`` and stage markers; malformed input is counted, never fatal."""

    BASE = ("read", "kept", "skipped_empty", "skipped_malformed")

    def __init__(self, name: str, *extra: str):
        super().__init__({k: 0 for k in (*self.BASE, *extra)})
        self.name = name

    def add(self, key: str, n: int = 1) -> None:
        self[key] = self.get(key, 0) + n

    def log(self) -> "BuildStats":
        log.info("%s: %s", self.name, ", ".join(f"{k} {v}" for k, v in self.items()))
        return self


def make_doc(id: str, text: str, title: str, source: str, metadata: dict[str, Any] | None = None) -> dict:
    """One row of :data:`DOC_SCHEMA` (metadata serialised with sorted keys: stable bytes)."""
    return {"id": id, "text": text, "title": title, "source": source,
            "metadata": json.dumps(metadata or {}, ensure_ascii=False, sort_keys=True)}


def validate_document(row: dict) -> None:
    """Raise ``ValueError`` unless ``row`` is a well-formed :data:`DOC_SCHEMA` row."""
    for col in DOC_SCHEMA.names:
        if not isinstance(row.get(col), str):
            raise ValueError(f"document {row.get('id')!r}: column {col!r} must be a string")
    if not row["id"] or not row["text"].strip():
        raise ValueError(f"document {row['id']!r}: id and text must be non-empty")
    try:
        meta = json.loads(row["metadata"])
    except json.JSONDecodeError as e:
        raise ValueError(f"document {row['id']!r}: metadata is not JSON ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"document {row['id']!r}: metadata must be a JSON object")
    extra = set(row) - set(DOC_SCHEMA.names)
    if extra:
        raise ValueError(f"document {row['id']!r}: unknown columns {sorted(extra)}")


def documents_table(rows: Iterable[dict]) -> pa.Table:
    """Rows -> a :data:`DOC_SCHEMA` table, each row validated and ids unique. Builders skip bad
    records before this point, so an error here is a bug, not bad input."""
    rows = list(rows)
    seen: set[str] = set()
    for r in rows:
        validate_document(r)
        if r["id"] in seen:
            raise ValueError(f"duplicate document id {r['id']!r}")
        seen.add(r["id"])
    return pa.Table.from_pylist(rows, schema=DOC_SCHEMA)


def package_data_dir(package: str) -> Path:
    """``<site-packages>/<package>/data``, found without importing the package (its
    ``__init__`` may pull in heavy dependencies)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (see docs/install.md)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A tqdm bar on a terminal, silent in logs and tests (``disable=None``)."""
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, total=total, disable=None, leave=False, mininterval=1.0)
