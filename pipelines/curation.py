"""s1K-style data curation: a small, high-value reasoning set out of a large pool.

The s1 paper (Muennighoff et al., 2025) showed that about a thousand well-chosen
question / reasoning-trace / answer rows teach test-time scaling as well as the full pool, and
that the choice needs all three of its criteria:

* **Quality** (:func:`quality_filter`): drop rows that cannot teach anything: malformed or
  missing fields, questions too short or too long, traces too short, formatting debris (URLs,
  replacement characters), exact duplicates and, optionally, traces that reach a wrong answer.
* **Difficulty** (:func:`difficulty_filter`): drop what a reference model already solves
  (s1 asked two Qwen models) and traces too short to show real reasoning.
* **Diversity** (:func:`select`): draw a domain uniformly at random, then a row within it,
  favouring long traces by ``2^-rank``; repeat until the target size.

:func:`curate` chains them and returns a report that accounts for every removed row;
``CurationConfig.selection`` switches to the paper's ablations ("random", "diversity",
"difficulty", "length") so their effect can be measured on the same pool. Everything is
deterministic in ``seed``; solvers that sample are only as deterministic as their backend.

    rows, bad = load_pool("pool.parquet", columns={"trace": "thinking", "task": "domain"})
    selected, report = curate(rows, CurationConfig(target_size=1000), solver=ColumnSolver("qwen_answer"))
    write_curation("runs/s1k", selected, report)
"""
from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Protocol, Sequence, runtime_checkable

import yaml
from pydantic import Field, field_validator, model_validator

from selftaught.config import EngineConfig, SamplingConfig, Strict
from selftaught.data.reasoning import answers_match, extract_answer, format_reasoning_prompt, score_answer

log = logging.getLogger(__name__)

Row = dict[str, Any]
PromptFn = Callable[[Row], str]


# ---------------------------------------------------------------------------------- configs
class QualityConfig(Strict):
    """Cheap, model-free checks. Lengths are in characters so the filter needs no tokenizer.

    ``reject_patterns`` are regular expressions searched in question, trace and answer: URLs
    usually point at figures the row does not contain, U+FFFD marks text broken in decoding.
    ``require_correct_trace`` keeps only traces whose final answer verifies (the task's
    verifier when the row carries reasoning-gym ``task`` + ``metadata``, otherwise a
    normalised comparison with the ``answer`` column); s1K itself did not require this.
    """

    enabled: bool = True
    min_question_chars: int = Field(default=10, ge=0)
    max_question_chars: int | None = Field(default=20_000, ge=1)
    min_trace_chars: int = Field(default=20, ge=0)
    require_answer: bool = True
    drop_duplicates: bool = True  # same question after case/whitespace normalisation
    reject_patterns: list[str] = Field(default_factory=lambda: [r"https?://", "\ufffd"])
    require_correct_trace: bool = False

    @field_validator("reject_patterns")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"reject pattern {p!r} is not a valid regular expression: {e}") from e
        return v

    @model_validator(mode="after")
    def _lengths(self) -> "QualityConfig":
        if self.max_question_chars is not None and self.max_question_chars < self.min_question_chars:
            raise ValueError("max_question_chars must be >= min_question_chars")
        return self


class DifficultyConfig(Strict):
    """A row is too easy when a reference solver gets it right in at least
    ``drop_if_solved_by_at_least`` of its ``num_samples`` attempts (a :class:`ColumnSolver`
    uses every stored answer instead). ``min_trace_tokens`` drops short traces, s1's proxy for
    easy problems. ``tokenizer`` (a local path or packaged model name) counts trace tokens;
    without one, whitespace-separated words are counted."""

    enabled: bool = True
    num_samples: int = Field(default=1, ge=1)
    drop_if_solved_by_at_least: int = Field(default=1, ge=1)
    min_trace_tokens: int = Field(default=0, ge=0)
    tokenizer: str | None = None


class DiversityConfig(Strict):
    """Domains come from ``domain_column`` (the reasoning-gym task by default; a classifier's
    label column works just as well). ``length_weighting`` favours long traces within a
    domain, as in s1; off, rows of a domain are equally likely."""

    enabled: bool = True
    domain_column: str = "task"
    length_weighting: bool = True


Selection = Literal["s1", "random", "diversity", "difficulty", "length"]


class CurationConfig(Strict):
    """``selection`` picks the recipe: "s1" applies all three criteria; the ablations apply
    the quality filter and then: "random" a uniform sample, "diversity" domain-uniform sampling
    without length weighting, "difficulty" the difficulty filter and a uniform sample, "length"
    the longest traces. A criterion with ``enabled=False`` is skipped in "s1"; an ablation
    that needs a disabled criterion is a config error (it would silently measure nothing).
    Malformed rows are always removed, whatever the switches."""

    target_size: int = Field(default=1000, ge=1)
    seed: int = 0
    selection: Selection = "s1"
    quality: QualityConfig = QualityConfig()
    difficulty: DifficultyConfig = DifficultyConfig()
    diversity: DiversityConfig = DiversityConfig()

    @model_validator(mode="after")
    def _ablation_has_its_stage(self) -> "CurationConfig":
        if self.selection == "diversity" and not self.diversity.enabled:
            raise ValueError("selection='diversity' needs diversity.enabled=true")
        if self.selection == "difficulty" and not self.difficulty.enabled:
            raise ValueError("selection='difficulty' needs difficulty.enabled=true")
        return self

    @property
    def uses_difficulty(self) -> bool:
        return self.difficulty.enabled and self.selection in ("s1", "difficulty")


# ---------------------------------------------------------------------------------- correctness
_ANSWER_MARKUP = re.compile(r"<answer>|\\boxed\{", re.I)


def _verifier_meta(row: Row) -> dict | None:
    """The row's reasoning-gym metadata when it has what :func:`score_answer` needs."""
    task, meta = row.get("task"), row.get("metadata")
    if not isinstance(task, str) or not task or meta is None:
        return None
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            return None
    if isinstance(meta, dict) and "size" in meta and "seed" in meta and ("entry" in meta or "index" in meta):
        return meta
    return None


def is_correct(row: Row, text: str) -> bool:
    """Whether ``text`` (a full solution or just an answer) reaches the row's answer.

    Rows built by reasoning-gym are judged by the task's own verifier (it knows equivalent
    forms a string match misses); other rows compare the extracted answer with the ``answer``
    column by :func:`~selftaught.data.reasoning.answers_match`: equal after
    :func:`~selftaught.text.normalize_answer`, or mathematically equal by math-verify
    ("1/2" = "0.5"); an answer column in ``<answer>`` tags or ``\\boxed{}`` is unwrapped first."""
    if not isinstance(text, str) or not text.strip():
        return False
    if _verifier_meta(row) is not None:
        try:
            return score_answer(row, text, extract=True, binary=True) >= 1.0
        except Exception as e:  # unknown task, stale metadata: fall back to the answer column
            log.debug("curation: no verifier for %s (%s); comparing strings", row.get("id"), e)
    answer = row.get("answer")
    if answer is None or not str(answer).strip():
        return False
    pred = extract_answer(text)
    gold = [str(answer)]
    if _ANSWER_MARKUP.search(str(answer)):  # a stored "\\boxed{5}" means 5; "between 2 and 3" never means 3
        gold.append(extract_answer(str(answer)))
    return any(answers_match(pred, g) for g in gold)


# ---------------------------------------------------------------------------------- quality
def _question_key(q: str) -> str:
    return " ".join(q.lower().split())


def quality_filter(rows: Iterable[Any], cfg: QualityConfig) -> tuple[list[Row], dict[str, int]]:
    """Rows that pass every quality check, and how many were removed for each reason.

    Reasons, checked in this order (a row counts once, under the first that applies):
    ``malformed`` (not a mapping, question not a string, trace neither string nor missing),
    ``missing_answer``, ``question_too_short``, ``question_too_long``, ``trace_too_short``,
    ``pattern:<regex>``, ``incorrect_trace``, ``duplicate``. Duplicates are checked last, so a
    question's first copy that passes everything else is the one kept. With
    ``enabled=False`` only malformed rows are removed (later stages cannot handle them).
    Returned rows are copies; the input is not modified."""
    removed: Counter[str] = Counter()
    kept: list[Row] = []
    patterns = [(p, re.compile(p)) for p in cfg.reject_patterns]
    seen: set[str] = set()
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) \
                or not isinstance(row.get("trace", None), (str, type(None))):
            removed["malformed"] += 1
            continue
        row = dict(row)
        question, trace = row["question"], row.get("trace") or ""
        answer = row.get("answer")
        answer_text = "" if answer is None else str(answer)
        if not cfg.enabled:
            kept.append(row)
            continue
        reason = None
        if cfg.require_answer and not answer_text.strip():
            reason = "missing_answer"
        elif len(question.strip()) < cfg.min_question_chars:
            reason = "question_too_short"
        elif cfg.max_question_chars is not None and len(question.strip()) > cfg.max_question_chars:
            reason = "question_too_long"
        elif len(trace.strip()) < cfg.min_trace_chars:
            reason = "trace_too_short"
        else:
            for p, rx in patterns:
                if rx.search(question) or rx.search(trace) or rx.search(answer_text):
                    reason = f"pattern:{p}"
                    break
        if reason is None and cfg.require_correct_trace and not is_correct(row, trace):
            reason = "incorrect_trace"
        if reason is None and cfg.drop_duplicates:
            key = _question_key(question)
            if key in seen:
                reason = "duplicate"
            seen.add(key)
        if reason is not None:
            removed[reason] += 1
        else:
            kept.append(row)
    return kept, dict(removed)


# ---------------------------------------------------------------------------------- solvers
@runtime_checkable
class Solver(Protocol):
    """A reference model's attempts: ``solve(rows, num_samples)`` returns, for each row in
    input order, the texts it produced (full solutions; answers are extracted when scored).
    An attempt that failed may be left out: it then counts as unsolved. ``failures`` counts
    such attempts over the solver's lifetime."""

    failures: int

    def solve(self, rows: Sequence[Row], num_samples: int) -> list[list[str]]: ...


class LLMSolver:
    """A remote (or mock) model through :class:`~selftaught.llm.LLMClient`. Each sample is a
    separate call (chat APIs return one choice per call here); with ``sampling.seed`` set,
    sample ``s`` uses ``seed + s`` so repeated samples are not identical."""

    def __init__(self, client: Any, sampling: SamplingConfig | None = None,
                 prompt: PromptFn = format_reasoning_prompt):
        self.client, self.sampling, self.prompt = client, sampling, prompt
        self.failures = 0

    def solve(self, rows: Sequence[Row], num_samples: int) -> list[list[str]]:
        prompts = [self.prompt(r) for r in rows]
        answers: list[list[str]] = [[] for _ in rows]
        for s in range(num_samples):
            sampling = self.sampling
            if sampling is not None and sampling.seed is not None:
                sampling = sampling.model_copy(update={"seed": sampling.seed + s})
            results = self.client.complete_many(prompts, return_exceptions=True, sampling=sampling)
            for i, res in enumerate(results):
                if isinstance(res, BaseException):  # an LLMError in place of a result
                    self.failures += 1
                    log.debug("curation: solver call for %s failed: %s", rows[i].get("id"), res)
                else:
                    answers[i].append(res.text)
        return answers


_IDX = "_curation_index"


class EngineSolver:
    """A local model on engine actors: Ray Data ``map_batches`` through
    :func:`actors.generator.generate_dataset`, prompts sent as chat turns. Ray Data does not
    keep row order, so every row carries its index and the answers are put back in order.
    With ``sampling.seed`` set, row ``i`` samples with ``seed + i``: reproducible, yet rows do
    not share their noise."""

    def __init__(self, engine_cfg: EngineConfig, sampling: SamplingConfig | None = None,
                 prompt: PromptFn = format_reasoning_prompt, num_actors: int | None = None,
                 batch_size: int | None = None):
        self.engine_cfg, self.sampling, self.prompt = engine_cfg, sampling or SamplingConfig(), prompt
        self.num_actors, self.batch_size = num_actors, batch_size
        self.failures = 0

    def solve(self, rows: Sequence[Row], num_samples: int) -> list[list[str]]:
        if not rows:
            return []
        import ray.data

        from actors.generator import generate_dataset

        seed = self.sampling.seed
        items = [{_IDX: i, "prompt": json.dumps([{"role": "user", "content": self.prompt(r)}]),
                  "sampling": json.dumps({"seed": seed + i}) if seed is not None else ""}
                 for i, r in enumerate(rows)]
        sampling = self.sampling.model_copy(update={"n": num_samples})
        ds = generate_dataset(ray.data.from_items(items), self.engine_cfg, sampling, prompt_column="prompt",
                              batch_size=self.batch_size, num_actors=self.num_actors,
                              sampling_column="sampling", chat=True)
        out = ds.select_columns([_IDX, "sample_index", "generated_text"]).take_all()
        return gather_samples(out, len(rows))


def gather_samples(records: Iterable[Row], num_rows: int) -> list[list[str]]:
    """Generated records (``_curation_index``, ``sample_index``, ``generated_text``) in any
    order -> texts per input row, in input and sample order."""
    answers: list[list[str]] = [[] for _ in range(num_rows)]
    for r in sorted(records, key=lambda r: (int(r[_IDX]), int(r["sample_index"]))):
        answers[int(r[_IDX])].append(str(r["generated_text"]))
    return answers


class ColumnSolver:
    """Answers already stored in the pool (s1 ran its Qwen models once, offline). Each column
    holds one answer or a list of them; all stored answers count (``num_samples`` is ignored)
    and a missing value is no attempt."""

    def __init__(self, column: str | Sequence[str]):
        self.columns = [column] if isinstance(column, str) else list(column)
        self.failures = 0

    def solve(self, rows: Sequence[Row], num_samples: int) -> list[list[str]]:
        out = []
        for r in rows:
            texts: list[str] = []
            for c in self.columns:
                v = r.get(c)
                if isinstance(v, (list, tuple)):
                    texts.extend(str(x) for x in v if x is not None)
                elif v is not None:
                    texts.append(str(v))
            out.append(texts)
        return out


# ---------------------------------------------------------------------------------- difficulty
@lru_cache(maxsize=4)
def _tokenizer(name: str) -> Any:
    from selftaught.models import PACKAGED_MODELS, load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path(name) if name in PACKAGED_MODELS else name)


def token_unit(tokenizer: str | None) -> str:
    return f"tokens ({tokenizer})" if tokenizer else "words (whitespace)"


def add_trace_tokens(rows: Sequence[Row], tokenizer: str | None = None, overwrite: bool = False) -> list[Row]:
    """Copies of ``rows`` with ``trace_tokens``: the trace's length in tokens of ``tokenizer``,
    or in whitespace-separated words without one. Rows that have it keep it unless
    ``overwrite``."""
    out = [dict(r) for r in rows]
    todo = [r for r in out if overwrite or r.get("trace_tokens") is None]
    if not todo:
        return out
    traces = [r.get("trace") or "" for r in todo]
    if tokenizer:
        ids = _tokenizer(tokenizer)(traces, add_special_tokens=False)["input_ids"]
        counts = [len(x) for x in ids]
    else:
        counts = [len(t.split()) for t in traces]
    for r, n in zip(todo, counts):
        r["trace_tokens"] = int(n)
    return out


def difficulty_filter(rows: Sequence[Row], solver: Solver | None,
                      cfg: DifficultyConfig) -> tuple[list[Row], dict[str, int]]:
    """Rows hard enough to keep, and removals by reason (``short_trace``, ``solved``).

    Every row gets ``trace_tokens`` (always recounted, with ``cfg.tokenizer``). Short traces
    are dropped first, so the solver is not paid to attempt rows that go anyway; the rest get
    ``solved_by`` (correct attempts, judged by :func:`is_correct`) and are dropped when it
    reaches ``drop_if_solved_by_at_least``. Without a solver only the length rule applies and
    ``solved_by`` is None. With ``enabled=False`` nothing is removed."""
    rows = add_trace_tokens(rows, cfg.tokenizer, overwrite=True)
    if not cfg.enabled:
        return rows, {}
    removed: Counter[str] = Counter()
    candidates = []
    for r in rows:
        if r["trace_tokens"] < cfg.min_trace_tokens:
            removed["short_trace"] += 1
        else:
            candidates.append(r)
    if solver is None:
        log.warning("curation: difficulty filter without a solver: only min_trace_tokens applies")
        for r in candidates:
            r["solved_by"] = None
        return candidates, dict(removed)
    answers = solver.solve(candidates, cfg.num_samples) if candidates else []
    if len(answers) != len(candidates):
        raise RuntimeError(f"{type(solver).__name__} returned {len(answers)} answer lists for "
                           f"{len(candidates)} rows")
    kept = []
    for r, texts in zip(candidates, answers):
        r["solved_by"] = sum(is_correct(r, t) for t in texts)
        if r["solved_by"] >= cfg.drop_if_solved_by_at_least:
            removed["solved"] += 1
        else:
            kept.append(r)
    return kept, dict(removed)


# ---------------------------------------------------------------------------------- diversity
def assign_domains(rows: Sequence[Row], cfg: DiversityConfig) -> list[Row]:
    """Copies of ``rows`` with ``domain`` taken from ``cfg.domain_column``; a missing or
    empty value becomes "unknown" (still a domain of its own, so it cannot crowd others out)."""
    out = []
    for r in rows:
        v = r.get(cfg.domain_column)
        out.append({**r, "domain": str(v) if v is not None and str(v).strip() else "unknown"})
    return out


def _pick_rank(rng: random.Random, n: int) -> int:
    """A rank in ``[0, n)`` drawn with probability proportional to ``2^-rank`` (walks the
    geometric weights; the expected walk is two steps whatever ``n``)."""
    u = rng.random() * 2.0 * (1.0 - 0.5 ** n)
    k, w = 0, 1.0
    while k < n - 1 and u >= w:
        u -= w
        w *= 0.5
        k += 1
    return k


def diversity_sample(rows: Sequence[Row], target_size: int, seed: int,
                     length_weighting: bool = True) -> list[Row]:
    """s1's sampling: until ``target_size`` rows are chosen (or none are left), draw a domain
    uniformly among those with rows left, then a row of it: with ``length_weighting`` the
    row at rank ``k`` of the remaining ones (longest trace first) with probability
    proportional to ``2^-k``, else uniformly. Uniform over domains, not rows, is what keeps a
    huge domain from swamping small ones. Rows need ``domain`` and ``trace_tokens``."""
    rng = random.Random(seed)
    pools: dict[str, list[Row]] = {}
    for r in rows:
        pools.setdefault(r["domain"], []).append(r)
    if length_weighting:  # stable sort: ties keep input order, so the result is a function of seed and input
        for pool in pools.values():
            pool.sort(key=lambda r: -r["trace_tokens"])
    domains = sorted(pools)
    chosen: list[Row] = []
    while len(chosen) < target_size and domains:
        d = domains[rng.randrange(len(domains))]
        pool = pools[d]
        k = _pick_rank(rng, len(pool)) if length_weighting else rng.randrange(len(pool))
        chosen.append(pool.pop(k))
        if not pool:
            domains.remove(d)
    return chosen


def select(rows: Sequence[Row], cfg: CurationConfig) -> list[Row]:
    """The final draw of ``cfg.target_size`` rows, by ``cfg.selection``: domain-uniform
    sampling ("s1" with length weighting as configured, "diversity" without), a uniform sample
    ("random", "difficulty", and "s1" with diversity disabled) or the longest traces
    ("length"). Deterministic in ``cfg.seed``. Adds ``domain`` and ``trace_tokens`` when
    missing (``domain`` is always reassigned from ``cfg.diversity.domain_column``)."""
    rows = add_trace_tokens(assign_domains(rows, cfg.diversity), cfg.difficulty.tokenizer)
    n = cfg.target_size
    mode = cfg.selection
    if mode == "length":
        return sorted(rows, key=lambda r: -r["trace_tokens"])[:n]
    if mode == "diversity" or (mode == "s1" and cfg.diversity.enabled):
        weighting = cfg.diversity.length_weighting and mode == "s1"
        return diversity_sample(rows, n, cfg.seed, length_weighting=weighting)
    return random.Random(cfg.seed).sample(rows, min(n, len(rows)))


# ---------------------------------------------------------------------------------- pipeline
def _mean(values: list[int]) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


def _domain_counts(rows: Iterable[Row]) -> dict[str, int]:
    return dict(sorted(Counter(r["domain"] for r in rows).items()))


def curate(rows: Iterable[Any], cfg: CurationConfig,
           solver: Solver | None = None) -> tuple[list[Row], dict[str, Any]]:
    """Quality filter -> difficulty filter -> selection, as ``cfg.selection`` asks.

    Returns the selected rows (with ``domain``, ``trace_tokens`` and, after a difficulty
    filter with a solver, ``solved_by``) and a JSON-able report: row counts after each
    stage, removals by stage and reason, solver failures, rows per domain in the input, in the
    pool the selection drew from (``candidates``) and in the selection, mean trace length of
    candidates and selection, and the config."""
    rows = list(rows)
    stages = {"quality": cfg.quality.enabled, "difficulty": cfg.uses_difficulty,
              "diversity": cfg.selection == "diversity" or (cfg.selection == "s1" and cfg.diversity.enabled)}
    input_domains = _domain_counts(assign_domains([r for r in rows if isinstance(r, dict)], cfg.diversity))

    kept, q_removed = quality_filter(rows, cfg.quality)
    counts = {"input": len(rows), "after_quality": len(kept)}
    removed: dict[str, dict[str, int]] = {"quality": q_removed}
    solver_info = None
    if cfg.uses_difficulty:
        before = getattr(solver, "failures", 0)
        kept, removed["difficulty"] = difficulty_filter(kept, solver, cfg.difficulty)
        counts["after_difficulty"] = len(kept)
        solver_info = {"name": type(solver).__name__ if solver is not None else None,
                       "failures": getattr(solver, "failures", 0) - before}
    else:
        kept = add_trace_tokens(kept, cfg.difficulty.tokenizer, overwrite=True)
    candidates = assign_domains(kept, cfg.diversity)
    selected = select(candidates, cfg)
    counts["selected"] = len(selected)
    if len(selected) < cfg.target_size:
        log.warning("curation: only %d rows left to select from, target was %d", len(selected), cfg.target_size)

    report = {
        "selection": cfg.selection,
        "target_size": cfg.target_size,
        "stages": stages,
        "counts": counts,
        "removed": removed,
        "solver": solver_info,
        "domains": {"input": input_domains, "candidates": _domain_counts(candidates),
                    "selected": _domain_counts(selected)},
        "trace_token_unit": token_unit(cfg.difficulty.tokenizer),
        "mean_trace_tokens": {"candidates": _mean([r["trace_tokens"] for r in candidates]),
                              "selected": _mean([r["trace_tokens"] for r in selected])},
        "config": cfg.model_dump(mode="json"),
    }
    log.info("curation: %s", json.dumps(counts))
    return selected, report


# ---------------------------------------------------------------------------------- files
POOL_FIELDS = ("id", "question", "trace", "answer", "task", "metadata")
REQUIRED_COLUMNS = ("question", "trace", "answer")


def load_pool(path: str | Path, columns: dict[str, str] | None = None) -> tuple[list[Row], int]:
    """Rows of any Parquet file (or directory of parts) in curation form, and how many were
    malformed (no question, or no answer) and skipped.

    ``columns`` maps our field names (id, question, trace, answer, task, metadata) to the
    file's column names where they differ; other columns are kept as they are (a
    :class:`ColumnSolver` reads them). A file without the question, trace or answer column is
    an error, not an empty pool. Rows without an id get their position as one."""
    from selftaught.storage import read_parquet

    mapping = {k: k for k in POOL_FIELDS}
    unknown = sorted(set(columns or {}) - set(POOL_FIELDS))
    if unknown:
        raise ValueError(f"load_pool: unknown fields {unknown}; known: {list(POOL_FIELDS)}")
    mapping.update(columns or {})
    table = read_parquet(path)
    names = set(table.column_names)
    missing = [f"{k} (column {mapping[k]!r})" for k in REQUIRED_COLUMNS if mapping[k] not in names]
    if missing:
        raise ValueError(f"load_pool: {path} has no {', '.join(missing)}; its columns: {sorted(names)}")
    renamed = {theirs for ours, theirs in mapping.items() if ours != theirs}
    rows: list[Row] = []
    malformed = 0
    for i, rec in enumerate(table.to_pylist()):
        row = {k: v for k, v in rec.items() if k not in renamed}
        for ours, theirs in mapping.items():
            if theirs in rec:
                row[ours] = rec[theirs]
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not question.strip() or answer is None or not str(answer).strip():
            malformed += 1
            continue
        row["answer"] = answer if isinstance(answer, str) else str(answer)
        if row.get("id") is None:
            row["id"] = str(i)
        rows.append(row)
    if malformed:
        log.warning("load_pool: %d of %d rows in %s lack a question or answer; skipped",
                    malformed, table.num_rows, path)
    return rows, malformed


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def report_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: stage counts, removals by reason, rows per domain."""
    c = report["counts"]
    lines = ["# Curation report", "",
             f"Selection **{report['selection']}**: {c['selected']} of {c['input']} rows "
             f"(target {report['target_size']}).", ""]
    if report.get("load_malformed"):  # set by the caller from load_pool's count
        lines += [f"{report['load_malformed']} rows without a question or answer were skipped when loading.", ""]
    lines += ["## Stages", ""]
    lines += _md_table(["stage", "applied", "rows after"],
                       [("quality", report["stages"]["quality"], c["after_quality"]),
                        ("difficulty", report["stages"]["difficulty"], c.get("after_difficulty", "-")),
                        ("selection", f"{report['selection']} (diversity: {report['stages']['diversity']})",
                         c["selected"])])
    removals = [(stage, reason, n) for stage, by in report["removed"].items() for reason, n in by.items()]
    lines += ["", "## Removed rows", ""]
    lines += _md_table(["stage", "reason", "rows"], removals) if removals else ["None."]
    if report.get("solver"):
        lines += ["", f"Solver: {report['solver']['name']}, failed attempts: {report['solver']['failures']}."]
    d = report["domains"]
    names = sorted(set(d["input"]) | set(d["candidates"]) | set(d["selected"]))
    lines += ["", "## Rows per domain", ""]
    lines += _md_table(["domain", "input", "candidates", "selected"],
                       [(n, d["input"].get(n, 0), d["candidates"].get(n, 0), d["selected"].get(n, 0))
                        for n in names])
    m = report["mean_trace_tokens"]
    lines += ["", f"Mean trace length in {report['trace_token_unit']}: candidates {m['candidates']}, "
                  f"selected {m['selected']}.", "", "## Config", "", "```yaml",
              yaml.safe_dump(report["config"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def write_curation(out_dir: str | Path, selected: Sequence[Row], report: dict[str, Any]) -> Path:
    """``selected.parquet``, ``report.json`` and ``report.md`` in ``out_dir`` (each written
    whole under a temporary name first, so a crash never leaves a truncated file)."""
    from selftaught.storage import write_parquet

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(list(selected), out / "selected.parquet")
    for name, text in (("report.json", json.dumps(report, indent=2, default=str)),
                       ("report.md", report_markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    return out
