"""Is an executed idea a hyper-parameter change or an algorithmic one?

The thesis reports how much of what a search finds is tuning rather than new method (ch. 4.6).
We answer it per executed idea, in two steps:

1. **By rule, free**: a knob idea (structured, no free text) and an edit that touches only the
   environment's config file are hyper-parameter changes by construction.
2. **By an LLM judge**, when one is configured (``JudgeConfig.llm``): the idea's text and its
   diff go to the model, which answers ``{"kind": ..., "reason": ...}``. Calls go through
   :class:`~selftaught.llm.LLMClient` as role ``judge``, so they are cached by request, charged
   to the run's ledger and stopped by its caps like every other call. An answer that does not
   parse is counted as ``unknown``, never guessed.
"""
from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import Field

from selftaught.config import Strict
from selftaught.llm import LLMClient, LLMConfig

Kind = Literal["hyperparameter", "algorithmic", "unknown"]
KINDS: tuple[str, ...] = ("hyperparameter", "algorithmic")

_DIFF_FILE = re.compile(r"^\+\+\+ (?:b/)?(\S+)", re.M)


class JudgeConfig(Strict):
    """The judge of idea kinds (``judge`` in a search config)."""

    llm: LLMConfig | None = None  # None: only the rule classifies (the others count as unknown)
    rule: bool = True  # knob ideas and config-only edits are hyper-parameter without a call
    max_edit_chars: int = Field(default=8000, ge=200)  # the diff shown to the judge is cut to this
    max_tokens: int = Field(default=200, ge=16)  # the answer is one short JSON object


def edited_files(diff: str | None) -> list[str]:
    """Paths a unified diff writes to (``/dev/null`` for deletions is skipped)."""
    return [p for p in _DIFF_FILE.findall(diff or "") if p != "/dev/null"]


def rule_kind(idea: dict[str, Any], edit: str | None, config_file: str | None) -> Kind | None:
    """The kind an idea has by construction, or None when only a judge can tell."""
    if idea.get("knobs") and not (idea.get("text") or "").strip():
        return "hyperparameter"
    files = edited_files(edit)
    if files and config_file and all(f == config_file or f.endswith("/" + config_file) for f in files):
        return "hyperparameter"
    return None


def judge_messages(idea_text: str, edit: str, max_edit_chars: int) -> list[dict[str, str]]:
    """The judge's prompt (our wording): the two kinds, defined by what changes."""
    if len(edit) > max_edit_chars:
        edit = edit[:max_edit_chars] + "\n... (diff cut)"
    system = ("You sort changes to machine-learning training code into two kinds.\n"
              "hyperparameter: the method stays the same and only settings change: numbers such as "
              "learning rate, schedule shape, warm-up, batch size, model width or depth, weight decay, "
              "or a choice among options the code already offers.\n"
              "algorithmic: the method itself changes: new code paths, a different architecture block, "
              "loss, optimizer update rule, data pipeline or training procedure.\n"
              'Answer with one JSON object and nothing else: {"kind": "hyperparameter" or "algorithmic", '
              '"reason": "one sentence"}.')
    user = f"Idea:\n{idea_text.strip() or '(no description)'}\n\nDiff:\n{edit.strip() or '(no diff)'}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_kind(text: str) -> tuple[Kind, str]:
    """``(kind, reason)`` from the judge's answer; ``unknown`` when it does not parse."""
    text = text or ""
    dec = json.JSONDecoder()
    for m in re.finditer(r"\{", text):  # the first JSON object with a known kind, wherever it starts
        try:
            obj, _ = dec.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and obj.get("kind") in KINDS:
            return obj["kind"], str(obj.get("reason") or "")[:500]
    return "unknown", f"unparsed answer: {text[:200]!r}"


class IdeaJudge:
    """Classifies executed ideas; ``classify`` returns kind, source (rule | judge | none),
    reason and the dollars the call cost now (0 for a cache hit or a rule)."""

    def __init__(self, cfg: JudgeConfig, *, cache: str | None = None, ledger: str | None = None):
        self.cfg = cfg
        self.client = None
        if cfg.llm is not None:
            llm = cfg.llm.model_copy(update={"role": "judge", "cache": cfg.llm.cache or cache,
                                             "ledger": cfg.llm.ledger or ledger})
            self.client = LLMClient(llm)

    def classify(self, idea: dict[str, Any], edit: str | None, config_file: str | None) -> dict[str, Any]:
        if self.cfg.rule:
            kind = rule_kind(idea, edit, config_file)
            if kind is not None:
                return {"kind": kind, "source": "rule", "reason": "knobs or config file only", "usd": 0.0}
        if self.client is None:
            return {"kind": "unknown", "source": "none", "reason": "no judge configured", "usd": 0.0}
        text = idea.get("text") or json.dumps(idea.get("knobs") or {}, sort_keys=True)
        res = self.client.complete(judge_messages(text, edit or "", self.cfg.max_edit_chars), temperature=0,
                                   max_tokens=self.cfg.max_tokens)
        kind, reason = parse_kind(res.text)
        return {"kind": kind, "source": "judge", "reason": reason, "usd": res.spent_usd}

    def worst_case_usd(self, calls: int, prompt_tokens: int = 3000) -> float:
        """Dollars ``calls`` judge calls could cost at most (for the run's estimate)."""
        if self.client is None or calls <= 0:
            return 0.0
        from selftaught.llm import worst_case_cost

        return calls * worst_case_cost(self.client.cfg, prompt_tokens, self.cfg.max_tokens)
