"""reasoning-gym task sets with their own verifiers (GRPO rewards, s1-style evaluation).

Rows carry everything needed to rescore an answer later without regenerating the set: the
generator's full entry (question, answer, metadata) as JSON, plus the ``size`` and ``seed``
the set was made with, so the same dataset object (and its config-dependent scoring) can be
rebuilt when the stored entry is not exactly JSON-representable. ``reasoning_gym`` takes a
few seconds to import, so it is imported only when a set is built or scored.

Answers are judged by the task's own verifier first; an answer it rejects still counts when
math-verify finds it mathematically equal to the task's answer (``0.5`` for ``1/2``,
``\\frac{1}{2}`` for ``0.5``, ``-5.0`` for ``-5``): see :func:`math_equivalent`.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from functools import lru_cache
from typing import Any

from selftaught.data.schema import BuildStats, progress

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the produced rows change, so prepared data is rebuilt
DEFAULT_TASKS = ["gsm_symbolic", "basic_arithmetic", "simple_equations"]


def available_tasks() -> list[str]:
    """Generator names registered in the installed reasoning-gym."""
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def reasoning_gym_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reasoning-gym")
    except PackageNotFoundError:
        return "missing"


@lru_cache(maxsize=64)
def _dataset_cached(task: str, size: int, seed: int, config_json: str) -> Any:
    import reasoning_gym

    return reasoning_gym.create_dataset(task, size=size, seed=seed, **json.loads(config_json))


def _dataset(task: str, size: int, seed: int, config: dict | None = None) -> Any:
    """One dataset object per (task, size, seed, config): generation and scoring share it."""
    return _dataset_cached(task, size, seed, json.dumps(config or {}, sort_keys=True))


def _json_exact(obj: Any) -> bool:
    try:
        return json.loads(json.dumps(obj)) == obj
    except (TypeError, ValueError):
        return False


def build_reasoning(tasks: list[str], size: int, seed: int = 0,
                    task_config: dict[str, dict] | None = None) -> tuple[list[dict], BuildStats]:
    """``size`` problems per task, deterministic in ``seed``; ids are ``<task>/<seed>/<index>``.
    ``task_config`` passes generator settings per task (e.g. ``{"chain_sum": {"max_terms": 4}}``);
    they are stored with each row, so scoring rebuilds the same generator.

    An unknown task name is an error (a typo must not silently shrink an evaluation). A
    problem whose generator raises is ``skipped_malformed``; one with an empty question or
    answer is ``skipped_empty``."""
    known = set(available_tasks())
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"unknown reasoning-gym tasks {unknown}; see selftaught.data.reasoning.available_tasks()")
    stats = BuildStats("reasoning")
    rows: list[dict] = []
    for task in tasks:
        config = (task_config or {}).get(task) or {}
        ds = _dataset(task, size, seed, config)
        for i in progress(range(size), f"reasoning {task}"):
            stats["read"] += 1
            try:
                entry = ds[i]
                question, answer = entry["question"], entry["answer"]
            except Exception as e:  # a generator bug for one index must not lose the whole set
                log.warning("reasoning: %s[%d] failed to generate (%s)", task, i, e)
                stats["skipped_malformed"] += 1
                continue
            if not str(question or "").strip() or answer is None or not str(answer).strip():
                stats["skipped_empty"] += 1
                continue
            meta = {"size": size, "seed": seed, "index": i, "exact": _json_exact(entry), "entry": entry,
                    **({"config": config} if config else {})}
            rows.append({"id": f"{task}/{seed}/{i}", "task": task, "question": str(question),
                         "answer": str(answer), "metadata": json.dumps(meta, default=str)})
            stats["kept"] += 1
    stats.log()
    return rows, stats


def entry_of(row: dict) -> dict:
    """The generator's entry for ``row``: the stored JSON when it round-trips exactly,
    otherwise regenerated from (task, size, seed, index)."""
    meta = json.loads(row["metadata"]) if isinstance(row["metadata"], str) else row["metadata"]
    if meta.get("exact", True) and "entry" in meta:
        return meta["entry"]
    return _dataset(row["task"], meta["size"], meta["seed"], meta.get("config"))[meta["index"]]


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*)\}")
_ANSWER_LINE = re.compile(r"(?:final answer|answer)\s*(?:is)?\s*[:=]?\s*(.+)", re.I)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def extract_answer(text: str) -> str:
    """The answer part of a free-form solution, in order of preference: the last
    ``<answer>...</answer>``, the last ``\\boxed{...}``, the text after the last "Answer:",
    the last number; otherwise the stripped text."""
    for pattern in (_ANSWER_TAG, _BOXED):
        found = pattern.findall(text)
        if found and found[-1].strip():
            return found[-1].strip()
    for line in reversed([ln for ln in text.strip().splitlines() if ln.strip()]):
        m = _ANSWER_LINE.search(line)
        if m and m.group(1).strip():
            return m.group(1).strip().rstrip(".").strip("*$ ")
    nums = _NUMBER.findall(text)
    if nums:
        return nums[-1].replace(",", "")
    return text.strip()


def format_reasoning_prompt(row: dict) -> str:
    """The question plus the answer convention :func:`extract_answer` reads first."""
    return (f"{row['question'].strip()}\n\nThink step by step, then give the final answer "
            f"inside <answer></answer> tags.")


_TEX_CMD = re.compile(r"\\[a-zA-Z]+")
_MAX_MATH_CHARS = 200


def _math_like(s: str) -> bool:
    """A single mathematical expression math-verify can be trusted with: a number, fraction,
    TeX expression or single-letter algebra. Words ("Paris", "2 or 3"), lists and tuples
    ("1, 2, 3": order may matter to the task, math-verify compares them as sets) and
    space-separated numbers are left to string comparison and the task's verifier."""
    if not s or len(s) > _MAX_MATH_CHARS or not re.search(r"\d|\\", s):
        return False
    bare = _TEX_CMD.sub(" ", s)
    return not (re.search(r"[A-Za-z]{2,}", bare) or re.search(r"\d\s+\d", bare)
                or re.search(r",(?!\d{3}(?!\d))", bare))


@lru_cache(maxsize=4096)
def _math_parse(s: str, timeout: int | None) -> tuple:
    from math_verify import parse

    return tuple(parse(s if "$" in s else f"${s}$", parsing_timeout=timeout))


def math_equivalent(pred: Any, gold: Any) -> bool:
    """Whether ``pred`` and ``gold`` are the same mathematical value by math-verify ("1/2",
    "0.5", "\\frac{1}{2}", "$\\frac12$" all match; floats compared after rounding to 6
    places). Only single expressions are compared (see :func:`_math_like`); anything else is
    False. math-verify's time limit uses SIGALRM, so it applies in the main thread only."""
    pred, gold = str(pred).strip(), str(gold).strip()
    if not (_math_like(pred) and _math_like(gold)):
        return False
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        from math_verify import verify

        p, g = _math_parse(pred, timeout), _math_parse(gold, timeout)
        return bool(p and g and verify(list(g), list(p), timeout_seconds=timeout))
    except Exception as e:  # noqa: BLE001 - sympy/antlr failures and timeouts mean "not shown equal"
        log.debug("reasoning: math-verify could not compare %r and %r (%s)", pred, gold, e)
        return False


def answers_match(pred: Any, gold: Any) -> bool:
    """One answer check for rows without a task verifier: equal after
    :func:`selftaught.text.normalize_answer`, or mathematically equal (:func:`math_equivalent`)."""
    from selftaught.text import normalize_answer

    p = normalize_answer(pred)
    return bool(p) and (p == normalize_answer(gold) or math_equivalent(pred, gold))


def score_answer(row: dict, answer_text: str, extract: bool = True, binary: bool = False) -> float:
    """reasoning-gym's own verdict for ``answer_text``: 1.0 correct, otherwise 0.0 or the
    task's partial credit (``gsm_symbolic`` gives 0.01 for a wrong but well-formed number, a
    shaping signal for RL). An answer the verifier does not fully credit gets 1.0 when
    math-verify shows it equal to the task's answer (:func:`math_equivalent`). ``binary``
    keeps only exact credit (accuracy); ``extract`` first cuts the answer out of a full solution."""
    answer = extract_answer(answer_text) if extract else answer_text
    meta = json.loads(row["metadata"]) if isinstance(row["metadata"], str) else row["metadata"]
    ds, entry = _dataset(row["task"], meta["size"], meta["seed"], meta.get("config")), entry_of(row)
    try:
        score = float(ds.score_answer(answer, entry))
    except Exception as e:  # a verifier that chokes on garbage means the answer is wrong
        log.debug("reasoning: scoring %s failed (%s)", row.get("id"), e)
        score = 0.0
    if score < 1.0 and entry.get("answer") is not None and math_equivalent(answer, entry["answer"]):
        score = 1.0
    return (1.0 if score >= 1.0 else 0.0) if binary else score
