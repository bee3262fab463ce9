"""The EntiGraph pipeline end to end on tiny models (pipelines/entigraph.py): two Factbook
countries; the generator through litellm (its own ``mock_response``, answering each prompt from
the document it names, priced so the ledger records dollars); continued pretraining of the tiny
LM under Ray Train with replay; closed-book and open-book evaluation; the report. A rerun does
nothing again and pays nothing. The local engine backend has its own test in
tests/test_entigraph_synth.py."""
from __future__ import annotations

import json
import re
from pathlib import Path

import litellm
import pytest

from pipelines.entigraph import EntiGraphConfig, arm_budget, loglinear_fit, plan, run
from pipelines.entigraph_synth import EXTRACT_SYSTEM, RELATION_SYSTEM
from selftaught.config import load_yaml

_REAL_COMPLETION = litellm.completion


def _answer(messages) -> str:
    """A faithful generator: entities are the document's capitalised words, a relation text
    repeats the document's lines that mention them, a rephrasing repeats its first lines."""
    user = str(messages[-1]["content"])
    if messages[0]["content"] == EXTRACT_SYSTEM:
        words = list(dict.fromkeys(re.findall(r"\b[A-Z][a-z]{3,}\b", user)))[2:8]
        return json.dumps({"summary": user[-200:], "entities": words})
    lines = [ln for ln in user.splitlines() if ln.strip()]
    if messages[0]["content"] == RELATION_SYSTEM:
        names = re.findall(r'"([^"]+)"', user)
        return "\n".join(ln for ln in lines if any(n in ln for n in names))[:600] or lines[-1]
    return "\n".join(lines[-6:])


def _cfg(tmp_path, base) -> EntiGraphConfig:
    return EntiGraphConfig.model_validate({
        "run_dir": str(tmp_path / "eg"),
        "corpus": {"limit": 2, "questions_per_doc": 4, "max_doc_chars": 700},
        "generator": {"backend": "litellm", "cache": str(tmp_path / "llm.sqlite"), "concurrency": 4,
                      "llm": {"model": "openai/test-generator", "mock_response": "unused", "max_retries": 0,
                              "input_price_per_mtok": 1.0, "output_price_per_mtok": 2.0, "role": "entigraph"}},
        "caps": {"total_usd": 5.0},
        "synth": {"max_entities": 4, "max_pairs": 2, "triplets": 1, "styles": ["easy"], "retries": 0,
                  "extract_sampling": {"temperature": 0.0, "max_new_tokens": 96},
                  "relation_sampling": {"temperature": 1.0, "max_new_tokens": 24, "seed": 0},
                  "rephrase_sampling": {"temperature": 1.0, "max_new_tokens": 24, "seed": 0}},
        "cpt": {"base_model": str(base), "epochs": 1.0, "replay_docs": 50, "fractions": [1.0],
                "arms": ["entigraph", "raw"],
                "train": {"lr": 1e-3, "seq_len": 64, "micro_batch_size": 2, "schedule": "constant",
                          "warmup_frac": 0.0, "eval_every": 1000, "checkpoint_every": 1000, "progress": False}},
        "eval": {"device": "cpu", "batch_size": 8, "rag": {"k": 2, "top_k": 4}},
        "rag_arms": ["entigraph"],
    })


def test_entigraph_runs_end_to_end_and_resumes(ray_cluster, tmp_path, tiny_lm_dir, monkeypatch):
    calls = []

    def completion(**kw):
        calls.append(kw)
        return _REAL_COMPLETION(**{**kw, "mock_response": _answer(kw["messages"])})

    monkeypatch.setattr(litellm, "completion", completion)
    cfg = _cfg(tmp_path, tiny_lm_dir)
    out = run(cfg)
    root = Path(out["run_dir"])
    res = json.loads((root / "results.json").read_text())
    assert res["documents"] == 2 and res["questions"] > 0
    syn = res["synthesis"]
    assert syn["extraction"]["docs"] == 2 and syn["extraction"]["malformed"] == 0
    # per document: 2 pairs and 1 triplet of its 4 entities, and its summary (no rephrase arm here)
    assert syn["selection"]["pairs"] == 4 and syn["selection"]["triplets"] == 2 and syn["rows"] == 8
    paid = len(calls)
    assert paid == 2 + 6 and res["plan"]["max_calls_total"] >= paid and res["plan"]["worst_case_usd"] > 0
    assert 0 < res["spent"]["total"]["usd"] <= res["plan"]["worst_case_usd"]
    # the arms at equal tokens: one budget, each trained for it; the RAG arm also read the corpus
    assert set(res["arms"]) == {"entigraph", "raw"}
    for arm in res["arms"].values():
        assert arm["budget_tokens"] == res["budget_tokens"] and arm["niche_tokens"] > 0
        cb = arm["eval"]["closed_book"]
        assert cb["n"] == res["questions"] and 0 <= cb["loglik_acc"] <= 1
        assert arm["eval"]["heldout_ppl"] > 1
    assert res["arms"]["entigraph"]["eval"]["open_book"]["n"] == res["questions"]
    assert "open_book" not in res["arms"]["raw"]["eval"] and "open_book" not in res["base"]
    report = (root / "report.md").read_text()
    assert report.startswith("# EntiGraph") and (root / "entigraph.png").stat().st_size
    # every stage's wall clock, in results and in the report's table
    assert {"corpus", "synthesis", "corpora", "cpt_entigraph", "eval_raw"} <= set(res["seconds"])
    assert all(v is not None and v >= 0 for v in res["seconds"].values()) and "| total |" in report
    assert res["loglinear"] is None  # one fraction: no line to fit
    # a rerun: every stage up to date, nothing generated or trained again
    marks = {p: p.stat().st_mtime for p in root.glob("*/_STAGE.json")}
    run(cfg)
    assert {p: p.stat().st_mtime for p in root.glob("*/_STAGE.json")} == marks and len(calls) == paid


def test_budget_and_configs(tmp_path):
    class _C:  # the corpora stage's outputs, as its marker stores them
        outputs = {"entigraph": {"tokens": 9000}}

    cfg = EntiGraphConfig.model_validate({"cpt": {"epochs": 2.0, "replay": 0.1}})
    assert arm_budget(cfg, _C) == 20000  # 2 passes, replay on top
    with pytest.raises(ValueError, match="fractions"):
        EntiGraphConfig.model_validate({"cpt": {"fractions": [0.5]}})
    with pytest.raises(ValueError, match="entigraph"):
        EntiGraphConfig.model_validate({"cpt": {"arms": ["raw"]}})
    for name in ("tiny.yaml", "paper.yaml"):
        EntiGraphConfig.model_validate(load_yaml(Path("examples/entigraph") / name))
    # options added later stay out of the stage fingerprints at their "as before" values, so an
    # existing run directory is not cleared (and its answers paid for again) by an upgrade
    from pipelines.entigraph import _fingerprint

    synth = EntiGraphConfig().synth.model_dump()
    assert "relation_context_chars" not in _fingerprint(synth) and "max_pairs" in _fingerprint(synth)
    assert _fingerprint({**synth, "relation_context_chars": 900})["relation_context_chars"] == 900
    assert "heldout_docs" not in _fingerprint(EntiGraphConfig().eval.model_dump())


def test_plan_counts_pieces_and_prices_the_shorter_prompts():
    docs = [{"id": f"d{i}", "title": f"D{i}", "text": "A sentence about the coast and its ports. " * 100}
            for i in range(3)]  # 4,200 characters each
    llm = {"model": "openai/local-test", "mock_response": "x", "input_price_per_mtok": 1e6,
           "output_price_per_mtok": 1e6}
    base = {"generator": {"backend": "litellm", "llm": llm},
            "synth": {"max_doc_chars": 4000, "max_pairs": 4, "triplets": 1, "retries": 0, "styles": ["easy", "hard"]}}
    whole = plan(EntiGraphConfig.model_validate(base), docs)
    assert whole["max_calls"] == {"extraction": 3, "relations": 15, "rephrase": 6}
    pieces = {**base, "synth": {**base["synth"], "extract_chunk_chars": 1000, "rephrase_chunk_chars": 2000,
                                "relation_context_chars": 1000}}
    cut = plan(EntiGraphConfig.model_validate(pieces), docs)
    # cut at sentence ends: 3,989 characters in 5 extraction pieces (4 x 965 + 125) and 3 rephrase
    # pieces (2 x 1,973 + 41) per document
    assert cut["max_calls"] == {"extraction": 15, "relations": 15, "rephrase": 18}
    assert cut["worst_case_usd"] > whole["worst_case_usd"]  # more calls, each with instructions
    # relation prompts of 1,000 characters instead of 4,000: the worst case falls
    short = plan(EntiGraphConfig.model_validate({**base, "synth": {**base["synth"], "relation_context_chars": 1000}}),
                 docs)
    assert short["max_calls"] == whole["max_calls"] and 0 < short["worst_case_usd"] < whole["worst_case_usd"]


def test_loglinear_fit_by_hand():
    # 0.30, 0.40, 0.50 at 1e3, 1e4, 1e5 tokens: +0.1 per decade, intercept 0, a straight line
    fit = loglinear_fit([(1e3, 0.30), (1e4, 0.40), (1e5, 0.50)])
    assert fit["points"] == 3 and abs(fit["slope_per_decade"] - 0.1) < 1e-12 and abs(fit["intercept"]) < 1e-12
    assert abs(fit["r2"] - 1.0) < 1e-12
    # a bent one: 0.3, 0.5, 0.5: slope (0.5-0.3)/2 = 0.1, mean 13/30, residuals -1/30, +2/30, -1/30
    bent = loglinear_fit([(1e3, 0.3), (1e4, 0.5), (1e5, 0.5)])
    assert abs(bent["slope_per_decade"] - 0.1) < 1e-12
    assert abs(bent["r2"] - (1 - (6 / 900) / (0.08 / 3))) < 1e-9  # 1 - SSres/SStot = 0.75
    assert loglinear_fit([(1e3, 0.3)]) is None and loglinear_fit([(1e3, 0.3), (1e3, 0.4)]) is None
