"""reasoning-gym task sets with their own verifiers (GRPO rewards, s1-style evaluation).

Rows carry everything needed to rescore an answer later without regenerating the set: the
generator's full entry (question, answer, metadata) as JSON, plus the ``size`` and ``seed``
the set was made with, so the same dataset object (and its config-dependent scoring) can be
rebuilt when the stored entry is not exactly JSON-representable. ``reasoning_gym`` takes a
few seconds to import, so it is imported only when a set is built or scored.
"""
from __future__ import annotations

import json
import logging
import re
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


def score_answer(row: dict, answer_text: str, extract: bool = True, binary: bool = False) -> float:
    """reasoning-gym's own verdict for ``answer_text``: 1.0 correct, otherwise 0.0 or the
    task's partial credit (``gsm_symbolic`` gives 0.01 for a wrong but well-formed number, a
    shaping signal for RL). ``binary`` keeps only exact credit (accuracy); ``extract`` first
    cuts the answer out of a full solution."""
    answer = extract_answer(answer_text) if extract else answer_text
    meta = json.loads(row["metadata"]) if isinstance(row["metadata"], str) else row["metadata"]
    ds, entry = _dataset(row["task"], meta["size"], meta["seed"], meta.get("config")), entry_of(row)
    try:
        score = float(ds.score_answer(answer, entry))
    except Exception as e:  # a verifier that chokes on garbage means the answer is wrong
        log.debug("reasoning: scoring %s failed (%s)", row.get("id"), e)
        return 0.0
    return (1.0 if score >= 1.0 else 0.0) if binary else score
