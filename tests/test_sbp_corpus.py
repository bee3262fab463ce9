"""SBP on a user's corpus: any Parquet with a `text` column (a file, a directory of parts, a
file:// URI), the held-out split cut by a seeded hash, bad rows counted, the thesis-scale
configs refusing to run without a corpus, and the random-pairs control's pairs. The corpus is
generated here: topical documents, so nearest-neighbour pairs exist and random ones are unrelated."""
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from pipelines.sbp import SBPConfig, corpus_stage, pairing_stage, random_pairs_stage
from selftaught.config import resolve
from selftaught.data.prepare import DataConfig, corpus_splits, prepare
from selftaught.storage import RunDir, read_parquet

TOPICS = {
    "astronomy": "star planet orbit galaxy telescope comet moon nebula solar eclipse gravity asteroid",
    "cooking": "bread oven flour butter recipe sauce garlic onion roast bake spice kitchen",
    "football": "goal striker referee stadium league match penalty keeper season coach pitch trophy",
    "finance": "bank interest loan bond market stock inflation credit budget tax dividend investor",
    "botany": "leaf root flower seed petal stem pollen soil garden tree fern blossom",
    "music": "guitar melody chord rhythm song piano drum concert orchestra violin tempo lyric",
}
FILLER = "the a of and in with on for is was to from by".split()


def make_docs(n: int, seed: int = 0) -> list[dict]:
    """``n`` documents of 30-60 words, each from one topic's vocabulary plus function words."""
    rng = np.random.default_rng(seed)
    names = sorted(TOPICS)
    docs = []
    for i in range(n):
        topic = names[i % len(names)]
        words = TOPICS[topic].split()
        sentences = []
        for _ in range(int(rng.integers(4, 7))):
            w = [str(rng.choice(words if rng.random() < 0.7 else FILLER)) for _ in range(int(rng.integers(7, 11)))]
            sentences.append(" ".join(w).capitalize() + ".")
        docs.append({"id": f"doc-{i:04d}", "text": " ".join(sentences), "title": f"{topic} {i}", "category": topic})
    return docs


def write_corpus(root, n: int = 300, bad: bool = True):
    """Two Parquet parts (plus files a reader must ignore); with ``bad``, malformed rows too."""
    root.mkdir(parents=True, exist_ok=True)
    docs = make_docs(n)
    first, second = docs[: n // 2], docs[n // 2:]
    if bad:
        second = second + [{"id": "doc-null", "text": None, "title": "x", "category": "x"},
                           {"id": "doc-blank", "text": "   ", "title": "x", "category": "x"},
                           {**docs[0], "title": "a repeated id"}]
    pq.write_table(pa.Table.from_pylist(first), root / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(second), root / "part-1.parquet")
    (root / "_SUCCESS").write_text("")
    pq.write_table(pa.table({"junk": [1]}), root / ".part-2.parquet.tmp.parquet")  # hidden: an unfinished write
    return docs


def split_ids(out) -> tuple[set, set]:
    paths = corpus_splits(DataConfig(datasets=[], corpus="set"), out)
    return tuple(set(read_parquet(paths[k], ["id"])["id"].to_pylist()) for k in ("train", "eval"))


def test_user_corpus_from_parts_file_and_uri_split_by_seeded_hash(tmp_path):
    docs = write_corpus(tmp_path / "corpus")
    out = prepare(DataConfig(datasets=["wiki"], corpus=str(tmp_path / "corpus"), eval_fraction=0.2), tmp_path / "a")
    assert set(out) == {"corpus"}  # a user corpus replaces the bundled wiki
    stats = out["corpus"]["stats"]
    assert stats == {"read": 303, "kept": 300, "skipped_empty": 2, "skipped_malformed": 0, "skipped_duplicate": 1,
                     "skipped_in_eval": 0}
    train, held = split_ids(tmp_path / "a")
    expected = {d["id"] for d in docs if zlib.crc32(d["id"].encode()) % 10_000 < 2_000}
    assert held == expected and train == {d["id"] for d in docs} - expected and 30 < len(held) < 90
    table = read_parquet(corpus_splits(DataConfig(corpus="set"), tmp_path / "a")["train"])
    row = table.to_pylist()[0]
    assert row["source"] == "corpus" and row["title"] and '"category"' in row["metadata"]

    # the same split from a file:// URI, and from one file with no id column (ids from the text)
    uri = (tmp_path / "corpus").as_uri()
    prepare(DataConfig(datasets=[], corpus=uri, eval_fraction=0.2), tmp_path / "b")
    assert split_ids(tmp_path / "b") == (train, held)
    pq.write_table(pa.Table.from_pylist([{"text": d["text"]} for d in docs]), tmp_path / "one.parquet")
    prepare(DataConfig(datasets=[], corpus=str(tmp_path / "one.parquet"), eval_fraction=0.2), tmp_path / "c")
    t1, h1 = split_ids(tmp_path / "c")
    assert len(t1) + len(h1) == 300 and all(i.startswith("doc/") for i in t1 | h1)
    prepare(DataConfig(datasets=[], corpus=str(tmp_path / "one.parquet"), eval_fraction=0.2), tmp_path / "c2")
    assert split_ids(tmp_path / "c2") == (t1, h1)  # stable across runs
    prepare(DataConfig(datasets=[], corpus=uri, eval_fraction=0.2, split_seed=7), tmp_path / "d")
    assert split_ids(tmp_path / "d")[1] != held  # the seed reshuffles the held-out set


def test_given_eval_split_and_bad_inputs(tmp_path, caplog):
    docs = write_corpus(tmp_path / "corpus", bad=False)
    pq.write_table(pa.Table.from_pylist(docs[:20]), tmp_path / "eval.parquet")
    out = prepare(DataConfig(datasets=[], corpus=str(tmp_path / "corpus"), eval=str(tmp_path / "eval.parquet")),
                  tmp_path / "a")["corpus"]
    assert out["eval_docs"] == 20 and out["train_docs"] == 280 and out["stats"]["skipped_in_eval"] == 20
    train, held = split_ids(tmp_path / "a")
    assert held == {d["id"] for d in docs[:20]} and not train & held

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "corpus" / "part-2.parquet")  # wrong type: skipped
    with caplog.at_level("WARNING"):
        out = prepare(DataConfig(datasets=[], corpus=str(tmp_path / "corpus")), tmp_path / "b")["corpus"]
    assert out["stats"]["skipped_malformed"] == 3 and out["stats"]["kept"] == 300
    assert "not a string" in caplog.text

    pq.write_table(pa.table({"body": ["no text column"]}), tmp_path / "notext.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        prepare(DataConfig(datasets=[], corpus=str(tmp_path / "notext.parquet")), tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no such file"):
        prepare(DataConfig(datasets=[], corpus=str(tmp_path / "missing")), tmp_path / "d")
    with pytest.raises(ValidationError, match="set data.corpus too"):
        DataConfig(eval=str(tmp_path / "eval.parquet"))


@pytest.mark.parametrize("name", ["3b-200b", "6b-1t"])
def test_thesis_scale_configs_require_a_corpus(name):
    with pytest.raises(ValidationError, match=r"data.corpus must be set to your corpus.*--set data.corpus=PATH"):
        resolve(SBPConfig, f"examples/sbp/{name}.yaml")
    cfg = resolve(SBPConfig, f"examples/sbp/{name}.yaml", ["data.corpus=s3://bucket/corpus/"])
    assert cfg.data.corpus == "s3://bucket/corpus/" and cfg.synthesis.num_docs is None  # budget-driven


def test_sbp_stages_on_a_user_corpus_and_random_pairs(ray_cluster, tmp_path):
    """Corpus, tokenizer, tokens and pairing stages on the generated corpus; the random-pairs
    control keeps the seeds but its pairs are far less similar than the nearest neighbours."""
    from pipelines.stages import TokenizerConfig, tokenizer_stage, tokens_stage

    write_corpus(tmp_path / "corpus")
    cfg = resolve(SBPConfig, None, [f"run_dir={tmp_path / 'run'}", f"data.corpus={(tmp_path / 'corpus').as_uri()}",
                                    "data.datasets=[]", "data.eval_fraction=0.2", "corpus.unique_docs=150",
                                    "corpus.eval_docs=40",
                                    "pairing.top_k=5", "pairing.threshold=0.5", "pairing.num_actors=1",
                                    "synth_tune.seq_len=256", "joint.arms=[repetition,sbp,random_pairs]"])
    run = RunDir(cfg.run_dir)
    prepare(cfg.data, run.root / "data")
    corpus = corpus_stage(run, cfg, corpus_splits(cfg.data, run.root / "data"))
    assert corpus.outputs["eval"] == 40 and corpus.outputs["candidates"] > 200
    tok = tokenizer_stage(run, TokenizerConfig(vocab_size=512), corpus.path / "candidates.parquet")
    tokens = tokens_stage(run, tok, {"candidates": corpus.path / "candidates.parquet",
                                     "eval": corpus.path / "eval.parquet"},
                          max_tokens=cfg.synth_context // 2, filter_splits=("candidates",))
    pairing = pairing_stage(run, cfg, corpus, tokens)
    assert pairing.outputs["pairs"] > 100
    rand = random_pairs_stage(run, cfg, pairing)
    nn = read_parquet(pairing.path / "pairs.parquet").to_pylist()
    rp = read_parquet(rand.path / "pairs.parquet").to_pylist()
    assert len(rp) == len(nn) and [p["d1_id"] for p in rp] == [p["d1_id"] for p in nn]
    assert all(p["d1_id"] != p["d2_id"] for p in rp)
    assert rand.outputs["mean_similarity"] < pairing.outputs["mean_similarity"] - 0.2
    # the same pairs when the index is split over two shard actors that read their own parts
    sharded = pairing_stage(run, cfg.model_copy(update={"pairing": cfg.pairing.model_copy(
        update={"index": cfg.pairing.index.model_copy(update={"shards": 2})})}), corpus, tokens)
    assert sharded.outputs["index_shards"] == 2
    again = read_parquet(sharded.path / "pairs.parquet").to_pylist()
    assert [(p["d1_id"], p["d2_id"]) for p in again] == [(p["d1_id"], p["d2_id"]) for p in nn]
    assert np.allclose([p["score"] for p in again], [p["score"] for p in nn], atol=1e-5)
    # a stage reruns when a field it reads outside its own section changes, and only then
    fewer = cfg.model_copy(update={"corpus": cfg.corpus.model_copy(update={"unique_docs": 120})})
    smaller = pairing_stage(run, fewer, corpus, tokens)  # pairing reads corpus.unique_docs (D's size)
    assert smaller.hash != pairing.hash and smaller.outputs["documents"] == 120
    assert random_pairs_stage(run, fewer, smaller).hash != rand.hash  # and what depends on it follows
    parallel = cfg.model_copy(update={"corpus": cfg.corpus.model_copy(update={"num_blocks": 7})})
    marker = (corpus.path / "_STAGE.json").stat().st_mtime_ns
    assert corpus_stage(run, parallel, corpus_splits(cfg.data, run.root / "data")).complete
    assert (corpus.path / "_STAGE.json").stat().st_mtime_ns == marker  # parallelism is not a result


def test_config_show_plans_a_thesis_scale_run(capsys):
    """`config show` states what a run needs before it runs: documents, tokens, GPU-hours."""
    from selftaught.cli import main

    assert main(["config", "show", "-c", "examples/sbp/3b-200b.yaml",
                 "--set", "data.corpus=/data/corpus"]) == 0
    out = capsys.readouterr().out
    plan = dict(line[4:].split(": ", 1) for line in out.splitlines() if line.startswith("#   "))
    assert int(plan["training_tokens_all_arms"]) == 3 * int(plan["token_budget_per_arm"])
    assert int(plan["synthetic_tokens_needed"]) > 0.375 * int(plan["token_budget_per_arm"])  # expected + margin
    assert float(plan["estimated_h100_hours"]) > 1000 and "MFU" in plan["estimate_assumes"]
