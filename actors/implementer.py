"""The implementer: turns a free-form research idea into an applied, smoke-tested code edit.

An LLM is asked for edit blocks against the codebase; each answer is applied to a fresh copy
and smoke-run (the executor's callable: imports and a step, seconds). A failure goes back to the
model in the same conversation, with the exact apply error (and the closest lines of the file)
or the tail of the smoke log, for up to ``max_revisions`` revisions. ``samples`` such chains run
in parallel because LLM calls and smoke runs are slow; the first chain that passes wins and the
others stop at their next step (``implement`` returns once all have stopped, so every token
spent is on record). Every attempt is recorded with its tokens and cost, and LLM outages are told
apart from bad edits, so a failed implementation is charged to the right cause. Each attempt is
a complete edit against the original codebase: revisions restate the whole change.

The class is plain Python (tests and in-process use); :func:`implementer_actor_class` wraps it as
a Ray actor whose results are plain dataclasses.
"""
from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import Field

from envs.edits import AppliedEdit, EditError, ProtectedPathError, apply_to_copy, codebase_listing
from selftaught.config import Strict
from selftaught.llm import LLMClient, LLMConfig, LLMError

log = logging.getLogger(__name__)

# Failure stages, from furthest to nearest: the most informative failure names the result.
_STAGE_RANK = {"smoke": 0, "apply": 1, "protected": 2, "llm": 3}


class ImplementerConfig(Strict):
    """How ideas are implemented.

    ``mock_responses`` (dry runs, tests) answers through litellm's ``mock_response``, so the
    real client path, accounting and call log run. Order: chain ``i``'s attempt ``j`` (``j=0``
    the first answer, ``j>=1`` revisions) gets item ``(i * (max_revisions + 1) + j) % len``;
    a list of ``max_revisions + 1`` answers thus gives every chain the same sequence, one
    answer answers everything.
    """

    llm: LLMConfig = Field(default_factory=lambda: LLMConfig(max_tokens=4096, timeout_s=300.0))
    samples: int = Field(default=2, ge=1)  # chains in parallel
    max_revisions: int = Field(default=2, ge=0)  # revisions per chain after its first answer
    max_codebase_chars: int = Field(default=60_000, ge=1000)  # codebase listing in the prompt
    temperature: float | None = Field(default=None, ge=0)  # for the samples; None: llm.temperature
    max_error_chars: int = Field(default=4000, ge=200)  # error text sent back and recorded
    max_file_bytes: int = Field(default=1_000_000, ge=1)  # largest file an edit may produce
    keep_failed_attempts: bool = False  # keep the copies of attempts that failed their smoke run
    save_transcripts: bool = True  # work_dir/transcript-<chain>.json: the conversation
    mock_responses: list[str] | None = Field(default=None, min_length=1)


@dataclass
class SmokeOutcome:
    """The executor's smoke run of one attempt. ``infra``: the run itself could not happen
    (sandbox or cluster trouble), which is not the edit's fault and is not revised."""

    ok: bool
    log: str = ""  # tail of stdout/stderr
    seconds: float = 0.0
    infra: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Implementation:
    """The outcome of implementing one idea. On success ``winning_dir`` is the applied copy to run;
    otherwise ``failed_stage`` is ``apply``, ``smoke``, ``protected`` or ``llm`` (``infra`` True
    when the failure was the provider's or the sandbox's, not the idea's)."""

    success: bool
    winning_dir: str | None = None
    diff: str = ""
    normalized_hash: str = ""
    files_changed: list[str] = field(default_factory=list)
    chain: int | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    failed_stage: str | None = None
    error: str = ""
    infra: bool = False
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cost_known: bool = True  # every call was priced
    seconds: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Implementation":
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in d.items() if k in names})


SYSTEM_PROMPT = """\
You are a careful research engineer. You are given a machine-learning codebase, the task it \
solves and one research idea, and you implement the idea as a minimal, correct change to the \
code. Your change is applied automatically, smoke-tested (imports and a few steps), then run \
in full and scored.

Answer with a few sentences at most on what you change, then the edits as SEARCH/REPLACE \
blocks. A block is the file's path relative to the codebase root on a line of its own, then:

<<<<<<< SEARCH
lines copied exactly from the current file
=======
the lines that take their place
>>>>>>> REPLACE

For example:

train.py
<<<<<<< SEARCH
    lr = 3e-4
    for step in range(num_steps):
=======
    lr = 1e-3
    warmup_steps = 100
    for step in range(num_steps):
>>>>>>> REPLACE

Edit blocks:
- SEARCH reproduces existing lines character for character (indentation, comments, blank \
lines) and matches exactly one place in the file; add a neighbouring unchanged line or two \
when needed. Keep blocks short: the lines that change plus the context that locates them.
- Use as many blocks as needed; blocks for the same file are applied in order.
- To create a file, give a new path with an empty SEARCH section and the whole content in \
REPLACE.
- Edits are always made against the original files shown to you.

The change:
- Implement the idea faithfully and nothing else; leave unrelated code alone.
- Never edit, create or delete protected files.
- Keep every interface the task describes: the entry command and its arguments, environment \
variables, input and output paths, the format of saved artefacts, and the names other files \
rely on.
- The entry command must keep working end to end within its time budget, smoke mode included.
- There is no network access: no downloads and no new packages; use the Python standard \
library and what the codebase already imports.
- Do not read evaluation data, and do not touch the evaluation, the metric or the time limits.
"""


def _clip_head(text: str, limit: int) -> str:
    """At most ``limit`` characters, keeping the beginning (apply errors lead with the cause)."""
    if len(text) <= limit:
        return text
    note = f"\n[... {len(text)} characters in all, cut]"
    return text[:limit - len(note)] + note


def _clip_tail(text: str, limit: int) -> str:
    """At most ``limit`` characters, keeping the end (a log's last lines hold the error)."""
    if len(text) <= limit:
        return text
    note = f"[... {len(text)} characters in all, cut]\n"
    return note + text[-(limit - len(note)):]


class _Race:
    """Shared state of one ``implement`` call: who won, and the lock that decides it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.winner: int | None = None

    def claim(self, chain: int) -> bool:
        with self.lock:
            if self.winner is None:
                self.winner = chain
                self.done.set()
                return True
            return False


class Implementer:
    """LLM -> edit -> smoke, with revisions; see the module docstring."""

    def __init__(self, cfg: ImplementerConfig | dict | None = None):
        if cfg is None:
            cfg = ImplementerConfig()
        self.cfg = cfg if isinstance(cfg, ImplementerConfig) else ImplementerConfig.model_validate(cfg)
        self._client: LLMClient | None = None
        self._client_lock = threading.Lock()

    # Picklable (Ray, multiprocessing): the client holds locks and is rebuilt on first use.
    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["cfg"])

    @property
    def client(self) -> LLMClient:
        with self._client_lock:
            if self._client is None:
                llm = self.cfg.llm
                if self.cfg.mock_responses is not None and llm.mock_response is None:
                    llm = llm.model_copy(update={"mock_response": self.cfg.mock_responses[0]})
                self._client = LLMClient(llm)
            return self._client

    def usage(self) -> dict[str, Any]:
        """Running totals of this implementer's LLM calls."""
        return self.client.usage.snapshot()

    # ------------------------------------------------------------------ prompts
    def messages(self, idea_text: str, codebase_dir: str | Path, context: str = "",
                 protected: Sequence[str] = (), editable: Sequence[str] | None = None,
                 entry: Sequence[str] | str | None = None) -> list[dict[str, str]]:
        """The opening conversation of every chain."""
        listing = codebase_listing(codebase_dir, editable, self.cfg.max_codebase_chars, protected)
        notes = []
        if entry:
            cmd = entry if isinstance(entry, str) else " ".join(entry)
            notes.append(f"The entry command is `{cmd}`, run in the codebase root.")
        if protected:
            notes.append("Protected paths (read only; globs relative to the root): "
                         + ", ".join(f"`{p}`" for p in protected) + ".")
        if editable:
            notes.append("Files you may edit or create match: " + ", ".join(f"`{p}`" for p in editable) + ".")
        user = (f"# Task\n\n{context.strip() or '(no description given)'}\n\n"
                f"# Codebase\n\nPaths are relative to the codebase root. {' '.join(notes)}\n\n{listing}\n"
                f"# Idea to implement\n\n{idea_text.strip()}\n\n"
                "Implement this idea now with SEARCH/REPLACE blocks.")
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def _revision(self, stage: str, error: str, truncated: bool) -> str:
        cut = ("\nYour answer was cut off at the output token limit; answer more briefly (fewer, shorter "
               "blocks).") if truncated else ""
        if stage == "apply":
            what = f"Your edits could not be applied:\n\n{error}{cut}"
        else:
            what = ("Your edits were applied, but the smoke run (the entry command in smoke mode: imports and a "
                    f"few steps) failed. The end of its output:\n\n```\n{error}\n```")
        return (f"{what}\n\nNothing of that answer was kept: the codebase is back to the original files shown "
                "above. Answer again with the complete, corrected set of SEARCH/REPLACE blocks against those "
                "original files.")

    def _mock(self, chain: int, j: int) -> dict[str, Any]:
        mocks = self.cfg.mock_responses
        if not mocks:
            return {}
        return {"mock_response": mocks[(chain * (self.cfg.max_revisions + 1) + j) % len(mocks)]}

    # ------------------------------------------------------------------ one chain
    def _chain(self, chain: int, base: list[dict[str, str]], codebase_dir: Path, work_dir: Path,
               protected: Sequence[str], editable: Sequence[str] | None,
               smoke: Callable[[Path], SmokeOutcome] | None,
               race: _Race) -> tuple[list[dict[str, Any]], Path | None, AppliedEdit | None]:
        """Run one conversation; returns its attempt records and, if it won, its dir and edit."""
        cfg = self.cfg
        messages = list(base)
        records: list[dict[str, Any]] = []
        overrides: dict[str, Any] = {}
        if cfg.temperature is not None:
            overrides["temperature"] = cfg.temperature

        def record(j: int, stage: str, *, result: Any = None, error: str = "", infra: bool = False,
                   latency: float = 0.0, **extra: Any) -> dict[str, Any]:
            rec = {"chain": chain, "index": j, "stage": stage, "ok": stage == "ok", "infra": infra,
                   "error": _clip_head(error, cfg.max_error_chars),
                   "prompt_tokens": getattr(result, "prompt_tokens", 0),
                   "completion_tokens": getattr(result, "completion_tokens", 0),
                   "cost_usd": getattr(result, "cost_usd", 0.0),
                   "cost_known": getattr(result, "cost_known", True) if result is not None else True,
                   "latency_s": round(getattr(result, "latency_s", latency), 4),
                   "model": getattr(result, "model", cfg.llm.model),
                   "finish_reason": getattr(result, "finish_reason", None),
                   "time": round(time.time(), 3), **extra}
            records.append(rec)
            return rec

        won: tuple[Path, Any] | None = None
        try:
            for j in range(cfg.max_revisions + 1):
                if race.done.is_set():
                    break
                t0 = time.perf_counter()
                try:
                    result = self.client.complete(messages, **overrides, **self._mock(chain, j))
                except LLMError as e:
                    record(j, "llm", error=str(e), infra=True, latency=time.perf_counter() - t0,
                           retryable=e.retryable)
                    break
                messages.append({"role": "assistant", "content": result.text})
                if race.done.is_set():
                    record(j, "cancelled", result=result)
                    break
                attempt_dir = work_dir / f"attempt-{chain}-{j}"
                if attempt_dir.exists():
                    shutil.rmtree(attempt_dir)
                try:
                    applied = apply_to_copy(result.text, codebase_dir, attempt_dir, protected, editable,
                                            max_file_bytes=cfg.max_file_bytes)
                except ProtectedPathError as e:
                    record(j, "protected", result=result, error=str(e))
                    break
                except OSError as e:  # the copy itself failed (disk full, permissions): not the edit's fault
                    record(j, "apply", result=result, error=f"copying the codebase failed: {e}", infra=True)
                    break
                except EditError as e:
                    rec = record(j, "apply", result=result, error=str(e))
                    messages.append({"role": "user", "content": self._revision(
                        "apply", rec["error"], result.finish_reason == "length")})
                    continue
                info = {"dir": str(attempt_dir), "files_changed": applied.files_changed,
                        "normalized_hash": applied.normalized_hash}
                if smoke is not None:
                    if race.done.is_set():
                        record(j, "cancelled", result=result, **info)
                        self._discard(attempt_dir)
                        break
                    try:
                        outcome = smoke(attempt_dir)
                    except Exception as e:  # noqa: BLE001 - the executor's runner broke, not the edit
                        outcome = SmokeOutcome(False, f"smoke runner error: {type(e).__name__}: {e}", 0.0, infra=True)
                    if not outcome.ok:
                        tail = _clip_tail(outcome.log or "(no output)", cfg.max_error_chars)
                        record(j, "smoke", result=result, error=tail, infra=outcome.infra,
                               smoke_s=round(outcome.seconds, 3), **info)
                        if not cfg.keep_failed_attempts:
                            self._discard(attempt_dir)
                        if outcome.infra:
                            break
                        messages.append({"role": "user", "content": self._revision("smoke", tail, False)})
                        continue
                    info["smoke_s"] = round(outcome.seconds, 3)
                if race.claim(chain):
                    record(j, "ok", result=result, **info)
                    won = (attempt_dir, applied)
                else:  # another chain passed first
                    record(j, "cancelled", result=result, **info)
                    self._discard(attempt_dir)
                break
        finally:
            if cfg.save_transcripts:
                self._save_transcript(work_dir / f"transcript-{chain}.json", messages, records)
        return records, (won[0] if won else None), (won[1] if won else None)

    @staticmethod
    def _discard(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _save_transcript(path: Path, messages: list[dict[str, str]], records: list[dict[str, Any]]) -> None:
        try:
            path.write_text(json.dumps({"messages": messages, "attempts": records}, indent=1))
        except OSError as e:  # a transcript is a convenience; never fail the idea for it
            log.warning("could not write %s: %s", path, e)

    # ------------------------------------------------------------------ entry point
    def implement(self, idea_text: str, codebase_dir: str | Path, work_dir: str | Path, context: str = "",
                  protected: Sequence[str] = (), editable: Sequence[str] | None = None,
                  smoke: Callable[[Path], SmokeOutcome] | None = None, *,
                  entry: Sequence[str] | str | None = None) -> Implementation:
        """Implement ``idea_text`` on copies of ``codebase_dir`` under ``work_dir``
        (``attempt-<chain>-<j>/``); see the module docstring."""
        t_start = time.perf_counter()
        cfg = self.cfg
        codebase_dir, work_dir = Path(codebase_dir), Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        protected, editable = list(protected or []), (list(editable) if editable is not None else None)
        base = self.messages(idea_text, codebase_dir, context, protected, editable, entry)
        race = _Race()
        workers = min(cfg.samples, cfg.llm.max_concurrency)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="implement") as pool:
            futures = [pool.submit(self._chain, i, base, codebase_dir, work_dir, protected, editable, smoke, race)
                       for i in range(cfg.samples)]
            outcomes = [f.result() for f in futures]

        attempts = sorted((r for recs, _, _ in outcomes for r in recs), key=lambda r: (r["chain"], r["index"]))
        impl = Implementation(success=False, attempts=attempts)
        impl.llm_calls = len(attempts)  # one call per attempt, failed calls included
        impl.prompt_tokens = sum(a["prompt_tokens"] for a in attempts)
        impl.completion_tokens = sum(a["completion_tokens"] for a in attempts)
        impl.cost_usd = sum(a["cost_usd"] for a in attempts)
        impl.cost_known = all(a["cost_known"] for a in attempts)
        winner = next(((i, d, a) for i, (_, d, a) in enumerate(outcomes) if d is not None), None)
        if winner is not None:
            i, d, applied = winner
            impl.success, impl.winning_dir, impl.chain = True, str(d), i
            impl.diff, impl.normalized_hash = applied.diff, applied.normalized_hash
            impl.files_changed = list(applied.files_changed)
        else:
            # Each chain's last attempt says how it ended; the one that got furthest names the
            # failure (smoke > apply > protected > llm), an idea's failure before infra trouble
            # at the same stage.
            lasts = [recs[-1] for recs, _, _ in outcomes if recs]
            lasts = [a for a in lasts if a["stage"] in _STAGE_RANK]
            if lasts:
                best = min(lasts, key=lambda a: (_STAGE_RANK[a["stage"]], a["infra"], a["chain"]))
                impl.failed_stage, impl.error, impl.infra = best["stage"], best["error"], best["infra"]
            else:
                impl.failed_stage, impl.error = "llm", "no attempt was made"
                impl.infra = True
        impl.seconds = round(time.perf_counter() - t_start, 3)
        return impl


def implementer_actor_class():
    """``ray.remote(Implementer)``; resources are set by the caller with ``.options``."""
    import ray

    return ray.remote(Implementer)
