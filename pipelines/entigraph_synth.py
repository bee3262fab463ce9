"""EntiGraph synthesis: turn a small corpus into a large synthetic one (thesis ch. 2).

Per source document:

1. *entity extraction*: the LM answers one JSON object ``{"summary", "entities"}`` (decoded
   under a JSON schema where the backend can, parsed with repair otherwise; malformed answers
   are asked again up to ``retries`` times, then counted);
2. *relation synthesis*: for entity pairs (all, or a seeded sample under a token budget) and a
   sample of triplets, the LM writes about how the entities relate in the document, naming its
   title; the summaries join the synthetic corpus;
3. *megadocs* (optional): every generation of one document stitched into one long document;
4. the *Rephrase* baseline: the document rewritten in several styles at temperature 1.0.

Every request goes through :func:`run_requests`, which keys it by a stable hash (document id,
kind, entities, model, sampling, prompt) and writes finished answers as Parquet parts, so a job
killed mid-way resumes per (document, pair or triplet) and never generates a finished row
twice. Remote backends add the LLM client's request cache and cost ledger on top (a rerun pays
nothing twice; ``BudgetExceeded`` stops a run at its cap).

Backends (:class:`Generator`): ``local`` (our engine on Ray actors, :class:`actors.generator.EnginePool`),
``litellm`` (any provider) and ``openai`` (any OpenAI-compatible server, e.g. our Serve app).
"""
from __future__ import annotations

import ast
import hashlib
import itertools
import json
import logging
import math
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import pyarrow as pa
from pydantic import Field, model_validator

from actors.engine.base import per_request
from selftaught.config import EngineConfig, SamplingConfig, Strict, StructuredOutput
from selftaught.llm import LLMConfig

log = logging.getLogger(__name__)

Messages = list[dict[str, Any]]


# --------------------------------------------------------------------------- configuration
class GeneratorConfig(Strict):
    """Which model writes the synthetic corpus, and how it is reached."""

    backend: Literal["local", "litellm", "openai"] = "local"
    # local: our engine (default: the packaged SmolLM2-135M-Instruct) on a pool of actors fed by
    # Ray Data ("ray_data": each stage's requests are one dataset streamed through map_batches,
    # answers written as they finish) or on long-lived actors called batch by batch ("actors")
    fanout: Literal["ray_data", "actors"] = "ray_data"
    engine: EngineConfig = Field(default_factory=EngineConfig)
    num_actors: int | None = Field(default=None, ge=1)  # None: engine.num_actors
    timeout_s: float = Field(default=1800.0, gt=0)  # bound on one batch's wait for the actors
    # litellm / openai: the model, its timeouts and retries (``openai`` needs api_base)
    llm: LLMConfig = Field(default_factory=lambda: LLMConfig(role="entigraph", max_tokens=1024))
    cache: str | None = None  # SQLite answer cache (None: llm.cache); a rerun pays nothing twice
    concurrency: int = Field(default=8, ge=1)  # remote calls in flight
    # remote: also send the extraction JSON schema as response_format (servers with structured output)
    remote_schema: bool = False

    @model_validator(mode="after")
    def _check(self) -> "GeneratorConfig":
        if self.backend == "openai" and not self.llm.api_base and self.llm.mock_response is None:
            raise ValueError("backend 'openai' needs llm.api_base (the server's /v1 URL)")
        return self


class SynthConfig(Strict):
    """What EntiGraph asks for, and how much of it."""

    max_doc_chars: int = Field(default=12_000, ge=100)  # a longer document is cut before prompting
    max_entities: int = Field(default=64, ge=2)
    # the decoding schema asks for at least this many (a small model otherwise stops at one or two)
    min_entities: int = Field(default=2, ge=1)
    # extract from pieces of at most this many characters and merge them (None: the whole
    # document in one request, as the thesis does with a strong model; a small model reads a short
    # piece far better than a long one)
    extract_chunk_chars: int | None = Field(default=None, ge=100)
    max_entity_chars: int = Field(default=80, ge=2)  # longer "entities" are sentences, not names
    # the relation prompt's context: the whole document (None, as the thesis does), or the passages
    # that name the entities, at most this many characters (a small model on CPU pays for every
    # prompt token, and reads a short passage better than a long document)
    relation_context_chars: int | None = Field(default=None, ge=100)
    # rephrase in pieces of at most this many characters (None: the whole document in one request);
    # a rewrite has max_new_tokens, so a long document rewritten whole is summarised, not rephrased
    rephrase_chunk_chars: int | None = Field(default=None, ge=100)
    max_summary_chars: int = Field(default=2_000, ge=10)  # bound in the decoding schema
    retries: int = Field(default=2, ge=0)  # extra attempts for a malformed extraction answer
    extract_sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.0, max_new_tokens=1024))
    relation_sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=1.0, max_new_tokens=1024))
    rephrase_sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=1.0, max_new_tokens=1024))
    # pairs per document: all of them, unless max_pairs or the token budget says fewer
    max_pairs: int | None = Field(default=None, ge=0)
    pair_token_budget: int | None = Field(default=None, ge=0)  # per document: prompt + max completion tokens
    triplets: int = Field(default=10, ge=0)  # sampled triplets per document
    styles: list[str] = Field(default_factory=lambda: ["easy", "medium", "hard"])  # Rephrase baseline
    style_prompts: dict[str, str] = Field(default_factory=dict)  # extra or replaced style instructions
    rephrases_per_style: int = Field(default=1, ge=1)
    megadocs: bool = False  # stitch each document's generations into one long document
    part_size: int = Field(default=64, ge=1)  # requests per Parquet part (the resume granularity)
    seed: int = 0


# --------------------------------------------------------------------------- generators
@dataclass
class GenOut:
    """One answer, whatever the backend. ``error`` set: the call failed (nothing to keep)."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    cost_usd: float = 0.0
    cached: bool = False
    exc: BaseException | None = field(default=None, repr=False, compare=False)  # a budget stop, re-raised


class Generator:
    """Answers conversations; every backend returns :class:`GenOut` in input order, one per
    conversation, and reports a failed call in ``error`` instead of raising (a cap still
    stops the run: see :func:`run_requests`)."""

    model: str = ""
    supports_schema: bool = False  # JSON-schema decoding is honoured (extraction asks for it)

    def chat(self, conversations: Sequence[Messages], sampling: SamplingConfig | Sequence[SamplingConfig],
             tags: Sequence[str | None] | None = None) -> list[GenOut]:
        raise NotImplementedError

    def stream(self, conversations: Sequence[Messages], sampling: SamplingConfig | Sequence[SamplingConfig],
               tags: Sequence[str | None] | None = None, chunk: int = 64) -> Iterator[list[tuple[int, GenOut]]]:
        """Answers as ``(index, GenOut)`` lists of about ``chunk``, in the order they finish, so a
        caller can keep each before the rest are done. Here: :meth:`chat` over consecutive slices."""
        params = per_request(sampling, len(conversations))
        tags = list(tags) if tags is not None else [None] * len(conversations)
        for i in range(0, len(conversations), chunk):
            outs = self.chat(conversations[i:i + chunk], params[i:i + chunk], tags[i:i + chunk])
            yield list(enumerate(outs, start=i))

    def close(self) -> None:
        """Release what the generator holds (actors)."""

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


class LocalGenerator(Generator):
    """Our engine on Ray actors (or any ChatModel handed in, e.g. a pool shared with another
    stage). A batch that fails as a whole (one prompt too long fails the engine's batch) is
    retried one conversation at a time, so only the bad one is lost."""

    supports_schema = True

    def __init__(self, chat_model: Any, model: str, owns: bool = False):
        self.chat_model, self.model, self._owns = chat_model, model, owns

    @classmethod
    def start(cls, cfg: GeneratorConfig) -> "LocalGenerator":
        from actors.generator import EnginePool

        pool = EnginePool.start(cfg.engine, cfg.num_actors or cfg.engine.num_actors, cfg.timeout_s)
        return cls(pool, cfg.engine.model, owns=True)

    @staticmethod
    def _out(o: Any) -> GenOut:
        c = o.completions[0]
        return GenOut(text=c.answer if c.answer is not None else c.text, prompt_tokens=len(o.prompt_token_ids),
                      completion_tokens=len(c.token_ids), finish_reason=c.finish_reason,
                      error=c.error if c.finish_reason == "error" else None)

    def chat(self, conversations, sampling, tags=None) -> list[GenOut]:
        if not conversations:
            return []
        params = [p.model_copy(update={"n": 1}) if p.n != 1 else p
                  for p in per_request(sampling, len(conversations))]
        try:
            return [self._out(o) for o in self.chat_model.chat([list(c) for c in conversations], params)]
        except Exception as e:  # noqa: BLE001 - find the bad conversation(s) one by one
            if len(conversations) == 1:
                return [GenOut(error=f"{type(e).__name__}: {e}"[:1000])]
            log.warning("local batch of %d failed (%s); retrying one at a time", len(conversations), e)
            return [self.chat([c], [p])[0] for c, p in zip(conversations, params)]

    def close(self) -> None:
        if self._owns and getattr(self.chat_model, "actors", None):
            import ray

            for a in self.chat_model.actors:
                ray.kill(a)
            self.chat_model.actors = []


class DataGenerator(Generator):
    """Our engine through Ray Data: one call's conversations become a dataset streamed through a
    pool of engine actors (:func:`actors.generator.generate_dataset`, ``map_batches`` on an actor
    pool) with Ray Data's back-pressure, and answers come back as blocks finish. A row the engine
    cannot serve fails alone (``error`` set). A call with no answer for ``timeout_s`` raises."""

    supports_schema = True
    _IDX = "_entigraph_index"

    def __init__(self, cfg: GeneratorConfig):
        self.cfg, self.model = cfg, cfg.engine.model

    def stream(self, conversations, sampling, tags=None, chunk: int = 64):
        if not conversations:
            return
        import queue
        import threading

        import ray.data

        from actors.generator import generate_dataset

        params = [p.model_copy(update={"n": 1}) if p.n != 1 else p
                  for p in per_request(sampling, len(conversations))]
        items = [{self._IDX: i, "prompt": json.dumps(list(c)), "sampling": p.model_dump_json()}
                 for i, (c, p) in enumerate(zip(conversations, params))]
        # blocks of about ``chunk`` rows: answers come back (and are written) block by block
        blocks = max(1, math.ceil(len(items) / max(1, min(chunk, self.cfg.engine.max_batch_size))))
        ds = generate_dataset(ray.data.from_items(items, override_num_blocks=blocks), self.cfg.engine,
                              SamplingConfig(), prompt_column="prompt",
                              num_actors=self.cfg.num_actors, sampling_column="sampling", chat=True)
        # (no select_columns: a projection is one more task operator, which on a small machine
        # waits behind the engine actors for a CPU and holds every answer back until they finish)
        rows: queue.Queue = queue.Queue(maxsize=4 * chunk)
        done = object()

        def consume() -> None:  # Ray Data's iterator has no timeout: read it beside a bounded wait
            try:
                for r in ds.iter_rows():
                    rows.put(r)
                rows.put(done)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                rows.put(e)

        threading.Thread(target=consume, daemon=True, name="entigraph-ray-data").start()
        buf: list[tuple[int, GenOut]] = []
        while True:
            try:
                r = rows.get(timeout=self.cfg.timeout_s)
            except queue.Empty:
                raise TimeoutError(f"no generation finished in {self.cfg.timeout_s:.0f} s "
                                   "(generator.timeout_s); rerun to resume") from None
            if r is done:
                break
            if isinstance(r, BaseException):
                raise r
            err = r["generated_error"] or ("engine error" if r["finish_reason"] == "error" else None)
            buf.append((int(r[self._IDX]), GenOut(text=str(r["generated_text"]), prompt_tokens=int(r["prompt_tokens"]),
                                                  completion_tokens=int(r["completion_tokens"]),
                                                  finish_reason=str(r["finish_reason"]), error=err)))
            if len(buf) >= chunk:
                yield buf
                buf = []
        if buf:
            yield buf

    def chat(self, conversations, sampling, tags=None) -> list[GenOut]:
        outs: list[GenOut] = [GenOut(error="no answer")] * len(conversations)
        for batch in self.stream(conversations, sampling, tags):
            for i, o in batch:
                outs[i] = o
        return outs


class RemoteGenerator(Generator):
    """litellm (any provider) or an OpenAI-compatible server, through :class:`LLMClient`: its
    request cache, ledger reservations, retries and timeouts; ``concurrency`` calls in flight."""

    def __init__(self, cfg: GeneratorConfig, ledger: Any = None):
        from selftaught.llm import LLMClient

        llm = cfg.llm
        if cfg.backend == "openai" and not llm.model.startswith("openai/"):
            llm = llm.model_copy(update={"model": "openai/" + llm.model})
        over = {"cache": cfg.cache} if cfg.cache else {}
        self.client = LLMClient(llm, ledger=ledger, **over)
        self.model = self.client.cfg.model
        self.supports_schema = cfg.remote_schema
        self.concurrency = cfg.concurrency

    def chat(self, conversations, sampling, tags=None) -> list[GenOut]:
        from selftaught.ledger import BudgetExceeded
        from selftaught.llm import LLMError

        n = len(conversations)
        params = per_request(sampling, n)
        tags = list(tags) if tags is not None else [None] * n

        def one(i: int) -> GenOut:
            try:
                r = self.client.complete(list(conversations[i]), sampling=params[i], cache_tag=tags[i])
            except BudgetExceeded as e:
                return GenOut(error=f"BudgetExceeded: {e}", exc=e)
            except LLMError as e:
                return GenOut(error=f"LLMError: {e}"[:1000])
            return GenOut(text=r.text, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                          finish_reason=r.finish_reason, cost_usd=r.spent_usd, cached=r.cached)

        if n == 0:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, n), thread_name_prefix="entigraph") as pool:
            return list(pool.map(one, range(n)))


def make_generator(cfg: GeneratorConfig, ledger: Any = None) -> Generator:
    """The configured backend. ``ledger`` (a :class:`~selftaught.ledger.Ledger` or its path)
    charges remote calls to ``cfg.llm.role`` and enforces its caps; local runs cost no dollars."""
    if cfg.backend == "local":
        return DataGenerator(cfg) if cfg.fanout == "ray_data" else LocalGenerator.start(cfg)
    return RemoteGenerator(cfg, ledger)


# --------------------------------------------------------------------------- requests and resuming
def request_key(source_id: str, kind: str, entities: Sequence[str], model: str, sampling: SamplingConfig,
                messages: Messages, attempt: int = 0, draw: int = 0) -> str:
    """Stable identity of one request: document, kind, entities, model, sampling and the prompt
    itself (a changed prompt or document text is a new request), retry attempt and draw."""
    body = {"source_id": source_id, "kind": kind, "entities": list(entities), "model": model,
            "sampling": sampling.model_dump(mode="json"), "messages": messages, "attempt": attempt, "draw": draw}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass
class Request:
    """One generation to run: what it is about, the conversation and its sampling."""

    source_id: str
    kind: str
    entities: list[str]
    messages: Messages
    sampling: SamplingConfig
    model: str
    attempt: int = 0
    draw: int = 0
    key: str = ""

    def __post_init__(self) -> None:
        if self.sampling.seed is not None:  # one stream per request, reproducible
            h = request_key(self.source_id, self.kind, self.entities, self.model, self.sampling, [], 0, self.draw)
            self.sampling = self.sampling.model_copy(update={"seed": (self.sampling.seed + int(h[:15], 16)) % 2**62})
        if not self.key:
            self.key = request_key(self.source_id, self.kind, self.entities, self.model, self.sampling,
                                   self.messages, self.attempt, self.draw)


PART_SCHEMA = pa.schema([("key", pa.string()), ("source_id", pa.string()), ("kind", pa.string()),
                         ("entities", pa.list_(pa.string())), ("attempt", pa.int32()), ("draw", pa.int32()),
                         ("model", pa.string()), ("text", pa.string()), ("prompt_tokens", pa.int64()),
                         ("completion_tokens", pa.int64()), ("finish_reason", pa.string()),
                         ("cost_usd", pa.float64())])


def _finished(out_dir: Path | None) -> tuple[dict[str, dict], int]:
    """Rows already written under ``out_dir`` by key, and the next free part number."""
    if out_dir is None or not out_dir.is_dir():
        return {}, 0
    parts = sorted(p for p in out_dir.glob("part-*.parquet") if not p.name.startswith("."))
    if not parts:
        return {}, 0
    from selftaught.storage import read_parquet

    rows = read_parquet(out_dir).to_pylist()
    nxt = max(int(p.stem.split("-")[1]) for p in parts) + 1
    return {r["key"]: r for r in rows}, nxt


def run_requests(requests: Sequence[Request], gen: Generator, out_dir: str | Path | None = None,
                 part_size: int = 64) -> tuple[list[dict], dict[str, Any]]:
    """Run the requests not yet answered under ``out_dir`` and return every answered one (in
    request order) with counts.

    Answers are written about ``part_size`` at a time, as the generator finishes them (in any
    order), as ``part-NNNNN.parquet`` (atomically), so a killed job loses at most the part in
    flight; a rerun reads the parts and skips their keys.
    A failed call is counted and left out (it is asked again on the next run); an exhausted
    budget writes what finished and then raises ``BudgetExceeded``."""
    from selftaught.storage import write_parquet

    out = Path(out_dir) if out_dir is not None else None
    done, part = _finished(out)
    unique: dict[str, Request] = {}
    for r in requests:
        unique.setdefault(r.key, r)
    pending = [r for k, r in unique.items() if k not in done]
    stats: dict[str, Any] = {"requested": len(unique), "resumed": len(unique) - len(pending), "generated": 0,
                             "failed": 0, "cached": 0, "parts": 0, "prompt_tokens": 0, "completion_tokens": 0,
                             "cost_usd": 0.0, "errors": []}
    stream = gen.stream([r.messages for r in pending], [r.sampling for r in pending],
                        tags=[r.key for r in pending], chunk=part_size)
    for batch in stream:
        rows, stop = [], None
        for r, o in ((pending[i], o) for i, o in batch):
            if o.error is not None:
                stats["failed"] += 1
                if len(stats["errors"]) < 5:
                    stats["errors"].append(o.error[:300])
                stop = stop or o.exc
                continue
            rows.append({"key": r.key, "source_id": r.source_id, "kind": r.kind, "entities": list(r.entities),
                         "attempt": r.attempt, "draw": r.draw, "model": r.model, "text": o.text,
                         "prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
                         "finish_reason": o.finish_reason, "cost_usd": o.cost_usd})
            stats["cached"] += int(o.cached)
            stats["prompt_tokens"] += o.prompt_tokens
            stats["completion_tokens"] += o.completion_tokens
            stats["cost_usd"] += o.cost_usd
        if rows and out is not None:
            write_parquet(rows, out / f"part-{part:05d}.parquet", schema=PART_SCHEMA)
            part += 1
            stats["parts"] += 1
        stats["generated"] += len(rows)
        done.update((row["key"], row) for row in rows)
        if stop is not None:
            raise stop
    return [done[k] for k in unique if k in done], stats


def _approx_tokens(text: str) -> int:
    """A tokenizer-free estimate (about 4 characters per token)."""
    return math.ceil(len(text) / 4)


def _prompt_chars(messages: Messages) -> int:
    return sum(len(str(m.get("content", ""))) for m in messages)


def estimate_cost(requests: Sequence[Request], cfg: GeneratorConfig) -> dict[str, Any]:
    """Worst case of a plan before it runs: every request's prompt tokens plus all of its
    ``max_new_tokens``. Remote: priced like the client reserves (prompt tokens counted by
    litellm times ``budget_margin``; ``LLMError`` for a model without a known or declared
    price); local: tokens estimated, no dollars."""
    pt_total = mt_total = 0
    usd = 0.0 if cfg.backend != "local" else None
    worst = 0.0
    if cfg.backend != "local":
        import litellm

        from selftaught.llm import worst_case_cost

        model = cfg.llm.model if cfg.backend == "litellm" or cfg.llm.model.startswith("openai/") \
            else "openai/" + cfg.llm.model
        llm = cfg.llm.model_copy(update={"model": model})
    for r in requests:
        mt = r.sampling.max_new_tokens
        if cfg.backend == "local":
            pt = _approx_tokens(" ".join(str(m.get("content", "")) for m in r.messages))
        else:
            pt = math.ceil(litellm.token_counter(model=llm.model, messages=r.messages) * llm.budget_margin)
            c = worst_case_cost(llm, pt, mt)
            usd += c
            worst = max(worst, c)
        pt_total += pt
        mt_total += mt
    return {"calls": len(requests), "prompt_tokens": pt_total, "max_completion_tokens": mt_total,
            "usd": usd, "max_call_usd": worst if usd is not None else None}


# --------------------------------------------------------------------------- JSON with repair
_FENCE = re.compile(r"```[A-Za-z0-9_-]*\s*\n?(.*?)(?:```|$)", re.S)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")

try:  # optional: a more thorough repair when installed
    import json_repair as _json_repair  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    _json_repair = None


def _outside_strings(s: str) -> tuple[list[tuple[int, str]], bool]:
    """The characters of ``s`` outside JSON strings, with their positions, and whether ``s``
    ends inside a string (an answer cut by the token limit)."""
    out: list[tuple[int, str]] = []
    in_str = esc = False
    for i, ch in enumerate(s):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        else:
            out.append((i, ch))
    return out, in_str


def _scan_close(s: str) -> str:
    """``s`` cut after its first complete top-level value, or closed (open string, then open
    brackets) when it ends early (an answer cut by the token limit)."""
    stack: list[str] = []
    chars, in_str = _outside_strings(s)
    for i, ch in chars:
        if ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]":
            if stack and stack[-1] == ch:
                stack.pop()
            if not stack:
                return s[: i + 1]
    out = s + ('"' if in_str else "")
    return re.sub(r"[\s,:]+$", "", out) + "".join(reversed(stack))


def _top_commas(s: str) -> list[int]:
    """Positions of commas outside strings (to drop a dangling last element)."""
    return [i for i, ch in _outside_strings(s)[0] if ch == ","]


def _loads_dict(s: str) -> dict | None:
    for load in (json.loads, ast.literal_eval):  # literal_eval: single quotes, True/None
        try:
            v = load(s)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(v, dict):
            return v
    return None


def parse_json_object(text: str) -> tuple[dict | None, bool]:
    """The first JSON object in an answer, and whether it needed repair (anything beyond
    ``json.loads`` of the stripped answer): code fences and surrounding prose are dropped,
    trailing commas removed, smart quotes straightened, a cut-off object closed. ``json_repair``
    is used when installed. (None, True) when nothing object-like can be recovered."""
    s = (text or "").strip()
    try:
        v = json.loads(s)
        if isinstance(v, dict):
            return v, False
    except ValueError:
        pass
    fenced = [m.group(1) for m in _FENCE.finditer(s) if "{" in m.group(1)]
    s = fenced[0] if fenced else s
    start = s.find("{")
    if start < 0:
        return None, True
    dec = json.JSONDecoder()
    for m in list(re.finditer(r"\{", s))[:50]:  # the first complete object, prose around it ignored
        try:
            v, _ = dec.raw_decode(s, m.start())
        except ValueError:
            continue
        if isinstance(v, dict):
            return v, True
    s = s[start:]
    if _json_repair is not None:
        try:
            v = _json_repair.loads(s)
            if isinstance(v, dict) and v:
                return v, True
        except Exception:  # noqa: BLE001 - fall back to our own repair
            pass
    s = s.replace("\u201c", '"').replace("\u201d", '"').replace("\u2019", "'")
    closed = _scan_close(s)
    candidates = [closed]
    for c in reversed(_top_commas(s)[-3:]):  # drop a dangling, half-written last element
        candidates.append(_scan_close(s[:c]))
    for c in candidates:
        v = _loads_dict(_TRAILING_COMMA.sub(r"\1", c))
        if v is not None:
            return v, True
    return None, True


# --------------------------------------------------------------------------- prompts
EXTRACT_SYSTEM = ("You catalogue documents for a knowledge base. You read carefully and answer with a "
                  "single JSON object, nothing else.")

EXTRACT_USER = """\
Catalogue the document below.

Title: {title}

{text}

Answer with one JSON object with two fields, in this order:
- "entities": every entity the document mentions: people, places, organisations, objects, \
events, works, ideas and technical concepts. Give each one once, by a short name, and list as \
many as you can find;
- "summary": what the document says, in a few sentences.
Write only the JSON object."""

RETRY_USER = """\
Your answer could not be read as the requested JSON object. Answer again with only one JSON \
object of the form {"entities": ["...", "..."], "summary": "..."}, with no other text."""

RELATION_SYSTEM = ("You write clear explanatory prose about a given document. Everything you write stays "
                   "faithful to the document; you never contradict it.")

RELATION_USER = """\
Document: "{title}"

{text}

Write an analysis, in the context of "{title}", of how these {n} entities relate to each other: {names}.
First go through the entities one at a time and restate what "{title}" tells us about each. Then \
discuss how they are connected: how they interact, depend on, influence or contrast with one \
another in "{title}". Name "{title}" at the start of every section."""

STYLE_PROMPTS: dict[str, str] = {
    "easy": "Rewrite the document below so that a child could follow it: short sentences and everyday words, "
            "with every fact kept.",
    "medium": "Rewrite the document below in clear, well-organised prose for an educated general reader, "
              "with every fact kept.",
    "hard": "Rewrite the document below in dense, precise technical language, as a specialist would write it "
            "for other specialists, with every fact kept.",
    "wikipedia": "Rewrite the document below as a neutral encyclopedia article with short sections, "
                 "with every fact kept.",
    "qa": "Turn the document below into a series of questions, each followed by its answer, that together "
          "cover every fact in it.",
}


def split_text(text: str, max_chars: int) -> list[str]:
    """``text`` in consecutive pieces of at most ``max_chars``, each cut where :func:`cut_text`
    would cut (a paragraph or sentence end when one is near)."""
    pieces, rest = [], (text or "").strip()
    while rest:
        piece = cut_text(rest, max_chars)
        pieces.append(piece)
        rest = rest[len(piece):].strip()
    return pieces


def cut_text(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars``, at a paragraph or sentence end when one is near."""
    text = (text or "").strip()
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    for sep in ("\n\n", "\n", ". "):
        i = head.rfind(sep)
        if i >= max_chars * 0.7:
            return head[: i + (1 if sep == ". " else 0)].rstrip()
    return head.rstrip()


def _title(doc: dict) -> str:
    return str(doc.get("title") or doc.get("id") or "the document")


def entity_schema(cfg: SynthConfig) -> dict[str, Any]:
    """The JSON schema extraction is decoded under: bounded strings and list, so even a small
    model's answer ends; at least ``min_entities`` entities (a document with fewer than two gives
    no pair to write about). Entities come first: a model that runs out of tokens in the summary
    has still listed them."""
    return {"type": "object",
            "properties": {"entities": {"type": "array", "minItems": min(cfg.min_entities, cfg.max_entities),
                                        "maxItems": cfg.max_entities,
                                        "items": {"type": "string", "minLength": 1,
                                                  "maxLength": cfg.max_entity_chars}},
                           "summary": {"type": "string", "maxLength": cfg.max_summary_chars}},
            "required": ["entities", "summary"], "additionalProperties": False}


def extraction_messages(doc: dict, cfg: SynthConfig) -> Messages:
    return [{"role": "system", "content": EXTRACT_SYSTEM},
            {"role": "user", "content": EXTRACT_USER.format(title=_title(doc),
                                                            text=cut_text(doc["text"], cfg.max_doc_chars))}]


def _names(passage: str, entity: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(entity.casefold()) + r"(?!\w)", passage.casefold()) is not None


def relation_context(doc: dict, entities: Sequence[str], cfg: SynthConfig) -> str:
    """What the relation prompt shows of the document: all of it (cut to ``max_doc_chars``), or
    with ``relation_context_chars`` the passages that name the most of ``entities`` (ties: the
    earlier passage), at most that many characters, in document order, gaps marked. Passages
    are under half the limit long, so the two entities of a pair named apart both get theirs; a pair
    the text never names verbatim gets the document's opening."""
    text = cut_text(doc["text"], cfg.max_doc_chars)
    limit = cfg.relation_context_chars
    if limit is None or len(text) <= limit:
        return text
    pieces = split_text(text, max((limit - len(_GAP)) // 2, 45))  # two passages and a gap fit
    named = [sum(_names(p, e) for e in entities) for p in pieces]
    order = sorted(range(len(pieces)), key=lambda i: (-named[i], i))
    picked, used, covered = [], 0, set()
    for i in order:
        if named[i] == 0 and picked:
            break
        new = {e for e in entities if _names(pieces[i], e)}
        if picked and not new - covered and len(covered) < len(entities):
            continue  # names nothing a picked passage does not: leave room for one that does
        cost = len(pieces[i]) + (len(_GAP) if picked else 0)  # at worst a gap before it
        if used + cost > limit:
            continue
        picked.append(i)
        used += cost
        covered |= new
    picked.sort()
    out = pieces[picked[0]]
    for prev, i in zip(picked, picked[1:]):
        out += ("\n\n" if i == prev + 1 else _GAP) + pieces[i]
    return out


_GAP = "\n\n[...]\n\n"  # between passages that are not adjacent in the document


def relation_messages(doc: dict, entities: Sequence[str], cfg: SynthConfig) -> Messages:
    names = ", ".join(f'"{e}"' for e in entities)
    user = RELATION_USER.format(title=_title(doc), text=relation_context(doc, entities, cfg),
                                n="two" if len(entities) == 2 else "three" if len(entities) == 3 else len(entities),
                                names=names)
    return [{"role": "system", "content": RELATION_SYSTEM}, {"role": "user", "content": user}]


def rephrase_messages(doc: dict, style: str, cfg: SynthConfig) -> Messages:
    prompts = {**STYLE_PROMPTS, **cfg.style_prompts}
    if style not in prompts:
        raise ValueError(f"unknown rephrase style {style!r}; one of {', '.join(sorted(prompts))} "
                         "(or add it to style_prompts)")
    text = cut_text(doc["text"], cfg.max_doc_chars)
    return [{"role": "user", "content": f"{prompts[style]}\n\nTitle: {_title(doc)}\n\n{text}"}]


def document_units(doc: dict, max_doc_chars: int, chunk_chars: int | None) -> list[dict]:
    """``doc`` cut to ``max_doc_chars``, whole or in consecutive pieces of ``chunk_chars``: copies
    of the document (id, title) with their piece's ``text`` and its index in ``_piece``."""
    text = cut_text(doc["text"], max_doc_chars)
    pieces = split_text(text, chunk_chars) if chunk_chars else [text]
    return [{**doc, "text": p, "_piece": i} for i, p in enumerate(pieces)]


def rephrase_units(doc: dict, cfg: SynthConfig) -> list[dict]:
    """What the Rephrase baseline rewrites of one document: the document (cut to
    ``max_doc_chars``) whole, or its pieces of ``rephrase_chunk_chars``, in order."""
    return document_units(doc, cfg.max_doc_chars, cfg.rephrase_chunk_chars)


# --------------------------------------------------------------------------- step 1: entities
# The extraction prompt's own category words: a small model lists them instead of entities.
NOT_ENTITIES = frozenset({"people", "places", "place", "organisations", "organizations", "objects", "events",
                          "works", "ideas", "technical concepts", "concepts", "technologies", "techniques", "things",
                          "entities", "entity", "summary", "document", "title", "catalogue", "knowledge base",
                          "json", "json object"})


_CATEGORY_STEMS = frozenset(w.removesuffix("s") for w in NOT_ENTITIES)


def clean_entities(raw: Any, max_entities: int, max_chars: int) -> list[str]:
    """Entity names as strings (``{"name": ...}`` items accepted), whitespace normalised, empty
    and over-long ones dropped, the prompt's category words (:data:`NOT_ENTITIES`) dropped, alone
    or as a comma-separated list of nothing else,
    duplicates dropped case-insensitively (first spelling kept), at most ``max_entities``."""
    out: list[str] = []
    seen: set[str] = set()
    for e in raw if isinstance(raw, list) else []:
        if isinstance(e, dict):
            e = e.get("name") or e.get("entity")
        if not isinstance(e, str):
            continue
        e = " ".join(e.split()).strip(" -*\u2022.,;:\"'`")
        if "_" in e:  # an identifier the model made up ("people_and_places"), not a name
            continue
        key = e.casefold()
        if not e or len(e) > max_chars or key in seen or key in NOT_ENTITIES:
            continue
        parts = [x.strip().removeprefix("and ").removeprefix("or ").removesuffix("s") for x in key.split(",")]
        if len(parts) > 1 and all(x in _CATEGORY_STEMS for x in parts):
            continue  # the prompt's categories listed in one string ("people,places,objects,work")
        seen.add(key)
        out.append(e)
        if len(out) >= max_entities:
            break
    return out


def parse_entities(text: str, cfg: SynthConfig) -> tuple[dict | None, bool]:
    """``({"summary", "entities"}, repaired)`` from one answer, or ``(None, ...)`` when it is
    malformed (no object, or no list of entities)."""
    obj, repaired = parse_json_object(text)
    if obj is None or not isinstance(obj.get("entities"), list):
        return None, repaired
    summary = obj.get("summary")
    summary = " ".join(summary.split()) if isinstance(summary, str) else ""
    return {"summary": summary, "entities": clean_entities(obj["entities"], cfg.max_entities,
                                                           cfg.max_entity_chars)}, repaired


def extraction_units(doc: dict, cfg: SynthConfig) -> list[dict]:
    """What one document's extraction reads: the document (cut to ``max_doc_chars``) whole, or
    in pieces of ``extract_chunk_chars``, each with the document's id and title."""
    return document_units(doc, cfg.max_doc_chars, cfg.extract_chunk_chars)


def _extract_request(unit: dict, gen: Generator, cfg: SynthConfig, attempt: int = 0,
                     previous: str | None = None) -> Request:
    s = cfg.extract_sampling
    if gen.supports_schema:
        s = s.model_copy(update={"response_format": StructuredOutput(type="json_schema",
                                                                     json_schema=entity_schema(cfg))})
    msgs = extraction_messages(unit, cfg)
    if attempt:  # show the bad answer and ask again: a new request (a cache would repeat the old one)
        msgs += [{"role": "assistant", "content": (previous or "")[:2000]}, {"role": "user", "content": RETRY_USER}]
    return Request(str(unit["id"]), "entities", [], msgs, s, gen.model, attempt=attempt, draw=unit["_piece"])


def _interleave(lists: Sequence[Sequence[str]]) -> list[str]:
    """Round-robin over the pieces' entity lists, so a cap on the total keeps some of every piece."""
    return [e for group in itertools.zip_longest(*lists) for e in group if e is not None]


def extract_entities(docs: Sequence[dict], gen: Generator, cfg: SynthConfig,
                     out_dir: str | Path | None = None) -> tuple[list[dict], dict[str, Any]]:
    """Step 1: per document one ``{"summary", "entities"}`` answer (or one per piece with
    ``extract_chunk_chars``, merged: entities interleaved and de-duplicated, summaries joined).
    Rows: ``source_id``, ``title``, ``summary``, ``entities``, ``raw`` (the answers), ``attempts``
    (the most any piece took), ``repaired``, ``pieces``, ``prompt_tokens``, ``completion_tokens``
    (all attempts). A piece still malformed after ``cfg.retries`` more attempts is counted
    (``stats["malformed"]``) and left out, a document none of whose pieces parsed with it
    (``malformed_docs``); a failed call is counted in ``failed`` (asked again on the next run)."""
    stats: dict[str, Any] = {"docs": len(docs), "pieces": 0, "requests": 0, "retried": 0, "malformed_answers": 0,
                             "malformed": 0, "malformed_docs": 0, "failed": 0, "repaired": 0, "entities": 0,
                             "no_entities": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
    by_id = {str(d["id"]): d for d in docs}
    units = {(str(d["id"]), u["_piece"]): u for d in by_id.values() for u in extraction_units(d, cfg)}
    stats["pieces"] = len(units)
    tokens: dict[str, list[int]] = {k: [0, 0] for k in by_id}
    parsed_units: dict[tuple[str, int], dict] = {}
    pending = [_extract_request(u, gen, cfg) for u in units.values()]
    for attempt in range(cfg.retries + 1):
        if not pending:
            break
        got, st = run_requests(pending, gen, out_dir, cfg.part_size)
        stats["requests"] += len(pending)
        stats["retried"] += len(pending) if attempt else 0
        stats["cost_usd"] += st["cost_usd"]
        answered = {r["key"]: r for r in got}
        retry = []
        for req in pending:
            r = answered.get(req.key)
            if r is None:  # the call failed: asked again on the next run
                stats["failed"] += 1
                continue
            t = tokens[req.source_id]
            t[0] += r["prompt_tokens"]
            t[1] += r["completion_tokens"]
            parsed, repaired = parse_entities(r["text"], cfg)
            if parsed is None:
                stats["malformed_answers"] += 1
                if attempt < cfg.retries:
                    retry.append(_extract_request(units[(req.source_id, req.draw)], gen, cfg, attempt + 1, r["text"]))
                else:
                    stats["malformed"] += 1
                continue
            stats["repaired"] += int(repaired)
            parsed_units[(req.source_id, req.draw)] = {**parsed, "raw": r["text"], "attempts": attempt + 1,
                                                       "repaired": repaired}
        pending = retry
    out = []
    for sid, d in by_id.items():
        got = [parsed_units[k] for k in sorted(k for k in parsed_units if k[0] == sid)]
        if not got:
            stats["malformed_docs"] += int(any(k[0] == sid for k in units))
            continue
        entities = clean_entities(_interleave([g["entities"] for g in got]), cfg.max_entities, cfg.max_entity_chars)
        out.append({"source_id": sid, "title": _title(d), "summary": " ".join(g["summary"] for g in got if g["summary"]),
                    "entities": entities, "raw": "\n".join(g["raw"] for g in got),
                    "attempts": max(g["attempts"] for g in got), "repaired": any(g["repaired"] for g in got),
                    "pieces": len(got), "prompt_tokens": tokens[sid][0], "completion_tokens": tokens[sid][1]})
    for r in out:
        stats["entities"] += len(r["entities"])
        stats["no_entities"] += int(not r["entities"])
    stats["prompt_tokens"] = sum(t[0] for t in tokens.values())
    stats["completion_tokens"] = sum(t[1] for t in tokens.values())
    log.info("entigraph extraction: %s", {k: v for k, v in stats.items()})
    return out, stats


# --------------------------------------------------------------------------- step 2: pairs, triplets
def _rng(rng: random.Random | int | str | None) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(0 if rng is None else rng)


def select_pairs(entities: Sequence[str], max_pairs: int | None = None, rng: random.Random | int | str | None = None,
                 *, token_budget: int | None = None, tokens_per_pair: int = 1
                 ) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """All entity pairs when they fit, else a seeded uniform sample of as many as fit: at most
    ``max_pairs``, and ``selected * tokens_per_pair <= token_budget``. Pairs come back in the
    order of ``itertools.combinations`` (whatever was sampled), with ``total`` / ``selected``
    / ``dropped`` counts."""
    total = math.comb(len(entities), 2)
    limit = total
    if max_pairs is not None:
        limit = min(limit, max_pairs)
    if token_budget is not None:
        limit = min(limit, token_budget // max(1, tokens_per_pair))
    combos = list(itertools.combinations(entities, 2))
    if limit < total:
        idx = sorted(_rng(rng).sample(range(total), limit))
        combos = [combos[i] for i in idx]
    return combos, {"total": total, "selected": len(combos), "dropped": total - len(combos)}


def select_triplets(entities: Sequence[str], n: int, rng: random.Random | int | str | None = None
                    ) -> tuple[list[tuple[str, str, str]], dict[str, int]]:
    """``n`` distinct triplets drawn uniformly (seeded; all of them when there are no more than
    ``n``), in entity order, with counts."""
    k = len(entities)
    total = math.comb(k, 3)
    r = _rng(rng)
    if n >= total:
        picks = list(itertools.combinations(range(k), 3))
    elif total <= 200_000:
        all_idx = list(itertools.combinations(range(k), 3))
        picks = sorted(all_idx[i] for i in r.sample(range(total), n))
    else:  # too many to list: rejection sampling of distinct sorted triples
        seen: set[tuple[int, int, int]] = set()
        while len(seen) < n:
            seen.add(tuple(sorted(r.sample(range(k), 3))))  # type: ignore[arg-type]
        picks = sorted(seen)
    out = [(entities[a], entities[b], entities[c]) for a, b, c in picks]
    return out, {"total": total, "selected": len(out), "dropped": total - len(out)}


def relation_requests(doc: dict, pairs: Sequence[Sequence[str]], triplets: Sequence[Sequence[str]],
                      gen: Generator, cfg: SynthConfig) -> list[Request]:
    """One request per pair and per triplet of one document."""
    sid = str(doc["id"])
    return [Request(sid, "pair" if len(ents) == 2 else "triplet", list(ents), relation_messages(doc, ents, cfg),
                    cfg.relation_sampling, gen.model)
            for ents in [*pairs, *triplets]]


def pair_tokens(doc: dict, cfg: SynthConfig) -> int:
    """Estimated tokens of one pair request (prompt + its completion limit), for the budget: the
    instructions plus the longest context a pair can get."""
    text = cut_text(doc["text"], cfg.max_doc_chars)
    longest = min(len(text), cfg.relation_context_chars or len(text))
    instructions = _prompt_chars(relation_messages({**doc, "text": ""}, ["x", "y"], cfg))
    return math.ceil((instructions + longest) / 4) + cfg.relation_sampling.max_new_tokens


def summary_row(entity_row: dict) -> dict | None:
    """A document's summary as a synthetic-corpus row (None when it has none)."""
    if not entity_row.get("summary"):
        return None
    sid = entity_row["source_id"]
    return {"id": f"{sid}#summary", "source_id": sid, "kind": "summary", "entities": [],
            "text": entity_row["summary"], "prompt_tokens": int(entity_row.get("prompt_tokens", 0)),
            "completion_tokens": int(entity_row.get("completion_tokens", 0))}


def _row(r: dict) -> dict:
    """A synthetic-corpus row from a request's answer."""
    return {"id": f"{r['source_id']}#{r['kind']}#{r['key'][:16]}", "source_id": r["source_id"], "kind": r["kind"],
            "entities": list(r["entities"]), "text": r["text"].strip(), "prompt_tokens": int(r["prompt_tokens"]),
            "completion_tokens": int(r["completion_tokens"])}


def _keep(rows: list[dict], stats: dict[str, Any]) -> list[dict]:
    """Drop empty answers (counted as malformed)."""
    out = [_row(r) for r in rows]
    kept = [r for r in out if r["text"]]
    stats["malformed"] = stats.get("malformed", 0) + len(out) - len(kept)
    return kept


def synthesize_relations(doc: dict, entity_row: dict, pairs: Sequence[Sequence[str]],
                         triplets: Sequence[Sequence[str]], gen: Generator, cfg: SynthConfig,
                         out_dir: str | Path | None = None, stats: dict[str, Any] | None = None,
                         include_summary: bool = True) -> list[dict]:
    """Step 2 for one document: one generation per pair and triplet (resumable under
    ``out_dir``), plus the document's summary as a ``summary`` row. Rows: ``id``,
    ``source_id``, ``kind`` (pair / triplet / summary), ``entities``, ``text``,
    ``prompt_tokens``, ``completion_tokens``. ``stats`` (if given) receives the counts."""
    got, st = run_requests(relation_requests(doc, pairs, triplets, gen, cfg), gen, out_dir, cfg.part_size)
    st = {k: v for k, v in st.items() if k != "errors"}
    rows = _keep(got, st)
    s = summary_row(entity_row) if include_summary else None
    if stats is not None:
        for k, v in st.items():
            stats[k] = stats.get(k, 0) + v
    return ([s] if s else []) + rows


# --------------------------------------------------------------------------- step 3: megadocs
_KIND_ORDER = {"summary": 0, "pair": 1, "triplet": 2}


def megadocs(rows: Sequence[dict], sep: str = "\n\n") -> list[dict]:
    """One long document per source id: its summary, then pair and triplet generations (then
    any other kinds, by name), each kind ordered by its entities, so the same rows always
    stitch into the same text. Token counts are summed; ``parts`` says how many were joined."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("text", "").strip():
            groups.setdefault(r["source_id"], []).append(r)
    out = []
    for sid in sorted(groups):
        g = sorted(groups[sid], key=lambda r: (_KIND_ORDER.get(r["kind"], 3), r["kind"],
                                               [e.casefold() for e in r.get("entities") or []], r["id"]))
        out.append({"id": f"{sid}#megadoc", "source_id": sid, "kind": "megadoc",
                    "entities": sorted({e for r in g for e in r.get("entities") or []}, key=str.casefold),
                    "text": sep.join(r["text"].strip() for r in g),
                    "prompt_tokens": sum(int(r.get("prompt_tokens", 0)) for r in g),
                    "completion_tokens": sum(int(r.get("completion_tokens", 0)) for r in g), "parts": len(g)})
    return out


# --------------------------------------------------------------------------- step 4: Rephrase baseline
def rephrase(docs: Sequence[dict], styles: Sequence[str], gen: Generator, cfg: SynthConfig,
             out_dir: str | Path | None = None, stats: dict[str, Any] | None = None) -> list[dict]:
    """The Rephrase baseline: ``cfg.rephrases_per_style`` rewrites of every document (or of each of
    its pieces, with ``rephrase_chunk_chars``) in every style, sampled with
    ``cfg.rephrase_sampling`` (temperature 1.0), rows of kind ``rephrase:<style>``."""
    n = cfg.rephrases_per_style
    reqs = [Request(str(d["id"]), f"rephrase:{s}", [], rephrase_messages(u, s, cfg), cfg.rephrase_sampling,
                    gen.model, draw=u["_piece"] * n + k)
            for d in docs for u in rephrase_units(d, cfg) for s in styles for k in range(n)]
    got, st = run_requests(reqs, gen, out_dir, cfg.part_size)
    st = {k: v for k, v in st.items() if k != "errors"}
    rows = _keep(got, st)
    if stats is not None:
        for k, v in st.items():
            stats[k] = stats.get(k, 0) + v
    return rows


# --------------------------------------------------------------------------- the whole synthesis
def synthesize(docs: Sequence[dict], gen: Generator, cfg: SynthConfig,
               out_dir: str | Path | None = None) -> tuple[list[dict], dict[str, Any]]:
    """EntiGraph over a corpus: extraction (``<out_dir>/entities``), pair / triplet selection
    (seeded per document), relation synthesis (``<out_dir>/relations``, one resumable request
    list over all documents), summaries, and megadocs when ``cfg.megadocs``. Returns the
    synthetic rows and the counts of every step."""
    out = Path(out_dir) if out_dir is not None else None
    ents, ex_stats = extract_entities(docs, gen, cfg, out / "entities" if out else None)
    by_id = {str(d["id"]): d for d in docs}
    reqs: list[Request] = []
    sel = {"pairs_total": 0, "pairs": 0, "pairs_dropped": 0, "triplets_total": 0, "triplets": 0,
           "triplets_dropped": 0}
    for e in ents:
        doc = by_id[e["source_id"]]
        rng = random.Random(f"{cfg.seed}:{e['source_id']}")
        pairs, p = select_pairs(e["entities"], cfg.max_pairs, rng, token_budget=cfg.pair_token_budget,
                                tokens_per_pair=pair_tokens(doc, cfg))
        trips, t = select_triplets(e["entities"], cfg.triplets, rng)
        for name, c in (("pairs", p), ("triplets", t)):
            sel[f"{name}_total"] += c["total"]
            sel[name] += c["selected"]
            sel[f"{name}_dropped"] += c["dropped"]
        reqs += relation_requests(doc, pairs, trips, gen, cfg)
    got, rel_stats = run_requests(reqs, gen, out / "relations" if out else None, cfg.part_size)
    rows = [s for s in (summary_row(e) for e in ents) if s] + _keep(got, rel_stats)
    if cfg.megadocs:
        rows = megadocs(rows)
    stats = {"extraction": ex_stats, "selection": sel, "relations": rel_stats, "rows": len(rows),
             "synthetic_completion_tokens": sum(r["completion_tokens"] for r in rows)}
    return rows, stats
