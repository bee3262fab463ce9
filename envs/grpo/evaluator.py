"""Frozen evaluator of the GRPO environment: validation accuracy of the job's checkpoint.

    python -m envs.grpo.evaluator --artifacts OUT --val VAL --codebase CODE --out result.json \
        [--n 64] [--max-new-tokens 32] [--batch-size 32] [--time-limit 60]

Trust boundary: nothing of the idea's code runs here, and only the weights of its checkpoint are
used. The checkpoint must be a safetensors Llama checkpoint with exactly the base model's shape
(``$MODEL_DIR``, or SmolLM2-135M-Instruct when unset): any pickle file (``.bin``, ``.pt``, ...) is
refused, so is a config naming another architecture (model_type) or size or custom code. The model is built
from the *base* config and the tokenizer is the base tokenizer; the prompt, the greedy decoding
and the answer extraction are fixed here (the codebase carries copies of the prompt and the
extraction so that training optimises the measured quantity). Each answer is scored by
reasoning-gym's own verifier; accuracy counts full credit only.

Writes ``{"value": accuracy, "metrics": {...}}``. Unusable artefacts: a message on stderr, exit
1, no output file. The run stops (exit 1) rather than exceed ``--time-limit``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

# Frozen prompt and answer format (copied into codebase/train.py and codebase/README.md). The
# spec picks the style with --prompt (short on CPU; cot for the paper shape's larger model).
INSTRUCTIONS = {
    "short": "Reply with only the final answer.",
    "cot": "Think step by step, then give the final answer inside <answer></answer> tags.",
}
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
# Config fields that fix the architecture's shape: they must equal the base model's.
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
              "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


class Unusable(Exception):
    """The artefacts cannot be evaluated (the idea failed at stage evaluate)."""


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


# --------------------------------------------------------------------------- checks
def base_model_dir() -> Path:
    if os.environ.get("MODEL_DIR"):
        return Path(os.environ["MODEL_DIR"])
    from selftaught.models import smollm2_path

    return smollm2_path()


def check_artifacts(artifacts: Path, base: Path) -> dict:
    """Refuse anything but a safetensors Llama checkpoint of the base model's shape; returns
    the base config (the one the model is built from)."""
    if not artifacts.is_dir():
        raise Unusable(f"no checkpoint directory at {artifacts}")
    pickles = sorted(str(p.relative_to(artifacts)) for p in artifacts.rglob("*")
                     if p.is_file() and p.name.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise Unusable(f"refusing pickle files in the checkpoint (safetensors only): {pickles[:5]}")
    weight_files(artifacts)  # raises when there are no (or dangling) safetensors weights
    cfg_path = artifacts / "config.json"
    if not cfg_path.is_file():
        raise Unusable(f"no config.json in {artifacts}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise Unusable(f"config.json is not JSON: {e}") from e
    base_cfg = json.loads((base / "config.json").read_text())
    if cfg.get("model_type") != base_cfg.get("model_type"):
        raise Unusable(f"config model_type is {cfg.get('model_type')!r}; the checkpoint must be the base "
                       f"model's ({base_cfg.get('model_type')!r})")
    if cfg.get("auto_map"):
        raise Unusable("config names custom code (auto_map); only the base architecture is accepted")
    diff = {k: (cfg.get(k), base_cfg.get(k)) for k in SHAPE_KEYS
            if k in base_cfg and cfg.get(k, base_cfg[k]) != base_cfg[k]}
    if diff:
        raise Unusable("checkpoint shape differs from the base model "
                       + ", ".join(f"{k}={a!r} (base {b!r})" for k, (a, b) in diff.items()))
    return base_cfg


def weight_files(artifacts: Path) -> list[Path]:
    """``model.safetensors``, or the shards a ``model.safetensors.index.json`` names (all inside
    the checkpoint directory)."""
    single, index = artifacts / "model.safetensors", artifacts / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise Unusable(f"unreadable model.safetensors.index.json: {e}") from e
        files = [artifacts / n for n in names]
        bad = [n for n, f in zip(names, files) if not n.endswith(".safetensors") or "/" in n or "\\" in n
               or not f.is_file()]
        if bad or not files:
            raise Unusable(f"model.safetensors.index.json names missing or invalid shards: {bad[:5]}")
        return files
    raise Unusable(f"no model.safetensors in {artifacts} (save with model.save_pretrained: safetensors)")


def load_model(artifacts: Path, base: Path):
    """The base architecture (base config) with the checkpoint's weights, all of them required."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base))
    state = {}
    for f in weight_files(artifacts):
        try:
            state.update(load_file(str(f), device="cpu"))
        except (SafetensorError, OSError, ValueError) as e:
            raise Unusable(f"cannot read {f.name}: {e}") from e
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    expected = model.state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    optional = {"lm_head.weight"} if tied else set()
    missing = sorted(k for k in expected if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in expected)
    wrong = sorted(k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise Unusable(f"checkpoint weights do not match the base model: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    for k, v in state.items():
        if not v.is_floating_point():
            raise Unusable(f"weight {k} is not floating point ({v.dtype})")
        state[k] = v.float()
    if tied:
        state.pop("lm_head.weight", None)  # tied to the input embedding: the embedding is authoritative
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise Unusable("checkpoint has non-finite weights")
    return model.eval()


def eos_token_ids(tok, base: Path) -> list[int]:
    """The tokenizer's EOS and any the base model's generation config names."""
    ids = {tok.eos_token_id}
    gen = base / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if isinstance(i, int))


# --------------------------------------------------------------------------- scoring
_DATASETS: dict = {}


def score(row: dict, completion: str) -> float:
    import reasoning_gym

    key = (row["task"], row["size"], row["seed"], json.dumps(row.get("config") or {}, sort_keys=True))
    if key not in _DATASETS:
        _DATASETS[key] = reasoning_gym.create_dataset(row["task"], size=row["size"], seed=row["seed"],
                                                      **(row.get("config") or {}))
    ds = _DATASETS[key]
    entry = row["entry"] if row.get("exact", True) else ds[row["index"]]
    try:
        return float(ds.score_answer(extract_answer(completion), entry))
    except Exception:  # a verifier choking on garbage means the answer is wrong
        return 0.0


def evaluate(args: argparse.Namespace) -> dict:
    t0 = time.time()
    base = base_model_dir()
    check_artifacts(Path(args.artifacts), base)  # before the heavy imports: refusals are quick

    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(max(1, args.num_threads or int(os.environ.get("NUM_THREADS", "0") or 0)
                              or min(2, os.cpu_count() or 1)))
    rows = [json.loads(x) for x in (Path(args.val) / "problems.jsonl").read_text().splitlines() if x.strip()]
    rows = rows[: args.n] if args.n else rows
    if not rows:
        raise RuntimeError(f"no validation problems in {args.val}")
    tok = AutoTokenizer.from_pretrained(str(base))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    eos_ids = eos_token_ids(tok, base)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(Path(args.artifacts), base).to(device)
    load_s = time.time() - t0

    scores, gen_tokens, truncated = [], 0, 0
    for i in range(0, len(rows), args.batch_size):
        batch = rows[i:i + args.batch_size]
        enc = tok([format_prompt(tok, r["question"], args.prompt) for r in batch], return_tensors="pt",
                  padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=args.max_new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=eos_ids)
        comp = out[:, enc["input_ids"].shape[1]:]
        for r, ids in zip(batch, comp):
            ids = ids.tolist()
            stop = next((j for j, t in enumerate(ids) if t in eos_ids), None)
            if stop is None:
                truncated += 1
            else:
                ids = ids[:stop]
            gen_tokens += len(ids)
            scores.append(score(r, tok.decode(ids, skip_special_tokens=True)))

    correct = [1.0 if s >= 1.0 else 0.0 for s in scores]
    per_task: dict[str, dict] = {}
    for r, c in zip(rows, correct):
        d = per_task.setdefault(r["task"], {"n": 0, "correct": 0})
        d["n"] += 1
        d["correct"] += int(c)
    for d in per_task.values():
        d["accuracy"] = d["correct"] / d["n"]
    acc = sum(correct) / len(correct)
    if not math.isfinite(acc):
        raise RuntimeError("non-finite accuracy")
    return {"value": acc,
            "metrics": {"accuracy": acc, "n": len(rows), "per_task": per_task,
                        "mean_score": sum(scores) / len(scores),
                        "mean_completion_tokens": gen_tokens / len(rows),
                        "truncated_fraction": truncated / len(rows),
                        "max_new_tokens": args.max_new_tokens, "prompt": args.prompt,
                        "load_seconds": round(load_s, 2), "seconds": round(time.time() - t0, 2)}}


def _timeout(signum, frame):  # noqa: ARG001
    raise TimeoutError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--codebase", default=None)  # unused: the codebase's own code is never run here
    ap.add_argument("--out", required=True)
    ap.add_argument("--model-cmd", default=None)  # unused: no model server in this environment
    ap.add_argument("--n", type=int, default=64, help="validation problems (a prefix, balanced across tasks)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--prompt", choices=sorted(INSTRUCTIONS), default="short", help="frozen prompt style")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-threads", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=0.0, help="seconds; 0 = none")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.time_limit and args.time_limit > 0:
        signal.signal(signal.SIGALRM, _timeout)
        signal.alarm(max(1, math.ceil(args.time_limit)))
    try:
        result = evaluate(args)
    except Unusable as e:
        print(f"grpo evaluator: unusable artefacts: {e}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"grpo evaluator: exceeded --time-limit {args.time_limit}s; no result", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(f"grpo evaluator: accuracy {result['value']:.4f} on {result['metrics']['n']} problems "
          f"({result['metrics']['seconds']:.1f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
