"""The one document schema every corpus Parquet uses, and the counters every builder keeps.

| column   | type   | meaning                                             |
|----------|--------|-----------------------------------------------------|
| id       | string | stable id (source prefix + key), unique in a corpus |
| text     | string | cleaned document text                               |
| title    | string | human-readable title                                |
| source   | string | corpus name (``wiki``, ``factbook``, ...)           |
| metadata | string | JSON object with source-specific fields             |
"""
from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa

log = logging.getLogger(__name__)

DOC_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("title", pa.string()),
                        ("source", pa.string()), ("metadata", pa.string())])


@dataclass
class BuildStats:
    """What a builder read, kept and skipped (and why): malformed input never stops a build."""

    source: str
    read: int = 0
    kept: int = 0
    skipped_empty: int = 0
    skipped_malformed: int = 0
    skipped_duplicate: int = 0
    notes: dict[str, int] = field(default_factory=dict)

    def note(self, key: str, n: int = 1) -> None:
        self.notes[key] = self.notes.get(key, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def log(self) -> None:
        log.info("%s: read %d, kept %d, skipped %d empty, %d malformed, %d duplicate%s", self.source,
                 self.read, self.kept, self.skipped_empty, self.skipped_malformed, self.skipped_duplicate,
                 f", {self.notes}" if self.notes else "")


def make_doc(id: str, text: str, title: str, source: str, metadata: dict | None = None) -> dict:
    return {"id": id, "text": text, "title": title, "source": source,
            "metadata": json.dumps(metadata or {}, ensure_ascii=False, sort_keys=True)}


def documents_table(rows: Iterable[dict]) -> pa.Table:
    """Rows -> a table in :data:`DOC_SCHEMA`; a row missing a field or with a non-string value is
    an error here (builders validate before), ids must be unique."""
    rows = list(rows)
    seen: set[str] = set()
    for r in rows:
        for col in DOC_SCHEMA.names:
            if not isinstance(r.get(col), str):
                raise ValueError(f"document {r.get('id')!r}: column {col!r} must be a string")
        if r["id"] in seen:
            raise ValueError(f"duplicate document id {r['id']!r}")
        seen.add(r["id"])
    return pa.Table.from_pylist(rows, schema=DOC_SCHEMA)


def package_data_dir(package: str) -> Path:
    """``<site-packages>/<package>/data`` located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (scripts/setup.sh installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"
