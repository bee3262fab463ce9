"""GRPO on the ideator: group-relative advantages from executed rewards, and the clipped policy
objective on sampled tokens only, run by the trainer loop's own engine (``trainers/loop.py``:
DDP or DeepSpeed, its optimizer, schedule and checkpoints). Nothing here is a second loop:
:func:`grpo_update` is one optimizer step of ``_Trainer`` with a different summed token loss.

Objectives (``RLConfig.objective``), each giving zero-mean advantages within a group:

- ``mean``: the thesis's GRPO, A_i = (r_i - mean r) / (std r + eps): raise the average reward.
- ``max``: aimed at the group's best idea: A_i = 1 - 1/G for the best (ties share it), -1/G for
  the rest. Only beating the rest of the group is rewarded.
- ``entropic``: TTT-Discover's entropic utility (1/beta) log E[exp(beta r)]; its gradient weights
  each sample by exp(beta r_i) / mean_j exp(beta r_j), so A_i = that weight - 1. Small beta
  behaves like ``mean``, large beta like ``max``.

Rewards: the environment's value; 0 for an idea that failed to execute (the caller's choice of
reward). A group with an **infrastructure** failure (the executor could not run some idea) is
masked whole: its samples get no advantage and no tokens in the loss, instead of teaching the
policy that an idea is bad because a node died.

Stragglers: a rollout cut from its step's executor wait (``late``, no reward yet) neither scores
nor masks: its group's advantages come from the members that finished (at least two). A late
result kept for the next step comes back as a rollout of its old group with the reward, its
finished group-mates alongside as ``train=False`` rows: they shape the group's advantages again,
and only the late rollout is trained on.

Off-policy bound: each rollout carries the policy version that sampled it. At trainer version k,
rollouts older than ``max_staleness`` are dropped; the rest use the engine's own log-probs of the
sampled tokens as the behaviour policy, so the clipped ratio pi_theta / pi_behaviour corrects for
the lag (importance correction). With staleness 0 the old log-probs are the trainer's own, taken
before the step, and the ratio is exactly 1 at the first micro-step: plain on-policy GRPO.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from selftaught.config import Strict
from trainers.mixture import Batch

Objective = Literal["mean", "max", "entropic"]


class RLConfig(Strict):
    """The policy update (``rl`` section of a research RL config)."""

    objective: Objective = "mean"
    entropic_beta: float = Field(default=10.0, gt=0)  # entropic: larger leans to the group's best
    clip: float = Field(default=0.2, gt=0, lt=1)  # PPO ratio clip
    kl_coef: float = Field(default=0.0, ge=0)  # KL to the reference policy (k3 estimator); 0: no reference
    max_staleness: int = Field(default=0, ge=0)  # policy versions a rollout may lag (0: on-policy)
    adv_eps: float = Field(default=1e-4, gt=0)
    # an infrastructure failure masks its whole group; false: only the failed rollout is left out
    # (like a straggler), for large groups where one lost node would otherwise void a whole step
    mask_infra_groups: bool = True


@dataclass
class Rollout:
    """One sampled idea: its prompt and completion tokens, the behaviour policy's log-probs of
    the completion, the policy version that sampled it, and (once executed) its reward."""

    group: str
    prompt_ids: list[int]
    completion_ids: list[int]
    behaviour_logprobs: list[float] | None = None
    version: int = 0
    reward: float | None = None
    infra_failure: bool = False
    idea: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    late: bool = False  # cut from its step's wait as a straggler (no reward then)
    loss_mask: list[int] | None = None  # per completion token: 1 sampled, 0 forced by the engine (None: all sampled)
    train: bool = True  # False: only there for its group's advantages (trained on already)

    @classmethod
    def coerce(cls, r: "Rollout | dict") -> "Rollout":
        if isinstance(r, Rollout):
            return r
        return cls(**{k: v for k, v in r.items() if k in cls.__dataclass_fields__})


# --------------------------------------------------------------------------- advantages
def group_advantages(rewards: Sequence[float], objective: Objective = "mean", *, beta: float = 10.0,
                     eps: float = 1e-4) -> np.ndarray:
    """Zero-mean advantages of one group's rewards under ``objective`` (module docstring)."""
    r = np.asarray(rewards, dtype=np.float64)
    g = len(r)
    if g == 0:
        return r
    if objective == "mean":
        return (r - r.mean()) / (r.std() + eps)
    if objective == "max":
        best = np.isclose(r, r.max(), rtol=0, atol=1e-12)
        return best / best.sum() - 1.0 / g
    if objective == "entropic":
        w = np.exp(beta * (r - r.max()))
        return w / w.mean() - 1.0
    raise ValueError(f"unknown objective {objective!r}")


def assign_advantages(rollouts: Sequence[Rollout], cfg: RLConfig) -> tuple[list[float | None], dict[str, Any]]:
    """Advantages per rollout, group by group. A group with an infrastructure failure (when
    masked), a missing reward that is not a straggler's, or fewer than two rewards gets None
    (masked out of the loss) and is reported; a late rollout gets None without masking its
    group, and so does a ``train=False`` row (it only shapes its group's advantages)."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rollouts):
        groups.setdefault(r.group, []).append(i)
    adv: list[float | None] = [None] * len(rollouts)  # None: no tokens in the loss
    masked, used = [], []
    for gid, idx in groups.items():
        rs = [rollouts[i] for i in idx]
        scored = [i for i in idx if rollouts[i].reward is not None]
        unexplained = [r for r in rs if r.reward is None and not r.late and not r.infra_failure]
        if (cfg.mask_infra_groups and any(r.infra_failure for r in rs)) or unexplained or len(scored) < 2:
            masked.append(gid)
            continue
        a = group_advantages([rollouts[i].reward for i in scored], cfg.objective, beta=cfg.entropic_beta,
                             eps=cfg.adv_eps)
        for i, v in zip(scored, a):
            adv[i] = float(v) if rollouts[i].train else None
        used.append(gid)
    return adv, {"groups": len(groups), "masked_groups": masked, "used_groups": len(used),
                 "late": sum(1 for r in rollouts if r.late and r.reward is None)}


def fresh_enough(rollouts: Sequence[Rollout], version: int, max_staleness: int) -> tuple[list[Rollout], int]:
    """The rollouts a trainer at ``version`` may learn from, and how many were too stale."""
    keep = [r for r in rollouts if version - r.version <= max_staleness]
    return keep, len(rollouts) - len(keep)


# --------------------------------------------------------------------------- batches and loss
def pack(rollouts: Sequence[Rollout], advantages: Sequence[float | None], micro_batches: int,
         pad_id: int = 0) -> list[tuple[Batch, dict[str, torch.Tensor]]]:
    """Exactly ``micro_batches`` right-padded micro-batches (the engine's accumulation count).
    Each row is prompt + completion; the loss mask is 1 on sampled completion tokens only (a
    rollout's ``loss_mask`` leaves out tokens the engine forced, such as the end of a budgeted
    thinking phase), and a row
    of a masked group (advantage None) carries no loss tokens at all. A row with advantage 0
    keeps its tokens: they count in the step's normalisation and carry the KL term."""
    rows = list(zip(rollouts, advantages))
    per = max(1, math.ceil(len(rows) / micro_batches))
    out = []
    for m in range(micro_batches):
        chunk = rows[m * per:(m + 1) * per] or [(None, 0.0)]
        width = max((len(r.prompt_ids) + len(r.completion_ids)) for r, _ in chunk if r is not None) \
            if any(r is not None for r, _ in chunk) else 2
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.uint8)
        behaviour = torch.zeros((len(chunk), width), dtype=torch.float32)
        adv = torch.zeros(len(chunk), dtype=torch.float32)
        versions = torch.zeros(len(chunk), dtype=torch.long)
        for j, (r, a) in enumerate(chunk):
            if r is None:
                continue
            versions[j] = r.version
            p, c = len(r.prompt_ids), len(r.completion_ids)
            ids[j, :p + c] = torch.tensor(r.prompt_ids + r.completion_ids)
            if a is not None:
                mask[j, p:p + c] = 1 if r.loss_mask is None else torch.tensor(r.loss_mask[:c], dtype=torch.uint8)
            if r.behaviour_logprobs is not None and len(r.behaviour_logprobs) >= c:
                behaviour[j, p:p + c] = torch.tensor(r.behaviour_logprobs[:c], dtype=torch.float32)
            adv[j] = a or 0.0
        out.append((Batch("rl", ids, mask, None), {"advantages": adv, "behaviour": behaviour, "versions": versions}))
    return out


def _plain_head(model) -> bool:
    """A bare Hugging Face causal LM whose logits are its output embedding of the last hidden
    state (no wrapper such as DDP or a DeepSpeed engine, no logit soft-capping or scaling)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or model.base_model is model or model.get_output_embeddings() is None:
        return False
    c = model.config
    return not getattr(c, "final_logit_softcapping", None) and getattr(c, "logit_scale", None) in (None, 1, 1.0)


def token_logprobs(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(ids[:, t] | ids[:, :t]) for t >= 1, aligned to ``ids`` (column 0 is 0).

    With ``mask`` (1 on the tokens whose log-probs are wanted), only those positions go
    through the output layer: a rollout's prompt is most of its tokens, and full logits over a
    50k vocabulary for 32 rows of 1,400 tokens are 9 GB. Other positions are 0. Wrapped models
    (DDP, DeepSpeed) take the full path."""
    if mask is not None and _plain_head(model):
        hidden = model.base_model(input_ids=ids[:, :-1], use_cache=False).last_hidden_state
        sel = mask[:, 1:].to(torch.bool)
        logits = model.get_output_embeddings()(hidden[sel]).float()
        lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:][sel][:, None]).squeeze(-1)
        full = torch.zeros(sel.shape, dtype=lp.dtype, device=lp.device).masked_scatter(sel, lp)
        return F.pad(full, (1, 0))
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits.float()
    lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return F.pad(lp, (1, 0))


def grpo_loss_sum(new_lp: torch.Tensor, old_lp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  clip: float, ref_lp: torch.Tensor | None = None, kl_coef: float = 0.0
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed clipped-surrogate loss over the masked (sampled) tokens, plus ``kl_coef`` times
    the k3 estimate of KL(pi_theta || pi_ref) per token. Returns the sum and detached stats."""
    m = mask.float()
    ratio = torch.exp(new_lp - old_lp)
    a = advantages[:, None]
    surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * a)
    per_token = -surrogate
    stats = {"clipped": (((ratio - 1.0).abs() > clip).float() * m).sum().detach(), "tokens": m.sum().detach()}
    if ref_lp is not None and kl_coef > 0:
        d = ref_lp - new_lp
        kl = torch.exp(d) - d - 1.0
        per_token = per_token + kl_coef * kl
        stats["kl"] = (kl * m).sum().detach()
    return (per_token * m).sum(), stats


@torch.no_grad()
def logprobs_of(model, batches: Sequence[tuple[Batch, dict]], device: str) -> list[torch.Tensor]:
    """The given (frozen) model's token log-probs for every micro-batch."""
    was = model.training
    model.eval()
    try:
        return [token_logprobs(model, b.ids.to(device), b.mask.to(device)).cpu() for b, _ in batches]
    finally:
        model.train(was)


def grpo_update(trainer, rollouts: Sequence[Rollout], cfg: RLConfig, version: int, *,
                reference=None, pad_id: int = 0) -> dict[str, Any]:
    """One optimizer step of ``trainer`` (a ``trainers.loop._Trainer``) on these rollouts.

    Drops rollouts staler than ``cfg.max_staleness``; the old policy is the trainer itself before
    the step (on-policy: one forward per micro-batch, no separate pass) or, for a lagging rollout,
    the engine's log-probs that sampled it."""
    keep, stale = fresh_enough(rollouts, version, cfg.max_staleness)
    adv, info = assign_advantages(keep, cfg)
    # rows without an advantage (masked groups, stragglers, context rows) carry no loss tokens:
    # leave them out rather than spend forward passes on them
    pairs = [(r, a) for r, a in zip(keep, adv) if a is not None]
    keep, adv = [r for r, _ in pairs], [a for _, a in pairs]
    micro = trainer.cfg.grad_accum
    batches = pack(keep, adv, micro, pad_id=pad_id)
    refs = logprobs_of(reference, batches, trainer.device) if (reference is not None and cfg.kl_coef > 0) \
        else [None] * len(batches)
    tokens = float(sum(float(b.mask[:, 1:].sum()) for b, _ in batches))
    totals: dict[str, float] = {"loss": 0.0, "clipped": 0.0, "kl": 0.0}
    informative = any(a for a in adv) or (cfg.kl_coef > 0 and reference is not None)
    if tokens == 0 or not informative:
        # every group masked, or every advantage 0 with no KL term: a zero gradient, yet AdamW's
        # momentum would still move the weights, so no step is taken
        return {**info, "stale": stale, "tokens": int(tokens), "stepped": False, **totals}
    scale = 1.0 / tokens
    for i, (b, extra) in enumerate(batches):
        lagging = ((version - extra["versions"]) > 0).to(trainer.device)

        def loss_fn(model, batch, extra=extra, ref=refs[i], lagging=lagging):
            ids = batch.ids.to(trainer.device)
            new = token_logprobs(model, ids, batch.mask.to(trainer.device))
            # the old policy: for an on-policy row the trainer itself before this step, which is
            # new.detach() exactly (the weights change only at the optimizer step, after every
            # micro-batch); for a lagging row the engine's log-probs that sampled it
            old = torch.where(lagging[:, None], extra["behaviour"].to(trainer.device), new.detach())
            loss, st = grpo_loss_sum(new[:, 1:], old[:, 1:],
                                     extra["advantages"].to(trainer.device), batch.mask[:, 1:].to(trainer.device),
                                     cfg.clip, None if ref is None else ref.to(trainer.device)[:, 1:], cfg.kl_coef)
            totals["clipped"] += float(st["clipped"])
            totals["kl"] += float(st.get("kl", 0.0))
            return loss

        totals["loss"] += trainer.micro_step(b, scale, i == len(batches) - 1, loss_fn=loss_fn)
    gnorm = trainer.optimizer_step()
    return {**info, "stale": stale, "tokens": int(tokens), "stepped": True, "grad_norm": gnorm,
            "loss": totals["loss"] / tokens, "clip_frac": totals["clipped"] / tokens, "kl": totals["kl"] / tokens,
            "lr": trainer.lr()}


def policy_state(trainer) -> dict[str, torch.Tensor]:
    """The trainer's current weights for the rollout engines' ``update_weights`` (CPU tensors)."""
    return {k: v.detach().to("cpu").clone() for k, v in trainer.core.state_dict().items()}


# --------------------------------------------------------------------------- the learner
class PolicyLearner:
    """The policy being trained: the trainer loop's ``_Trainer`` (its engine, optimizer, schedule
    and checkpoint format) around a causal LM, a frozen reference when KL is on, and the policy
    version (updates so far). Plain Python; :func:`learner_actor_class` runs it as a Ray actor on
    its own resources, apart from the rollout engines and the executor's job slots."""

    def __init__(self, model: str, train: dict, rl: dict, total_steps: int, device: str = "cpu",
                 num_threads: int | None = None):
        from selftaught.models import load_causal_lm
        from trainers.config import TrainConfig
        from trainers.loop import _Trainer

        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.rl = RLConfig.model_validate(rl)
        cfg = TrainConfig.model_validate(train)
        torch.manual_seed(cfg.seed)
        self.tokenizer, net = load_causal_lm(model, device=device)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.trainer = _Trainer(net, cfg, total_steps=max(1, total_steps), device=device, world=1)
        self.reference = None
        if self.rl.kl_coef > 0:
            _, self.reference = load_causal_lm(model, device=device)
        self.version = 0

    def update(self, rollouts: Sequence[dict], version: int | None = None) -> dict[str, Any]:
        rs = [Rollout.coerce(r) for r in rollouts]
        stats = grpo_update(self.trainer, rs, self.rl, self.version if version is None else version,
                            reference=self.reference, pad_id=self.pad_id)
        if stats["stepped"]:
            self.version += 1
        stats["version"] = self.version
        return stats

    def weights(self) -> dict[str, torch.Tensor]:
        return policy_state(self.trainer)

    def save(self, path: str, extra: dict[str, Any]) -> str:
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.trainer.save(tmp, 0, {**extra, "version": self.version, "rng": torch.get_rng_state()})
        shutil.rmtree(p, ignore_errors=True)
        tmp.rename(p)  # a checkpoint is either whole or absent
        return str(p)

    def load(self, path: str) -> dict[str, Any]:
        extra = self.trainer.load(Path(path), 0)
        self.version = int(extra["version"])
        torch.set_rng_state(extra["rng"])
        return extra

    def info(self) -> dict[str, Any]:
        return {"version": self.version, "lr": self.trainer.lr()}


def learner_actor_class():
    """``ray.remote(PolicyLearner)``: size it with ``.options(num_cpus=..., num_gpus=...)``."""
    import ray

    return ray.remote(PolicyLearner)
