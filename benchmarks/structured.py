"""Grammar libraries for constrained decoding, side by side: xgrammar vs llguidance on the
SmolLM2-135M-Instruct tokenizer (49,152 tokens), plus our engine's path built on the winner
(``actors/engine/structured.py``).

    python benchmarks/structured.py                 # every installed library, 3 repeats
    python benchmarks/structured.py --steps 200 --repeats 5

For each spec (flat object with enum/int/string fields, nested object with arrays, any JSON
object, a regex, a choice) it measures:

- cold compile: grammar compile with no cache, plus the first mask, filled and applied
  (llguidance builds its lexer lazily, so compile alone would flatter it): the latency a new
  schema adds to a request;
- a constrained walk of ``--steps`` tokens with random logits (every step samples from the masked
  distribution, so strings, numbers, separators and ends are all exercised; the matcher restarts
  when its document is complete): per-token mask fill, mask apply on ``[1, V]`` logits and
  token accept, in microseconds;
- correctness: every completed document is checked (``jsonschema`` / full regex match / choice).

Writes ``benchmarks/results/structured.json``. A library that is not installed is skipped
(xgrammar is not a dependency: ``pip install xgrammar==0.2.9`` to compare).
Repeats are interleaved between libraries, so drift in machine load hits both alike.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A fresh inductor cache, so that llguidance's torch.compile'd apply is measured cold.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))

import torch  # noqa: E402

FLAT = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 30},
        "author": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 20},
                           "year": {"type": "integer", "minimum": 1900, "maximum": 2100}},
            "required": ["name", "year"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 4},
    },
    "required": ["title", "author", "tags"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{2,9} (0?[1-9]|[12][0-9]|3[01]), (19|20)[0-9]{2}"
CHOICE = ["positive", "negative", "neutral", "mixed feelings"]

# (name, kind, spec): kind is json_schema | json_object | regex | choice
SPECS: list[tuple[str, str, Any]] = [
    ("flat_object", "json_schema", FLAT),
    ("nested_object", "json_schema", NESTED),
    ("any_json_object", "json_object", None),
    ("regex_date", "regex", REGEX),
    ("choice", "choice", CHOICE),
]


def check(kind: str, spec: Any, text: str) -> bool:
    """Does a completed document belong to the language?"""
    if kind in ("json_schema", "json_object"):
        import jsonschema

        try:
            doc = json.loads(text)
        except ValueError:
            return False
        if kind == "json_object":
            return isinstance(doc, dict)
        return jsonschema.Draft202012Validator(spec).is_valid(doc)
    if kind == "regex":
        return re.fullmatch(spec, text) is not None
    return text in spec


# --------------------------------------------------------------------------- library adapters
class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab: int, stop: list[int]):
        import xgrammar as xgr

        self.xgr, self.vocab = xgr, vocab
        t0 = time.perf_counter()
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=stop)
        self.tokenizer_s = time.perf_counter() - t0
        self.threads = min(8, os.cpu_count() or 1)

    def version(self) -> str:
        from importlib.metadata import version

        return version("xgrammar")

    def compile(self, kind: str, spec: Any):
        c = self.xgr.GrammarCompiler(self.info, max_threads=self.threads, cache_enabled=False)
        if kind == "json_schema":
            return c.compile_json_schema(spec, any_whitespace=False, separators=(",", ":"))
        if kind == "json_object":
            return c.compile_json_schema({"type": "object"}, any_whitespace=False, separators=(",", ":"))
        if kind == "regex":
            return c.compile_regex(spec)
        return c.compile_regex("|".join(re.escape(s) for s in spec))

    def matcher(self, grammar):
        return self.xgr.GrammarMatcher(grammar)

    def alloc(self, batch: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(batch, self.vocab)

    def fill(self, m, bitmask: torch.Tensor, row: int) -> None:
        m.fill_next_token_bitmask(bitmask, row)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab)

    def accept(self, m, token: int) -> bool:
        return m.accept_token(token)

    def done(self, m) -> bool:
        return m.is_terminated()


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, vocab: int, stop: list[int]):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg, self.lt, self.vocab = llguidance, llguidance.torch, vocab
        t0 = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=stop[0])
        self.tokenizer_s = time.perf_counter() - t0

    def version(self) -> str:
        return self.llg.__version__

    def compile(self, kind: str, spec: Any):
        M = self.llg.LLMatcher
        opts = {"whitespace_flexible": False}
        if kind == "json_schema":
            g = M.grammar_from_json_schema(spec, overrides=opts)
        elif kind == "json_object":
            g = M.grammar_from_json_schema({"type": "object"}, overrides=opts)
        elif kind == "regex":
            g = M.grammar_from_regex(spec)
        else:
            g = M.grammar_from_lark("start: " + " | ".join(json.dumps(s) for s in spec))
        m = M(self.tok, g, log_level=0)  # the compile proper (lexer built lazily, on first mask)
        if m.is_error():
            raise ValueError(m.get_error())
        return g

    def matcher(self, grammar):
        return self.llg.LLMatcher(self.tok, grammar, log_level=0)

    def alloc(self, batch: int) -> torch.Tensor:
        return self.lt.allocate_token_bitmask(batch, self.vocab)

    def fill(self, m, bitmask: torch.Tensor, row: int) -> None:
        self.lt.fill_next_token_bitmask(m, bitmask, row)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.lt.apply_token_bitmask_inplace(logits, bitmask)

    def accept(self, m, token: int) -> bool:
        return m.consume_token(token)

    def done(self, m) -> bool:
        return m.is_stopped()


class Engine:
    """Our path (actors/engine/structured.py: llguidance + batched tensor-op apply), measured
    the same way: its ``apply`` is ``apply_constraints`` (mask fill and apply in one call)."""

    name = "selftaught"

    def __init__(self, tok, vocab: int, stop: list[int]):
        from actors.engine.structured import GrammarCache, apply_constraints

        self._apply = apply_constraints
        t0 = time.perf_counter()
        self.cache = GrammarCache(tok, vocab, stop_token_ids=stop)
        self.tokenizer_s = time.perf_counter() - t0
        self.vocab = vocab

    def version(self) -> str:
        from importlib.metadata import version

        return "llguidance " + version("llguidance")

    def compile(self, kind: str, spec: Any):
        from selftaught.config import StructuredOutput

        field = {"json_schema": "json_schema", "regex": "regex", "choice": "choice"}.get(kind)
        so = StructuredOutput(type=kind, **({field: spec} if field else {}))
        self.cache._entries.clear()  # cold
        self.cache.constraint(so)
        return so

    def matcher(self, so):
        return self.cache.constraint(so)

    def alloc(self, batch: int) -> list:
        return [None] * batch

    def fill(self, c, rows: list, row: int) -> None:
        rows[row] = c

    def apply(self, logits: torch.Tensor, rows: list) -> None:
        self._apply(logits, rows)

    def accept(self, c, token: int) -> bool:
        return c.accept(token)

    def done(self, c) -> bool:
        return c.is_terminated()


# --------------------------------------------------------------------------- measurements
def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def cold_compile(lib, kind: str, spec: Any) -> dict:
    """Compile with no cache, then the first mask of a fresh matcher (fill and apply)."""
    compile_s, grammar = timed(lambda: lib.compile(kind, spec))
    m = lib.matcher(grammar)
    bm, logits = lib.alloc(1), torch.randn(1, lib.vocab)
    first_mask_s, _ = timed(lambda: (lib.fill(m, bm, 0), lib.apply(logits, bm)))
    return {"compile_ms": compile_s * 1e3, "first_mask_ms": first_mask_s * 1e3,
            "total_ms": (compile_s + first_mask_s) * 1e3}


def walk(lib, tok, kind: str, spec: Any, steps: int, seed: int) -> dict:
    """``steps`` constrained tokens from random logits; restart the matcher on each document."""
    gen = torch.Generator().manual_seed(seed)
    grammar = lib.compile(kind, spec)
    m, ids = lib.matcher(grammar), []
    bm = lib.alloc(1)
    fill_t, apply_t, accept_t = [], [], []
    docs = valid = rejected = 0
    invalid: list[str] = []
    for _ in range(steps):
        logits = torch.randn(1, lib.vocab, generator=gen)
        t0 = time.perf_counter()
        lib.fill(m, bm, 0)
        t1 = time.perf_counter()
        lib.apply(logits, bm)
        t2 = time.perf_counter()
        gumbel = torch.rand(logits.shape, generator=gen).log_().neg_().log_().neg_()
        token = int((logits + gumbel).argmax())  # a sample from softmax(logits)
        t3 = time.perf_counter()
        ok = lib.accept(m, token)
        t4 = time.perf_counter()
        fill_t.append(t1 - t0), apply_t.append(t2 - t1), accept_t.append(t4 - t3)
        rejected += not ok
        ids.append(token)
        if lib.done(m):
            docs += 1
            text = tok.decode([i for i in ids if i not in STOP], skip_special_tokens=False)
            ok_doc = check(kind, spec, text)
            valid += ok_doc
            if not ok_doc and len(invalid) < 3:
                invalid.append(text)
            m, ids = lib.matcher(grammar), []

    def us(xs: list[float]) -> dict:
        xs = sorted(xs)
        return {"mean": statistics.fmean(xs) * 1e6, "p50": xs[len(xs) // 2] * 1e6,
                "p99": xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1e6}

    return {"fill_us": us(fill_t), "apply_us": us(apply_t), "accept_us": us(accept_t),
            "per_token_us": statistics.fmean(f + a + c for f, a, c in zip(fill_t, apply_t, accept_t)) * 1e6,
            "documents": docs, "valid_documents": valid, "rejected_tokens": rejected,
            "invalid_examples": invalid}


def batched_apply(lib, batch: int, repeats: int = 50) -> float:
    """Microseconds to apply a full mask to ``[batch, V]`` logits (one call; for ours, the mask
    fill of ``batch`` fresh nested-object rows is included)."""
    bm = lib.alloc(batch)
    if isinstance(bm, torch.Tensor):
        bm.random_(-(2 ** 31), 2 ** 31 - 1)
    else:
        so = lib.compile("json_schema", NESTED)
        bm[:] = [lib.matcher(so) for _ in range(batch)]
    logits = torch.randn(batch, lib.vocab)
    lib.apply(logits.clone(), bm)  # warm-up (llguidance's torch.compile kernel compiles here)
    ts = []
    for _ in range(repeats):
        x = logits.clone()
        ts.append(timed(lambda: lib.apply(x, bm))[0])
    return statistics.median(ts) * 1e6


STOP: set[int] = set()


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "os": platform.platform()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: masking ops are small, and a shared 2-core "
                         "machine makes the thread pool's synchronisation the cost)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "structured.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from selftaught.models import SMOLLM2, load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path(SMOLLM2))
    vocab = len(tok)
    stop = [tok.eos_token_id]
    STOP.update(stop)

    libs = []
    for cls in (XGrammar, LLGuidance, Engine):
        try:
            libs.append(cls(tok, vocab, stop))
        except ImportError as e:
            print(f"skip {cls.name}: {e}", file=sys.stderr)
    # warm the apply kernels once (llguidance's CPU apply is a torch.compile'd function)
    apply_warmup_ms = {}
    for lib in libs:
        apply_warmup_ms[lib.name] = timed(lambda: lib.apply(torch.randn(1, vocab), lib.alloc(1)))[0] * 1e3

    rows: dict[str, dict[str, list[dict]]] = {lib.name: {n: [] for n, _, _ in SPECS} for lib in libs}
    for r in range(args.repeats):
        for name, kind, spec in SPECS:
            for lib in libs:
                c = cold_compile(lib, kind, spec)
                w = walk(lib, tok, kind, spec, args.steps, seed=r)
                rows[lib.name][name].append({**c, **w})

    def med(xs: list[dict], *path: str) -> float:
        vals = []
        for x in xs:
            for p in path:
                x = x[p]
            vals.append(x)
        return statistics.median(vals)

    summary: dict[str, dict] = {}
    for lib in libs:
        per = {}
        for name, _, _ in SPECS:
            xs = rows[lib.name][name]
            per[name] = {
                "cold_compile_ms": med(xs, "compile_ms"), "first_mask_ms": med(xs, "first_mask_ms"),
                "compile_plus_first_mask_ms": med(xs, "total_ms"),
                "fill_us": med(xs, "fill_us", "mean"), "fill_p99_us": med(xs, "fill_us", "p99"),
                "apply_us": med(xs, "apply_us", "mean"), "accept_us": med(xs, "accept_us", "mean"),
                "per_token_us": med(xs, "per_token_us"),
                "documents": sum(x["documents"] for x in xs), "valid_documents": sum(x["valid_documents"] for x in xs),
                "rejected_tokens": sum(x["rejected_tokens"] for x in xs),
                "invalid_examples": [e for x in xs for e in x["invalid_examples"]][:3],
            }
        summary[lib.name] = {"version": lib.version(), "tokenizer_setup_ms": lib.tokenizer_s * 1e3,
                             "apply_first_call_ms": apply_warmup_ms[lib.name],
                             "apply_batch16_us": batched_apply(lib, 16), "specs": per}

    ratios = {}
    if "xgrammar" in summary:  # every other row against xgrammar
        a = summary["xgrammar"]
        for lib in libs[1:]:
            b = summary[lib.name]
            ratios[f"{lib.name}/xgrammar"] = {
                name: {k: round(b["specs"][name][k] / a["specs"][name][k], 2)
                       for k in ("compile_plus_first_mask_ms", "fill_us", "apply_us", "per_token_us")
                       if a["specs"][name][k] > 0 and b["specs"][name][k] > 0}
                for name, _, _ in SPECS}

    result = {"benchmark": "structured", "tokenizer": SMOLLM2, "vocab": vocab, "steps": args.steps,
              "repeats": args.repeats, "machine": machine(),
              "specs": {n: {"kind": k, "spec": s} for n, k, s in SPECS},
              "summary": summary, "ratios": ratios, "runs": rows,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({"machine": result["machine"], "summary": summary, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
