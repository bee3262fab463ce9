"""EntiGraph: learn a small niche corpus by continued pretraining on synthetic text about its
entities (thesis chapter 2), against Raw and Rephrase baselines at equal tokens, evaluated
closed-book and open-book (``selftaught run -c examples/entigraph/tiny.yaml``).

Stages (each resumable; a changed setting reruns what it affects):

1. ``corpus``: the niche documents (the bundled World Factbook by default, or your Parquet
   corpus) cut to ``corpus.max_doc_chars`` (the generator's context), and the multiple-choice
   questions whose answers survive the cut (a question the corpus cannot answer is dropped and
   counted).
2. ``entities``: per document, ``{summary, entities}`` from the generator.
3. ``relations``: texts on entity pairs and triplets in the document's context; with the
   summaries, the EntiGraph corpus. ``megadocs`` stitches each document's generations.
4. ``rephrase``: the Rephrase baseline's rewritings in several styles.
5. ``corpora``: every arm's text tokenised with the base model's tokenizer; token counts.
6. ``cpt_<arm>``: continued pretraining of the base model under Ray Train with replay of
   generic text (bundled Wikipedia) with probability ``cpt.replay`` per batch. Every arm sees
   the same number of tokens: ``cpt.epochs`` passes over the full EntiGraph corpus; the
   scaling arms see a fraction of it as many times.
7. ``eval_<arm>``: closed-book accuracy (option log-likelihood), open-book (RAG) for the base
   model and the full EntiGraph arm, perplexity on held-out generic text (forgetting).
8. ``report.md``, ``results.json``, ``entigraph.png`` (accuracy against synthetic tokens).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipelines import entigraph_eval, entigraph_synth
from pipelines.entigraph_eval import EvalConfig
from pipelines.entigraph_synth import GeneratorConfig, SynthConfig
from selftaught.config import RayConfig, Strict, save
from selftaught.data.prepare import DataConfig, load_questions, prepare
from selftaught.ledger import BudgetCaps
from selftaught.storage import RunDir, Stage, file_fingerprint, read_parquet, write_parquet
from trainers.config import TrainConfig

log = logging.getLogger(__name__)

Arm = Literal["entigraph", "megadocs", "raw", "rephrase"]


class CorpusConfig(Strict):
    """The niche corpus: the Factbook (``documents: null``) or your Parquet documents with, if
    you have them, your questions (our QUESTION_SCHEMA: question, four choices, answer_index)."""

    documents: str | None = None
    questions: str | None = None
    limit: int | None = Field(default=8, ge=1)  # Factbook countries
    questions_per_doc: int = Field(default=8, ge=1)
    max_doc_chars: int = Field(default=4000, ge=200)  # each document is cut to this before anything reads it
    seed: int = 0


class CPTConfig(Strict):
    base_model: str = "smollm2-135m-instruct"  # packaged name or a Hugging Face checkpoint directory
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(
        lr=3e-5, schedule="cosine", warmup_frac=0.05, weight_decay=0.0, seq_len=512, micro_batch_size=4,
        eval_every=1000, checkpoint_every=200, progress=False))
    epochs: float = Field(default=2.0, gt=0)  # passes over the full EntiGraph corpus: every arm's budget
    replay: float = Field(default=0.1, ge=0, lt=1)  # generic text per batch (forgetting)
    replay_docs: int = Field(default=2000, ge=1)
    fractions: list[float] = Field(default_factory=lambda: [0.25, 0.5, 1.0])  # of the EntiGraph corpus
    arms: list[Arm] = Field(default_factory=lambda: ["entigraph", "megadocs", "raw", "rephrase"])

    @model_validator(mode="after")
    def _check(self) -> "CPTConfig":
        if any(not 0 < f <= 1 for f in self.fractions) or 1.0 not in self.fractions:
            raise ValueError("cpt.fractions: each in (0, 1], and 1.0 among them (the full corpus)")
        if "entigraph" not in self.arms:
            raise ValueError("cpt.arms must include entigraph: the others are compared with it")
        return self


# --------------------------------------------------------------------------- 1. corpus
def _answer_in(text: str, answer: str) -> bool:
    from selftaught.data.factbook import _padded

    return _padded(answer) in _padded(text)


def corpus_stage(run: RunDir, cfg: "EntiGraphConfig", data_dir: Path) -> Stage:
    """Documents cut to ``max_doc_chars`` and the questions they still answer."""
    c = cfg.corpus
    inputs = {k: file_fingerprint(p) for k, p in (("documents", c.documents), ("questions", c.questions)) if p}
    st = run.stage("corpus", c, inputs=inputs)
    if st.up_to_date():
        return st
    st.begin(keep_partial=False)
    if c.documents:
        from selftaught.data.prepare import load_documents

        docs = load_documents(c.documents).to_pylist()[: c.limit] if c.limit else load_documents(c.documents).to_pylist()
        questions = load_questions(c.questions) if c.questions else []
    else:  # questions were built over every country (their distractors come from the others)
        fb = data_dir / "factbook"
        docs = read_parquet(fb / "documents.parquet").to_pylist()[: c.limit]
        keep = {d["id"] for d in docs}
        questions = [q for q in load_questions(fb / "questions.parquet") if q["doc_id"] in keep]
    for d in docs:
        d["text"] = d["text"][: c.max_doc_chars]
    by_id = {d["id"]: d for d in docs}
    kept, dropped = [], {"document_not_in_corpus": 0, "answer_cut_off": 0}
    for q in questions:
        doc = by_id.get(q.get("doc_id"))
        if doc is None:
            dropped["document_not_in_corpus"] += 1
        elif q.get("answer") and not _answer_in(doc["text"], q["answer"]):
            dropped["answer_cut_off"] += 1
        else:
            kept.append(q)
    write_parquet(docs, st.path / "documents.parquet")
    if kept:
        from selftaught.data.schema import QUESTION_SCHEMA
        import pyarrow as pa

        write_parquet(pa.Table.from_pylist(kept, schema=QUESTION_SCHEMA), st.path / "questions.parquet")
    st.finish(documents=len(docs), questions=len(kept), dropped_questions=dropped,
              chars=sum(len(d["text"]) for d in docs))
    return st


def documents(corpus: Stage) -> list[dict]:
    return read_parquet(corpus.path / "documents.parquet").to_pylist()


def questions(corpus: Stage) -> list[dict]:
    p = corpus.path / "questions.parquet"
    return load_questions(p) if p.exists() else []


# --------------------------------------------------------------------------- 5. corpora
def corpora_stage(run: RunDir, cfg: "EntiGraphConfig", corpus: Stage, synthetic: dict[str, Stage]) -> Stage:
    """Each arm's documents tokenised with the base model's tokenizer (EOS-terminated), with
    token counts: the unit every comparison is matched on."""
    from pipelines.stages import tokens_stage
    from selftaught.models import resolve_model_path

    paths = {"raw": corpus.path / "documents.parquet",
             **{name: stage.path / f"{name}.parquet" for name, stage in synthetic.items()}}
    stages = list({id(s): s for s in synthetic.values()}.values())
    return tokens_stage(run, resolve_model_path(cfg.cpt.base_model), paths, name="corpora", deps=(corpus, *stages))


def token_docs(corpora: Stage, name: str, fraction: float = 1.0, seed: int = 0) -> list:
    """An arm's token documents; a fraction keeps a seeded random subset of that share of tokens."""
    import numpy as np

    from pipelines.stages import load_token_docs

    docs = load_token_docs(corpora.path / f"{name}.parquet")
    if fraction >= 1.0:
        return docs
    order = np.random.default_rng(seed).permutation(len(docs))
    want, out, have = fraction * sum(len(d) for d in docs), [], 0
    for i in order:
        if have >= want:
            break
        out.append(docs[i])
        have += len(docs[i])
    return out


def arm_budget(cfg: "EntiGraphConfig", corpora: Stage) -> int:
    """Tokens every arm trains on: ``epochs`` passes over the full EntiGraph corpus, plus the
    replay share on top (replay batches do not eat into the niche tokens)."""
    niche = cfg.cpt.epochs * corpora.outputs["entigraph"]["tokens"]
    return int(math.ceil(niche / (1.0 - cfg.cpt.replay)))


# --------------------------------------------------------------------------- 6. continued pretraining
def _replay_docs(cfg: "EntiGraphConfig", data_dir: Path) -> list:
    """Generic text for replay: bundled Wikipedia (train split), tokenised like the arms."""
    import numpy as np

    from selftaught.models import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path(cfg.cpt.base_model))
    texts = read_parquet(data_dir / "wiki" / "train.parquet", columns=["text"])["text"].to_pylist()[: cfg.cpt.replay_docs]
    return [np.asarray(x + [tok.eos_token_id], dtype=np.int32) for x in tok(texts, add_special_tokens=False)["input_ids"]]


def heldout_texts(data_dir: Path, n: int = 64) -> list[str]:
    if n <= 0:
        return []
    return read_parquet(data_dir / "wiki" / "eval.parquet", columns=["text"])["text"].to_pylist()[:n]


def cpt_stage(run: RunDir, cfg: "EntiGraphConfig", corpora: Stage, data_dir: Path, name: str, source: str,
              fraction: float, budget: int) -> Stage:
    """Continued pretraining of the base model on ``source`` (a ``fraction`` of it) for
    ``budget`` tokens, with replay; the model is ``<stage>/model``."""
    from pipelines.stages import train_stage
    from selftaught.models import resolve_model_path
    from trainers.mixture import TokenSource

    train = cfg.cpt.train.model_copy(update={"token_budget": max(budget, cfg.cpt.train.tokens_per_step())})

    def sources():
        out = [TokenSource(source, token_docs(corpora, source, fraction, cfg.corpus.seed), weight=1 - cfg.cpt.replay)]
        if cfg.cpt.replay > 0:
            out.append(TokenSource("replay", _replay_docs(cfg, data_dir), weight=cfg.cpt.replay))
        return out

    return train_stage(run, name, train, resolve_model_path(cfg.cpt.base_model), sources, None, deps=(corpora,),
                       extra={"source": source, "fraction": fraction, "replay": cfg.cpt.replay,
                              "replay_docs": cfg.cpt.replay_docs})


# --------------------------------------------------------------------------- 8. report
def loglinear_fit(points: list[tuple[float, float]]) -> dict[str, float] | None:
    """Least squares of ``accuracy = intercept + slope * log10(tokens)`` over the scaling arms:
    ``slope`` is accuracy gained per 10x tokens, ``r2`` how straight the line is on a log axis
    (the thesis's question). None with fewer than two distinct token counts."""
    pts = [(math.log10(x), y) for x, y in points if x > 0 and y is not None]
    if len({x for x, _ in pts}) < 2:
        return None
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for _, y in pts)
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in pts)
    return {"slope_per_decade": slope, "intercept": intercept, "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
            "points": n}


def _scaling_points(rows: dict[str, Any]) -> list[tuple[float, float]]:
    return sorted((r["niche_tokens"], r["eval"]["closed_book"]["loglik_acc"]) for k, r in rows.items()
                  if k.startswith("entigraph") and (r.get("eval", {}).get("closed_book") or {}).get("loglik_acc")
                  is not None)


def write_report(run: RunDir, cfg: "EntiGraphConfig", st: dict[str, Stage], results: dict[str, Any]) -> Path:
    """``report.md`` (the arms at equal tokens, the scaling rows, RAG, forgetting),
    ``results.json`` and ``entigraph.png`` (closed-book accuracy against synthetic tokens, log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = run.root
    (root / "results.json").write_text(json.dumps(results, indent=1, default=str))
    rows = results["arms"]
    base = results.get("base", {})
    lines = [f"# EntiGraph: {results['documents']} documents, {results['questions']} questions", "",
             f"Base model `{cfg.cpt.base_model}`; generator `{results['generator']}`; every arm at "
             f"{results['budget_tokens']:,} training tokens ({cfg.cpt.epochs:g} passes over the EntiGraph corpus, "
             f"replay {cfg.cpt.replay:g}).", "",
             "| arm | niche tokens | training tokens | closed-book acc (log-lik) | length-normalised | open-book (RAG) | held-out ppl |",
             "|---|---|---|---|---|---|---|"]

    def fmt(x, p=3):
        return "-" if x is None else (f"{x:.{p}f}" if isinstance(x, float) else str(x))

    def line(name, r):
        ev = r.get("eval", {})
        cb, ob = ev.get("closed_book") or {}, ev.get("open_book") or {}
        lines.append(f"| {name} | {fmt(r.get('niche_tokens'))} | {fmt(r.get('budget_tokens'))} | "
                     f"{fmt(cb.get('loglik_acc'))} | {fmt(cb.get('loglik_norm_acc'))} | {fmt(ob.get('loglik_acc'))} | "
                     f"{fmt(ev.get('heldout_ppl'), 2)} |")

    line("base (no CPT)", {"eval": base})
    for name, r in rows.items():
        line(name, r)
    n = results["questions"]
    if n:
        se = math.sqrt(0.25 / n)
        lines += ["", f"With {n} questions, one standard error of an accuracy near 0.5 is {se:.3f}; chance is 0.25."]
    fit = results.get("loglinear")
    if fit:
        lines += ["", f"Scaling: closed-book accuracy = {fit['intercept']:.3f} + {fit['slope_per_decade']:.3f} x "
                      f"log10(synthetic tokens) over the {fit['points']} EntiGraph arms, R^2 = {fit['r2']:.2f} "
                      f"({fit['slope_per_decade'] * 100:+.1f} points per 10x tokens)."]
    if results.get("seconds"):
        lines += ["", "## Time per stage (seconds, the attempt that finished)", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:,.0f} |" for k, v in results["seconds"].items() if v is not None]
        lines.append(f"| total | {sum(v for v in results['seconds'].values() if v):,.0f} |")
    if results.get("spent"):
        lines += ["", "## Spent (remote generator)", "", "```", json.dumps(results["spent"], indent=1, default=str), "```"]
    lines += ["", "## Synthesis", "", "```", json.dumps(results["synthesis"], indent=1, default=str), "```"]
    report = root / "report.md"
    report.write_text("\n".join(lines) + "\n")
    scaling = _scaling_points(rows)

    def se(acc: float) -> float:  # one standard error of an accuracy over n questions
        return math.sqrt(max(acc * (1 - acc), 1e-9) / max(n, 1))

    fig, ax = plt.subplots(figsize=(6, 4))
    if scaling:
        ax.errorbar([x for x, _ in scaling], [y for _, y in scaling], yerr=[se(y) for _, y in scaling], fmt="o-",
                    capsize=3, label="EntiGraph CPT (+-1 s.e.)")
        ax.set_xscale("log")
    for name, marker in (("raw", "s"), ("rephrase", "^"), ("megadocs", "D")):
        r = rows.get(name)
        if r and r.get("eval", {}).get("closed_book"):
            acc = r["eval"]["closed_book"]["loglik_acc"]
            ax.errorbar([r["niche_tokens"]], [acc], yerr=[se(acc)], fmt=marker, capsize=3, label=f"{name} CPT")
    if base.get("closed_book"):
        ax.axhline(base["closed_book"]["loglik_acc"], color="grey", ls="--", label="base model")
    ax.axhline(0.25, color="lightgrey", ls=":", label="chance")
    ax.set_xlabel("distinct tokens in the arm's corpus (EntiGraph shares: the same passes over less)")
    ax.set_ylabel("closed-book accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "entigraph.png", dpi=120)
    plt.close(fig)
    return report


# --------------------------------------------------------------------------- config
class EntiGraphConfig(Strict):
    """``selftaught run -c FILE`` with ``pipeline: entigraph``."""

    pipeline: Literal["entigraph"] = "entigraph"
    run_dir: str = "runs/entigraph/tiny"
    ray: RayConfig = Field(default_factory=RayConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    caps: BudgetCaps = Field(default_factory=BudgetCaps)  # money: a remote generator stops cleanly at these
    cpt: CPTConfig = Field(default_factory=CPTConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    rag_arms: list[str] = Field(default_factory=lambda: ["base", "entigraph"])  # open book with and without CPT

    @model_validator(mode="after")
    def _check(self) -> "EntiGraphConfig":
        if self.synth.megadocs:
            raise ValueError("synth.megadocs: the megadocs arm is built beside the plain corpus; "
                             "choose it with cpt.arms instead")
        return self


CONFIG = EntiGraphConfig


# --------------------------------------------------------------------------- 2-4. synthesis
def plan(cfg: EntiGraphConfig, docs: list[dict]) -> dict[str, Any]:
    """The most requests the synthesis can make and, for a remote generator, their worst-case
    dollars (prompt = the document plus instructions, completion = ``max_new_tokens``)."""
    s = cfg.synth
    pairs = s.max_pairs if s.max_pairs is not None else s.max_entities * (s.max_entities - 1) // 2
    rephrasing = "rephrase" in cfg.cpt.arms
    per_unit = {"extraction": 1 + s.retries, "relations": pairs + s.triplets,
                "rephrase": len(s.styles) * s.rephrases_per_style if rephrasing else 0}
    pieces = [len(entigraph_synth.extraction_units(d, s)) for d in docs]
    rephrase_pieces = [len(entigraph_synth.rephrase_units(d, s)) for d in docs]
    units = {"extraction": sum(pieces), "relations": len(docs), "rephrase": sum(rephrase_pieces)}
    calls = {k: v * units[k] for k, v in per_unit.items()}
    out: dict[str, Any] = {"documents": len(docs), "max_calls": calls, "max_calls_total": sum(calls.values())}
    if cfg.generator.backend != "local":
        from selftaught.llm import worst_case_cost

        usd = 0.0

        def tokens(chars: int | None, d: dict) -> int:  # about 3 characters a token, plus the instructions
            return min(len(d["text"]), s.max_doc_chars, chars or s.max_doc_chars) // 3 + 300

        llm = cfg.generator.llm
        for d, n, r in zip(docs, pieces, rephrase_pieces):
            usd += n * per_unit["extraction"] * worst_case_cost(llm, tokens(s.extract_chunk_chars, d),
                                                                s.extract_sampling.max_new_tokens)
            usd += per_unit["relations"] * worst_case_cost(llm, tokens(s.relation_context_chars, d),
                                                           s.relation_sampling.max_new_tokens)
            usd += r * per_unit["rephrase"] * worst_case_cost(llm, tokens(s.rephrase_chunk_chars, d),
                                                              s.rephrase_sampling.max_new_tokens)
        out["worst_case_usd"] = usd
        out["cap_usd"] = cfg.caps.total_usd
    return out


# Options added after runs existed, left out of a stage's fingerprint while they keep the value
# that means "as before": a changed fingerprint clears the stage's directory, and with it the
# answers a resumed run would otherwise not pay for again.
_LATER_OPTIONS = {"relation_context_chars": None, "chunk_chars": None, "heldout_docs": 64}


def _fingerprint(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in _LATER_OPTIONS or v != _LATER_OPTIONS[k]}


def synthesis_stage(run: RunDir, cfg: EntiGraphConfig, corpus: Stage, gen_factory) -> Stage:
    """Entities, relations and summaries (``entigraph.parquet``) and their megadocs; resumable
    per request under ``work/`` (a killed stage asks only what is missing)."""
    st = run.stage("synthesis", {"generator": cfg.generator.model_dump(exclude={"timeout_s", "concurrency"}),
                                 "synth": _fingerprint(cfg.synth.model_dump(exclude={
                                     "styles", "style_prompts", "rephrases_per_style", "rephrase_sampling",
                                     "rephrase_chunk_chars"}))},
                   deps=[corpus])
    if st.up_to_date():
        return st
    st.begin(keep_partial=True)
    rows, stats = entigraph_synth.synthesize(documents(corpus), gen_factory(), cfg.synth, st.path / "work")
    if not rows:
        raise RuntimeError(f"synthesis produced nothing: {stats}")
    write_parquet(rows, st.path / "entigraph.parquet")
    write_parquet(entigraph_synth.megadocs(rows), st.path / "megadocs.parquet")
    st.finish(**stats)
    return st


def rephrase_stage(run: RunDir, cfg: EntiGraphConfig, corpus: Stage, gen_factory) -> Stage:
    st = run.stage("rephrase", _fingerprint({
        "generator": cfg.generator.model_dump(exclude={"timeout_s", "concurrency"}),
        "styles": cfg.synth.styles, "style_prompts": cfg.synth.style_prompts,
        "per_style": cfg.synth.rephrases_per_style, "sampling": cfg.synth.rephrase_sampling.model_dump(),
        "max_doc_chars": cfg.synth.max_doc_chars, "chunk_chars": cfg.synth.rephrase_chunk_chars}),
        deps=[corpus])
    if st.up_to_date():
        return st
    st.begin(keep_partial=True)
    stats: dict[str, Any] = {}
    rows = entigraph_synth.rephrase(documents(corpus), cfg.synth.styles, gen_factory(), cfg.synth,
                                    st.path / "work", stats)
    if not rows:
        raise RuntimeError(f"rephrasing produced nothing: {stats}")
    write_parquet(rows, st.path / "rephrase.parquet")
    st.finish(rows=len(rows), **stats)
    return st


# --------------------------------------------------------------------------- 7. evaluation
def eval_stage(run: RunDir, cfg: EntiGraphConfig, name: str, model: Stage | str, corpus: Stage, data_dir: Path,
               rag: bool) -> Stage:
    from pipelines.stages import model_dir

    ecfg = cfg.eval.model_copy(update={"rag": cfg.eval.rag.model_copy(update={"enabled": rag and cfg.eval.rag.enabled})})
    deps = [corpus] + ([model] if isinstance(model, Stage) else [])
    st = run.stage(f"eval_{name}", {"eval": _fingerprint(ecfg.model_dump()),
                                    "model": model if isinstance(model, str) else None},
                   deps=deps)
    if st.up_to_date():
        return st
    st.begin(keep_partial=False)
    path = str(model_dir(model)) if isinstance(model, Stage) else model
    qs = questions(corpus)
    res = entigraph_eval.evaluate(path, qs, documents(corpus),
                                  heldout_texts(data_dir, ecfg.heldout_docs), ecfg) if qs else \
        {"closed_book": None, "note": "no questions for this corpus"}
    (st.path / "eval.json").write_text(json.dumps(res, indent=1, default=str))
    st.finish(**{k: v for k, v in res.items() if k != "heldout"})
    return st


# --------------------------------------------------------------------------- the run
def run(cfg: EntiGraphConfig | dict) -> dict[str, Any]:
    from selftaught.ledger import Ledger
    from selftaught.runtime import init_ray

    cfg = cfg if isinstance(cfg, EntiGraphConfig) else EntiGraphConfig.model_validate(cfg)
    run_dir = RunDir(cfg.run_dir)
    save(cfg, run_dir.root / "config.yaml")
    data_dir = run_dir.root / "data"
    prepare(DataConfig(datasets=["wiki"] if cfg.corpus.documents else ["wiki", "factbook"],
                       questions_per_country=cfg.corpus.questions_per_doc,
                       seed=cfg.corpus.seed, wiki_limit=max(cfg.cpt.replay_docs * 2, 400)), data_dir)
    init_ray(cfg.ray, run_dir.root)
    st: dict[str, Stage] = {"corpus": corpus_stage(run_dir, cfg, data_dir)}
    docs = documents(st["corpus"])
    the_plan = plan(cfg, docs)
    log.info("entigraph plan: %s", json.dumps(the_plan))
    if the_plan.get("worst_case_usd") and cfg.caps.total_usd is None:
        log.warning("a remote generator with no dollar cap: the worst case is $%.2f (set caps.total_usd)",
                    the_plan["worst_case_usd"])
    ledger = Ledger.for_run(run_dir.root, cfg.caps) if cfg.generator.backend != "local" else None
    gens: list = []

    def gen_factory():
        if not gens:
            gens.append(entigraph_synth.make_generator(cfg.generator, ledger))
        return gens[0]

    try:
        st["synthesis"] = synthesis_stage(run_dir, cfg, st["corpus"], gen_factory)
        synthetic = {"entigraph": st["synthesis"], "megadocs": st["synthesis"]}
        if "rephrase" in cfg.cpt.arms:
            st["rephrase"] = rephrase_stage(run_dir, cfg, st["corpus"], gen_factory)
            synthetic["rephrase"] = st["rephrase"]
    finally:
        for g in gens:
            g.close()
    st["corpora"] = corpora_stage(run_dir, cfg, st["corpus"], synthetic)
    corpora = st["corpora"]
    budget = arm_budget(cfg, corpora)
    results: dict[str, Any] = {"documents": len(docs), "questions": len(questions(st["corpus"])),
                               "generator": cfg.generator.engine.model if cfg.generator.backend == "local"
                               else cfg.generator.llm.model, "budget_tokens": budget, "plan": the_plan,
                               "synthesis": st["synthesis"].outputs, "arms": {},
                               "rephrase_stats": st["rephrase"].outputs if "rephrase" in st else None,
                               "spent": ledger.snapshot() if ledger else None}
    st["eval_base"] = eval_stage(run_dir, cfg, "base", cfg.cpt.base_model, st["corpus"], data_dir,
                                 "base" in cfg.rag_arms)
    results["base"] = st["eval_base"].outputs
    arms: list[tuple[str, str, float, int]] = []
    for f in sorted(cfg.cpt.fractions):
        name = "entigraph" if f == 1.0 else f"entigraph_{f:g}"
        arms.append((name, "entigraph", f, int(math.ceil(budget * f))))
    arms += [(a, a, 1.0, budget) for a in cfg.cpt.arms if a != "entigraph"]
    for name, source, f, b in arms:
        st[f"cpt_{name}"] = cpt_stage(run_dir, cfg, corpora, data_dir, f"cpt_{name}", source, f, b)
        st[f"eval_{name}"] = eval_stage(run_dir, cfg, name, st[f"cpt_{name}"], st["corpus"], data_dir,
                                        name in cfg.rag_arms)
        niche = corpora.outputs[source]["tokens"] if source != "entigraph" else \
            sum(len(x) for x in token_docs(corpora, "entigraph", f, cfg.corpus.seed))
        results["arms"][name] = {"source": source, "fraction": f, "niche_tokens": niche, "budget_tokens": b,
                                 "trained_tokens": st[f"cpt_{name}"].outputs.get("tokens_seen"),
                                 "eval": st[f"eval_{name}"].outputs}
    results["loglinear"] = loglinear_fit(_scaling_points(results["arms"]))
    results["seconds"] = {k: v.seconds for k, v in st.items()}
    report = write_report(run_dir, cfg, st, results)
    log.info("report: %s", report)
    return {"run_dir": str(run_dir.root), "report": str(report),
            **{k: (v["eval"].get("closed_book") or {}).get("loglik_acc") for k, v in results["arms"].items()}}
