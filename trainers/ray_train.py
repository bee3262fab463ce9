"""Ray Train entry point: the same loop on N workers with ``TorchTrainer``.

Each token source becomes a Ray Dataset (rows: global index, token ids, loss mask) handed to
``TorchTrainer(datasets=...)``; ``ShardByIndex`` splits it deterministically (rank r of w gets
the documents whose index is r mod w, on every run and after every restart, which exact resume
needs), and each worker reads only its shard with ``ray.train.get_dataset_shard`` and shuffles it
per epoch. The small held-out set goes through the object store once and every worker reads it
whole. Each worker builds the model from a saved initial checkpoint. Every ``checkpoint_every`` steps
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

import numpy as np
from ray.train import DataConfig

from trainers.config import TrainConfig
from trainers.mixture import TokenSource

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
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train = [_read_shard(meta, rank, world) for meta in config["sources"]]  # every rank, in the same order
    if config["on_shard"] is not None:
        config["on_shard"](rank, {s.name: idx for s, idx in train})
    train = [s for s, _ in train]
    eval_docs = ray.get(config["eval_ref"]) if config["eval_ref"] is not None else None
    model = AutoModelForCausalLM.from_pretrained(config["init_dir"], dtype=torch.float32)
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
        storage_dir: str | Path, name: str = "train", on_step: Callable[[int, int], None] | None = None,
        on_shard: Callable[[int, dict[str, np.ndarray]], None] | None = None) -> dict:
    """Train with Ray Train; returns the loop's summary. The final model is ``out_dir/model``.
    ``train`` (token sources, or plain token arrays) goes to the workers as one Ray Dataset per
    source, split by ``ShardByIndex``: each rank holds and shuffles only its shard (with one
    worker, the whole source in the order a plain process reads it). ``storage_dir`` (a path or
    URI every node reaches) holds Ray Train's checkpoints; a run of the same ``name`` and config
    there resumes from its newest one. ``on_step(step, rank)`` runs on the workers before every
    step (fault drills); ``on_shard(rank, {source: global indices})`` once per worker start with
    the documents it received (tests)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from selftaught.models import cache_dir
    from selftaught.runtime import cluster_cpus
    from trainers.loop import as_sources

    if not cfg.use_gpu:  # never ask for more CPUs than the cluster has: it would wait forever
        cpus = cluster_cpus()
        per = min(cfg.cpus_per_worker, max(cpus / cfg.num_workers, 0.5))
        if per != cfg.cpus_per_worker:
            log.info("cpus_per_worker %.2f -> %.2f to fit the cluster", cfg.cpus_per_worker, per)
            cfg = cfg.model_copy(update={"cpus_per_worker": per})
        elif per * cfg.num_workers < cpus:  # each worker runs as many torch threads as CPUs
            log.info("CPU training on %g of the cluster's %g CPUs (%d workers x cpus_per_worker %g): "
                     "raise cpus_per_worker to use the rest", per * cfg.num_workers, cpus, cfg.num_workers, per)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = as_sources(list(train))
    for src in sources:
        if len(src.ids) < cfg.num_workers:
            raise ValueError(f"source {src.name!r} has {len(src.ids)} items, fewer than the "
                             f"{cfg.num_workers} data-parallel workers")
    datasets = {_dataset_name(src.name): _source_dataset(src) for src in sources}
    metas = [{"dataset": _dataset_name(s.name), "name": s.name, "kind": s.kind, "weight": s.weight,
              "repeat": s.repeat, "skipped": dict(s.skipped), "masked": s.masks is not None} for s in sources]
    eval_ref = ray.put(list(eval_docs)) if eval_docs is not None else None
    env = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions"))}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"train": cfg.model_dump(), "sources": metas, "eval_ref": eval_ref,
                           "init_dir": str(init_dir), "out_dir": str(out_dir), "on_step": on_step,
                           "on_shard": on_shard},
        datasets=datasets,
        dataset_config=ShardByIndex(),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **cfg.worker_resources}),
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


# ------------------------------------------------------------------------------ data ingest
BLOCK_TOKENS = 4 << 20  # tokens per Ray Data block (16 MiB of int32 ids)


def _dataset_name(source: str) -> str:
    return f"source:{source}"


def _list_array(arrays: list[np.ndarray], dtype):
    import pyarrow as pa

    offsets = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))


def _source_dataset(src: TokenSource):
    """The source as a Ray Dataset of rows ``index`` (position in the source), ``ids`` and, when
    the source has masks, ``mask``; blocks of about ``BLOCK_TOKENS`` tokens, put into the object
    store once by the driver."""
    import pyarrow as pa
    import ray.data

    tables, start, tokens = [], 0, 0
    for i, x in enumerate(src.ids):
        tokens += len(x)
        if tokens >= BLOCK_TOKENS or i == len(src.ids) - 1:
            cols = {"index": pa.array(np.arange(start, i + 1, dtype=np.int64)),
                    "ids": _list_array(src.ids[start:i + 1], np.int32)}
            if src.masks is not None:
                cols["mask"] = _list_array(src.masks[start:i + 1], np.uint8)
            tables.append(pa.table(cols))
            start, tokens = i + 1, 0
    return ray.data.from_arrow(tables)


def _keep_rank(batch, rank: int, world: int):
    """The rows of a pyarrow batch whose global index is ``rank`` mod ``world``."""
    import pyarrow as pa

    return batch.filter(pa.array(batch["index"].to_numpy() % world == rank))


class ShardByIndex(DataConfig):
    """Splits every dataset by global index: rank r of w gets the rows whose ``index`` is r mod w.
    Ray Data's default ``streaming_split`` hands blocks to whichever worker asks first, so the
    documents a rank holds could change between runs and restarts; exact resume restores each
    rank's position in its own shard and needs the same shard every time. Each rank's shard is
    one filtering pass (zero-CPU tasks, so that workers holding every CPU cannot starve it); with
    one worker the dataset is read as it is."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        out = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            for r in range(world_size):
                part = ds if world_size == 1 else ds.map_batches(
                    _keep_rank, fn_kwargs={"rank": r, "world": world_size}, batch_format="pyarrow",
                    batch_size=None, zero_copy_batch=True, num_cpus=0)
                out[r][name] = part.iterator()
        return out


def _lists(col) -> list[np.ndarray]:
    """A pyarrow list column as one numpy array per row (views of one copied buffer)."""
    import pyarrow as pa

    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = col.offsets.to_numpy()
    values = np.array(col.flatten().to_numpy(zero_copy_only=False))
    return np.split(values, (offsets - offsets[0])[1:-1]) if len(col) else []


def _read_shard(meta: dict, rank: int, world: int) -> tuple[TokenSource, np.ndarray]:
    """This rank's shard of one source, read through Ray Train's dataset integration, in global
    index order (so one worker reads exactly the source); returns it and its global indices."""
    import ray.train

    index, ids, masks = [], [], []
    for t in ray.train.get_dataset_shard(meta["dataset"]).iter_batches(batch_size=None, batch_format="pyarrow"):
        if t.num_rows == 0:
            continue
        index.append(t["index"].to_numpy())
        ids += _lists(t["ids"])
        if meta["masked"]:
            masks += _lists(t["mask"])
    index = np.concatenate(index) if index else np.zeros(0, np.int64)
    if len(index) == 0:
        raise ValueError(f"source {meta['name']!r}: rank {rank} of {world} received no items")
    order = np.argsort(index, kind="stable")
    src = TokenSource(meta["name"], [ids[i] for i in order], [masks[i] for i in order] if meta["masked"] else None,
                      kind=meta["kind"], weight=meta["weight"], repeat=meta["repeat"], skipped=meta["skipped"],
                      shard=(rank, world))
    log.info("rank %d/%d holds %d items, %d tokens of source %r", rank, world, len(src.ids), src.num_tokens, src.name)
    return src, index[order]
