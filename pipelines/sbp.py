"""Synthetic Bootstrapped Pretraining (SBP), end to end and compute-matched.

corpus (the bundled wiki or ``data.corpus``; Ray Data: read, clean) -> tokenizer -> tokens
(drop documents longer than half the synthesizer context) -> repetition arm (= the baseline
checkpoint) -> pairing (embeddings on an actor pool, FAISS top-k, similarity threshold,
13-token shingle near-copy rule) -> synthesizer-tuning (loss on d2 only, from the baseline) ->
synthesis (as many documents as the SBP arm's share of the budget needs; seeds uniform over D,
engine actors through Ray Data, degenerate outputs dropped, provenance kept) -> SBP and oracle
arms at the same token budget and hyper-parameters (optionally the random-pairs control arm,
thesis B.1.3) -> data-quality figures -> report.

Every stage is resumable: a killed run re-run finishes with the same result; synthesis writes
numbered parts, so no synthetic document is generated twice.
"""
from __future__ import annotations

import json
import logging
import math
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from pipelines.stages import (ModelConfig, TokenizerConfig, init_model_stage, load_token_docs, model_dir,
                              tokenizer_stage, tokens_stage, train_stage)
from selftaught.ann import AnnConfig
from selftaught.config import EngineConfig, RayConfig, SamplingConfig, Strict, save
from selftaught.data.prepare import DataConfig, corpus_splits, prepare
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
    # None: as many documents as the SBP arm's synthetic share of the token budget needs (see
    # synthetic_target); a number: exactly that many requests, whatever share they reach.
    num_docs: int | None = Field(default=None, ge=1)
    margin: float = Field(default=0.1, ge=0)  # extra requests over the estimate (short or filtered outputs)
    max_rounds: int = Field(default=4, ge=1)  # top-ups from the measured kept tokens per request
    part_size: int = Field(default=256, ge=1)
    sampling: SamplingConfig = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=160)
    engine: EngineConfig = EngineConfig(backend="transformers", max_batch_size=64)
    shingle_n: int = Field(default=13, ge=2)
    seed: int = 0


class JointConfig(Strict):
    train: TrainConfig = TrainConfig()
    synthetic_share: float = Field(default=0.25, gt=0, lt=1)  # share of SBP batches drawn from synthetic data
    # "random_pairs": the control of thesis B.1.3, SBP with a synthesizer tuned on random pairs
    arms: list[Literal["repetition", "sbp", "oracle", "random_pairs"]] = ["repetition", "sbp", "oracle"]


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


def corpus_stage(run: RunDir, cfg: SBPConfig, paths: dict[str, Path]) -> Stage:
    """Clean the corpus (``paths``: train and eval document Parquet, files or directories of
    parts, from :func:`corpus_splits`) with Ray Data and order it by a seeded hash of the id:
    the first ``unique_docs`` (after the length filter) are D, the rest the oracle pool."""
    import ray.data

    inputs = {split: file_fingerprint(paths[split]) for split in ("train", "eval")}
    # what this stage reads: the split's seed and size (num_blocks is parallelism; unique_docs and
    # oracle_docs are read where D and the pool are cut, and are in those stages' hashes)
    st = run.stage("corpus", cfg.corpus.model_dump(include={"seed", "eval_docs"}), inputs=inputs)
    if st.up_to_date():
        return st
    st.begin(keep_partial=False)
    counts = {}
    for split in ("train", "eval"):
        ds = ray.data.read_parquet(str(paths[split]), override_num_blocks=cfg.corpus.num_blocks)
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
def _embedding_table(batch: pa.Table) -> pa.Table:
    """Ray Data step: ``row``, ``id`` and a plain ``fixed_size_list<float32>`` embedding column
    (what the index shards read straight from Parquet), whatever layout the embedder returned."""
    col = batch["embedding"]
    vecs = np.stack(col.to_numpy(zero_copy_only=False)).astype(np.float32, copy=False)
    flat = pa.array(vecs.reshape(-1), pa.float32())
    return pa.table({"row": batch["row"], "id": batch["id"],
                     "embedding": pa.FixedSizeListArray.from_arrays(flat, vecs.shape[1])})


def load_embeddings(pairing: Stage) -> tuple[list[str], np.ndarray]:
    """The pairing stage's document ids and unit-norm vectors, in D's order (for the small
    consumers: the random-pairs control and the quality sample)."""
    t = read_parquet(pairing.path / "embeddings", columns=["row", "id", "embedding"])
    t = t.sort_by("row")
    flat = t["embedding"].combine_chunks().flatten()
    return t["id"].to_pylist(), np.asarray(flat, dtype=np.float32).reshape(t.num_rows, -1)


def pairing_stage(run: RunDir, cfg: SBPConfig, corpus: Stage, tokens: Stage) -> Stage:
    """Embeddings on the embedder actor pool written as Parquet parts; the parts are loaded by
    the :class:`~selftaught.ann.ShardedIndex` shard actors themselves (``pairing.index.shards``),
    and the top-k self-join streams back batch by batch, thresholded as it arrives, so the driver
    never holds the vectors. A 13-token shingle rule then drops near-copies among the pairs."""
    import ray.data

    from actors.embedder import embed_dataset
    from selftaught.ann import ShardedIndex, pairs_above
    from selftaught.text import shares_shingle

    st = run.stage("pairing", cfg.pairing, deps=[corpus, tokens],
                   inputs={"unique_docs": cfg.corpus.unique_docs, "layout": "sharded"})
    if st.up_to_date():
        return st
    st.begin(keep_partial=False)
    d_ids, _ = split_ids(tokens, cfg)
    texts = _texts_by_id(corpus, d_ids)
    p = cfg.pairing
    ds = ray.data.from_items([{"row": i, "id": d, "text": t} for i, (d, t) in enumerate(zip(d_ids, texts))])
    # one part per shard at least (a shard loads whole parts), about 100k vectors per part at scale
    parts = max(p.index.shards, min(256, len(d_ids) // 100_000 + 1))
    embed_dataset(ds, p.embedder, p.num_actors, p.batch_size).map_batches(
        _embedding_table, batch_format="pyarrow").repartition(parts).write_parquet(str(st.path / "embeddings"))
    files = sorted(str(f) for f in (st.path / "embeddings").glob("*.parquet"))
    index = ShardedIndex.from_parquet(files, p.index, id_column="row")
    found = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))]
    candidates = 0
    try:
        for rows, scores, nbrs in index.self_join(p.top_k + 1):
            candidates += int(((nbrs >= 0) & (nbrs != rows[:, None])).sum())
            found.append(pairs_above(rows, scores, nbrs, p.threshold))  # vectorised
    finally:
        index.close()
    seeds, partners, sims = (np.concatenate(x) for x in zip(*found))
    order = np.lexsort((partners, -sims, seeds))  # seed by seed, best neighbour first: independent of shards
    stats = {"candidates": candidates, "above_threshold": len(seeds), "near_copies": 0}
    pairs = []
    for i, j, s in zip(seeds[order].tolist(), partners[order].tolist(), sims[order].tolist()):
        if shares_shingle(texts[i], texts[j], p.shingle_n):  # text check only above the threshold
            stats["near_copies"] += 1
            continue
        pairs.append({"d1_id": d_ids[i], "d2_id": d_ids[j], "score": float(s)})
    write_parquet(pa.Table.from_pylist(pairs, schema=pa.schema([("d1_id", pa.string()), ("d2_id", pa.string()),
                                                                 ("score", pa.float32())])),
                  st.path / "pairs.parquet")
    st.finish(pairs=len(pairs), documents=len(d_ids), seeds_with_pairs=len({q["d1_id"] for q in pairs}),
              mean_similarity=float(np.mean([q["score"] for q in pairs])) if pairs else None,
              index_shards=len(index.shards), **stats)
    return st


def random_pairs_stage(run: RunDir, cfg: SBPConfig, pairing: Stage) -> Stage:
    """The control of thesis B.1.3: the same seeds d1 and as many pairs as nearest-neighbour
    pairing kept, each d2 drawn uniformly from D (never d1 itself), so a synthesizer tuned on
    them sees as much data but no relation. ``score`` is the pair's cosine similarity."""
    st = run.stage("pairing_random", {"seed": cfg.corpus.seed}, deps=[pairing])
    if st.up_to_date():
        return st
    st.begin(keep_partial=False)
    ids, vec = load_embeddings(pairing)
    pos = {d: i for i, d in enumerate(ids)}
    d1 = read_parquet(pairing.path / "pairs.parquet", columns=["d1_id"])["d1_id"].to_pylist()
    a = np.array([pos[d] for d in d1], dtype=np.int64)
    b = np.random.default_rng([cfg.corpus.seed, 1]).integers(0, len(ids) - 1, len(a))
    b = b + (b >= a)  # skip d1 itself
    score = np.sum(vec[a] * vec[b], axis=1) if len(a) else np.zeros(0, np.float32)
    write_parquet(pa.table({"d1_id": pa.array([ids[i] for i in a], pa.string()),
                            "d2_id": pa.array([ids[i] for i in b], pa.string()),
                            "score": pa.array(score, pa.float32())}), st.path / "pairs.parquet")
    st.finish(pairs=len(a), mean_similarity=float(score.mean()) if len(a) else None,
              nearest_neighbour_similarity=pairing.outputs.get("mean_similarity"))
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
SYNTH_SCHEMA = pa.schema([("k", pa.int64()), ("id", pa.string()), ("seed_id", pa.string()), ("text", pa.string()),
                          ("tokens", pa.int32()), ("completion_tokens", pa.int32()), ("finish_reason", pa.string()),
                          ("kept", pa.bool_()), ("drop_reason", pa.string()), ("sampling", pa.string()),
                          ("synthesizer", pa.string())])


def synthetic_target(cfg: SBPConfig) -> int:
    """Synthetic tokens the SBP arm will draw: each of its micro-batches comes from the
    synthetic source with probability ``synthetic_share`` and takes ``micro_batch_size`` windows
    of ``seq_len + 1`` tokens. The draw is random, so each rank plans its expected count plus
    three standard deviations; fewer tokens would exhaust the source and lower the share."""
    t, p = cfg.joint.train, cfg.joint.synthetic_share
    per_rank = t.total_steps() * t.grad_accum
    batches = math.ceil(per_rank * p + 3 * math.sqrt(per_rank * p * (1 - p)))
    return batches * t.num_workers * t.micro_batch_size * (t.seq_len + 1)


# Dense bf16 peak of one H100 / H200 and a utilisation a tuned run reaches: GPU-hours in a plan
# are estimates from these, stated in the plan, not measurements.
PLAN_PEAK_FLOPS, PLAN_MFU = 989e12, 0.40


def plan(cfg: SBPConfig) -> dict:
    """What a run of ``cfg`` needs, before it runs: documents, tokens per phase and estimated
    GPU-hours (6 N T for training, 2 N T for generation, at ``PLAN_MFU`` of one H100), so a
    thesis-scale config can be sized and budgeted."""
    from selftaught.models import MODEL_SIZES

    shape = MODEL_SIZES.get(cfg.model.size)
    params = shape.num_params(cfg.tokenizer.vocab_size) if shape else None
    train_tokens = cfg.joint.train.token_budget * len(cfg.joint.arms)
    tune_tokens = cfg.synth_tune.token_budget * (2 if "random_pairs" in cfg.joint.arms else 1)
    synthetic = synthetic_target(cfg) * (2 if "random_pairs" in cfg.joint.arms else 1)
    out = {"documents_D": cfg.corpus.unique_docs, "arms": list(cfg.joint.arms),
           "token_budget_per_arm": cfg.joint.train.token_budget, "training_tokens_all_arms": train_tokens,
           "synthesizer_tuning_tokens": tune_tokens, "synthetic_tokens_needed": synthetic,
           "synthetic_share": cfg.joint.synthetic_share, "model_size": cfg.model.size, "parameters": params}
    if params:
        flops = 6 * params * (train_tokens + tune_tokens) + 2 * params * synthetic * (1 + cfg.synthesis.margin)
        out["estimated_h100_hours"] = round(flops / (PLAN_PEAK_FLOPS * PLAN_MFU) / 3600, 2)
        out["estimate_assumes"] = f"{PLAN_MFU:.0%} MFU of {PLAN_PEAK_FLOPS / 1e12:.0f} TFLOP/s (bf16 dense)"
    return out


def plan_requests(target: int, have: int, tokens_per_request: float, margin: float, part_size: int) -> int:
    """Further synthesis requests for kept tokens to reach ``target``: the shortfall over the
    kept tokens one request yields (measured, or estimated before any), plus ``margin``,
    rounded up to whole parts (parts are the unit of resumption)."""
    if have >= target:
        return 0
    n = math.ceil((target - have) / max(tokens_per_request, 1e-9) * (1 + margin))
    return math.ceil(n / part_size) * part_size


def synthesis_stage(run: RunDir, cfg: SBPConfig, corpus: Stage, tokens: Stage, synth: Stage,
                    name: str = "synthesis") -> Stage:
    """Seeds uniform over D (drawn per part); one numbered Parquet part per ``part_size`` seeds,
    so a killed run resumes at the first missing part and never regenerates (or duplicates) a
    document. Without ``num_docs`` the request count follows the budget: a first round from the
    documents' mean length, then top-ups from the measured kept tokens per request, until the
    kept tokens cover :func:`synthetic_target`. The plan is not in the stage hash, so a larger
    share or budget tops up the existing parts instead of regenerating them."""
    s = cfg.synthesis
    st = run.stage(name, {**s.model_dump(exclude={"num_docs", "margin", "max_rounds"}), "seeding": "per-part"},
                   deps=[synth, tokens])
    target = synthetic_target(cfg) if s.num_docs is None else None
    plan = {"target_tokens": target, "num_docs": s.num_docs, "margin": s.margin, "max_rounds": s.max_rounds}
    if st.complete and st.outputs.get("plan") == plan:
        log.info("stage %s: up to date, skipped", name)
        return st
    st.begin(keep_partial=True)
    d_ids, _ = split_ids(tokens, cfg)
    docs = dict(zip(d_ids, load_token_docs(tokens.path / "candidates.parquet", d_ids)))
    parts = st.parts()
    gen = _Generator(cfg, docs, d_ids, model_dir(synth), parts)
    if s.num_docs is not None:
        requests, rounds = gen.upto(s.num_docs), 1
    else:
        est = float(np.mean([min(len(x), s.sampling.max_new_tokens + 1) for x in docs.values()]))
        requests, rounds, have = 0, 0, 0
        while rounds < s.max_rounds:
            more = plan_requests(target, have, have / requests if requests else est, s.margin, s.part_size)
            if not more:
                break
            requests, rounds = gen.upto(requests + more), rounds + 1
            have = _kept_tokens(_requested(parts, requests, ["k", "kept", "tokens"]))
            if not have:
                raise ValueError(f"{name}: no output of {requests} requests survived the filters; see "
                                 f"{parts.dir} (drop_reason) and the synthesizer")
        if have < target:
            log.warning("%s: %d kept tokens after %d rounds, short of the %d the share needs: the SBP arm "
                        "will run at a lower share (raise synthesis.max_rounds or margin)", name, have, rounds, target)
    all_rows = _requested(parts, requests)
    kept = all_rows.filter(all_rows["kept"])
    write_parquet(kept.drop_columns(["k"]), st.path / "synthetic.parquet")
    drops = {}
    for reason in all_rows["drop_reason"].to_pylist():
        if reason:
            drops[reason] = drops.get(reason, 0) + 1
    st.finish(generated=all_rows.num_rows, kept=kept.num_rows, dropped=drops, rounds=rounds, plan=plan,
              kept_tokens=_kept_tokens(all_rows),
              completion_tokens=int(pc.sum(all_rows["completion_tokens"]).as_py() or 0))
    return st


def _requested(parts, n: int, columns: list[str] | None = None) -> pa.Table:
    """The first ``n`` requests' rows (parts may hold more, left by an earlier, larger plan)."""
    rows = parts.read(columns)
    return rows.filter(pc.less(rows["k"], n))


def _kept_tokens(rows: pa.Table) -> int:
    return int(pc.sum(rows.filter(rows["kept"])["tokens"]).as_py() or 0)


class _Generator:
    """Writes synthesis parts ``[0, n)``: part ``p`` holds requests ``p * part_size ...``, its
    seeds drawn from ``rng([seed, p])`` and each request's sampling seed from its index, so a
    part's content does not depend on how many parts a plan asks for."""

    def __init__(self, cfg: SBPConfig, docs: dict[str, np.ndarray], d_ids: list[str], syn_dir: Path, parts):
        from selftaught.models import load_tokenizer

        self.cfg, self.docs, self.d_ids, self.parts = cfg, docs, d_ids, parts
        self.tok = load_tokenizer(syn_dir)
        self.sep = self.tok("\n\n", add_special_tokens=False)["input_ids"]
        self.engine = cfg.synthesis.engine.model_copy(update={"model": str(syn_dir)})
        self.provenance = str(syn_dir)

    def upto(self, n: int) -> int:
        ps = self.cfg.synthesis.part_size
        for p in range(math.ceil(n / ps)):
            count = min(ps, n - p * ps)
            done = self.parts.done(p) and pq.read_metadata(self.parts.path(p)).num_rows >= count
            if not done:
                self.parts.write(p, self._part(p, count))
        return n

    def _part(self, p: int, count: int) -> pa.Table:
        import ray.data

        from actors.generator import generate_dataset
        from selftaught.text import has_repeated_shingle

        s, half = self.cfg.synthesis, self.cfg.synth_context // 2
        picks = np.random.default_rng([s.seed, p]).integers(0, len(self.d_ids), s.part_size)[:count]
        rows = []
        for k, i in enumerate(picks, start=p * s.part_size):
            d1 = self.docs[self.d_ids[i]][:-1][-half:].tolist()  # without its EOS; the end nearest to d2, as in tuning
            over = {"seed": (s.sampling.seed or 0) * 1_000_003 + s.seed * 7919 + k}
            rows.append({"k": k, "seed_id": self.d_ids[i], "prompt": d1 + self.sep, "sampling": json.dumps(over)})
        max_new = min(s.sampling.max_new_tokens, self.cfg.synth_context - max(len(r["prompt"]) for r in rows))
        sampling = s.sampling.model_copy(update={"max_new_tokens": max(8, max_new)})
        out = generate_dataset(ray.data.from_items(rows), self.engine, sampling, sampling_column="sampling").take_all()
        out.sort(key=lambda r: r["k"])
        texts = [r["generated_text"].strip() for r in out]
        lengths = [len(x) + 1 for x in self.tok(texts, add_special_tokens=False)["input_ids"]]  # + EOS, as trained
        table = []
        for r, text, n_tok in zip(out, texts, lengths):
            reason = ("empty" if not text else
                      "repeated_shingle" if has_repeated_shingle(text, s.shingle_n) else "")
            table.append({"k": int(r["k"]), "id": f"synthetic/{r['k']}", "seed_id": r["seed_id"], "text": text,
                          "tokens": n_tok if text else 0, "completion_tokens": int(r["completion_tokens"]),
                          "finish_reason": r["finish_reason"], "kept": not reason, "drop_reason": reason,
                          "sampling": json.dumps({**sampling.model_dump(), **json.loads(r["sampling"])}),
                          "synthesizer": self.provenance})
        log.info("synthesis part %d: %d documents, %d kept", p, len(table), sum(t["kept"] for t in table))
        return pa.Table.from_pylist(table, schema=SYNTH_SCHEMA)


def synthetic_docs(synthesis: Stage, tok_dir: Path) -> list[np.ndarray]:
    from selftaught.models import load_tokenizer
    from trainers.data import tokenize_documents

    return tokenize_documents(load_tokenizer(tok_dir), read_parquet(synthesis.path / "synthetic.parquet",
                                                                    columns=["text"])["text"].to_pylist())


# ------------------------------------------------------------------------------------ quality
def quality_stage(run: RunDir, cfg: SBPConfig, corpus: Stage, pairing: Stage, synthesis: Stage,
                  name: str = "quality") -> Stage:
    """The synthetic set's quality figures (lower is better for the first three)."""
    from actors.embedder import embed_texts
    from selftaught.text import quality_figures

    shingles = {"shingle_n": cfg.synthesis.shingle_n, "pair_shingle_n": cfg.pairing.shingle_n}
    st = run.stage(name, {"sample": cfg.quality_sample, **shingles, "figures": 2}, deps=[synthesis, pairing],
                   inputs={"plan": synthesis.outputs.get("plan")})  # a top-up changes the set, not the hash
    if st.up_to_date():
        return st
    st.begin(keep_partial=False)
    syn = read_parquet(synthesis.path / "synthetic.parquet", columns=["seed_id", "text"]).to_pylist()
    rng = np.random.default_rng(0)
    sample = [syn[i] for i in rng.permutation(len(syn))[: cfg.quality_sample]]
    seeds = _texts_by_id(corpus, [r["seed_id"] for r in sample])
    emb_ids, vec = load_embeddings(pairing)
    pos = {d: i for i, d in enumerate(emb_ids)}
    out_vec = embed_texts([r["text"] for r in sample], cfg.pairing.embedder) if sample else np.zeros((0, 1))
    seed_vec = vec[[pos[r["seed_id"]] for r in sample]] if sample else np.zeros((0, 1))
    pairs = read_parquet(pairing.path / "pairs.parquet", columns=["score"])["score"].to_pylist()
    a, b = rng.integers(0, len(vec), 2000), rng.integers(0, len(vec), 2000)
    figures = {
        "synthetic_documents": len(syn),
        **quality_figures([r["text"] for r in syn], seeds, [r["text"] for r in sample], **shingles),
        "seed_to_output_similarity": float(np.mean(np.sum(out_vec * seed_vec, axis=1))) if sample else None,
        # the control for it: the same outputs against other samples' seeds (a rotation, so never
        # their own): what any output of this synthesizer scores against an unrelated seed
        "other_seed_to_output_similarity": (float(np.mean(np.sum(out_vec * np.roll(seed_vec, 1, axis=0), axis=1)))
                                            if len(sample) > 1 else None),
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
    achieved = achieved_shares(final)
    lines = ["# SBP report", "",
             f"Token budget per arm: {cfg.joint.train.token_budget:,} (same hyper-parameters for every arm). "
             f"|D| = {st['pairing'].outputs.get('documents')} documents; synthetic share of SBP batches: "
             f"{cfg.joint.synthetic_share}." + (f" Oracle pool: {pool_tokens:,} unique tokens"
                                                 f"{' (fewer than the budget: the oracle repeats data)' if pool_tokens < cfg.joint.train.token_budget else ''}."
                                                 if pool_tokens is not None else ""), "",
             f"Synthetic share: configured {cfg.joint.synthetic_share:.1%}, achieved "
             + (", ".join(f"{v:.1%} ({a})" for a, v in achieved.items()) or "n/a") + ".", "",
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
        # the share is defined only when the oracle beats repetition (else: no gain to share)
        frac = ("-" if oracle is None or a == "repetition" else
                f"{gain / (base - oracle):.0%}" if base - oracle > 0 else "n/a (oracle no better)")
        lines.append(f"| {a} | {out['tokens_seen']:,} | {real:,} | {syn:,} | {loss:.4f} | {np.exp(loss):.1f} | "
                     f"{gain:+.4f} | {frac} |")
    q = st["quality"].outputs
    pr = st["pairing"].outputs
    sy = st["synthesis"].outputs
    syr = st["synthesis_random"].outputs if "synthesis_random" in st else None
    qr = st["quality_random"].outputs if "quality_random" in st else {}
    rp = st["pairing_random"].outputs if "pairing_random" in st else None
    nn_sim = pr.get("mean_similarity") or float("nan")
    rp_line = [f"Random pairs (control, thesis B.1.3): {rp['pairs']:,}, mean similarity {rp['mean_similarity']:.3f} "
               f"against {nn_sim:.3f} for the nearest-neighbour pairs."] if rp else []
    lines += ["", "![held-out loss](curves.png)", "", "## Pairing", "",
              f"{pr['documents']} documents, {pr['candidates']:,} neighbour candidates, {pr['above_threshold']:,} above "
              f"the {cfg.pairing.threshold} threshold, {pr['near_copies']} near-copies dropped (13-token shingle rule), "
              f"{pr['pairs']:,} pairs over {pr['seeds_with_pairs']} seed documents.", "",
              "## Synthetic data", "",
              _synthesis_line(sy), *([_synthesis_line(syr, "Random-pairs synthesizer: ")] if syr else []), *rp_line, "",
              "| measure | value |" + (" random pairs |" if qr else ""), "|---|---|" + ("---|" if qr else "")]
    fmt = lambda v: v if not isinstance(v, float) else f"{v:.3f}"  # noqa: E731
    for k, v in q.items():
        lines.append(f"| {k} | {fmt(v)} |" + (f" {fmt(qr.get(k))} |" if qr else ""))
    samples = json.loads((st["quality"].path / "samples.json").read_text())
    lines += ["", "## Sample pairs (seed -> synthetic)", ""]
    for s in samples[:3]:
        lines += [f"- **seed:** {s['seed'][:240]}", f"  **synthetic:** {s['synthetic'][:240]}"]
    path = run.root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    extra = {k: st[k].outputs for k in ("pairing_random", "synthesis_random", "quality_random") if k in st}
    (run.root / "results.json").write_text(json.dumps(
        {"arms": final, "share": {"configured": cfg.joint.synthetic_share, "achieved": achieved},
         "quality": q, "pairing": pr, "synthesis": sy, **extra}, indent=2, default=str))
    return path


def achieved_shares(final: dict[str, dict]) -> dict[str, float]:
    """Synthetic tokens over tokens seen, per arm that drew synthetic data: what the arm ran
    at, which falls short of the configured share when the synthetic source runs out."""
    return {a: out["sources"]["synthetic"]["tokens"] / out["tokens_seen"]
            for a, out in final.items() if "synthetic" in out.get("sources", {}) and out.get("tokens_seen")}


def _synthesis_line(sy: dict, prefix: str = "") -> str:
    plan = sy.get("plan") or {}
    budget = (f" Planned from the budget: {plan['target_tokens']:,} synthetic tokens needed, {sy['kept_tokens']:,} "
              f"kept after {sy['rounds']} round(s)." if plan.get("target_tokens") else "")
    return (f"{prefix}{sy['generated']:,} generated, {sy['kept']:,} kept, dropped: {sy['dropped'] or 'none'}."
            + budget)


# ------------------------------------------------------------------------------------ driver
def run(cfg: SBPConfig) -> dict:
    from selftaught.runtime import init_ray
    from trainers.mixture import TokenSource

    run_dir = RunDir(cfg.run_dir)
    save(cfg, run_dir.root / "config.yaml")
    prepare(cfg.data.model_copy(update={"datasets": ["wiki"]}), run_dir.root / "data")  # only what SBP reads
    init_ray(cfg.ray, run_dir.root)
    st: dict[str, Stage] = {}
    st["corpus"] = corpus_stage(run_dir, cfg, corpus_splits(cfg.data, run_dir.root / "data"))
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

    def sbp_arm(arm: str, synthesis: Stage) -> Stage:
        return train_stage(
            run_dir, f"arm_{arm}", train, st["init_model"],
            lambda: [TokenSource("real", load_token_docs(cand, d_ids), weight=1 - share),
                     TokenSource("synthetic", synthetic_docs(synthesis, model_dir(st["init_model"])),
                                 weight=share, repeat=False)],
            eval_docs, deps=(tokens, synthesis), extra={"share": share, "unique_docs": cfg.corpus.unique_docs,
                                                        "synthesis": synthesis.outputs.get("plan")})

    if "sbp" in cfg.joint.arms:
        st["arm_sbp"] = sbp_arm("sbp", st["synthesis"])
    if "random_pairs" in cfg.joint.arms:
        st["pairing_random"] = random_pairs_stage(run_dir, cfg, st["pairing"])
        st["synthesizer_random"] = train_stage(
            run_dir, "synthesizer_random", cfg.synth_tune, st["arm_repetition"],
            lambda: synth_tune_sources(cfg, st["corpus"], st["pairing_random"], model_dir(st["arm_repetition"])),
            None, deps=(st["pairing_random"],))
        st["synthesis_random"] = synthesis_stage(run_dir, cfg, st["corpus"], tokens, st["synthesizer_random"],
                                                 name="synthesis_random")
        st["quality_random"] = quality_stage(run_dir, cfg, st["corpus"], st["pairing"], st["synthesis_random"],
                                             name="quality_random")
        st["arm_random_pairs"] = sbp_arm("random_pairs", st["synthesis_random"])
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
