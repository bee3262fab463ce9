"""reasoning-gym task sets with their own verifiers: rows carry what is needed to rescore."""
from __future__ import annotations

import json
import logging
import re
from functools import lru_cache

from selftaught.data.schema import BuildStats

log = logging.getLogger(__name__)

DEFAULT_TASKS = ["gsm_symbolic", "basic_arithmetic", "simple_equations"]


def available_tasks() -> list[str]:
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def build_reasoning(tasks: list[str], size: int, seed: int = 0) -> tuple[list[dict], BuildStats]:
    """``size`` problems per task, deterministic in ``seed``. Unknown task names are an error
    (a typo should not silently shrink an evaluation); a problem that fails to generate is
    counted and skipped."""
    import reasoning_gym

    known = set(available_tasks())
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"unknown reasoning-gym tasks {unknown}; see selftaught.data.reasoning.available_tasks()")
    stats = BuildStats("reasoning")
    rows = []
    for task in tasks:
        ds = reasoning_gym.create_dataset(task, size=size, seed=seed)
        for i in range(size):
            stats.read += 1
            try:
                e = ds[i]
                q, a = e["question"], e["answer"]
            except Exception:  # a generator bug for one index must not lose the set
                stats.skipped_malformed += 1
                continue
            if not str(q).strip() or a is None or not str(a).strip():
                stats.skipped_empty += 1
                continue
            rows.append({"id": f"{task}/{seed}/{i}", "task": task, "question": str(q), "answer": str(a),
                         "metadata": json.dumps({"seed": seed, "index": i, "entry": e.get("metadata", {})},
                                                default=str)})
            stats.kept += 1
    stats.log()
    return rows, stats


@lru_cache(maxsize=None)
def _scorer(task: str):
    import reasoning_gym

    return reasoning_gym.create_dataset(task, size=1, seed=0)


_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_ANSWER = re.compile(r"(?:final answer|answer)\s*(?:is)?\s*[:=]?\s*(.+)", re.I)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def extract_answer(text: str) -> str:
    """The answer part of a free-form solution: the last ``\\boxed{}``, else the text after the
    last 'Answer:', else the last number, else the stripped text."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = _ANSWER.search(ln)
        if m and m.group(1).strip():
            return m.group(1).strip().rstrip(".")
    nums = _NUMBER.findall(text)
    if nums:
        return nums[-1].replace(",", "")
    return text.strip()


def score_answer(row: dict, response: str, extract: bool = True) -> float:
    """reasoning-gym's own verdict for ``response`` on ``row`` (1.0 correct; partial credit
    when the task gives it)."""
    meta = json.loads(row["metadata"]) if isinstance(row["metadata"], str) else row["metadata"]
    entry = {"question": row["question"], "answer": row["answer"], "metadata": meta.get("entry", {})}
    answer = extract_answer(response) if extract else response
    try:
        return float(_scorer(row["task"]).score_answer(answer, entry))
    except Exception:  # a verifier that chokes on garbage means the answer is wrong
        return 0.0
