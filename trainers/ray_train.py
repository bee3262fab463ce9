"""Ray Train entry point: the same loop on N workers with ``TorchTrainer``.

The driver ships the tokenised documents through the object store, each worker builds the
model from a saved initial checkpoint and trains its data shard, and rank 0 hands the final
Hugging Face checkpoint back as a Ray Train ``Checkpoint`` (so it survives on cluster storage).
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from trainers.config import TrainConfig

log = logging.getLogger(__name__)


def _worker_loop(config: dict) -> None:
    import json

    import ray
    import ray.train
    import torch
    from transformers import AutoModelForCausalLM

    from trainers.loop import train_causal_lm

    cfg = TrainConfig(**config["train"])
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    train_docs, eval_docs = ray.get(config["docs_ref"])
    model = AutoModelForCausalLM.from_pretrained(config["init_dir"], dtype=torch.float32)
    rank = ray.train.get_context().get_world_rank()
    # Progress goes to metrics.jsonl (rank 0); ``ray.train.report`` is a collective in Ray Train
    # 2.x, so every worker calls it exactly once, at the end, and only rank 0 attaches a model.
    summary = train_causal_lm(model, train_docs, eval_docs, cfg,
                              out_dir=config["out_dir"] if rank == 0 else None)
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            (Path(tmp) / "summary.json").write_text(json.dumps(summary))
            ray.train.report({"done": 1, **{k: v for k, v in summary.items() if v is not None}},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report({"done": 1})


def fit(cfg: TrainConfig, init_dir: str | Path, train_docs, eval_docs, out_dir: str | Path,
        storage_dir: str | Path, name: str = "train") -> dict:
    """Train with Ray Train; the final model is written to ``out_dir`` (HF format)."""
    import json

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from selftaught.runtime import cluster_cpus

    if not cfg.use_gpu:  # never ask for more CPUs than the cluster has: it would wait forever
        per = min(cfg.cpus_per_worker, max(cluster_cpus() / cfg.num_workers, 0.5))
        if per != cfg.cpus_per_worker:
            log.info("cpus_per_worker %.2f -> %.2f to fit the cluster", cfg.cpus_per_worker, per)
            cfg = cfg.model_copy(update={"cpus_per_worker": per})
    docs_ref = ray.put((list(train_docs), list(eval_docs)))
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"train": cfg.model_dump(), "docs_ref": docs_ref,
                           "init_dir": str(init_dir), "out_dir": str(out_dir)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(Path(storage_dir).resolve())),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    out_dir = Path(out_dir)
    model_dir = out_dir / "model"
    with result.checkpoint.as_directory() as ckpt:
        if model_dir.exists():
            shutil.rmtree(model_dir)
        shutil.copytree(ckpt, model_dir)
    summary = json.loads((model_dir / "summary.json").read_text())
    return summary
