"""GRPO post-training of a small instruct model on reasoning-gym problems, within a wall-clock budget.

Each step: sample `prompts_per_step` problems from $DATA_DIR/problems.jsonl, generate `group_size`
completions per problem (sampling, batched, left padding), reward each completion with
reasoning-gym's scorer on the extracted answer, normalise rewards within each group
(advantages), and take `inner_epochs` optimizer steps on the clipped-ratio (PPO/GRPO) objective,
optionally with a KL penalty to the frozen base model. Stops when $TIME_BUDGET_S would be
exceeded (or after `max_steps`), then saves the policy to $OUT_DIR as safetensors.

The prompt format and answer extraction below are the ones the frozen evaluator uses to measure
validation accuracy (greedy decoding); changing them here changes what is trained, not how it is
measured.
"""
from __future__ import annotations

import time

T_START = time.time()  # the budget counts from process start (imports and loading included)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

# --------------------------------------------------------------------------- prompt and answer
# Must match the evaluator (frozen): chat template of the base tokenizer (it adds SmolLM2's default
# system message), one user turn = question + "\n" + instruction, generation prompt appended.
# The evaluator uses the "short" style in this environment (config "prompt").
INSTRUCTIONS = {
    "short": "Reply with only the final answer.",
    "cot": "Think step by step, then give the final answer inside <answer></answer> tags.",
}
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def format_prompt(tokenizer, question: str, style: str = "short") -> str:
    messages = [{"role": "user", "content": f"{question.strip()}\n{INSTRUCTIONS[style]}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def extract_answer(text: str) -> str:
    """The last <answer>...</answer> if any, else the last number in the text, else the text."""
    tags = [t.strip() for t in _ANSWER_TAG.findall(text) if t.strip()]
    if tags:
        return tags[-1]
    nums = _NUMBER.findall(text.replace(",", ""))
    return nums[-1] if nums else text.strip()


# --------------------------------------------------------------------------- rewards
_DATASETS: dict = {}


def _dataset(row: dict):
    import reasoning_gym

    key = (row["task"], row["size"], row["seed"], json.dumps(row.get("config") or {}, sort_keys=True))
    if key not in _DATASETS:
        _DATASETS[key] = reasoning_gym.create_dataset(row["task"], size=row["size"], seed=row["seed"],
                                                      **(row.get("config") or {}))
    return _DATASETS[key]


def score(row: dict, completion: str) -> float:
    """reasoning-gym's verdict on the extracted answer (1.0 correct; some tasks give partial credit)."""
    ds = _dataset(row)
    entry = row["entry"] if row.get("exact", True) else ds[row["index"]]
    try:
        return float(ds.score_answer(extract_answer(completion), entry))
    except Exception:
        return 0.0


# --------------------------------------------------------------------------- helpers
def load_config(path: str, smoke: bool) -> dict:
    cfg = {"lr": 2e-5, "group_size": 8, "prompts_per_step": 4, "max_new_tokens": 24, "temperature": 1.0,
           "top_p": 1.0, "clip_eps": 0.2, "kl_coef": 0.0, "inner_epochs": 1, "loss_agg": "token-mean",
           "adv_norm": "std", "max_steps": None, "weight_decay": 0.0, "grad_clip": 1.0,
           "micro_batch_size": 16, "binary_reward": True, "prompt": "short"}
    if Path(path).exists():
        cfg.update(json.loads(Path(path).read_text()))
    if smoke:  # one tiny step: checks that the code runs end to end, in seconds
        cfg.update(group_size=2, prompts_per_step=1, max_new_tokens=4, max_steps=1, inner_epochs=1)
    if cfg["loss_agg"] not in ("token-mean", "seq-mean"):
        raise ValueError(f"loss_agg must be token-mean or seq-mean, not {cfg['loss_agg']!r}")
    if cfg["adv_norm"] not in ("std", "none"):
        raise ValueError(f"adv_norm must be std or none, not {cfg['adv_norm']!r}")
    if cfg["prompt"] not in INSTRUCTIONS:
        raise ValueError(f"prompt must be one of {sorted(INSTRUCTIONS)}, not {cfg['prompt']!r}")
    return cfg


def completion_mask(tokens: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 for generated tokens up to and including the first EOS, 0 after (padding)."""
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device)).long()
    return ((is_eos.cumsum(dim=1) - is_eos) == 0).float()


def token_logprobs(model, input_ids, attention_mask, n_completion: int) -> torch.Tensor:
    """Log-probabilities of the last `n_completion` tokens of each row under `model`."""
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # left padding, as in generate
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=n_completion + 1, use_cache=False)
    logits = out.logits[:, :-1].float()
    targets = input_ids[:, -n_completion:]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="config.json")
    args = ap.parse_args()

    data_dir = Path(os.environ["DATA_DIR"])
    model_dir = os.environ["MODEL_DIR"]
    out_dir = Path(os.environ.get("OUT_DIR", "out"))
    seed = int(os.environ.get("SEED", "0"))
    budget = float(os.environ.get("TIME_BUDGET_S", "120"))
    smoke = os.environ.get("SMOKE", "0") == "1"
    torch.set_num_threads(max(1, int(os.environ.get("NUM_THREADS", "1"))))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config(args.config, smoke)
    print(f"config: {json.dumps(cfg)}", flush=True)

    random.seed(seed)
    torch.manual_seed(seed)
    rows = [json.loads(line) for line in (data_dir / "problems.jsonl").read_text().splitlines() if line.strip()]
    print(f"{len(rows)} training problems, device {device}, budget {budget:.0f}s", flush=True)

    import reasoning_gym  # noqa: F401  (scoring; imported now so step times are honest)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # fp32 master weights (small AdamW updates vanish in bf16); bf16 autocast on GPU
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.generation_config.pad_token_id = tok.pad_token_id
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    ref = None
    if cfg["kl_coef"] > 0:
        ref_dtype = torch.bfloat16 if device == "cuda" else torch.float32
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=ref_dtype).to(device).eval()
        ref.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                            betas=(0.9, 0.99))
    # end of a completion: the tokenizer's EOS and any the base model's generation config names
    gen_eos = model.generation_config.eos_token_id
    eos_ids = sorted({tok.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None})

    order: list[int] = []
    log: list[dict] = []
    step, step_s = 0, 0.0
    print(f"ready after {time.time() - T_START:.1f}s", flush=True)
    while True:
        elapsed = time.time() - T_START
        if cfg["max_steps"] is not None and step >= cfg["max_steps"]:
            break
        if step > 0 and elapsed + step_s > budget:  # the next step would overrun the budget
            break
        t_step = time.time()
        # ---- sample problems (without replacement, reshuffled each pass)
        batch = []
        for _ in range(cfg["prompts_per_step"]):
            if not order:
                order = list(range(len(rows)))
                random.shuffle(order)
            batch.append(rows[order.pop()])
        G = cfg["group_size"]
        prompts = [format_prompt(tok, r["question"], cfg["prompt"]) for r in batch]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)

        # ---- rollouts
        model.eval()
        with torch.no_grad(), autocast:
            seqs = model.generate(**enc, do_sample=True, temperature=cfg["temperature"], top_p=cfg["top_p"],
                                  top_k=0, max_new_tokens=cfg["max_new_tokens"], num_return_sequences=G,
                                  pad_token_id=tok.pad_token_id, eos_token_id=eos_ids)
        P = enc["input_ids"].shape[1]
        completion = seqs[:, P:]
        C = completion.shape[1]
        cmask = completion_mask(completion, eos_ids)
        attn = torch.cat([enc["attention_mask"].repeat_interleave(G, dim=0), cmask.long()], dim=1)
        texts = tok.batch_decode(completion, skip_special_tokens=True)

        # ---- rewards and group-normalised advantages
        raw = torch.tensor([score(batch[i // G], t) for i, t in enumerate(texts)], dtype=torch.float32)
        rewards = (raw >= 1.0).float() if cfg["binary_reward"] else raw
        grouped = rewards.view(-1, G)
        adv = grouped - grouped.mean(dim=1, keepdim=True)
        if cfg["adv_norm"] == "std":
            adv = adv / (grouped.std(dim=1, keepdim=True) + 1e-4) if G > 1 else adv
        adv = adv.view(-1).to(device)

        # ---- reference log-probs (KL penalty)
        mb = max(1, cfg["micro_batch_size"])
        chunks = [slice(i, min(i + mb, seqs.shape[0])) for i in range(0, seqs.shape[0], mb)]
        ref_lp = []
        if ref is not None:
            with torch.no_grad(), autocast:
                ref_lp = [token_logprobs(ref, seqs[s], attn[s], C) for s in chunks]

        # ---- policy update: clipped-ratio objective, `inner_epochs` optimizer steps on this batch
        model.train()
        n_tokens = cmask.sum().clamp(min=1.0)
        n_seqs = seqs.shape[0]
        old_lp: list[torch.Tensor] = []
        eps = cfg["clip_eps"]
        loss_sum, kl_sum, clip_frac = 0.0, 0.0, 0.0
        for epoch in range(cfg["inner_epochs"]):
            opt.zero_grad(set_to_none=True)
            for j, s in enumerate(chunks):
                with autocast:
                    lp = token_logprobs(model, seqs[s], attn[s], C)
                if epoch == 0:  # the policy that sampled: ratio 1 on the first pass
                    old_lp.append(lp.detach())
                m = cmask[s]
                ratio = torch.exp(lp - old_lp[j])
                a = adv[s].unsqueeze(1)
                per_tok = -torch.min(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
                if ref is not None:
                    d = ref_lp[j] - lp
                    kl = torch.exp(d) - d - 1  # k3 estimator, >= 0
                    per_tok = per_tok + cfg["kl_coef"] * kl
                    kl_sum += float((kl.detach() * m).sum() / n_tokens) / cfg["inner_epochs"]
                if cfg["loss_agg"] == "token-mean":
                    loss = (per_tok * m).sum() / n_tokens
                else:
                    loss = ((per_tok * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)).sum() / n_seqs
                loss.backward()
                with torch.no_grad():
                    loss_sum += loss.item() / cfg["inner_epochs"]
                    clip_frac += float((((ratio - 1).abs() > eps).float() * m).sum() / n_tokens) / cfg["inner_epochs"]
            if cfg["grad_clip"] and cfg["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            opt.step()
        step += 1
        step_s = time.time() - t_step
        rec = {"step": step, "elapsed_s": round(time.time() - T_START, 1), "step_s": round(step_s, 2),
               "reward": round(float(rewards.mean()), 4),
               "groups_with_signal": round(float((grouped.std(dim=1) > 0).float().mean()), 3) if G > 1 else 0.0,
               "loss": round(loss_sum, 5), "kl": round(kl_sum, 5), "clip_frac": round(clip_frac, 4),
               "completion_tokens": round(float(cmask.sum(dim=1).mean()), 1)}
        log.append(rec)
        print(" ".join(f"{k}={v}" for k, v in rec.items()), flush=True)
        if not math.isfinite(loss_sum):
            print("non-finite loss: stopping", flush=True)
            break

    # ---- save (safetensors only; the evaluator refuses pickles)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    summary = {"steps": step, "seconds": round(time.time() - T_START, 1), "config": cfg, "log": log}
    (out_dir / "train_log.json").write_text(json.dumps(summary, indent=1))
    print(f"saved {out_dir} after {step} steps, {time.time() - T_START:.1f}s", flush=True)


if __name__ == "__main__":
    main()
