"""Budget forcing (s1): control how many tokens a reasoning model thinks before it answers.

Two implementations with one semantics (``BudgetConfig`` in :mod:`selftaught.config`):

- :class:`BudgetForcing`, a per-row decode policy of the transformers engine. It acts token by
  token inside the batched decode loop, so rows with different budgets share a batch and no
  prompt is ever re-encoded.
- :func:`generate_in_rounds`, for backends without per-token hooks (vLLM): thinking runs in
  rounds that stop at the end-of-thinking triggers or at the remaining budget, extensions or
  the delimiter are appended between rounds, then one answer round. vLLM's prefix cache makes
  the re-submitted prefix cheap. It drives any engine through ``engine.generate``, so it is
  checked against the per-token policy on the transformers engine.

Semantics, per sample: thinking tokens are everything between the prompt (which ends with
``think_start``) and the delimiter, extension strings included. A *trigger* is the first token
of ``think_end`` when it is one token, the whole ``think_end`` sequence when it is several (its
tokens are held back from streams until decided, and taken back when overruled), EOS or a stop
token id. A sampled trigger while ``min_thinking_tokens`` is
not reached or fewer than ``num_extensions`` extensions were used is replaced by the extension
string; otherwise it ends thinking and is replaced by the full delimiter. With no extension
string the triggers (and the delimiter's first token) are masked until the minimum. Reaching ``max_thinking_tokens`` forces the
delimiter plus ``answer_cue`` (``capped``). Extensions are cut at the cap, so thinking never
exceeds it. The answer then runs to EOS/stop, ``max_answer_tokens`` or the request's
``max_new_tokens``, which bounds the whole completion; ``min_new_tokens`` counts the whole
completion too (the answer may not stop before it). The round driver gives every round its own
seed derived from the request's, so rounds do not replay one random stream.
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

from actors.engine.base import Completion, DecodePolicy, first_stop, sample_seed
from selftaught.config import BudgetConfig, SamplingConfig

if TYPE_CHECKING:  # pragma: no cover
    from actors.engine.base import GenerationEngine


@dataclass(frozen=True)
class BudgetTokens:
    """A budget's strings as token ids for one tokenizer. ``triggers`` are the single tokens
    that end thinking (EOS, stop ids, and ``think_end`` when it is one token); a multi-token
    ``think_end`` ends thinking when its whole sequence is sampled."""

    think_start: tuple[int, ...]
    think_end: tuple[int, ...]
    cue: tuple[int, ...]
    extension: tuple[int, ...]
    triggers: frozenset[int]

    @property
    def masked(self) -> frozenset[int]:
        """What is masked while thinking may not end yet: the triggers and the delimiter's start."""
        return self.triggers | {self.think_end[0]}


def _ids(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else ()


def tokenize_budget(tokenizer, cfg: BudgetConfig, stop_ids: set[int]) -> BudgetTokens:
    end = _ids(tokenizer, cfg.think_end)
    if not end:
        raise ValueError(f"think_end {cfg.think_end!r} encodes to no tokens")
    single = {end[0]} if len(end) == 1 else set()
    return BudgetTokens(think_start=_ids(tokenizer, cfg.think_start), think_end=end,
                        cue=_ids(tokenizer, cfg.answer_cue), extension=_ids(tokenizer, cfg.extension),
                        triggers=frozenset(single | set(stop_ids)))


def budget_tokens(engine: "GenerationEngine", cfg: BudgetConfig, params: SamplingConfig) -> BudgetTokens:
    """Token ids of the budget's strings (the engine's bounded cache)."""
    return engine.budget_token_ids(cfg, params)


def with_think_start(ids: Sequence[int], toks: BudgetTokens) -> list[int]:
    """The prompt ending with the start-of-thinking marker (added only if missing)."""
    ids = list(ids)
    n = len(toks.think_start)
    if n and ids[-n:] != list(toks.think_start):
        ids += toks.think_start
    return ids


@dataclass
class BudgetUsage:
    """Exact token accounting of one budget-forced sample."""

    thinking_tokens: int = 0  # extension tokens included
    extension_tokens: int = 0
    extensions: int = 0
    control_tokens: int = 0  # the forced delimiter and answer cue
    answer_tokens: int = 0
    capped: bool = False  # thinking was ended by max_thinking_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def assemble(tokenizer, tokens: list[int], usage: BudgetUsage, finish_reason: str,
             stop_reason: Any, stop: Sequence[str]) -> Completion:
    """A budget-forced sample in the engine schema: ``reasoning`` is the thinking text,
    ``answer`` the text after the delimiter (cut at a stop string), ``text`` both with the
    delimiter between them."""
    t, c = usage.thinking_tokens, usage.control_tokens
    dec = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    reasoning, control, answer = dec(tokens[:t]), dec(tokens[t:t + c]), dec(tokens[t + c:])
    if stop:
        hit = first_stop(answer, stop)
        if hit is not None:
            answer, finish_reason, stop_reason = answer[:hit[0]], "stop", hit[1]
    return Completion(text=reasoning + control + answer, token_ids=list(tokens),
                      finish_reason=finish_reason, stop_reason=stop_reason,
                      reasoning=reasoning, answer=answer, budget=usage.to_dict())


def thinking_room(cfg: BudgetConfig, usage: BudgetUsage) -> int | None:
    """Thinking tokens left under ``max_thinking_tokens`` (None: no cap)."""
    cap = cfg.max_thinking_tokens
    return None if cap is None else cap - usage.thinking_tokens


def extension_for(cfg: BudgetConfig, toks: BudgetTokens, usage: BudgetUsage) -> tuple[int, ...] | None:
    """What replaces an attempt to stop thinking: the extension (cut at the cap) while the
    minimum or the extension count is not reached, else None (thinking ends)."""
    if toks.extension and (usage.thinking_tokens < cfg.min_thinking_tokens or usage.extensions < cfg.num_extensions):
        room = thinking_room(cfg, usage)
        return toks.extension if room is None else toks.extension[:room]
    return None


class BudgetForcing(DecodePolicy):
    """Per-row decode policy of the transformers engine (one instance per sample).

    Every emitted token is labelled with the phase it belongs to: sampled tokens take the
    current phase, forced ones the label queued with them (``ext`` or ``ctl``)."""

    def __init__(self, cfg: BudgetConfig, toks: BudgetTokens):
        self.cfg, self.toks = cfg, toks
        self.state = "think"  # think -> control (delimiter) -> answer
        self.labels: deque[str] = deque()
        self.usage = BudgetUsage()
        self.run = 0  # sampled thinking tokens at the end of the row (a delimiter may be forming)
        self.max_retract = len(toks.think_end) - 1

    def _queue(self, row, ids: Sequence[int], label: str) -> None:
        row.forced.extend(ids)
        self.labels.extend([label] * len(ids))

    def _end_thinking(self, row, capped: bool) -> None:
        row.forced.clear()
        self.labels.clear()
        self._queue(row, self.toks.think_end + (self.toks.cue if capped else ()), "ctl")
        self.state, self.usage.capped = "control", capped

    def before_step(self, row, engine) -> None:
        if self.state == "answer":
            if row.n_generated < row.params.min_new_tokens:
                row.banned.update(engine.stop_ids_for(row.params))
            return
        if self.state != "think":
            return
        room = thinking_room(self.cfg, self.usage)
        if room is not None and room <= 0:
            self._end_thinking(row, capped=True)
        elif (not row.forced and not self.toks.extension
              and self.usage.thinking_tokens < self.cfg.min_thinking_tokens):
            row.banned.update(self.toks.masked)

    def _delimiter_done(self, row, token: int) -> bool:
        """The sampled ``token`` completes a multi-token ``think_end`` written by the model."""
        end = self.toks.think_end
        k = len(end) - 1
        return k > 0 and token == end[-1] and self.run >= k and tuple(row.tokens[-k:]) == end[:-1]

    def on_sample(self, row, token: int, engine) -> None:
        """The model proposed ``token``; queue replacements when it tries to stop thinking."""
        if self.state != "think":
            return
        delimiter = self._delimiter_done(row, token)
        if not delimiter and token not in self.toks.triggers:
            return
        k = len(self.toks.think_end) - 1 if delimiter else 0
        if k:  # the delimiter's first tokens were counted as thinking
            self.usage.thinking_tokens -= k
            self.run = 0
        ext = extension_for(self.cfg, self.toks, self.usage)
        if ext is not None:
            row.retract = k  # take the partial delimiter back (it was never streamed)
            self.usage.extensions += 1
            self._queue(row, ext, "ext")
        elif delimiter:  # the model closed thinking itself: its delimiter tokens are control
            self.usage.control_tokens += k
            self.state = "control"
            self._queue(row, (token,), "ctl")
        else:
            self._end_thinking(row, capped=False)

    def after_token(self, row, token: int, engine) -> bool:
        label = self.labels.popleft() if row.was_forced else ("think" if self.state == "think" else "answer")
        u, p = self.usage, row.params
        if label in ("think", "ext"):
            u.thinking_tokens += 1
            u.extension_tokens += label == "ext"
            self.run = self.run + 1 if label == "think" else 0
        elif label == "ctl":
            u.control_tokens += 1
            if not self.labels:
                self.state = "answer"
        else:
            u.answer_tokens += 1
            if token in engine.stop_ids_for(p) and row.n_generated > p.min_new_tokens - 1:
                row.finish_reason, row.stop_reason = "stop", int(token)
                if token in engine.eos_ids and token not in p.stop_token_ids:
                    row.tokens.pop()  # EOS is not part of the text
                    u.answer_tokens -= 1
                return True
        if row.n_generated >= p.max_new_tokens:  # the whole completion's hard limit
            row.forced.clear()
            row.finish_reason = "length"
            return True
        if label == "answer" and self.cfg.max_answer_tokens and u.answer_tokens >= self.cfg.max_answer_tokens:
            row.finish_reason = "length"
            return True
        return False

    def phase_at(self, row, index: int) -> str:
        """Thinking tokens come first, then the delimiter (and cue), then the answer."""
        t, c = self.usage.thinking_tokens, self.usage.control_tokens
        return "reasoning" if index < t else "control" if index < t + c else "answer"

    def held_back(self, row) -> int:
        """A tail of sampled thinking that may be the start of the delimiter."""
        end = self.toks.think_end
        if self.state != "think" or len(end) < 2:
            return 0
        for j in range(min(len(end) - 1, self.run), 0, -1):
            if tuple(row.tokens[-j:]) == end[:j]:
                return j
        return 0

    def answer_started(self, row) -> bool:
        return self.state == "answer"

    def completion(self, row, engine, text: str = "") -> Completion:
        return assemble(engine.tokenizer, row.tokens, self.usage, row.finish_reason,
                        row.stop_reason, row.params.stop)


# ---------------------------------------------------------------------- round-based driver
@dataclass
class _Sample:
    prompt: list[int]
    params: SamplingConfig
    toks: BudgetTokens
    seed: int | None
    tokens: list[int]
    usage: BudgetUsage
    phase: str = "think"
    finish_reason: str = "length"
    stop_reason: Any = None
    rounds: int = 0

    @property
    def room_total(self) -> int:
        return self.params.max_new_tokens - len(self.tokens)

    def append(self, ids: Sequence[int]) -> bool:
        """Append forced tokens up to the hard limit; False when the limit was hit."""
        ids = list(ids)[: self.room_total]
        self.tokens += ids
        return self.room_total > 0


def _round_params(s: _Sample, **kw: Any) -> SamplingConfig:
    """One round's settings; every round draws from its own seed (derived from the sample's),
    so a round does not replay the random stream of the one before."""
    p = s.params
    seed = None if s.seed is None else (s.seed * 6364136223846793005 + s.rounds * 1442695040888963407) % 2**63
    s.rounds += 1
    return SamplingConfig(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=seed, n=1, **kw)


def _ids_for_text(tokenizer, ids: list[int], text: str) -> list[int]:
    """The prefix of ``ids`` that decodes to ``text`` (a stop string cut inside a token is
    completed by encoding the rest of ``text``)."""
    dec = lambda x: tokenizer.decode(x, skip_special_tokens=True)  # noqa: E731
    keep = list(ids)
    while keep and len(dec(keep)) > len(text):
        keep.pop()
    done = dec(keep)
    if done != text and text.startswith(done):
        keep += list(_ids(tokenizer, text[len(done):]))
    return keep


def next_round(s: _Sample) -> tuple[list[int], SamplingConfig] | None:
    """The sample's next plain request (prompt ids, settings), or None when it is finished.
    Thinking rounds stop at a trigger or the remaining budget; then one answer round."""
    while s.phase == "think":
        cfg = s.params.budget
        cap_room = thinking_room(cfg, s.usage)
        if cap_room is not None and cap_room <= 0:
            _close_thinking(s, capped=True)
            continue
        room = s.room_total if cap_room is None else min(s.room_total, cap_room)
        min_new = 0 if s.toks.extension else max(0, cfg.min_thinking_tokens - s.usage.thinking_tokens)
        multi = len(s.toks.think_end) > 1  # a delimiter of several tokens: matched as a string
        return s.prompt + s.tokens, _round_params(s, max_new_tokens=room, min_new_tokens=min(min_new, room),
                                                  stop_token_ids=sorted(s.toks.triggers), ignore_eos=True,
                                                  stop=[cfg.think_end] if multi else [])
    if s.phase == "answer":
        p, cfg = s.params, s.params.budget
        limit = s.room_total if not cfg.max_answer_tokens else min(s.room_total, cfg.max_answer_tokens)
        return s.prompt + s.tokens, _round_params(s, max_new_tokens=limit, stop=list(p.stop),
                                                  min_new_tokens=min(limit, max(0, p.min_new_tokens - len(s.tokens))),
                                                  stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos)
    return None


def finish_round(s: _Sample, c: Completion, tokenizer) -> None:
    """Fold a finished round into the sample: thinking tokens (the trigger dropped, then an
    extension or the delimiter), or the answer."""
    if s.phase == "answer":
        s.tokens += c.token_ids
        s.usage.answer_tokens += len(c.token_ids)
        s.finish_reason, s.stop_reason, s.phase = c.finish_reason, c.stop_reason, "done"
        return
    ids = list(c.token_ids)
    delimiter = c.finish_reason == "stop" and c.stop_reason == s.params.budget.think_end
    trigger = delimiter or (c.finish_reason == "stop" and bool(ids) and ids[-1] in s.toks.triggers)
    if delimiter:
        ids = _ids_for_text(tokenizer, ids, c.text)
    elif trigger:
        ids.pop()
    s.tokens += ids
    s.usage.thinking_tokens += len(ids)
    if s.room_total <= 0:
        s.phase, s.finish_reason = "done", "length"
        return
    if not trigger:
        return  # the thinking budget ran out: capped at the next round
    u = s.usage
    ext = extension_for(s.params.budget, s.toks, u)
    if ext is not None:
        before = len(s.tokens)
        full = s.append(ext)
        added = len(s.tokens) - before
        u.extensions += 1
        u.thinking_tokens += added
        u.extension_tokens += added
        if not full:
            s.phase, s.finish_reason = "done", "length"
    else:
        _close_thinking(s, capped=False)


def round_samples(engine: "GenerationEngine", ids: list[int], p: SamplingConfig) -> list[_Sample]:
    """The ``n`` samples of one budget-forced request, ready for :func:`next_round`."""
    toks = budget_tokens(engine, p.budget, p)
    prompt = with_think_start(ids, toks)
    return [_Sample(prompt, p, toks, None if p.seed is None else sample_seed(p.seed, k),
                    [], BudgetUsage()) for k in range(p.n)]


def sample_completion(tokenizer, s: _Sample) -> Completion:
    return assemble(tokenizer, s.tokens, s.usage, s.finish_reason, s.stop_reason, s.params.stop)


def generate_in_rounds(engine: "GenerationEngine", prompts: list[list[int]],
                       params: list[SamplingConfig]) -> list[list[Completion]]:
    """Budget forcing through repeated ``engine.generate`` calls (backends without per-token
    hooks). ``prompts`` are token ids; returns the completions of each prompt (``n`` each)."""
    samples = [round_samples(engine, ids, p) for ids, p in zip(prompts, params)]
    flat = [s for group in samples for s in group]
    while True:
        todo = [(s, r) for s in flat if (r := next_round(s)) is not None]
        if not todo:
            break
        outs = engine.generate([r[0] for _, r in todo], [r[1] for _, r in todo])
        for (s, _), o in zip(todo, outs):
            finish_round(s, o.completions[0], engine.tokenizer)
    return [[sample_completion(engine.tokenizer, s) for s in group] for group in samples]


def _close_thinking(s: _Sample, capped: bool) -> None:
    before = len(s.tokens)
    full = s.append(s.toks.think_end + (s.toks.cue if capped else ()))
    s.usage.control_tokens += len(s.tokens) - before
    s.usage.capped = capped
    s.phase = "answer" if full else "done"
    if not full:
        s.finish_reason = "length"


def budget_key(cfg: BudgetConfig | None) -> str:
    """A stable text form of a budget (grouping, logging)."""
    return json.dumps(cfg.model_dump(), sort_keys=True) if cfg else ""
