"""Ray Train entry point: the same loop on N workers with ``TorchTrainer``.

The driver ships the token sources through the object store; each worker builds the model from
a saved initial checkpoint and trains its shard of every source. Every ``checkpoint_every`` steps
each rank reports its part of the training state with ``ray.train.report``; Ray Train merges the
parts in its storage path (local, NFS or a cloud URI), so when a worker dies Ray Train restarts
the group (``max_failures``), on any node, and ``ray.train.get_checkpoint()`` resumes it. Rank 0
reports the final Hugging Face model as the last checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

from trainers.config import TrainConfig

log = logging.getLogger(__name__)


RUN_CONFIG = "train_config.json"  # in each state checkpoint: which run it belongs to


def _worker_loop(config: dict) -> None:
    import ray
    import ray.train
    import torch
    from transformers import AutoModelForCausalLM

    from trainers.loop import train_causal_lm

    cfg = TrainConfig(**config["train"])
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    train, eval_docs = ray.get(config["data_ref"])
    model = AutoModelForCausalLM.from_pretrained(config["init_dir"], dtype=torch.float32)
    rank = ray.train.get_context().get_world_rank()
    out_dir = Path(config["out_dir"])
    run_config = json.dumps(cfg.result_fields(), sort_keys=True)

    def report_state(path: Path, step: int) -> None:
        if rank == 0:
            (path / RUN_CONFIG).write_text(run_config)
        ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(str(path)))

    ckpt = ray.train.get_checkpoint()
    with ckpt.as_directory() if ckpt is not None else nullcontext() as ckpt_dir:
        # the newest checkpoint of a run of the same name may be a final model or another config's
        tag = Path(ckpt_dir) / RUN_CONFIG if ckpt_dir is not None else None
        ours = tag is not None and tag.is_file() and tag.read_text() == run_config
        summary = train_causal_lm(model, train, eval_docs, cfg, out_dir=out_dir, on_step=config["on_step"],
                                  resume_from=Path(ckpt_dir) if ours else None, on_checkpoint=report_state)
    # ``ray.train.report`` is a collective: every worker calls it once; rank 0 attaches the model.
    if rank == 0 and summary["finished"]:
        (out_dir / "model" / "summary.json").write_text(json.dumps(summary))
        ray.train.report({"done": 1, "steps": summary["steps"]},
                         checkpoint=ray.train.Checkpoint.from_directory(str(out_dir / "model")))
    else:
        ray.train.report({"done": 1, "steps": summary["steps"]})
    if rank == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary))


def fit(cfg: TrainConfig, init_dir: str | Path, train: Sequence, eval_docs, out_dir: str | Path,
        storage_dir: str | Path, name: str = "train", on_step: Callable[[int, int], None] | None = None) -> dict:
    """Train with Ray Train; returns the loop's summary. The final model is ``out_dir/model``.
    ``storage_dir`` (a path or URI every node reaches) holds Ray Train's checkpoints; a run of the
    same ``name`` and config there resumes from its newest one. ``on_step(step, rank)`` runs on
    the workers before every step (fault drills)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from selftaught.models import cache_dir
    from selftaught.runtime import cluster_cpus

    if not cfg.use_gpu:  # never ask for more CPUs than the cluster has: it would wait forever
        per = min(cfg.cpus_per_worker, max(cluster_cpus() / cfg.num_workers, 0.5))
        if per != cfg.cpus_per_worker:
            log.info("cpus_per_worker %.2f -> %.2f to fit the cluster", cfg.cpus_per_worker, per)
            cfg = cfg.model_copy(update={"cpus_per_worker": per})
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    data_ref = ray.put((list(train), list(eval_docs) if eval_docs is not None else None))
    env = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions"))}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"train": cfg.model_dump(), "data_ref": data_ref, "init_dir": str(init_dir),
                           "out_dir": str(out_dir), "on_step": on_step},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=_storage_path(storage_dir),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             worker_runtime_env={"env_vars": env}),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    summary = json.loads((out_dir / "summary.json").read_text())
    if summary["finished"] and not (out_dir / "model" / "config.json").exists() and result.checkpoint:
        with result.checkpoint.as_directory() as ckpt:  # the model was written on another node
            shutil.copytree(ckpt, out_dir / "model", dirs_exist_ok=True)
    return summary



def _storage_path(storage_dir: str | Path) -> str:
    """A URI (``s3://``, ``gs://``, ...) as given; a local path made absolute."""
    return str(storage_dir) if "://" in str(storage_dir) else str(Path(storage_dir).resolve())
