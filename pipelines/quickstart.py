"""Quickstart: the smallest end-to-end job that exercises the whole foundation.

bundled Wikipedia summaries -> byte-level BPE tokenizer -> Llama/QK-norm model of a named size
-> pretraining under Ray Train (token budget) -> sampling with the generation engine on a Ray
Data actor pool -> report (table + loss plot). Every step is a resumable stage of the run
directory; a re-run skips finished stages, a changed setting reruns the stages it affects.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import Field

from selftaught.config import EngineConfig, RayConfig, SamplingConfig, Strict, save
from selftaught.data.prepare import DataConfig, corpus_splits, prepare
from selftaught.storage import RunDir, Stage, file_fingerprint, read_parquet, write_parquet
from pipelines.stages import (ModelConfig, TokenizerConfig, init_model_stage, load_token_docs,
                              tokenizer_stage, tokens_stage, train_stage)
from trainers.config import TrainConfig

log = logging.getLogger(__name__)


class SampleConfig(Strict):
    num_prompts: int = Field(default=16, ge=1)
    prompt_words: int = Field(default=6, ge=1)  # prompts are the opening words of held-out docs
    sampling: SamplingConfig = SamplingConfig(temperature=0.8, top_p=0.95, max_new_tokens=48, seed=0)
    engine: EngineConfig = EngineConfig(backend="transformers", max_batch_size=16)


class QuickstartConfig(Strict):
    pipeline: Literal["quickstart"] = "quickstart"
    run_dir: str = "runs/quickstart"
    ray: RayConfig = RayConfig()
    data: DataConfig = DataConfig(datasets=["wiki"])
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()


CONFIG = QuickstartConfig


def stage_pretrain(run: RunDir, cfg: QuickstartConfig, init: Stage, tokens: Stage) -> Stage:
    return train_stage(run, "pretrain", cfg.train, init,
                       lambda: load_token_docs(tokens.path / "train.parquet"),
                       lambda: load_token_docs(tokens.path / "eval.parquet"), deps=(tokens,))


def stage_sample(run: RunDir, cfg: QuickstartConfig, model_stage: Stage, eval_path: Path) -> Stage:
    import ray.data

    from actors.generator import generate_dataset

    st = run.stage("samples", cfg.sample, deps=[model_stage], inputs={"eval": file_fingerprint(eval_path)})
    if not st.up_to_date():
        st.begin(keep_partial=False)
        table = read_parquet(eval_path, columns=["id", "text"]).slice(0, cfg.sample.num_prompts)
        base = cfg.sample.sampling.seed
        # One seed per prompt (base + row): reproducible, yet prompts do not share their noise.
        rows = [{"id": i, "prompt": " ".join(t.split()[:cfg.sample.prompt_words]),
                 "sampling": json.dumps({"seed": base + k} if base is not None else {})}
                for k, (i, t) in enumerate(zip(table["id"].to_pylist(), table["text"].to_pylist()))]
        engine = cfg.sample.engine.model_copy(update={"model": str(model_stage.path / "model")})
        ds = generate_dataset(ray.data.from_items(rows), engine, cfg.sample.sampling,
                              sampling_column="sampling")
        out = sorted(ds.take_all(), key=lambda r: (r["id"], r["sample_index"]))
        write_parquet([{k: r[k] for k in ("id", "prompt", "generated_text", "sample_index",
                                          "completion_tokens", "finish_reason")} for r in out],
                      st.path / "samples.parquet")
        st.finish(rows=len(out), completion_tokens=int(sum(r["completion_tokens"] for r in out)))
    return st


def write_report(run: RunDir, cfg: QuickstartConfig, stages: dict[str, Stage]) -> Path:
    """``report.md`` with the key numbers and a few samples, and ``loss.png``."""
    from trainers.loop import plot_curves

    metrics = [json.loads(x) for x in (stages["pretrain"].path / "metrics.jsonl").read_text().splitlines()]
    plot_curves(metrics, run.root / "loss.png",
                title=f"{cfg.model.size} model, {cfg.train.token_budget:,}-token budget")
    summary = stages["pretrain"].outputs
    samples = read_parquet(stages["samples"].path / "samples.parquet").to_pylist()
    lines = ["# Quickstart report", "",
             "| quantity | value |", "|---|---|",
             f"| model size | {cfg.model.size} ({stages['init_model'].outputs.get('params', 0):,} parameters) |",
             f"| tokenizer vocabulary | {stages['tokenizer'].outputs.get('vocab_size')} |",
             f"| training tokens (budget) | {summary.get('tokens_seen'):,} |",
             f"| optimizer steps | {summary.get('steps')} |",
             f"| held-out loss before / after | {summary.get('initial_eval_loss'):.3f} / "
             f"{summary.get('final_eval_loss'):.3f} |",
             f"| samples generated | {len(samples)} |", "",
             "![loss](loss.png)", "", "## Samples", ""]
    for s in samples[:5]:
        lines.append(f"- **{s['prompt']}** {s['generated_text'].strip()}")
    path = run.root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(cfg: QuickstartConfig) -> dict:
    from selftaught.runtime import init_ray

    run_dir = RunDir(cfg.run_dir)
    save(cfg, run_dir.root / "config.yaml")
    data_dir = run_dir.root / "data"
    prepare(cfg.data, data_dir)
    paths = corpus_splits(cfg.data, data_dir)  # the user's corpus when data.corpus is set, else the bundled wiki
    init_ray(cfg.ray, run_dir.root)
    stages: dict[str, Stage] = {}
    stages["tokenizer"] = tokenizer_stage(run_dir, cfg.tokenizer, paths["train"])
    stages["tokens"] = tokens_stage(run_dir, stages["tokenizer"], paths)
    stages["init_model"] = init_model_stage(run_dir, cfg.model, stages["tokenizer"],
                                            context=max(cfg.train.seq_len, 256) + cfg.sample.sampling.max_new_tokens)
    stages["pretrain"] = stage_pretrain(run_dir, cfg, stages["init_model"], stages["tokens"])
    stages["samples"] = stage_sample(run_dir, cfg, stages["pretrain"], paths["eval"])
    report = write_report(run_dir, cfg, stages)
    log.info("report: %s", report)
    return {"run_dir": str(run_dir.root), "report": str(report), **stages["pretrain"].outputs}
