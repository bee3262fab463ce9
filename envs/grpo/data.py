"""Problems for the GRPO environment: reasoning-gym sets, a training split the job sees
(``train/``, mounted read-only as ``$DATA_DIR``) and a held-out split only the evaluator reads
(``val/``).

Every (split, task) set comes from its own generator seed, far enough apart that reasoning-gym's
``Random(seed + index)`` streams never meet, and any training problem that also occurs in the
validation split (small arithmetic problems do repeat; the same expression in another task's
phrasing counts as the same problem) is dropped, so validation problems are never seen in
training.

Each line of ``problems.jsonl`` holds everything scoring needs without this package::

    {"id": "chain_sum/1/17", "task": "chain_sum", "question": "...", "answer": "42",
     "entry": {...generator entry...}, "exact": true, "config": {...}, "seed": 1,
     "size": 2000, "index": 17}

``ds = reasoning_gym.create_dataset(task, size=size, seed=seed, **config)`` rebuilds the
generator; ``ds.score_answer(answer, entry)`` scores (when ``exact`` is false the stored entry
did not survive JSON, so use ``ds[index]`` instead).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1

DEFAULTS: dict[str, Any] = {
    # Two-term addition/subtraction with 1-2 digit numbers in two phrasings: SmolLM2-135M-Instruct
    # gets about 15-30% of them right greedily (measured), so there is room to improve both ways.
    "tasks": ["basic_arithmetic", "chain_sum"],
    "task_config": {
        "basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2,
                             "operators": ["+", "-"], "allow_parentheses": False, "allow_negation": False},
        "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
    },
    "train_size": 2000,  # per task, before removing questions that also occur in val
    "val_size": 200,  # per task
    "train_seed": 1,
    "val_seed": 50_000_017,
    "task_seed_stride": 1_000_003,  # task k of a split uses seed <split>_seed + k * stride
}


def _options(options: dict | None) -> dict[str, Any]:
    opts = {**DEFAULTS, **(options or {})}
    unknown = sorted(set(opts) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown grpo data options {unknown}; known: {sorted(DEFAULTS)}")
    opts["tasks"] = list(opts["tasks"])
    if not opts["tasks"] or len(set(opts["tasks"])) != len(opts["tasks"]):
        raise ValueError("grpo data: 'tasks' must name at least one reasoning-gym task, each once")
    opts["task_config"] = {t: dict((opts["task_config"] or {}).get(t) or {}) for t in opts["tasks"]}
    for k in ("train_size", "val_size", "train_seed", "val_seed", "task_seed_stride"):
        opts[k] = int(opts[k])
    if opts["train_size"] < 1 or opts["val_size"] < 1:
        raise ValueError("grpo data: train_size and val_size must be positive")
    # reasoning-gym draws problem i of a set from Random(seed + i): every (split, task) set gets
    # its own seed, and their index ranges must not meet (else two sets share problems).
    ranges = sorted((_seed(opts, split, k), opts[f"{split}_size"], f"{split}/{t}")
                    for split in ("train", "val") for k, t in enumerate(opts["tasks"]))
    for (s0, n0, a), (s1, _, b) in zip(ranges, ranges[1:]):
        if s0 + n0 > s1:
            raise ValueError(f"grpo data: seed ranges of {a} and {b} overlap (reasoning-gym seeds problem i "
                             "with seed + i); move train_seed/val_seed apart or raise task_seed_stride")
    return opts


def _seed(opts: dict, split: str, k: int) -> int:
    """Generator seed of the k-th task of a split."""
    return opts[f"{split}_seed"] + k * opts["task_seed_stride"]


def _key(row: dict) -> str:
    """What makes two problems the same: the arithmetic expression when the generator records
    one (the same sum phrased by two tasks is one problem), otherwise the question."""
    meta = (row.get("entry") or {}).get("metadata") or {}
    expr = meta.get("expression") if isinstance(meta, dict) else None
    return re.sub(r"\s+", "", str(expr)) if expr else row["question"].strip()


def _rows(task: str, size: int, seed: int, config: dict) -> list[dict]:
    from selftaught.data.reasoning import build_reasoning

    built, _ = build_reasoning([task], size, seed=seed, task_config={task: config} if config else None)
    rows = []
    for r in built:
        meta = json.loads(r["metadata"])
        rows.append({"id": r["id"], "task": task, "question": r["question"], "answer": r["answer"],
                     "entry": meta["entry"], "exact": bool(meta.get("exact", True)), "config": config,
                     "seed": seed, "size": size, "index": meta["index"]})
    return rows


def _interleave(per_task: list[list[dict]]) -> list[dict]:
    """Round-robin over tasks, so any prefix (the evaluator's ``--n``) is balanced."""
    out: list[dict] = []
    for i in range(max((len(x) for x in per_task), default=0)):
        out.extend(x[i] for x in per_task if i < len(x))
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")
    tmp.replace(path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def _done(marker: Path, opts: dict) -> dict | None:
    try:
        old = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    ok = old.get("options") == opts and old.get("format_version") == FORMAT_VERSION
    return old if ok else None


def prepare(out_dir: Path, options: dict | None = None) -> dict:
    """Write ``out_dir/train/problems.jsonl`` and ``out_dir/val/problems.jsonl`` with their
    ``meta.json`` and return the metadata; a no-op when ``out_dir/val/meta.json`` already
    records the same options."""
    out_dir = Path(out_dir)
    opts = _options(options)
    marker = out_dir / "val" / "meta.json"
    if (old := _done(marker, opts)) is not None:
        return old
    from filelock import FileLock

    out_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir / ".prepare.lock")):
        if (old := _done(marker, opts)) is not None:  # another process finished while we waited
            return old
        marker.unlink(missing_ok=True)  # a rebuild with other options: not done until rewritten
        return _build(out_dir, opts)


def _build(out_dir: Path, opts: dict[str, Any]) -> dict:
    from selftaught.data.reasoning import reasoning_gym_version

    val_by_task, train_by_task = [], []
    counts: dict[str, dict[str, int]] = {"train": {}, "val": {}, "train_dropped_overlap": {}}
    seeds: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    for k, task in enumerate(opts["tasks"]):
        seeds["val"][task] = _seed(opts, "val", k)
        val_by_task.append(_rows(task, opts["val_size"], seeds["val"][task], opts["task_config"][task]))
    val_keys = {_key(r) for rows in val_by_task for r in rows}
    for k, task in enumerate(opts["tasks"]):
        seeds["train"][task] = _seed(opts, "train", k)
        train_all = _rows(task, opts["train_size"], seeds["train"][task], opts["task_config"][task])
        train = [r for r in train_all if _key(r) not in val_keys]
        train_by_task.append(train)
        counts["val"][task] = len(val_by_task[k])
        counts["train"][task] = len(train)
        counts["train_dropped_overlap"][task] = len(train_all) - len(train)
    val_rows, train_rows = _interleave(val_by_task), _interleave(train_by_task)
    if not train_rows or not val_rows:
        raise RuntimeError(f"grpo data: empty split (counts {counts})")
    common = {"format_version": FORMAT_VERSION, "options": opts, "tasks": opts["tasks"],
              "task_config": opts["task_config"], "reasoning_gym_version": reasoning_gym_version()}
    meta = {**common, "seeds": seeds,
            "counts": {"train": len(train_rows), "val": len(val_rows), "per_task": counts}}
    for split in ("train", "val"):
        (out_dir / split).mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / "train" / "problems.jsonl", train_rows)
    # The job sees train/ only: its meta names no validation seed or question.
    _write_json(out_dir / "train" / "meta.json",
                {"format_version": FORMAT_VERSION, "tasks": opts["tasks"], "task_config": opts["task_config"],
                 "reasoning_gym_version": common["reasoning_gym_version"], "seeds": seeds["train"],
                 "count": len(train_rows), "per_task": counts["train"]})
    _write_jsonl(out_dir / "val" / "problems.jsonl", val_rows)
    _write_json(out_dir / "val" / "meta.json", meta)  # written last: the completion marker
    return meta
