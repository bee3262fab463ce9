"""Synthetic Bootstrapped Pretraining (SBP), end to end and compute-matched.

corpus (Ray Data: read, clean) -> tokenizer -> tokens (drop documents longer than half the
synthesizer context) -> repetition arm (= the baseline checkpoint) -> pairing (embeddings on an
actor pool, FAISS top-k, similarity threshold, 13-token shingle near-copy rule) ->
synthesizer-tuning (loss on d2 only, from the baseline) -> synthesis (seeds uniform over D,
engine actors through Ray Data, degenerate outputs dropped, provenance kept) -> SBP and oracle
arms at the same token budget and hyper-parameters -> data-quality figures -> report.

Every stage is resumable: a killed run re-run finishes with the same result; synthesis writes
numbered parts, so no synthetic document is generated twice.
"""
from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from pipelines.stages import (ModelConfig, TokenizerConfig, init_model_stage, load_token_docs, model_dir,
                              tokenizer_stage, tokens_stage, train_stage)
from selftaught.ann import AnnConfig
from selftaught.config import EngineConfig, RayConfig, SamplingConfig, Strict, save
from selftaught.data.prepare import DataConfig, prepare
from selftaught.storage import RunDir, Stage, file_fingerprint, read_parquet, write_parquet
from trainers.config import TrainConfig

log = logging.getLogger(__name__)


class CorpusConfig(Strict):
    unique_docs: int = Field(default=1500, ge=10)  # |D|: the fixed unique data
    oracle_docs: int | None = Field(default=None, ge=1)  # pool of further unique documents (None: all left)
    eval_docs: int | None = Field(default=400, ge=1)
    seed: int = 0
    num_blocks: int = Field(default=4, ge=1)  # Ray Data parallelism of the cleaning step


class PairingConfig(Strict):
    embedder: str = "minilm"  # or a sentence-transformers dir, or "hidden:<checkpoint>"
    num_actors: int = Field(default=2, ge=1)
    batch_size: int = Field(default=64, ge=1)
    index: AnnConfig = AnnConfig()
    top_k: int = Field(default=200, ge=1)
    threshold: float = Field(default=0.75, ge=-1, le=1)
    shingle_n: int = Field(default=13, ge=2)


class SynthesisConfig(Strict):
    num_docs: int = Field(default=1000, ge=1)
    part_size: int = Field(default=256, ge=1)
    sampling: SamplingConfig = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=160)
    engine: EngineConfig = EngineConfig(backend="transformers", max_batch_size=64)
    shingle_n: int = Field(default=13, ge=2)
    seed: int = 0


class JointConfig(Strict):
    train: TrainConfig = TrainConfig()
    synthetic_share: float = Field(default=0.25, gt=0, lt=1)  # share of SBP batches drawn from synthetic data
    arms: list[Literal["repetition", "sbp", "oracle"]] = ["repetition", "sbp", "oracle"]


class SBPConfig(Strict):
    pipeline: Literal["sbp"] = "sbp"
    run_dir: str = "runs/sbp"
    ray: RayConfig = RayConfig()
    data: DataConfig = DataConfig(datasets=["wiki"])
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    corpus: CorpusConfig = CorpusConfig()
    pairing: PairingConfig = PairingConfig()
    synth_tune: TrainConfig = TrainConfig(schedule="constant", lr=1e-3, warmup_frac=0.0)
    synthesis: SynthesisConfig = SynthesisConfig()
    joint: JointConfig = JointConfig()
    quality_sample: int = Field(default=200, ge=10)

    @model_validator(mode="after")
    def _checks(self):
        if "repetition" not in self.joint.arms:
            raise ValueError("joint.arms must include 'repetition': it is the baseline checkpoint the synthesizer starts from")
        return self

    @property
    def synth_context(self) -> int:
        return self.synth_tune.seq_len


CONFIG = SBPConfig


# ------------------------------------------------------------------------------------ corpus
def _clean_batch(batch: dict) -> dict:
    from selftaught.text import clean_document

    texts = [clean_document(t) if isinstance(t, str) else "" for t in batch["text"]]
    keep = [bool(t.strip()) for t in texts]
    return {k: [v for v, ok in zip(batch[k], keep) if ok] for k in ("id", "title")} | {
        "text": [t for t, ok in zip(texts, keep) if ok]}


def corpus_stage(run: RunDir, cfg: SBPConfig, wiki: Path) -> Stage:
    """Clean the corpus with Ray Data and order it by a seeded hash of the id: the first
    ``unique_docs`` (after the length filter) are D, the rest the oracle pool."""
    import ray.data

    inputs = {"train": file_fingerprint(wiki / "train.parquet"), "eval": file_fingerprint(wiki / "eval.parquet")}
    st = run.stage("corpus", cfg.corpus, inputs=inputs)
    if st.up_to_date():
        return st
    st.begin(keep_partial=False)
    counts = {}
    for split in ("train", "eval"):
        ds = ray.data.read_parquet(str(wiki / f"{split}.parquet"), override_num_blocks=cfg.corpus.num_blocks)
        rows = ds.map_batches(_clean_batch, batch_format="numpy").take_all()
        rows.sort(key=lambda r: (zlib.crc32(f"{cfg.corpus.seed}:{r['id']}".encode()), r["id"]))
        if split == "eval" and cfg.corpus.eval_docs:
            rows = rows[: cfg.corpus.eval_docs]
        name = "candidates" if split == "train" else "eval"
        write_parquet(pa.table({"id": [r["id"] for r in rows], "title": [r["title"] for r in rows],
                                "text": [r["text"] for r in rows]}), st.path / f"{name}.parquet")
        counts[name] = len(rows)
    st.finish(**counts)
    return st


def split_ids(tokens: Stage, cfg: SBPConfig) -> tuple[list[str], list[str]]:
    ids = read_parquet(tokens.path / "candidates.parquet", columns=["id"])["id"].to_pylist()
    n = cfg.corpus.unique_docs
    if len(ids) <= n:
        raise ValueError(f"corpus has {len(ids)} usable documents; unique_docs={n} leaves no oracle pool")
    pool = ids[n:]
    return ids[:n], pool[: cfg.corpus.oracle_docs] if cfg.corpus.oracle_docs else pool


def _texts_by_id(corpus: Stage, ids: list[str]) -> list[str]:
    t = read_parquet(corpus.path / "candidates.parquet", columns=["id", "text"])
    pos = {d: i for i, d in enumerate(t["id"].to_pylist())}
    texts = t["text"].to_pylist()
    return [texts[pos[d]] for d in ids]


# ------------------------------------------------------------------------------------ pairing
def pairing_stage(run: RunDir, cfg: SBPConfig, corpus: Stage, tokens: Stage) -> Stage:
    import ray.data

    from actors.embedder import embed_dataset
    from selftaught.ann import knn
    from selftaught.text import shares_shingle

    st = run.stage("pairing", cfg.pairing, deps=[corpus, tokens], inputs={"unique_docs": cfg.corpus.unique_docs})
    if st.up_to_date():
        return st
    st.begin(keep_partial=False)
    d_ids, _ = split_ids(tokens, cfg)
    texts = _texts_by_id(corpus, d_ids)
    ds = ray.data.from_items([{"row": i, "text": t} for i, t in enumerate(texts)])
    rows = embed_dataset(ds, cfg.pairing.embedder, cfg.pairing.num_actors, cfg.pairing.batch_size).take_all()
    rows.sort(key=lambda r: r["row"])
    vecs = np.stack([np.asarray(r["embedding"], dtype=np.float32) for r in rows])
    write_parquet(pa.table({"id": d_ids, "embedding": pa.array(list(vecs), pa.list_(pa.float32()))}),
                  st.path / "embeddings.parquet")
    scores, nbrs = knn(vecs, cfg.pairing.top_k + 1, cfg.pairing.index)
    pairs, stats = [], {"candidates": 0, "above_threshold": 0, "near_copies": 0}
    for i in range(len(d_ids)):
        for s, j in zip(scores[i], nbrs[i]):
            if j < 0 or j == i:
                continue
            stats["candidates"] += 1
            if s <= cfg.pairing.threshold:
                continue
            stats["above_threshold"] += 1
            if shares_shingle(texts[i], texts[j], cfg.pairing.shingle_n):
                stats["near_copies"] += 1
                continue
            pairs.append({"d1_id": d_ids[i], "d2_id": d_ids[j], "score": float(s)})
    write_parquet(pa.Table.from_pylist(pairs, schema=pa.schema([("d1_id", pa.string()), ("d2_id", pa.string()),
                                                                 ("score", pa.float32())])),
                  st.path / "pairs.parquet")
    st.finish(pairs=len(pairs), documents=len(d_ids), seeds_with_pairs=len({p["d1_id"] for p in pairs}), **stats)
    return st


def synth_tune_sources(cfg: SBPConfig, corpus: Stage, pairing: Stage, tok_dir: Path):
    from selftaught.models import load_tokenizer
    from trainers.data import tokenize_pairs
    from trainers.mixture import TokenSource

    pairs = read_parquet(pairing.path / "pairs.parquet").to_pylist()
    if not pairs:
        raise ValueError("pairing found no pairs above the similarity threshold: lower pairing.threshold "
                         "or raise pairing.top_k")
    ids = sorted({p["d1_id"] for p in pairs} | {p["d2_id"] for p in pairs})
    text = dict(zip(ids, _texts_by_id(corpus, ids)))
    tok = load_tokenizer(tok_dir)
    seq, masks, skipped = tokenize_pairs(tok, [(text[p["d1_id"]], text[p["d2_id"]]) for p in pairs],
                                         cfg.synth_tune.seq_len)
    return [TokenSource("pairs", seq, masks, kind="examples", skipped=skipped)]


# ------------------------------------------------------------------------------------ synthesis
SYNTH_SCHEMA = pa.schema([("id", pa.string()), ("seed_id", pa.string()), ("text", pa.string()),
                          ("completion_tokens", pa.int32()), ("finish_reason", pa.string()),
                          ("kept", pa.bool_()), ("drop_reason", pa.string()), ("sampling", pa.string()),
                          ("synthesizer", pa.string())])


def synthesis_stage(run: RunDir, cfg: SBPConfig, corpus: Stage, tokens: Stage, synth: Stage) -> Stage:
    """Seeds uniform over D; one numbered Parquet part per ``part_size`` seeds, so a killed run
    resumes at the first missing part and never regenerates (or duplicates) a document."""
    import ray.data

    from actors.generator import generate_dataset
    from selftaught.models import load_tokenizer
    from selftaught.text import has_repeated_shingle

    st = run.stage("synthesis", cfg.synthesis, deps=[synth, tokens])
    if st.up_to_date():
        return st
    st.begin(keep_partial=True)
    d_ids, _ = split_ids(tokens, cfg)
    docs = dict(zip(d_ids, load_token_docs(tokens.path / "candidates.parquet", d_ids)))
    syn_dir = model_dir(synth)
    tok = load_tokenizer(syn_dir)
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    half = cfg.synth_context // 2
    rng = np.random.default_rng(cfg.synthesis.seed)
    seeds = [d_ids[i] for i in rng.integers(0, len(d_ids), cfg.synthesis.num_docs)]
    parts = st.parts()
    s = cfg.synthesis
    engine = s.engine.model_copy(update={"model": str(syn_dir)})
    provenance = str(syn_dir)
    for p, start in enumerate(range(0, len(seeds), s.part_size)):
        if parts.done(p):
            continue
        rows = []
        for k, sid in enumerate(seeds[start:start + s.part_size], start=start):
            d1 = docs[sid][:-1][-half:].tolist()  # without its EOS; the end nearest to d2, as in tuning
            over = {"seed": (s.sampling.seed or 0) * 1_000_003 + s.seed * 7919 + k}
            rows.append({"k": k, "seed_id": sid, "prompt": d1 + sep, "sampling": json.dumps(over)})
        max_new = min(s.sampling.max_new_tokens, cfg.synth_context - max(len(r["prompt"]) for r in rows))
        sampling = s.sampling.model_copy(update={"max_new_tokens": max(8, max_new)})
        out = generate_dataset(ray.data.from_items(rows), engine, sampling, sampling_column="sampling").take_all()
        out.sort(key=lambda r: r["k"])
        table = []
        for r in out:
            text = r["generated_text"].strip()
            reason = ("empty" if not text else
                      "repeated_shingle" if has_repeated_shingle(text, s.shingle_n) else "")
            table.append({"id": f"synthetic/{r['k']}", "seed_id": r["seed_id"], "text": text,
                          "completion_tokens": int(r["completion_tokens"]), "finish_reason": r["finish_reason"],
                          "kept": not reason, "drop_reason": reason,
                          "sampling": json.dumps({**sampling.model_dump(), **json.loads(r["sampling"])}),
                          "synthesizer": provenance})
        parts.write(p, pa.Table.from_pylist(table, schema=SYNTH_SCHEMA))
        log.info("synthesis part %d: %d documents, %d kept", p, len(table), sum(t["kept"] for t in table))
    all_rows = parts.read()
    kept = all_rows.filter(all_rows["kept"])
    write_parquet(kept, st.path / "synthetic.parquet")
    drops = {}
    for reason in all_rows["drop_reason"].to_pylist():
        if reason:
            drops[reason] = drops.get(reason, 0) + 1
    st.finish(generated=all_rows.num_rows, kept=kept.num_rows, dropped=drops,
              completion_tokens=int(sum(all_rows["completion_tokens"].to_pylist())))
    return st


def synthetic_docs(synthesis: Stage, tok_dir: Path) -> list[np.ndarray]:
    from selftaught.models import load_tokenizer
    from trainers.data import tokenize_documents

    return tokenize_documents(load_tokenizer(tok_dir), read_parquet(synthesis.path / "synthetic.parquet",
                                                                    columns=["text"])["text"].to_pylist())


# ------------------------------------------------------------------------------------ quality
def quality_stage(run: RunDir, cfg: SBPConfig, corpus: Stage, pairing: Stage, synthesis: Stage) -> Stage:
    """The synthetic set's quality figures (lower is better for the first three)."""
    from actors.embedder import embed_texts
    from selftaught.text import duplicate_rate, repetition_rate, shares_shingle

    st = run.stage("quality", {"sample": cfg.quality_sample}, deps=[synthesis, pairing])
    if st.up_to_date():
        return st
    st.begin(keep_partial=False)
    syn = read_parquet(synthesis.path / "synthetic.parquet", columns=["seed_id", "text"]).to_pylist()
    rng = np.random.default_rng(0)
    sample = [syn[i] for i in rng.permutation(len(syn))[: cfg.quality_sample]]
    seeds = _texts_by_id(corpus, [r["seed_id"] for r in sample])
    emb = read_parquet(pairing.path / "embeddings.parquet")
    vec = np.stack([np.asarray(v, np.float32) for v in emb["embedding"].to_pylist()])
    pos = {d: i for i, d in enumerate(emb["id"].to_pylist())}
    out_vec = embed_texts([r["text"] for r in sample], cfg.pairing.embedder) if sample else np.zeros((0, 1))
    seed_vec = vec[[pos[r["seed_id"]] for r in sample]] if sample else np.zeros((0, 1))
    pairs = read_parquet(pairing.path / "pairs.parquet", columns=["score"])["score"].to_pylist()
    a, b = rng.integers(0, len(vec), 2000), rng.integers(0, len(vec), 2000)
    figures = {
        "synthetic_documents": len(syn),
        "repetition_rate": repetition_rate([r["text"] for r in syn]),
        "duplicate_rate_jaccard_0.6": duplicate_rate([r["text"] for r in syn], threshold=0.6),
        "pair_copying_rate": float(np.mean([shares_shingle(s, r["text"], 13) for s, r in zip(seeds, sample)]))
        if sample else None,
        "seed_to_output_similarity": float(np.mean(np.sum(out_vec * seed_vec, axis=1))) if sample else None,
        "real_pair_similarity": float(np.mean(pairs)) if pairs else None,
        "random_pair_similarity": float(np.mean(np.sum(vec[a] * vec[b], axis=1))),
    }
    (st.path / "samples.json").write_text(json.dumps(
        [{"seed": s[:400], "synthetic": r["text"][:400]} for s, r in list(zip(seeds, sample))[:5]], indent=2))
    st.finish(**figures)
    return st


# ------------------------------------------------------------------------------------ report
def write_report(run: RunDir, cfg: SBPConfig, st: dict[str, Stage], pool_tokens: int | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = {a: st[f"arm_{a}"] for a in cfg.joint.arms if f"arm_{a}" in st}
    curves, final = {}, {}
    for a, s in arms.items():
        rows = [json.loads(x) for x in (s.path / "metrics.jsonl").read_text().splitlines()]
        curves[a] = [(r["tokens_seen"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        final[a] = s.outputs
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for a, pts in curves.items():
        ax.plot(*zip(*pts), "o-", ms=3, label=a)
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(f"SBP: {cfg.model.size} model, |D| = {cfg.corpus.unique_docs} documents, equal budgets")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run.root / "curves.png", dpi=120)
    plt.close(fig)

    base = final["repetition"]["final_eval_loss"]
    oracle = final.get("oracle", {}).get("final_eval_loss")
    lines = ["# SBP report", "",
             f"Token budget per arm: {cfg.joint.train.token_budget:,} (same hyper-parameters for every arm). "
             f"|D| = {st['pairing'].outputs.get('documents')} documents; synthetic share of SBP batches: "
             f"{cfg.joint.synthetic_share}." + (f" Oracle pool: {pool_tokens:,} unique tokens"
                                                 f"{' (fewer than the budget: the oracle repeats data)' if pool_tokens < cfg.joint.train.token_budget else ''}."
                                                 if pool_tokens is not None else ""), "",
             "| arm | tokens seen | real tokens | synthetic tokens | held-out loss | perplexity | gain vs repetition | share of oracle gain |",
             "|---|---|---|---|---|---|---|---|"]
    for a, out in final.items():
        src = out.get("sources", {})
        real = sum(v["tokens"] for k, v in src.items() if k != "synthetic")
        syn = src.get("synthetic", {}).get("tokens", 0)
        loss = out["final_eval_loss"]
        if loss is None or base is None:
            lines.append(f"| {a} | {out['tokens_seen']:,} | {real:,} | {syn:,} | n/a | n/a | n/a | n/a |")
            continue
        gain = base - loss
        frac = (f"{gain / (base - oracle):.0%}" if oracle is not None and a != "repetition" and base != oracle
                else "-")
        lines.append(f"| {a} | {out['tokens_seen']:,} | {real:,} | {syn:,} | {loss:.4f} | {np.exp(loss):.1f} | "
                     f"{gain:+.4f} | {frac} |")
    q = st["quality"].outputs
    pr = st["pairing"].outputs
    sy = st["synthesis"].outputs
    lines += ["", "![held-out loss](curves.png)", "", "## Pairing", "",
              f"{pr['documents']} documents, {pr['candidates']:,} neighbour candidates, {pr['above_threshold']:,} above "
              f"the {cfg.pairing.threshold} threshold, {pr['near_copies']} near-copies dropped (13-token shingle rule), "
              f"{pr['pairs']:,} pairs over {pr['seeds_with_pairs']} seed documents.", "",
              "## Synthetic data", "",
              f"{sy['generated']:,} generated, {sy['kept']:,} kept, dropped: {sy['dropped'] or 'none'}.", "",
              "| measure | value |", "|---|---|"]
    for k, v in q.items():
        lines.append(f"| {k} | {v if not isinstance(v, float) else f'{v:.3f}'} |")
    samples = json.loads((st["quality"].path / "samples.json").read_text())
    lines += ["", "## Sample pairs (seed -> synthetic)", ""]
    for s in samples[:3]:
        lines += [f"- **seed:** {s['seed'][:240]}", f"  **synthetic:** {s['synthetic'][:240]}"]
    path = run.root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (run.root / "results.json").write_text(json.dumps({"arms": final, "quality": q, "pairing": pr,
                                                       "synthesis": sy}, indent=2, default=str))
    return path


# ------------------------------------------------------------------------------------ driver
def run(cfg: SBPConfig) -> dict:
    from selftaught.runtime import init_ray
    from trainers.mixture import TokenSource

    run_dir = RunDir(cfg.run_dir)
    save(cfg, run_dir.root / "config.yaml")
    prepare(cfg.data, run_dir.root / "data")
    init_ray(cfg.ray, run_dir.root)
    st: dict[str, Stage] = {}
    st["corpus"] = corpus_stage(run_dir, cfg, run_dir.root / "data" / "wiki")
    tok_cfg = cfg.tokenizer if cfg.tokenizer.max_docs else cfg.tokenizer.model_copy(
        update={"max_docs": cfg.corpus.unique_docs})
    st["tokenizer"] = tokenizer_stage(run_dir, tok_cfg, st["corpus"].path / "candidates.parquet")
    st["tokens"] = tokens_stage(run_dir, st["tokenizer"], {"candidates": st["corpus"].path / "candidates.parquet",
                                                           "eval": st["corpus"].path / "eval.parquet"},
                                max_tokens=cfg.synth_context // 2, filter_splits=("candidates",))
    tokens = st["tokens"]
    d_ids, pool_ids = split_ids(tokens, cfg)
    cand = tokens.path / "candidates.parquet"
    eval_docs = lambda: load_token_docs(tokens.path / "eval.parquet")  # noqa: E731
    context = max(cfg.joint.train.seq_len, cfg.synth_tune.seq_len)
    st["init_model"] = init_model_stage(run_dir, cfg.model, st["tokenizer"], context=context)
    train = cfg.joint.train
    st["arm_repetition"] = train_stage(run_dir, "arm_repetition", train, st["init_model"],
                                       lambda: [TokenSource("real", load_token_docs(cand, d_ids))], eval_docs,
                                       deps=(tokens,), extra={"unique_docs": cfg.corpus.unique_docs})
    st["pairing"] = pairing_stage(run_dir, cfg, st["corpus"], tokens)
    st["synthesizer"] = train_stage(run_dir, "synthesizer", cfg.synth_tune, st["arm_repetition"],
                                    lambda: synth_tune_sources(cfg, st["corpus"], st["pairing"],
                                                               model_dir(st["arm_repetition"])),
                                    None, deps=(st["pairing"],))
    st["synthesis"] = synthesis_stage(run_dir, cfg, st["corpus"], tokens, st["synthesizer"])
    st["quality"] = quality_stage(run_dir, cfg, st["corpus"], st["pairing"], st["synthesis"])
    share = cfg.joint.synthetic_share
    if "sbp" in cfg.joint.arms:
        st["arm_sbp"] = train_stage(
            run_dir, "arm_sbp", train, st["init_model"],
            lambda: [TokenSource("real", load_token_docs(cand, d_ids), weight=1 - share),
                     TokenSource("synthetic", synthetic_docs(st["synthesis"], model_dir(st["init_model"])),
                                 weight=share, repeat=False)],
            eval_docs, deps=(tokens, st["synthesis"]), extra={"share": share, "unique_docs": cfg.corpus.unique_docs})
    if "oracle" in cfg.joint.arms:
        pool_tokens = sum(len(x) for x in load_token_docs(cand, pool_ids))
        if pool_tokens < train.token_budget:
            log.warning("the oracle pool holds %d tokens, less than the %d-token budget: the oracle arm will "
                        "repeat data (raise the corpus or lower the budget)", pool_tokens, train.token_budget)
        st["arm_oracle"] = train_stage(run_dir, "arm_oracle", train, st["init_model"],
                                       lambda: [TokenSource("oracle", load_token_docs(cand, pool_ids))], eval_docs,
                                       deps=(tokens,), extra={"oracle_docs": cfg.corpus.oracle_docs,
                                                              "unique_docs": cfg.corpus.unique_docs})
    report = write_report(run_dir, cfg, st, pool_tokens if "oracle" in cfg.joint.arms else None)
    log.info("report: %s", report)
    return {"run_dir": str(run_dir.root), "report": str(report),
            **{a: st[f"arm_{a}"].outputs.get("final_eval_loss") for a in cfg.joint.arms}}
