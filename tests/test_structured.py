"""Constrained decoding on the real SmolLM2 tokenizer: random walks (seeded random logits,
sampled from the masked distribution) always end in documents of the requested language."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import types
from dataclasses import dataclass

import jsonschema
import pytest
import torch

from actors.engine.structured import (Constraint, GrammarCache, apply_constraints, strict_schema,
                                      vllm_structured_kwargs)
from selftaught.config import StructuredOutput

FLAT = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "active"],
}
NESTED = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 16},
        "author": {"type": "object",
                   "properties": {"name": {"type": "string", "maxLength": 10},
                                  "year": {"type": "integer", "minimum": 1900, "maximum": 2100}},
                   "required": ["name", "year"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "score": {"type": "number"},
    },
    "required": ["title", "author", "tags"],
}
REGEX = r"[A-Z][a-z]{2,8} (0?[1-9]|[12][0-9]|3[01]), (19|20)[0-9]{2}"
CHOICE = ["positive", "negative", "neutral", "mixed feelings"]
STEP_CAP = 400


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Single-threaded torch: these are tiny ops, and on a loaded 2-core machine the intra-op
    pool's synchronisation costs 20 ms per op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    from selftaught.models import SMOLLM2, load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path(SMOLLM2))


@pytest.fixture(scope="module")
def cache(tok):
    return GrammarCache(tok, len(tok), stop_token_ids=[tok.eos_token_id])


def walk(cache: GrammarCache, spec: StructuredOutput, seed: int, bias: torch.Tensor | None = None) -> list[int]:
    """Sample from masked random logits until the row is complete; returns the token ids
    (without the stop token)."""
    gen = torch.Generator().manual_seed(seed)
    c, ids = cache.constraint(spec), []
    for _ in range(STEP_CAP):
        logits = torch.randn(1, cache.vocab_size, generator=gen)
        if bias is not None:
            logits += bias
        apply_constraints(logits, [c])
        # a sample from softmax(logits): Gumbel-max, exact and 4x cheaper than torch.multinomial
        gumbel = torch.rand(logits.shape, generator=gen).log_().neg_().log_().neg_()
        t = int((logits + gumbel).argmax())
        assert c.accept(t)
        if t in cache.stop_token_ids:
            assert c.is_terminated()
            return ids
        ids.append(t)
    raise AssertionError(f"no end after {STEP_CAP} steps: {ids[:50]}")


def _whitespace_outside_strings(text: str) -> bool:
    in_str = esc = False
    for ch in text:
        if in_str:
            esc, in_str = (False, True) if esc else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch.isspace():
            return True
    return False


@pytest.mark.parametrize("schema", [FLAT, NESTED], ids=["flat", "nested"])
def test_json_schema_walks_parse_and_validate(cache, tok, schema):
    spec = StructuredOutput(type="json_schema", json_schema=schema)
    validator = jsonschema.Draft202012Validator(schema)
    for seed in range(100):
        text = tok.decode(walk(cache, spec, seed))
        doc = json.loads(text)  # strict: raw control characters in strings would fail here
        validator.validate(doc)
        assert set(doc) <= set(schema["properties"])  # strict objects: no invented keys
        assert not _whitespace_outside_strings(text)  # compact JSON


def test_json_object_walks_parse(cache, tok):
    # Random logits rarely close an open string: favour the tokens that end strings and containers.
    bias = torch.zeros(cache.vocab_size)
    for i in range(len(tok)):
        if any(ch in tok.decode([i]) for ch in '"}]'):
            bias[i] = 6.0
    spec = StructuredOutput(type="json_object")
    for seed in range(20):
        assert isinstance(json.loads(tok.decode(walk(cache, spec, seed, bias))), dict)


def test_regex_and_choice_walks_match(cache, tok):
    rx = StructuredOutput(type="regex", regex=REGEX)
    ch = StructuredOutput(type="choice", choice=CHOICE)
    for seed in range(30):
        assert re.fullmatch(REGEX, tok.decode(walk(cache, rx, seed)))
        assert tok.decode(walk(cache, ch, seed)) in CHOICE


def test_only_stop_tokens_once_complete(tok):
    stops = [tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")]
    cache = GrammarCache(tok, len(tok), stop_token_ids=stops)
    c = cache.constraint(StructuredOutput(type="json_schema", json_schema={
        "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}))
    for t in tok.encode('{"ok":true}', add_special_tokens=False):
        assert c.accept(t)
    assert c.is_terminated()
    logits = torch.zeros(1, cache.vocab_size)
    apply_constraints(logits, [c])
    assert sorted(torch.isfinite(logits[0]).nonzero().flatten().tolist()) == sorted(stops)
    assert not c.accept(tok.encode("x", add_special_tokens=False)[0])
    assert c.accept(stops[1])


def test_forbidden_token_is_refused_without_killing_the_row(cache, tok):
    c = cache.constraint(StructuredOutput(type="choice", choice=["yes", "no"]))
    assert not c.accept(tok.encode("maybe", add_special_tokens=False)[0])
    assert not c.accept(tok.eos_token_id)  # nothing chosen yet: EOS is not allowed either
    assert c.accept(tok.encode("yes", add_special_tokens=False)[0]) and c.is_terminated()


def test_rollback_restores_the_mask(cache, tok):
    c = cache.constraint(StructuredOutput(type="json_schema", json_schema=FLAT))
    prefix = tok.encode('{"name":"Al', add_special_tokens=False)
    for t in prefix:
        assert c.accept(t)
    before = torch.zeros(1, cache.vocab_size)
    apply_constraints(before, [c])
    for t in tok.encode('ice","age":4', add_special_tokens=False):
        assert c.accept(t)
    c.rollback(len(tok.encode('ice","age":4', add_special_tokens=False)))
    after = torch.zeros(1, cache.vocab_size)
    apply_constraints(after, [c])
    assert torch.equal(before, after)


@pytest.mark.parametrize("spec", [
    StructuredOutput(type="json_schema", json_schema={"type": "nonsense"}),
    StructuredOutput(type="json_schema", json_schema={"type": "object", "properties": {"a": {"$ref": "#/missing"}}}),
    StructuredOutput(type="json_schema", json_schema={"type": "object", "properties": {"a": False}, "required": ["a"]}),
    StructuredOutput(type="regex", regex="([a-z"),
    StructuredOutput(type="regex", regex="(?<=a)b"),  # look-around: not a regular language here
], ids=["type", "ref", "unsatisfiable", "unclosed", "lookbehind"])
def test_invalid_specs_raise_value_error(cache, spec):
    with pytest.raises(ValueError, match=f"invalid {spec.type} response format"):
        cache.constraint(spec)


def test_cache_is_bounded_lru_and_thread_safe(tok):
    cache = GrammarCache(tok, len(tok), max_entries=3)
    specs = [StructuredOutput(type="choice", choice=[f"option {i}", "other"]) for i in range(5)]
    for s in specs[:3]:
        cache.constraint(s)
    cache.constraint(specs[0])  # refresh: specs[1] is now the oldest
    cache.constraint(specs[3])
    assert len(cache) == 3
    assert set(cache._entries) == {specs[0].key(), specs[2].key(), specs[3].key()}

    errors: list[BaseException] = []

    def hammer(k: int) -> None:
        try:
            for i in range(20):
                c = cache.constraint(specs[(k + i) % 5])
                assert isinstance(c, Constraint) and c.accept(tok.encode("option", add_special_tokens=False)[0])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(cache) == 3


def test_apply_constraints_leaves_unconstrained_rows_untouched(cache):
    c1 = cache.constraint(StructuredOutput(type="choice", choice=CHOICE))
    c2 = cache.constraint(StructuredOutput(type="regex", regex=r"[0-9]+"))
    logits = torch.randn(4, cache.vocab_size, dtype=torch.float32)
    ref = logits.clone()
    apply_constraints(logits, [c1, None, c2, None])
    assert torch.equal(logits[1], ref[1]) and torch.equal(logits[3], ref[3])
    for row, c in ((0, c1), (2, c2)):
        ok = torch.isfinite(logits[row])
        assert 0 < int(ok.sum()) < 1000
        assert torch.equal(logits[row][ok], ref[row][ok])  # allowed logits keep their values
    same = ref.clone()
    apply_constraints(same, [None] * 4)
    assert torch.equal(same, ref)
    bf = ref[:2].to(torch.bfloat16)
    apply_constraints(bf, [None, c1])
    assert torch.equal(bf[0], ref[0].to(torch.bfloat16)) and int(torch.isfinite(bf[1]).sum()) < 1000
    with pytest.raises(ValueError):
        apply_constraints(torch.zeros(2, cache.vocab_size), [c1])


def test_bitmask_expansions_agree():
    from actors.engine.structured import _banned, _banned_bitops

    gen = torch.Generator().manual_seed(0)
    for vocab in (64, 49152, 49152 + 17):
        mask = torch.randint(-2 ** 31, 2 ** 31 - 1, (3, (vocab + 31) // 32), dtype=torch.int32, generator=gen)
        cpu = _banned(mask, vocab, torch.device("cpu"))
        assert cpu.shape == (3, vocab)
        assert torch.equal(cpu, _banned_bitops(mask, vocab, torch.device("cpu")))
        assert bool(cpu[0, 5]) == (not (int(mask[0, 0]) >> 5) & 1)


@pytest.mark.gpu
def test_apply_constraints_on_cuda_matches_cpu(cache):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cs = [cache.constraint(StructuredOutput(type="json_schema", json_schema=FLAT)), None,
          cache.constraint(StructuredOutput(type="choice", choice=CHOICE))]
    logits = torch.randn(3, cache.vocab_size)
    gpu = logits.to("cuda", torch.bfloat16)
    apply_constraints(logits, cs)
    apply_constraints(gpu, cs)
    assert torch.equal(torch.isinf(gpu.cpu()), torch.isinf(logits))


def test_padded_vocab_rows_are_never_allowed(tok):
    cache = GrammarCache(tok, len(tok) + 64)
    c = cache.constraint(StructuredOutput(type="json_object"))
    logits = torch.zeros(1, len(tok) + 64)
    apply_constraints(logits, [c])
    assert torch.isinf(logits[0, len(tok):]).all() and torch.isfinite(logits[0, :len(tok)]).any()


def test_strict_schema_closes_objects_without_mutating():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}}},
                                               "c": {"type": "array", "items": {"properties": {"d": {}}}},
                                               "e": {"type": "object", "properties": {}, "additionalProperties": True}},
              "$defs": {"x": {"properties": {"y": {}}}}, "allOf": [{"properties": {"z": {}}}]}
    original = json.dumps(schema, sort_keys=True)
    out = strict_schema(schema)
    assert json.dumps(schema, sort_keys=True) == original
    assert out["additionalProperties"] is False
    assert out["properties"]["a"]["additionalProperties"] is False
    assert out["properties"]["c"]["items"]["additionalProperties"] is False
    assert out["properties"]["e"]["additionalProperties"] is True
    assert out["$defs"]["x"]["additionalProperties"] is False
    assert "additionalProperties" not in out["allOf"][0]


@dataclass
class _FakeParams:
    json: object = None
    regex: str | None = None
    choice: list | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False


def test_vllm_kwargs_dispatch(monkeypatch):
    new = types.ModuleType("vllm.sampling_params")
    new.StructuredOutputsParams = _FakeParams
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", new)
    kw = vllm_structured_kwargs(StructuredOutput(type="json_schema", json_schema=FLAT))
    p = kw["structured_outputs"]
    assert p.json == strict_schema(FLAT) and p.disable_any_whitespace
    assert vllm_structured_kwargs(StructuredOutput(type="json_object"))["structured_outputs"].json_object is True
    assert vllm_structured_kwargs(StructuredOutput(type="regex", regex="a+"))["structured_outputs"].regex == "a+"

    @dataclass
    class OldParams:  # older vLLM: no whitespace option, different keyword
        json: object = None
        regex: str | None = None
        choice: list | None = None
        json_object: bool | None = None

    old = types.ModuleType("vllm.sampling_params")
    old.GuidedDecodingParams = OldParams
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", old)
    kw = vllm_structured_kwargs(StructuredOutput(type="choice", choice=CHOICE))
    assert list(kw) == ["guided_decoding"] and kw["guided_decoding"].choice == CHOICE
    assert vllm_structured_kwargs(StructuredOutput(type="json_object"))["guided_decoding"].json_object is True


def test_module_imports_without_the_grammar_library():
    code = "import sys, actors.engine.structured; assert 'llguidance' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
