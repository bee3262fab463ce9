"""Stages shared by the pipelines: tokenizer, tokenised corpora, initial model, training.

Each returns a :class:`~selftaught.storage.Stage`; a finished one is skipped on re-run, a changed
config or input reruns it (and, through the dependency hashes, what follows)."""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
from pydantic import Field

from selftaught.config import Strict
from selftaught.storage import RunDir, Stage, file_fingerprint, read_parquet, write_parquet

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


class TokenizerConfig(Strict):
    vocab_size: int = Field(default=4096, ge=300)
    max_docs: int | None = Field(default=None, ge=1)  # train the BPE on at most this many docs


class ModelConfig(Strict):
    size: str = "tiny"
    seed: int = 0
    context: int | None = Field(default=None, ge=16)  # default: the size's context


def read_texts(path: Path, limit: int | None = None) -> list[str]:
    texts = read_parquet(path, columns=["text"])["text"].to_pylist()
    return texts[:limit] if limit else texts


def tokenizer_stage(run: RunDir, cfg: TokenizerConfig, train_path: Path, name: str = "tokenizer") -> Stage:
    from selftaught.models import train_bpe_tokenizer

    st = run.stage(name, cfg, inputs={"train": file_fingerprint(train_path)})
    if not st.up_to_date():
        st.begin(keep_partial=False)
        t0 = time.perf_counter()
        tok = train_bpe_tokenizer(read_texts(train_path, cfg.max_docs), cfg.vocab_size, st.path)
        st.finish(vocab_size=len(tok), seconds=round(time.perf_counter() - t0, 1))
    return st


def tokens_stage(run: RunDir, tok_stage: Stage | Path, paths: dict[str, Path], name: str = "tokens",
                 max_tokens: int | None = None, filter_splits: tuple[str, ...] = (),
                 deps: tuple[Stage, ...] = ()) -> Stage:
    """Token ids per document (``id``, ``ids`` as Parquet ``list<int32>``), so training restarts
    fast. In ``filter_splits``, documents longer than ``max_tokens`` are dropped and counted.
    ``tok_stage``: a tokenizer stage, or a model directory whose tokenizer to use (continued
    pretraining of a packaged model)."""
    from selftaught.models import load_tokenizer

    settings: dict = {"max_tokens": max_tokens, "filter_splits": list(filter_splits)}
    if isinstance(tok_stage, Stage):
        tok_dir, deps = tok_stage.path, (tok_stage, *deps)
    else:
        tok_dir = Path(tok_stage)
        settings["tokenizer"] = str(tok_dir)
    st = run.stage(name, settings, deps=list(deps), inputs={k: file_fingerprint(p) for k, p in paths.items()})
    if not st.up_to_date():
        st.begin(keep_partial=False)
        tok = load_tokenizer(tok_dir)
        eos = tok.eos_token_id
        counts = {}
        for split, path in paths.items():
            table = read_parquet(path, columns=["id", "text"])
            ids_out, keep_ids, dropped = [], [], {"empty": 0, "too_long": 0}
            enc = tok(table["text"].to_pylist(), add_special_tokens=False)["input_ids"]
            for doc_id, ids in zip(table["id"].to_pylist(), enc):
                if not ids:
                    dropped["empty"] += 1
                elif max_tokens and split in filter_splits and len(ids) + 1 > max_tokens:
                    dropped["too_long"] += 1
                else:
                    ids_out.append(ids + [eos])
                    keep_ids.append(doc_id)
            write_parquet(pa.table({"id": keep_ids, "ids": pa.array(ids_out, pa.list_(pa.int32()))}),
                          st.path / f"{split}.parquet")
            counts[split] = {"docs": len(ids_out), "tokens": int(sum(len(d) for d in ids_out)), "dropped": dropped}
        st.finish(**counts)
    return st


def load_token_docs(path: Path, ids: list[str] | None = None) -> list[np.ndarray]:
    table = read_parquet(path, columns=["id", "ids"] if ids is not None else ["ids"])
    rows = table["ids"].to_pylist()
    if ids is not None:
        pos = {d: i for i, d in enumerate(table["id"].to_pylist())}
        rows = [rows[pos[d]] for d in ids if d in pos]
    return [np.asarray(x, dtype=np.int32) for x in rows]


def init_model_stage(run: RunDir, cfg: ModelConfig, tok_stage: Stage, context: int,
                     name: str = "init_model") -> Stage:
    from selftaught.models import build_model, load_tokenizer

    st = run.stage(name, {**cfg.model_dump(), "context": cfg.context or context}, deps=[tok_stage])
    if not st.up_to_date():
        st.begin(keep_partial=False)
        tok = load_tokenizer(tok_stage.path)
        model = build_model(cfg.size, tok, seed=cfg.seed, context=cfg.context or context)
        model.save_pretrained(st.path)
        tok.save_pretrained(st.path)
        st.finish(params=sum(p.numel() for p in model.parameters()))
    return st


class StoppedEarly(RuntimeError):
    """A training stage ended before its budget (``stop_after_steps``, a preemption drill): the
    stage stays unfinished with its checkpoint, and nothing downstream may read its model. The
    CLI reports it and exits cleanly; the same command resumes the run."""

    def __init__(self, stage: str, steps: int, total_steps: int):
        super().__init__(f"stage {stage}: stopped after {steps} of {total_steps} steps; run the same command "
                         "again to resume from its checkpoint")
        self.stage, self.steps, self.total_steps = stage, steps, total_steps


def model_dir(stage: Stage) -> Path:
    """Where a stage keeps its model: ``model/`` for training stages, the stage itself otherwise."""
    return stage.path / "model" if (stage.path / "model" / "config.json").exists() else stage.path


def train_stage(run: RunDir, name: str, train_cfg, init: Stage | Path, sources: Callable[[], list],
                eval_docs: Callable[[], list] | None, deps: tuple[Stage, ...] = (), extra: dict | None = None) -> Stage:
    """Train under Ray Train from ``init``'s model (a stage, or a checkpoint directory such as
    a packaged model). The stage's hash covers the settings that change results (not the progress
    bar or restart policy); an interrupted stage resumes from Ray Train's newest checkpoint of the
    run named after that hash. A run cut short by ``stop_after_steps`` leaves the stage unfinished
    and raises :class:`StoppedEarly`, so no pipeline goes on with a half-trained model (a re-run
    resumes it)."""
    from trainers.ray_train import fit

    if isinstance(init, Stage):
        deps, init_dir = (init, *deps), model_dir(init)
    else:
        init_dir = Path(init)
        extra = {**(extra or {}), "init": str(init_dir)}
    st = run.stage(name, {"train": train_cfg.result_fields(), **(extra or {})}, deps=list(deps))
    if not st.up_to_date():
        st.begin(keep_partial=True)
        summary = fit(train_cfg, init_dir, sources(), eval_docs() if eval_docs else None, st.path,
                      run.root / "ray_train", name=f"{run.root.name}-{name}-{st.hash[:12]}")
        if not summary["finished"]:
            raise StoppedEarly(name, summary["steps"], summary["total_steps"])
        for f in TOKENIZER_FILES:
            if (init_dir / f).exists():
                shutil.copy(init_dir / f, st.path / "model" / f)
        st.finish(**summary)
    return st
