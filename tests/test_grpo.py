"""GRPO on the trainer loop (trainers/grpo.py): advantages and the clipped loss against hand
computations, infrastructure masking, the staleness bound with importance correction, a real
update on the tiny LM, and weight sync into a rollout engine."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainers.grpo import (RLConfig, Rollout, assign_advantages, fresh_enough, grpo_loss_sum, grpo_update,
                           group_advantages, policy_state, token_logprobs)


def test_group_advantages_by_hand():
    eps = 1e-4
    assert group_advantages([1, 0, 0, 1], "mean", eps=eps) == pytest.approx(np.array([1, -1, -1, 1]) * 0.5 / (0.5 + eps))
    # max: the best share 1 - 1/G between them; everyone pays 1/G
    assert group_advantages([0.2, 0.9, 0.5, 0.9], "max") == pytest.approx([-0.25, 0.25, -0.25, 0.25])
    # entropic, beta 1: weights exp(r - max) = [1/3, 1], mean 2/3 -> [0.5, 1.5] - 1
    assert group_advantages([0.0, math.log(3)], "entropic", beta=1.0) == pytest.approx([-0.5, 0.5])
    for obj in ("mean", "max", "entropic"):  # zero mean, and a flat group teaches nothing
        assert group_advantages([0.3, 0.1, 0.7], obj).sum() == pytest.approx(0.0, abs=1e-9)
        assert group_advantages([0.4, 0.4, 0.4], obj) == pytest.approx([0.0, 0.0, 0.0], abs=1e-9)
    # large beta approaches max-of-group, small beta the mean-centred reward
    r = [0.1, 0.5, 0.9, 0.2]
    big = group_advantages(r, "entropic", beta=200.0)
    assert big == pytest.approx([-1, -1, 3, -1], abs=1e-6)
    small = group_advantages(r, "entropic", beta=1e-3)
    assert small / 1e-3 == pytest.approx(np.array(r) - np.mean(r), rel=1e-2)


def _ro(group, reward, infra=False, version=0):
    return Rollout(group=group, prompt_ids=[1, 2], completion_ids=[3, 4], reward=reward, infra_failure=infra,
                   version=version)


def test_an_infrastructure_failure_masks_its_whole_group():
    rs = [_ro("a", 1.0), _ro("a", 0.0), _ro("b", 1.0), _ro("b", None, infra=True), _ro("c", 0.0), _ro("c", None)]
    adv, info = assign_advantages(rs, RLConfig())
    assert adv[0] > 0 > adv[1]
    assert adv[2:] == [None, None, None, None]  # b: infra failure; c: a reward still missing
    assert set(info["masked_groups"]) == {"b", "c"} and info["used_groups"] == 1
    # or, when asked, only the failed rollout is left out and the group still teaches
    adv, info = assign_advantages(rs[:4], RLConfig(mask_infra_groups=False))
    assert adv[2] is None and adv[3] is None and info["masked_groups"] == ["b"]  # b: one reward left
    three = [_ro("e", 1.0), _ro("e", 0.0), _ro("e", None, infra=True)]
    adv, info = assign_advantages(three, RLConfig(mask_infra_groups=False))
    assert adv[0] > 0 > adv[1] and adv[2] is None and info["masked_groups"] == []
    # an idea that failed to execute is a reward of 0, not a mask
    adv, info = assign_advantages([_ro("d", 0.0), _ro("d", 0.5)], RLConfig())
    assert adv[0] < 0 < adv[1] and info["masked_groups"] == []


def test_stragglers_neither_score_nor_mask_and_context_rows_only_shape_advantages():
    late = Rollout(group="a", prompt_ids=[1], completion_ids=[2], reward=None, late=True)
    rs = [_ro("a", 1.0), _ro("a", 0.0), _ro("a", 0.5), late]
    adv, info = assign_advantages(rs, RLConfig())
    # the group's advantages come from the three that finished, by hand: mean 0.5, std sqrt(1/6)
    std = math.sqrt(1 / 6)
    assert adv[:3] == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0])
    assert adv[3] is None and info["masked_groups"] == [] and info["late"] == 1
    # one finished member is no group: masked
    adv, info = assign_advantages([_ro("b", 1.0), Rollout(group="b", prompt_ids=[1], completion_ids=[2],
                                                            late=True)], RLConfig())
    assert adv == [None, None] and info["masked_groups"] == ["b"]
    # a late result kept for the next step: its finished mates come back as train=False rows
    back = Rollout(group="a", prompt_ids=[1], completion_ids=[2], reward=1.0, version=0)
    mates = [Rollout(group="a", prompt_ids=[1, 2], completion_ids=[3, 4], reward=r, train=False) for r in (1.0, 0.0, 0.5)]
    adv, _ = assign_advantages([back, *mates], RLConfig(objective="max"))
    assert adv == [pytest.approx(1 / 2 - 1 / 4), None, None, None]  # ties with the first mate for the best


def test_staleness_bound():
    rs = [_ro("g", 1.0, version=v) for v in (5, 4, 3, 2)]
    keep, dropped = fresh_enough(rs, 5, 0)
    assert [r.version for r in keep] == [5] and dropped == 3
    keep, dropped = fresh_enough(rs, 5, 2)
    assert [r.version for r in keep] == [5, 4, 3] and dropped == 1


def test_clipped_loss_by_hand():
    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    # ratio 1 everywhere: the loss is -sum(A) over masked tokens
    loss, st = grpo_loss_sum(torch.zeros(2, 3), old, adv, mask, clip=0.2)
    assert float(loss) == pytest.approx(-(1.0 * 2) - (-2.0 * 2)) and float(st["tokens"]) == 4 and float(st["clipped"]) == 0
    # ratio e^0.5 = 1.65 on every token: positive advantages clip at 1.2, negative keep the ratio (pessimistic)
    new = torch.full((2, 3), 0.5)
    loss, st = grpo_loss_sum(new, old, adv, mask, clip=0.2)
    r = math.exp(0.5)
    assert float(loss) == pytest.approx(-(1.2 * 1.0) * 2 - (r * -2.0) * 2, rel=1e-6) and float(st["clipped"]) == 4
    # k3 KL to a reference: exp(d) - d - 1 with d = ref - new
    ref = torch.full((2, 3), 0.2)
    loss_kl, st = grpo_loss_sum(torch.zeros(2, 3), old, adv, mask, clip=0.2, ref_lp=ref, kl_coef=0.1)
    k3 = math.exp(0.2) - 0.2 - 1
    assert float(loss_kl) == pytest.approx(2.0 + 0.1 * k3 * 4, rel=1e-5) and float(st["kl"]) == pytest.approx(k3 * 4, rel=1e-5)


@pytest.fixture
def policy(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    from trainers.config import TrainConfig
    from trainers.loop import _Trainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir))
    cfg = TrainConfig(lr=5e-3, grad_accum=2, schedule="constant", warmup_frac=0.0, weight_decay=0.0, grad_clip=1.0,
                      micro_batch_size=4, progress=False)
    return _Trainer(model, cfg, total_steps=10, device="cpu", world=1)


def _rollouts(engine, prompt: str, g: int, version: int = 0, seed: int = 0) -> list[Rollout]:
    from selftaught.config import SamplingConfig

    out = engine.generate([prompt], SamplingConfig(n=g, temperature=1.0, max_new_tokens=6, logprobs=0, seed=seed,
                                                   ignore_eos=True))[0]
    return [Rollout(group=prompt, prompt_ids=list(out.prompt_token_ids), completion_ids=list(c.token_ids),
                    behaviour_logprobs=list(c.logprobs), version=version, idea=c.text) for c in out.completions]


def _seq_logprob(model, r: Rollout) -> float:
    ids = torch.tensor([r.prompt_ids + r.completion_ids])
    with torch.no_grad():
        return float(token_logprobs(model, ids)[0, len(r.prompt_ids):].sum())


def test_masked_log_probs_match_the_full_path_with_the_same_gradient(tiny_lm_dir):
    """The output layer on loss positions only (the learner's path) gives the full forward's
    log-probs there, 0 elsewhere, and the same gradient."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir))
    ids = torch.randint(3, 200, (3, 12))
    mask = torch.zeros_like(ids)
    mask[0, 7:] = 1
    mask[2, 4:9] = 1
    fast = token_logprobs(model, ids, mask)
    fast[mask.bool()].sum().backward()
    g_fast = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full = token_logprobs(model, ids)
    full[mask.bool()].sum().backward()
    assert torch.allclose(fast[mask.bool()].detach(), full[mask.bool()].detach(), atol=1e-5)
    assert (fast[~mask.bool()] == 0).all()
    for a, p in zip(g_fast, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5)


def test_update_moves_the_policy_toward_rewarded_ideas_and_sync_reaches_the_engine(policy, tiny_lm_dir):
    from actors.engine import create_engine
    from selftaught.config import EngineConfig, SamplingConfig

    engine = create_engine(EngineConfig(backend="transformers", model=str(tiny_lm_dir)))
    rs = _rollouts(engine, "The river", 4)
    # the engine's log-probs of its samples are the policy's own (same weights): on-policy start
    for r in rs:
        assert sum(r.behaviour_logprobs) == pytest.approx(_seq_logprob(policy.core, r), abs=1e-3)
    for r, reward in zip(rs, (1.0, 0.0, 0.0, 0.0)):
        r.reward = reward
    masked = _rollouts(engine, "Water", 4, seed=1)
    for r in masked:
        r.reward = 1.0
    masked[0].infra_failure = True  # this group teaches nothing
    before = [_seq_logprob(policy.core, r) for r in rs + masked]
    stats = grpo_update(policy, rs + masked, RLConfig(objective="mean"), version=0)
    assert stats["stepped"] and stats["masked_groups"] == ["Water"] and stats["clip_frac"] == 0.0
    assert stats["tokens"] == sum(len(r.completion_ids) for r in rs)  # sampled tokens of unmasked groups only
    after = [_seq_logprob(policy.core, r) for r in rs + masked]
    assert after[0] > before[0]  # the rewarded idea became likelier
    assert sum(after[1:4]) < sum(before[1:4])  # the others less likely
    # weight sync: the engine now samples from the trainer's policy
    info = engine.update_weights(policy_state(policy))
    assert info["version"] == 1
    greedy = engine.generate(["The river"], SamplingConfig(temperature=0, max_new_tokens=6, logprobs=0,
                                                           ignore_eos=True))[0].completions[0]
    r = Rollout(group="x", prompt_ids=rs[0].prompt_ids, completion_ids=list(greedy.token_ids))
    assert sum(greedy.logprobs) == pytest.approx(_seq_logprob(policy.core, r), abs=1e-3)


def test_stale_rollouts_are_importance_corrected_or_dropped(policy, tiny_lm_dir):
    from actors.engine import create_engine
    from selftaught.config import EngineConfig

    engine = create_engine(EngineConfig(backend="transformers", model=str(tiny_lm_dir)))
    rs = _rollouts(engine, "The river", 4)
    for r, reward in zip(rs, (1.0, 0.0, 0.5, 0.0)):
        r.reward = reward
        r.behaviour_logprobs = [x - 0.5 for x in r.behaviour_logprobs]  # the lagging policy was less sure
    # version 1 trainer, rollouts from version 0: dropped at staleness 0 ...
    none = grpo_update(policy, rs, RLConfig(max_staleness=0), version=1)
    assert none["stale"] == 4 and not none["stepped"]
    # ... and at staleness 1 learned from with ratio pi / pi_behaviour = e^0.5, outside the clip
    st = grpo_update(policy, rs, RLConfig(max_staleness=1), version=1)
    assert st["stale"] == 0 and st["stepped"] and st["clip_frac"] == pytest.approx(1.0)


def test_a_group_of_equal_rewards_takes_no_step(policy, tiny_lm_dir):
    """Zero advantages everywhere and no KL term: a zero gradient, and AdamW's momentum would
    still move the weights, so no step is taken; the tokens still count."""
    from actors.engine import create_engine
    from selftaught.config import EngineConfig

    engine = create_engine(EngineConfig(backend="transformers", model=str(tiny_lm_dir)))
    rs = _rollouts(engine, "The river", 4)
    for r in rs:
        r.reward = 0.5
    before = {k: v.clone() for k, v in policy.core.state_dict().items()}
    st = grpo_update(policy, rs, RLConfig(), version=0)
    assert not st["stepped"] and st["tokens"] == sum(len(r.completion_ids) for r in rs)
    assert all(torch.equal(v, policy.core.state_dict()[k]) for k, v in before.items())
