"""SBP end to end at toy scale, stage by stage, and resumption after a kill. Synthesis is
budget-driven and the random-pairs control arm (thesis B.1.3) runs too."""
import json

import numpy as np
import pytest

from pipelines.sbp import SBPConfig, load_embeddings, plan_requests, run, split_ids, synthesis_stage, synthetic_target
from selftaught.config import resolve
from selftaught.storage import Stage, read_parquet

TOY = ["corpus.unique_docs=150", "corpus.eval_docs=40", "corpus.oracle_docs=400", "model.size=nano",
       "tokenizer.vocab_size=512", "pairing.top_k=10", "pairing.threshold=0.5", "pairing.num_actors=1",
       "synth_tune.token_budget=8192", "synth_tune.seq_len=256", "synth_tune.micro_batch_size=4",
       "synth_tune.cpus_per_worker=1", "synth_tune.progress=false",
       "synthesis.part_size=64", "synthesis.sampling.max_new_tokens=40",
       "synthesis.engine.cpus_per_actor=1", "joint.train.token_budget=24576", "joint.train.seq_len=64",
       "joint.train.micro_batch_size=8", "joint.train.eval_every=8", "joint.train.log_every=4",
       "joint.train.eval_tokens=2048", "joint.train.cpus_per_worker=1", "joint.train.progress=false",
       "quality_sample=12", "joint.arms=[repetition,sbp,oracle,random_pairs]"]


@pytest.fixture(scope="module")
def sbp_run(ray_cluster, tmp_path_factory):
    d = tmp_path_factory.mktemp("sbp")
    cfg = resolve(SBPConfig, "examples/sbp/tiny.yaml", TOY + [f"run_dir={d}"])
    return cfg, d, run(cfg)


def test_arms_are_compute_matched_and_reported(sbp_run):
    cfg, d, out = sbp_run
    results = json.loads((d / "results.json").read_text())
    arms = results["arms"]
    assert set(arms) == {"repetition", "sbp", "oracle", "random_pairs"}
    assert {a["tokens_seen"] for a in arms.values()} == {cfg.joint.train.token_budget}
    syn = arms["sbp"]["sources"]["synthetic"]["tokens"]
    assert 0 < syn < cfg.joint.train.token_budget
    assert "| repetition |" in (d / "report.md").read_text() and (d / "curves.png").stat().st_size > 1000
    assert all(isinstance(out[a], float) for a in ("repetition", "sbp", "oracle", "random_pairs"))
    assert all(a["final_eval_loss"] < a["initial_eval_loss"] for a in arms.values())


def test_split_and_length_filter(sbp_run):
    cfg, d, _ = sbp_run
    tokens = json.loads((d / "tokens" / "_STAGE.json").read_text())["outputs"]
    assert tokens["candidates"]["dropped"]["too_long"] > 0  # longer than half the synthesizer context
    assert tokens["eval"]["dropped"]["too_long"] == 0  # the held-out set is not filtered
    ids = read_parquet(d / "tokens" / "candidates.parquet")
    assert max(len(x) for x in ids["ids"].to_pylist()) <= cfg.synth_tune.seq_len // 2


def test_pairs_respect_threshold_and_shingle_rule(sbp_run):
    from selftaught.text import shares_shingle

    cfg, d, _ = sbp_run
    pairs = read_parquet(d / "pairing" / "pairs.parquet").to_pylist()
    assert pairs and all(p["score"] > cfg.pairing.threshold and p["d1_id"] != p["d2_id"] for p in pairs)
    text = dict(zip(*[read_parquet(d / "corpus" / "candidates.parquet")[c].to_pylist() for c in ("id", "text")]))
    assert not any(shares_shingle(text[p["d1_id"]], text[p["d2_id"]], 13) for p in pairs)
    ids, v = load_embeddings(Stage("pairing", d / "pairing", ""))
    assert ids == split_ids(Stage("tokens", d / "tokens", ""), cfg)[0]  # D's order, whatever the shard layout
    assert v.shape == (cfg.corpus.unique_docs, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)


def test_synthesis_follows_the_budget_and_the_report_states_the_achieved_share(sbp_run):
    """The SBP arm never runs out of synthetic data (it would fall back to real data and run at a
    lower share, as the main job once did at 98k of 150k tokens): synthesis generates whole parts
    until the kept tokens cover the target, and the report states configured vs achieved share."""
    cfg, d, _ = sbp_run
    results = json.loads((d / "results.json").read_text())
    sy = results["synthesis"]
    assert sy["plan"]["target_tokens"] == synthetic_target(cfg) and sy["kept_tokens"] >= synthetic_target(cfg)
    assert sy["generated"] % cfg.synthesis.part_size == 0
    per_request = sy["kept_tokens"] / sy["generated"]  # no more parts than the shortfall needs, plus margin
    assert sy["generated"] <= plan_requests(synthetic_target(cfg), 0, per_request, cfg.synthesis.margin,
                                            cfg.synthesis.part_size) + cfg.synthesis.part_size
    for arm in ("sbp", "random_pairs"):
        assert "synthetic" not in results["arms"][arm]["exhausted_sources"]
        achieved = results["share"]["achieved"][arm]
        assert achieved == results["arms"][arm]["sources"]["synthetic"]["tokens"] / cfg.joint.train.token_budget
        assert abs(achieved - cfg.joint.synthetic_share) < 0.25  # a random draw per micro-batch
    assert results["share"]["configured"] == cfg.joint.synthetic_share
    report = (d / "report.md").read_text()
    assert f"Synthetic share: configured {cfg.joint.synthetic_share:.1%}, achieved" in report
    assert f"{sy['plan']['target_tokens']:,} synthetic tokens needed" in report


def test_a_larger_share_tops_up_synthesis_without_regenerating(sbp_run):
    """Requests scale with the budget: a larger share asks for more documents and reuses the
    parts already generated."""
    cfg, d, _ = sbp_run
    from selftaught.storage import RunDir

    run_dir = RunDir(d)
    corpus, tokens, synth = (run_dir.stage(n) for n in ("corpus", "tokens", "synthesizer"))  # their outputs
    small, large = (cfg.model_copy(update={"joint": cfg.joint.model_copy(update={"synthetic_share": x})})
                    for x in (0.02, 0.08))
    s = synthesis_stage(run_dir, small, corpus, tokens, synth, name="synthesis_topup")
    first = s.outputs["generated"]
    mtimes = {p: p.stat().st_mtime_ns for p in (s.path / "parts").glob("*.parquet")}
    s = synthesis_stage(run_dir, large, corpus, tokens, synth, name="synthesis_topup")
    target = synthetic_target(large)
    assert target > 2 * synthetic_target(small) and s.outputs["generated"] > first
    assert s.outputs["kept_tokens"] >= target
    ps = cfg.synthesis.part_size  # no more requests than the measured yield needs (+ margin, whole parts)
    assert s.outputs["generated"] <= plan_requests(target, 0, s.outputs["kept_tokens"] / s.outputs["generated"],
                                                   cfg.synthesis.margin, ps) + ps
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())


def test_synthetic_target_and_plan():
    cfg = resolve(SBPConfig, None, ["joint.train.token_budget=2000000000", "joint.train.num_workers=4"])
    t = cfg.joint.train
    micro = t.total_steps() * t.grad_accum  # per worker
    expected = micro * cfg.joint.synthetic_share * t.micro_batch_size * (t.seq_len + 1) * 4
    assert expected < synthetic_target(cfg) < 1.05 * expected  # the mean plus three standard deviations
    assert plan_requests(1000, 0, 10.0, 0.1, 16) == 112  # 110 rounded up to whole parts
    assert plan_requests(1000, 900, 10.0, 0.0, 16) == 16 and plan_requests(1000, 1000, 10.0, 0.1, 16) == 0


def test_synthesis_provenance_and_filters(sbp_run):
    cfg, d, _ = sbp_run
    parts = read_parquet(d / "synthesis" / "parts")
    assert parts.num_rows == json.loads((d / "results.json").read_text())["synthesis"]["generated"]
    assert len(set(parts["id"].to_pylist())) == parts.num_rows
    row = parts.to_pylist()[0]
    assert row["synthesizer"].endswith("synthesizer/model") and json.loads(row["sampling"])["top_p"] == 0.9
    d_ids = set(read_parquet(d / "tokens" / "candidates.parquet")["id"].to_pylist()[: cfg.corpus.unique_docs])
    assert set(parts["seed_id"].to_pylist()) <= d_ids  # seeds come from D only
    kept = read_parquet(d / "synthesis" / "synthetic.parquet")
    assert kept.num_rows == sum(parts["kept"].to_pylist())


def test_killed_synthesis_resumes_without_duplicates(sbp_run):
    """Remove the stage marker and one part (a kill mid-stage): the re-run regenerates only the
    missing part, reproduces it exactly, and skips every other stage."""
    cfg, d, _ = sbp_run
    syn = d / "synthesis"
    before = read_parquet(syn / "parts").sort_by("id")
    other = {p: p.stat().st_mtime_ns for p in (syn / "parts").glob("*.parquet") if p.name != "part-00001.parquet"}
    markers = {p.parent.name: p.stat().st_mtime_ns for p in d.glob("*/_STAGE.json") if p.parent.name != "synthesis"}
    (syn / "_STAGE.json").unlink()
    (syn / "parts" / "part-00001.parquet").unlink()
    run(cfg)
    after = read_parquet(syn / "parts").sort_by("id")
    assert after.to_pylist() == before.to_pylist()
    assert all(p.stat().st_mtime_ns == t for p, t in other.items())
    reran = [n for n, t in markers.items() if (d / n / "_STAGE.json").stat().st_mtime_ns != t]
    assert reran == []  # downstream hashes depend on config, not on mtimes: nothing else reruns


def test_config_rejects_missing_baseline_arm():
    with pytest.raises(Exception, match="repetition"):
        SBPConfig.model_validate({"joint": {"arms": ["sbp", "oracle"]}})


def test_split_ids_needs_an_oracle_pool(sbp_run):
    cfg, d, _ = sbp_run
    from selftaught.storage import RunDir

    tokens = RunDir(d).stage("tokens")
    with pytest.raises(ValueError, match="no oracle pool"):
        split_ids(tokens, cfg.model_copy(update={"corpus": cfg.corpus.model_copy(update={"unique_docs": 10 ** 6})}))


@pytest.mark.slow
def test_a_fresh_run_of_the_same_config_reproduces_every_number(sbp_run, tmp_path):
    """Same config, same machine, a new run directory: the corpus order, pairs, every synthetic
    document and each arm's loss curve come out identical (Ray Data order, per-request sampling
    seeds, fixed thread counts). The arms' list does not change what the other stages compute,
    so a run with two arms is compared with the fixture's four-arm run stage by stage."""
    cfg, d, _ = sbp_run
    again = cfg.model_copy(update={"run_dir": str(tmp_path), "joint": cfg.joint.model_copy(
        update={"arms": ["repetition", "sbp"]})})
    run(again)
    for table in ("corpus/candidates.parquet", "pairing/pairs.parquet", "synthesis/synthetic.parquet"):
        rows = lambda root: [{k: v for k, v in r.items() if k != "synthesizer"}  # noqa: E731 (provenance: a path)
                             for r in read_parquet(root / table).to_pylist()]
        assert rows(tmp_path) == rows(d), table
    for arm in ("arm_repetition", "arm_sbp"):
        curve = lambda root: [(r["step"], r.get("loss"), r.get("eval_loss"), r.get("grad_norm"))  # noqa: E731
                              for r in map(json.loads, (root / arm / "metrics.jsonl").read_text().splitlines())]
        assert curve(tmp_path) == curve(d), arm
