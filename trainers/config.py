"""Training configuration: one loop, its budget measured in tokens seen."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from selftaught.config import Strict


NOT_RESULTS = {"progress", "cpus_per_worker", "checkpoint_every", "keep_checkpoints", "resume", "stop_after_steps",
               "max_failures", "worker_resources"}


class TrainConfig(Strict):
    token_budget: int = Field(default=2_000_000, ge=1)  # tokens seen: the unit of every comparison
    seq_len: int = Field(default=256, ge=8)
    micro_batch_size: int = Field(default=16, ge=1)  # sequences per worker per step
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_frac: float = Field(default=0.05, ge=0, lt=1)
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(default=1.0, ge=0)
    eval_every: int = Field(default=50, ge=1)  # optimizer steps
    eval_tokens: int = Field(default=32_768, ge=1)
    log_every: int = Field(default=10, ge=1)
    seed: int = 0
    num_workers: int = Field(default=1, ge=1)  # Ray Train workers (DDP over gloo/NCCL)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    # custom Ray resources each worker asks for besides its CPUs / GPU (placement only: pin the
    # workers to a node type, e.g. {"trainer": 1}); a restarted group asks for the same
    worker_resources: dict[str, float] = Field(default_factory=dict)
    dtype: Literal["float32", "bfloat16"] = "float32"
    progress: bool = True  # a tqdm bar on rank 0
    # engines: plain DDP (the simple path) or DeepSpeed ZeRO
    engine: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = Field(default=1, ge=0, le=3)
    offload_optimizer: bool = False  # ZeRO optimizer state in CPU memory
    # checkpoints: model, optimizer, scheduler, sampler position and RNG, every N steps and at the end
    checkpoint_every: int | None = Field(default=100, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    resume: bool = True  # continue from the newest complete checkpoint in out_dir
    stop_after_steps: int | None = Field(default=None, ge=1)  # end early (after checkpointing): preemption drills
    # Ray Train restarts of the worker group after a worker or its node dies (-1: unlimited);
    # each restart resumes from the newest checkpoint in the storage path (docs/node_loss.md)
    max_failures: int = Field(default=0, ge=-1)

    def result_fields(self) -> dict[str, Any]:
        """The settings that decide what a run computes: a stage's fingerprint and a checkpoint's
        claim to belong to this run use these, so a changed progress bar or restart policy
        neither retrains nor refuses to resume."""
        return self.model_dump(exclude=NOT_RESULTS)

    def tokens_per_step(self) -> int:
        return self.seq_len * self.micro_batch_size * self.grad_accum * self.num_workers

    def total_steps(self) -> int:
        steps = self.token_budget // self.tokens_per_step()
        if steps < 1:
            raise ValueError(f"token_budget {self.token_budget} is smaller than one optimizer step "
                             f"({self.tokens_per_step()} tokens); raise the budget or shrink the batch")
        return steps
