"""The ideator: an LLM that proposes research ideas for a :class:`~envs.base.ResearchEnv`.

Three prompt modes follow the evolutionary search of the thesis (Algorithm 1, ch. 4.5), in our
own wording:

- ``fresh``: the environment's context and a request for ``k`` diverse ideas (epoch 0, and
  best-of-N);
- ``exploit``: ideas that beat the baseline, each with its measured result, and a request for
  variants that refine or combine them;
- ``explore``: a random sample of past ideas, packed until a context budget (characters or
  tokens) is full and never beyond, and a request for ideas unlike any of them.

Every prompt records which past ideas it showed; each proposed idea carries those ids
(``shown_ids``, its lineage), the mode, the backend and model that wrote it, the tokens and
cost attributed to it and, with ``thinking``, the reasoning written before it (recorded, never
part of the idea).

Structured environments (``env.idea_schema()`` is a JSON schema of knobs) get ideas as knob
objects validated against that schema; free-form environments get ideas as text. Answers that
do not parse or do not validate are counted (``stats()["malformed"]``) and skipped.

Backends: ``litellm`` (any provider, or a weighted ensemble of models drawn per call),
``openai`` (an OpenAI-compatible server such as our Serve app: litellm with ``api_base``) and
``local`` (our generation engine in-process, by default the bundled SmolLM2-135M-Instruct).
Locally, structured ideas are decoded one idea per sample under the knob schema (constrained
decoding), so even the 135M model yields schema-valid ideas offline.

:class:`Ideator` is plain Python (tests, in-process use); :func:`ideator_actor_class` (also
importable as ``IdeatorActor``) wraps it as a long-lived Ray actor.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

from pydantic import Field, model_validator

from selftaught.config import BudgetConfig, EngineConfig, SamplingConfig, Strict, StructuredOutput
from selftaught.llm import LLMConfig

log = logging.getLogger(__name__)

Mode = Literal["fresh", "exploit", "explore"]
MODES: tuple[str, ...] = ("fresh", "exploit", "explore")

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Delimiter pairs recognised around a thinking phase (ours, and s1's SFT format).
_THINK_PAIRS = ((THINK_OPEN, THINK_CLOSE), ("<|im_start|>think", "<|im_start|>answer"))


# --------------------------------------------------------------------------- configuration
class EnsembleMember(Strict):
    """One model of an ensemble and its share of the calls."""

    llm: LLMConfig
    weight: float = Field(default=1.0, gt=0)


class IdeatorConfig(Strict):
    """Which model proposes ideas and how it is asked."""

    backend: Literal["litellm", "openai", "local"] = "litellm"
    # litellm / openai: the model (``openai`` needs api_base: any OpenAI-compatible server)
    llm: LLMConfig = Field(default_factory=lambda: LLMConfig(max_tokens=4096, timeout_s=300.0))
    # litellm / openai: several models, one drawn per call with probability ~ weight (overrides llm)
    ensemble: list[EnsembleMember] = Field(default_factory=list)
    # local: our engine in-process (default: the bundled SmolLM2-135M-Instruct)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    # Ideas asked for per call. Local structured decoding asks for one idea per sample and
    # draws batch_size samples per request instead.
    batch_size: int = Field(default=8, ge=1, le=256)
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=1.0, max_new_tokens=2048))
    thinking: bool = False  # reason first in a delimited block; recorded, never part of the idea
    thinking_tokens: int = Field(default=256, ge=1)  # local: cap on the thinking phase (budget forcing)
    max_context_chars: int = Field(default=60_000, ge=200)  # the environment's context is cut to this
    explore_budget_chars: int = Field(default=20_000, ge=100)  # past ideas shown in explore prompts
    explore_budget_tokens: int | None = Field(default=None, ge=10)  # the same in tokens (also applies)
    exploit_budget_chars: int = Field(default=20_000, ge=100)  # winning ideas shown in exploit prompts
    max_shown_chars: int = Field(default=2_000, ge=50)  # one past idea as shown (longer ones are cut)
    max_idea_chars: int = Field(default=20_000, ge=20)  # a proposed text idea longer than this is malformed
    # Structured ideas: "any" = at least one knob set (an empty object is the baseline, not an
    # idea), "all" = every knob set, "none" = the schema as it is.
    require_knobs: Literal["none", "any", "all"] = "any"
    # Remote backends: also send the array-of-ideas JSON schema as response_format (providers
    # and servers with structured output; ignored while thinking, which needs free text first).
    constrain_remote: bool = False
    max_rounds: int = Field(default=2, ge=1)  # rounds of calls to top up to n after malformed answers
    concurrency: int = Field(default=8, ge=1)  # remote calls in flight
    seed: int | None = None  # the random sampling of past ideas (and call seeds when sampling.seed is set)

    @model_validator(mode="after")
    def _check(self) -> "IdeatorConfig":
        if self.backend == "openai":
            for cfg in [self.llm] + [m.llm for m in self.ensemble]:
                if not cfg.api_base and cfg.mock_response is None:
                    raise ValueError("backend 'openai' needs llm.api_base (the server's /v1 URL)")
        if self.sampling.n != 1:
            raise ValueError("sampling.n is chosen by the ideator (batch_size); leave it at 1")
        return self


# --------------------------------------------------------------------------- prompts
SYSTEM_PROMPT = """\
You are a research scientist who proposes experiments. Each idea you write is implemented and \
run automatically, and judged only by the number the environment's evaluator measures. Good \
ideas are concrete (one could implement them without asking questions), fit the stated compute \
and time budget, respect the rules of the environment, and have a plausible reason to improve \
the metric."""

_FRESH = """\
# Task
Propose {k} research ideas that could improve the metric over the baseline described above.
Spread them out: change different parts of the method (data, model, optimisation, schedule, \
evaluation-safe tricks, ...), and mix safe refinements with bolder bets. No two ideas should \
be the same change in different words."""

_EXPLOIT = """\
# Ideas that already beat the baseline
Each of these was run in this environment; its measured result follows it.

{listing}

# Task
Propose {k} new ideas that build on the ones above. You may push a winning idea further, \
retune what it changes, or merge the strengths of two or more of them into one idea. Each new \
idea must differ from every idea listed."""

_EXPLORE = """\
# Ideas tried before
A random sample of earlier ideas, listed without their results.

{listing}

# Task
Propose {k} ideas that are unlike every idea above: change something none of them touches, \
or take an approach none of them takes. Do not resubmit or lightly reword a listed idea."""

_FORMAT_TEXT = """\
# Answer format
Answer with a JSON list of {k} strings, one idea per string: what to change and why it should \
help, in a few sentences. Write nothing after the list."""

_FORMAT_KNOBS = """\
# Answer format
An idea sets some of the environment's knobs (at least one), with values allowed by this JSON \
schema:
{schema}
Answer with a JSON list of {k} objects, each mapping knob names to values. Write nothing after \
the list."""

_FORMAT_ONE_KNOB = """\
# Answer format
An idea sets some of the environment's knobs, with values allowed by this JSON schema:
{schema}
Answer with one idea: a single JSON object mapping knob names to values."""

_THINKING = """\
Before answering, reason step by step inside {open} ... {close}. Only what follows {close} is \
read as your answer."""


@dataclass
class IdeaPrompt:
    """One prompt: the conversation, the ideas it showed (lineage) and how many it asks for."""

    mode: str
    messages: list[dict[str, str]]
    shown_ids: list[str]
    k: int
    listing_chars: int = 0
    listing_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _entry(x: Any) -> dict[str, Any]:
    """A past idea as shown: id, description and (when known) its measured result. Accepts
    ``{"id", "text"|"knobs", "reward", "status", "metrics"}``, ``{"idea": Idea|dict,
    "result": Result|dict}``, an :class:`~envs.base.Idea` or a string."""
    from envs.base import Idea, Result

    if isinstance(x, (str, Idea)):
        x = {"idea": x}
    if not isinstance(x, dict):
        raise TypeError(f"a shown idea is a dict, an Idea or a str, not {type(x).__name__}")
    idea = x.get("idea", x)
    res = x.get("result") or {}
    if isinstance(res, Result):
        res = res.to_dict()
    idea = Idea.coerce(idea if isinstance(idea, (Idea, str)) else
                       {k: v for k, v in idea.items() if k in ("text", "knobs", "id", "meta")})
    metrics = dict(res.get("metrics") or x.get("metrics") or {})
    reward = res.get("reward", x.get("reward"))
    status = res.get("status", x.get("status"))
    desc = (json.dumps(idea.knobs, sort_keys=True) if idea.knobs is not None and not idea.text.strip()
            else idea.text.strip() if idea.knobs is None
            else f"{idea.text.strip()} knobs: {json.dumps(idea.knobs, sort_keys=True)}")
    return {"id": idea.id, "desc": desc, "reward": reward, "status": status, "gain": metrics.get("gain")}


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(limit - 15, 0)].rstrip() + " [... cut]"


def _result_text(e: dict[str, Any]) -> str:
    parts = []
    if e.get("status") and e["status"] != "ok":
        parts.append(f"status {e['status']}")
    if isinstance(e.get("reward"), (int, float)):
        parts.append(f"reward {e['reward']:.6g}")
    if isinstance(e.get("gain"), (int, float)):
        parts.append(f"gain over baseline {e['gain']:+.4g}")
    return "; ".join(parts) or "result not recorded"


def _listing_line(e: dict[str, Any], with_result: bool, max_chars: int) -> str:
    line = f"- [{e['id']}] {_cut(e['desc'], max_chars)}"
    if with_result:
        line += f"\n  measured: {_result_text(e)}"
    return line + "\n"


def pack_listing(entries: Sequence[dict[str, Any]], budget_chars: int, budget_tokens: int | None = None,
                 count_tokens=None, with_result: bool = False, max_chars: int = 2000) -> tuple[str, list[str], int]:
    """Lines for ``entries`` in their order, each added when it still fits both budgets
    (a line that does not fit is skipped; later, shorter ones may still fit). Returns the
    listing, the ids shown and its token count (0 without a token budget)."""
    count = count_tokens or _approx_tokens
    lines, ids, chars, tokens = [], [], 0, 0
    for e in entries:
        line = _listing_line(e, with_result, max_chars)
        t = count(line) if budget_tokens is not None else 0
        if chars + len(line) > budget_chars or (budget_tokens is not None and tokens + t > budget_tokens):
            continue
        lines.append(line)
        ids.append(e["id"])
        chars += len(line)
        tokens += t
    return "".join(lines).rstrip("\n"), ids, tokens


def _approx_tokens(text: str) -> int:
    """A tokenizer-free estimate (about 4 characters per token) for remote models."""
    return math.ceil(len(text) / 4)


def build_prompt(cfg: IdeatorConfig, mode: str, context: str, shown: Sequence[Any], k: int,
                 schema: dict[str, Any] | None = None, rng: random.Random | None = None,
                 one_per_sample: bool = False, count_tokens=None) -> IdeaPrompt:
    """The conversation for one call in ``mode`` asking for ``k`` ideas (or one idea per
    sample, for local constrained decoding)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    rng = rng or random.Random(cfg.seed)
    entries = [_entry(x) for x in shown]
    body = [_cut(context.strip(), cfg.max_context_chars)]
    shown_ids: list[str] = []
    chars = tokens = 0
    want = 1 if one_per_sample else k
    if mode == "fresh":
        body.append(_FRESH.format(k=want))
    elif mode == "exploit":
        if not entries:
            raise ValueError("exploit needs at least one idea that beat the baseline (shown=[])")
        ranked = sorted(entries, key=lambda e: e["reward"] if isinstance(e["reward"], (int, float)) else -math.inf,
                        reverse=True)
        listing, shown_ids, _ = pack_listing(ranked, cfg.exploit_budget_chars, with_result=True,
                                             max_chars=cfg.max_shown_chars)
        chars = len(listing)
        body.append(_EXPLOIT.format(listing=listing, k=want))
    else:
        order = list(entries)
        rng.shuffle(order)
        listing, shown_ids, tokens = pack_listing(order, cfg.explore_budget_chars, cfg.explore_budget_tokens,
                                                  count_tokens, max_chars=cfg.max_shown_chars)
        chars = len(listing)
        body.append(_EXPLORE.format(listing=listing or "(none yet)", k=want))
    if schema is not None:
        text = json.dumps(schema, separators=(",", ":"))
        body.append((_FORMAT_ONE_KNOB if one_per_sample else _FORMAT_KNOBS).format(schema=text, k=want))
    else:
        body.append(_FORMAT_TEXT.format(k=want))
    if cfg.thinking and not one_per_sample:  # local decoding opens the thinking block itself
        body.append(_THINKING.format(open=THINK_OPEN, close=THINK_CLOSE))
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n\n".join(body)}]
    return IdeaPrompt(mode=mode, messages=messages, shown_ids=shown_ids, k=want, listing_chars=chars,
                      listing_tokens=tokens)


# --------------------------------------------------------------------------- parsing
def split_thinking(text: str) -> tuple[str | None, str]:
    """(thinking, answer): the text of a leading delimited thinking block and what follows it.
    An unclosed block is all thinking (no answer); a closing delimiter without an opening one
    (the chat template opened the block) ends the thinking too."""
    s = text.strip()
    for o, c in _THINK_PAIRS:
        if s.startswith(o):
            end = s.find(c, len(o))
            if end < 0:
                return s[len(o):].strip(), ""
            return s[len(o):end].strip(), s[end + len(c):].strip()
        if o not in s and c in s:
            end = s.find(c)
            return s[:end].strip(), s[end + len(c):].strip()
    return None, s


def _json_values(text: str) -> list[Any]:
    """Every top-level JSON array or object in ``text``, in order (prose, code fences and
    trailing remarks around them are ignored)."""
    dec = json.JSONDecoder()
    out, i = [], 0
    while True:
        m = re.search(r"[\[{]", text[i:])
        if not m:
            return out
        j = i + m.start()
        try:
            value, end = dec.raw_decode(text, j)
        except json.JSONDecodeError:
            i = j + 1
            continue
        out.append(value)
        i = end


_ITEM = re.compile(r"^\s*(?:\d{1,3}[.):]|[-*\u2022]|#{1,4}\s*\d{1,3}[.):]?)\s+(.*)$")


def _text_items(text: str) -> list[str] | None:
    """Items of a numbered or bulleted list (continuation lines joined), or None."""
    items: list[list[str]] = []
    for line in text.splitlines():
        m = _ITEM.match(line)
        if m:
            items.append([m.group(1).strip()])
        elif items and line.strip():
            items[-1].append(line.strip())
    return [" ".join(x).strip() for x in items] if items else None


def _idea_text(x: Any) -> str | None:
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        for key in ("idea", "text", "description"):
            if isinstance(x.get(key), str):
                title = x.get("title") or x.get("name")
                return f"{title}: {x[key]}" if isinstance(title, str) and key != "idea" else x[key]
    return None


@dataclass
class Parsed:
    """What one answer yielded: ideas (text or knob dicts) and how many items were malformed."""

    ideas: list[Any] = field(default_factory=list)
    malformed: int = 0
    thinking: str | None = None


def parse_ideas(text: str, schema: dict[str, Any] | None = None, *, require_knobs: str = "any",
                max_idea_chars: int = 20_000, thinking: bool = True) -> Parsed:
    """Parse one answer. Free-form: a JSON list of strings (or of objects with an ``idea`` /
    ``text`` / ``description`` field) or a numbered / bulleted list. Structured: JSON objects of
    knob values (a list of them, one object, ``{"ideas": [...]}`` or items shaped
    ``{"knobs": {...}}``), each validated against ``schema``. Items that fail are counted in
    ``malformed``; an answer with nothing usable counts as one. A leading thinking block is
    split off first (``thinking``)."""
    out = Parsed()
    if thinking:
        out.thinking, text = split_thinking(text or "")
    text = text or ""
    values = _json_values(text)
    if schema is not None:
        import jsonschema

        validator = jsonschema.validators.validator_for(schema)(schema)
        items: list[Any] = []
        for v in values:
            if isinstance(v, dict) and isinstance(v.get("ideas"), list):
                items += v["ideas"]
            elif isinstance(v, list):
                items += v
            else:
                items.append(v)
        for it in items:
            knobs = it.get("knobs") if isinstance(it, dict) and isinstance(it.get("knobs"), dict) else it
            if not isinstance(knobs, dict) or not validator.is_valid(knobs):
                out.malformed += 1
            elif not knobs and require_knobs != "none":
                out.malformed += 1  # the baseline itself, not an idea
            elif require_knobs == "all" and set(schema.get("properties", {})) - set(knobs):
                out.malformed += 1
            else:
                out.ideas.append(knobs)
        if not items:
            out.malformed += 1
        return out
    raw: list[Any] | None = None
    for v in values:
        if isinstance(v, list):
            raw = v
            break
        if isinstance(v, dict) and isinstance(v.get("ideas"), list):
            raw = v["ideas"]
            break
    if raw is None:
        raw = _text_items(text)
    if raw is None:
        out.malformed += 1
        return out
    for it in raw:
        t = _idea_text(it)
        if t is None or not t.strip() or len(t) > max_idea_chars:
            out.malformed += 1
        else:
            out.ideas.append(t.strip())
    if not raw:
        out.malformed += 1
    return out


# --------------------------------------------------------------------------- decoding schemas
def decode_schema(knobs: dict[str, Any], require: str = "any") -> dict[str, Any]:
    """The schema one idea is decoded under locally: the knob schema, with integers bounded
    by ``minimum``/``maximum`` and a ``multipleOf`` spelled out as an ``enum`` (the grammar
    would otherwise let the model write any integer in range), and the ``require`` rule:
    ``any`` adds ``minProperties: 1`` (an empty object is the baseline), ``all`` makes every
    knob required."""
    s = copy.deepcopy(knobs)
    for name, p in (s.get("properties") or {}).items():
        if not isinstance(p, dict) or "multipleOf" not in p or "enum" in p:
            continue
        types = p.get("type") if isinstance(p.get("type"), list) else [p.get("type")]
        lo, hi, step = p.get("minimum"), p.get("maximum"), p["multipleOf"]
        if "integer" in types and None not in (lo, hi) and float(step).is_integer() and step > 0:
            step = int(step)
            first = math.ceil(lo / step) * step
            vals = list(range(first, int(hi) + 1, step))
            if 0 < len(vals) <= 256:
                p["enum"] = vals + ([None] if "null" in types else [])
    if require == "all" and s.get("properties"):
        s["required"] = list(s["properties"])
    elif require == "any" and s.get("properties"):
        s["minProperties"] = max(1, int(s.get("minProperties", 0)))
    return s


def ideas_schema(knobs: dict[str, Any], k: int, require: str = "any") -> dict[str, Any]:
    """``{"ideas": [k knob objects]}``: the response format for a remote call asking for
    ``k`` ideas (OpenAI-style structured output wants an object at the top)."""
    return {"type": "object", "properties": {"ideas": {"type": "array", "items": decode_schema(knobs, require),
                                                       "minItems": 1, "maxItems": k}},
            "required": ["ideas"], "additionalProperties": False}


# --------------------------------------------------------------------------- the ideator
class Ideator:
    """Proposes ideas in one of the three modes (see the module docstring)."""

    def __init__(self, cfg: IdeatorConfig | dict | None = None, chat_model: Any = None,
                 num_cpus: float | None = None):
        """``chat_model``: any :class:`~actors.engine.base.ChatModel` to use instead of the
        configured backend (e.g. an :class:`~actors.generator.EnginePool` shared with other
        stages; with ``backend="local"`` it is decoded like the local engine)."""
        self.cfg = cfg if isinstance(cfg, IdeatorConfig) else IdeatorConfig.model_validate(cfg or {})
        self._chat_model = chat_model
        self._clients: dict[int, Any] = {}
        self._engine_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._calls = 0
        self._rng = random.Random(self.cfg.seed)
        self._num_cpus = num_cpus
        self._stats = {"calls": 0, "failed_calls": 0, "ideas": 0, "malformed": 0, "duplicates": 0,
                       "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, "seconds": 0.0}
        self.last: dict[str, Any] = {}

    # ------------------------------------------------------------------ backends
    @property
    def structured_local(self) -> bool:
        return self.cfg.backend == "local"

    def _client(self, i: int) -> Any:
        from selftaught.llm import LLMClient

        if i not in self._clients:
            cfg = self.cfg.ensemble[i].llm if self.cfg.ensemble else self.cfg.llm
            if self.cfg.backend == "openai" and not cfg.model.startswith("openai/"):
                cfg = cfg.model_copy(update={"model": "openai/" + cfg.model})
            self._clients[i] = LLMClient(cfg)
        return self._clients[i]

    def _engine(self) -> Any:
        with self._engine_lock:
            if self._chat_model is None:
                from actors.engine import create_engine

                if self._num_cpus:
                    import torch

                    torch.set_num_threads(max(1, int(self._num_cpus)))
                self._chat_model = create_engine(self.cfg.engine)
            return self._chat_model

    def _count_tokens(self):
        """A token counter for the explore budget: the local model's tokenizer, else an estimate."""
        if self.cfg.backend == "local":
            eng = self._engine()
            if hasattr(eng, "count_tokens"):
                return eng.count_tokens
        return _approx_tokens

    def model_name(self, member: int | None = None) -> str:
        if self.cfg.backend == "local":
            return getattr(self._chat_model, "model_name", None) or self.cfg.engine.model
        if member is not None and self.cfg.ensemble:
            return self.cfg.ensemble[member].llm.model
        return self.cfg.llm.model

    # ------------------------------------------------------------------ proposing
    def propose(self, mode: str, context: str, shown: Sequence[Any] = (), n: int | None = None,
                schema: dict[str, Any] | None = None, seed: int | None = None) -> list[dict[str, Any]]:
        """Up to ``n`` (default ``batch_size``) new ideas in ``mode``. ``context`` is what the
        environment shows (``env.context()``; ``env.task_text()`` suits small local models),
        ``shown`` the past ideas the mode needs (exploit: those that beat the baseline, with
        results; explore: the history to sample from), ``schema`` the environment's knob schema
        (``env.idea_schema()``) for structured ideas. Each idea is a dict: ``id``, ``text`` or
        ``knobs``, ``mode``, ``shown_ids``, ``thinking``, ``backend``, ``model``,
        ``prompt_tokens``, ``completion_tokens``, ``tokens``, ``cost_usd`` and ``meta`` (the
        lineage again, so ``Idea.coerce(d)`` keeps it). Fewer come back when answers were
        malformed after ``max_rounds`` rounds (``stats()`` counts them)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        n = self.cfg.batch_size if n is None else int(n)
        if n < 1:
            return []
        t0 = time.perf_counter()
        rng = random.Random(seed) if seed is not None else random.Random(self._rng.getrandbits(63))
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        report = {"mode": mode, "requested": n, "malformed": 0, "duplicates": 0, "failed_calls": 0, "calls": 0}
        for _ in range(self.cfg.max_rounds):
            need = n - len(out)
            if need <= 0:
                break
            for idea in self._round(mode, context, shown, need, schema, rng, report):
                key = json.dumps(idea.get("knobs"), sort_keys=True) if idea.get("knobs") is not None \
                    else " ".join(idea["text"].lower().split())
                if key in seen:
                    report["duplicates"] += 1
                    continue
                seen.add(key)
                out.append(idea)
        out = out[:n]
        report["returned"] = len(out)
        report["seconds"] = round(time.perf_counter() - t0, 3)
        with self._stats_lock:
            for k in ("malformed", "duplicates", "failed_calls", "calls"):
                self._stats[k] += report[k]
            self._stats["ideas"] += len(out)
            self._stats["seconds"] += report["seconds"]
        self.last = report
        return out

    def _round(self, mode: str, context: str, shown: Sequence[Any], need: int, schema: dict[str, Any] | None,
               rng: random.Random, report: dict[str, Any]) -> list[dict[str, Any]]:
        if self.cfg.backend == "local":
            return self._round_local(mode, context, shown, need, schema, rng, report)
        return self._round_remote(mode, context, shown, need, schema, rng, report)

    def _sizes(self, need: int) -> list[int]:
        b = self.cfg.batch_size
        return [min(b, need - i) for i in range(0, need, b)]

    def _round_remote(self, mode, context, shown, need, schema, rng, report) -> list[dict[str, Any]]:
        calls = []
        for k in self._sizes(need):
            prompt = build_prompt(self.cfg, mode, context, shown, k, schema, rng)
            member = self._draw_member(rng)
            s = self.cfg.sampling
            upd: dict[str, Any] = {}
            if s.seed is not None:
                upd["seed"] = rng.getrandbits(62)
            if schema is not None and self.cfg.constrain_remote and not self.cfg.thinking:
                upd["response_format"] = StructuredOutput(type="json_schema", json_schema=ideas_schema(
                    schema, k, self.cfg.require_knobs))
            calls.append((prompt, member, s.model_copy(update=upd) if upd else s))

        def one(c):
            from selftaught.ledger import BudgetExceeded

            prompt, member, sampling = c
            try:
                return c, self._client(member if member is not None else 0).chat([prompt.messages], sampling)[0], None
            except BudgetExceeded:
                raise  # a cap: the caller stops cleanly, it is not an outage
            except Exception as e:  # noqa: BLE001 - an outage costs this call's ideas, not the batch
                log.warning("ideator call failed (%s): %s", self.model_name(member), e)
                return c, None, e

        with ThreadPoolExecutor(max_workers=max(1, min(self.cfg.concurrency, len(calls))),
                                thread_name_prefix="ideator") as pool:
            done = list(pool.map(one, calls))
        ideas = []
        for (prompt, member, _), o, err in done:
            report["calls"] += 1
            if o is None:
                report["failed_calls"] += 1
                report.setdefault("errors", []).append(f"{type(err).__name__}: {err}"[:500])
                if not _transient(err):  # auth, a bad or unsupported parameter: every call would fail alike
                    report["fatal"] = report["errors"][-1]
                continue
            m = o.metrics or {}
            pt, ct, cost = int(m.get("prompt_tokens", 0)), int(m.get("completion_tokens", 0)), float(m.get("cost_usd", 0.0))
            self._account(pt, ct, cost)
            parsed = parse_ideas(o.completions[0].text if o.completions else "", schema,
                                 require_knobs=self.cfg.require_knobs, max_idea_chars=self.cfg.max_idea_chars)
            got = parsed.ideas[: prompt.k]
            report["malformed"] += parsed.malformed
            share = max(len(got), 1)
            for x in got:
                ideas.append(self._record(x, prompt, parsed.thinking, self.model_name(member),
                                          pt / share, ct / share, cost / share))
        return ideas

    def _draw_member(self, rng: random.Random) -> int | None:
        if not self.cfg.ensemble:
            return None
        weights = [m.weight for m in self.cfg.ensemble]
        return rng.choices(range(len(weights)), weights=weights, k=1)[0]

    def _round_local(self, mode, context, shown, need, schema, rng, report) -> list[dict[str, Any]]:
        eng = self._engine()
        count = self._count_tokens()
        s = self.cfg.sampling
        prompts, params = [], []
        if schema is not None:  # one idea per sample, decoded under the knob schema
            fmt = StructuredOutput(type="json_schema", json_schema=decode_schema(schema, self.cfg.require_knobs))
            for k in self._sizes(need):
                prompts.append(build_prompt(self.cfg, mode, context, shown, k, schema, rng, one_per_sample=True,
                                            count_tokens=count))
                params.append(s.model_copy(update={"n": k, "response_format": fmt}))
        else:
            for k in self._sizes(need):
                prompts.append(build_prompt(self.cfg, mode, context, shown, k, None, rng, count_tokens=count))
                params.append(s.model_copy(update={"n": 1}))
        if self.cfg.thinking:
            budget = BudgetConfig(max_thinking_tokens=self.cfg.thinking_tokens, think_start=THINK_OPEN + "\n",
                                  think_end=THINK_CLOSE + "\n")
            params = [p.model_copy(update={"budget": budget}) for p in params]
        if s.seed is not None:
            params = [p.model_copy(update={"seed": rng.getrandbits(62)}) for p in params]
        try:
            outs = eng.chat([p.messages for p in prompts], params)
        except Exception as e:  # noqa: BLE001 - a failed batch is counted, the ideator lives on
            log.warning("local ideator batch failed: %s", e)
            report["calls"] += len(prompts)
            report["failed_calls"] += len(prompts)
            return []
        ideas = []
        model = self.model_name()
        for prompt, o in zip(prompts, outs):
            report["calls"] += 1
            pt = int((o.metrics or {}).get("prompt_tokens", len(o.prompt_token_ids)))
            self._account(pt, sum(c.num_tokens for c in o.completions), 0.0)
            for c in o.completions:
                text = c.answer if c.answer is not None else c.text
                thinking = c.reasoning if c.reasoning is not None else None
                if c.finish_reason == "length" and schema is not None and not text.rstrip().endswith("}"):
                    report["malformed"] += 1  # cut by max_new_tokens mid-object
                    continue
                parsed = parse_ideas(text, schema, require_knobs=self.cfg.require_knobs,
                                     max_idea_chars=self.cfg.max_idea_chars, thinking=c.reasoning is None)
                report["malformed"] += parsed.malformed
                got = parsed.ideas[:1] if schema is not None else parsed.ideas[: prompt.k]
                share = max(len(got), 1)
                for x in got:
                    ideas.append(self._record(x, prompt, thinking or parsed.thinking, model,
                                              pt / len(o.completions) / share, c.num_tokens / share, 0.0))
        return ideas

    def _record(self, x: Any, prompt: IdeaPrompt, thinking: str | None, model: str, pt: float, ct: float,
                cost: float) -> dict[str, Any]:
        from envs.base import Idea

        knobs = x if isinstance(x, dict) else None
        text = "" if knobs is not None else str(x)
        lineage = {"mode": prompt.mode, "shown_ids": list(prompt.shown_ids), "backend": self.cfg.backend,
                   "model": model}
        pt_i, ct_i = int(round(pt)), int(round(ct))
        return {"id": Idea(text=text, knobs=knobs).id, "text": text, "knobs": knobs, **lineage,
                "thinking": thinking or None, "prompt_tokens": pt_i, "completion_tokens": ct_i,
                "tokens": pt_i + ct_i, "cost_usd": cost, "meta": {"ideator": lineage}}

    def _account(self, pt: int, ct: int, cost: float) -> None:
        with self._stats_lock:
            self._stats["prompt_tokens"] += pt
            self._stats["completion_tokens"] += ct
            self._stats["cost_usd"] += cost

    # ------------------------------------------------------------------ reporting
    def prompt(self, mode: str, context: str, shown: Sequence[Any] = (), k: int | None = None,
               schema: dict[str, Any] | None = None, seed: int | None = None) -> dict[str, Any]:
        """The prompt ``propose`` would send for one call (for inspection and logs)."""
        one = self.cfg.backend == "local" and schema is not None
        count = self._count_tokens() if self.cfg.explore_budget_tokens is not None else None
        return build_prompt(self.cfg, mode, context, shown, k or self.cfg.batch_size, schema,
                            random.Random(seed if seed is not None else self.cfg.seed), one_per_sample=one,
                            count_tokens=count).to_dict()

    def stats(self) -> dict[str, Any]:
        """Totals over this ideator's life: calls, failed calls, ideas returned, malformed and
        duplicate items skipped, tokens, cost (from the LLM clients' metrics), seconds."""
        with self._stats_lock:
            out = dict(self._stats)
        out["usage"] = {str(i): c.usage.snapshot() for i, c in self._clients.items()}
        return out

    def info(self) -> dict[str, Any]:
        return {"backend": self.cfg.backend, "model": self.model_name(), "batch_size": self.cfg.batch_size,
                "thinking": self.cfg.thinking}


def _transient(e: BaseException | None) -> bool:
    """An outage worth asking again later (rate limit, timeout, 5xx), not a configuration error."""
    from selftaught.llm import LLMError, is_retryable

    if e is None:
        return False
    if isinstance(e, LLMError):
        return e.retryable
    return is_retryable(e)


def to_idea(d: dict[str, Any]):
    """A proposed idea as an :class:`~envs.base.Idea` (lineage kept in ``meta``)."""
    from envs.base import Idea

    return Idea(text=d.get("text") or "", knobs=d.get("knobs"), meta=dict(d.get("meta") or {}))


def ideator_actor_class():
    """``ray.remote(Ideator)``: a long-lived actor; set resources with ``.options`` (a local
    backend holds its engine, so give it the engine's CPUs / GPUs)."""
    import ray

    return ray.remote(Ideator)


def start_ideator(cfg: IdeatorConfig | dict | None = None, **options: Any):
    """Start an ideator actor sized for its backend (local: the engine's ``cpus_per_actor`` and
    ``gpus_per_actor``; remote: a fraction of a CPU)."""
    cfg = cfg if isinstance(cfg, IdeatorConfig) else IdeatorConfig.model_validate(cfg or {})
    if cfg.backend == "local":
        from selftaught.runtime import fit_actor_cpus

        gpus = cfg.engine.gpus_per_actor
        cpus = cfg.engine.cpus_per_actor if gpus else fit_actor_cpus(cfg.engine.cpus_per_actor, 1)
        options = {"num_cpus": cpus, "num_gpus": gpus,
                   **({"resources": cfg.engine.resources} if cfg.engine.resources else {}), **options}
    else:
        options = {"num_cpus": 0.25, **options}
    return ideator_actor_class().options(**options).remote(cfg.model_dump(), None, options.get("num_cpus"))


def __getattr__(name: str) -> Any:  # ``from actors.ideator import IdeatorActor`` without importing Ray early
    if name == "IdeatorActor":
        return ideator_actor_class()
    raise AttributeError(name)
