"""Tokenisation for the training loop: documents (EOS-joined streams), conditional pairs and chat
examples with loss masks, and fixed held-out windows."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm


def tokenize_documents(tokenizer, texts: Iterable[str], batch_size: int = 256,
                       skipped: dict[str, int] | None = None) -> list[np.ndarray]:
    """Token ids per non-empty document (EOS appended), as int32 arrays. Empty or non-string
    documents are counted in ``skipped`` and left out."""
    eos = tokenizer.eos_token_id
    out: list[np.ndarray] = []
    batch: list[str] = []
    skipped = skipped if skipped is not None else {}

    def flush():
        if batch:
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                if ids:
                    out.append(np.asarray(ids + [eos], dtype=np.int32))
            batch.clear()

    for t in tqdm(texts, desc="tokenize", unit="doc", mininterval=2.0, disable=None):
        if isinstance(t, str) and t.strip():
            batch.append(t)
            if len(batch) >= batch_size:
                flush()
        else:
            skipped["empty"] = skipped.get("empty", 0) + 1
    flush()
    return out


def tokenize_pairs(tokenizer, pairs: Iterable[tuple[str, str]], seq_len: int, sep: str = "\n\n",
                   ) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, int]]:
    """Conditional examples ``d1 + sep + d2 + EOS`` with loss only on d2 and EOS (synthesizer
    tuning: maximise log p(d2 | d1)). A too-long pair keeps at most half the window for d1 (its
    end, nearest to d2) and cuts d2's tail; a pair with no room left for d2, or with an empty
    side, is skipped and counted."""
    L = seq_len + 1
    eos = tokenizer.eos_token_id
    sep_ids = tokenizer(sep, add_special_tokens=False)["input_ids"] if sep else []
    ids_out, masks_out, skipped = [], [], {}

    def skip(why: str) -> None:
        skipped[why] = skipped.get(why, 0) + 1

    for pair in pairs:
        try:
            d1, d2 = pair
        except (TypeError, ValueError):
            skip("malformed")
            continue
        if not (isinstance(d1, str) and isinstance(d2, str) and d1.strip() and d2.strip()):
            skip("empty")
            continue
        a = tokenizer(d1, add_special_tokens=False)["input_ids"]
        b = tokenizer(d2, add_special_tokens=False)["input_ids"] + [eos]
        if len(a) + len(sep_ids) + len(b) > L:
            a = a[-min(len(a), L // 2):]
            room = L - len(a) - len(sep_ids)
            if room < 2:  # not even one d2 token besides EOS
                skip("d2_cut_off")
                continue
            b = b[:room]
        ids = np.asarray(a + sep_ids + b, dtype=np.int32)
        mask = np.zeros(len(ids), np.uint8)
        mask[len(a) + len(sep_ids):] = 1
        ids_out.append(ids)
        masks_out.append(mask)
    return ids_out, masks_out, skipped


def tokenize_chat(tokenizer, conversations: Iterable[Sequence[dict]], seq_len: int,
                  assistant_prefix: str = "",
                  ) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, int]]:
    """SFT examples rendered with the tokenizer's chat template; loss only on the assistant
    turns' tokens (their content and end-of-turn marker, not the role header). An assistant turn
    starting with ``assistant_prefix`` (s1's start-of-thinking marker, which inference puts in
    the prompt) has that prefix masked too. Conversations longer than the window are skipped
    and counted (cutting a reasoning trace teaches the model to stop mid-thought)."""
    L = seq_len + 1
    ids_out, masks_out, skipped = [], [], {}

    def skip(why: str) -> None:
        skipped[why] = skipped.get(why, 0) + 1

    for conv in conversations:
        msgs = list(conv) if isinstance(conv, (list, tuple)) else None
        if not msgs or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role")
                               for m in msgs):
            skip("malformed")
            continue
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            skip("no_assistant_turn")
            continue
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start = len(tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True))
            if assistant_prefix and m["content"].startswith(assistant_prefix):
                start += len(assistant_prefix)
            end = len(tokenizer.apply_chat_template(msgs[:i + 1], tokenize=False))
            spans.append((start, end))
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        if len(ids) > L:
            skip("too_long")
            continue
        mask = np.zeros(len(ids), np.uint8)
        for t, (s, e) in enumerate(enc["offset_mapping"]):
            if any(a <= s < b for a, b in spans) and e > s:
                mask[t] = 1
        ids_out.append(np.asarray(ids, dtype=np.int32))
        masks_out.append(mask)
    return ids_out, masks_out, skipped


def eval_windows(docs: Sequence[np.ndarray], seq_len: int, max_tokens: int) -> torch.Tensor:
    """Deterministic held-out windows (first ``max_tokens`` tokens of the held-out stream)."""
    flat = np.concatenate(list(docs)) if docs else np.zeros(0, dtype=np.int32)
    n = min(len(flat) // (seq_len + 1), max(1, max_tokens // seq_len))
    if n == 0:
        raise ValueError("held-out set shorter than one training window")
    return torch.from_numpy(flat[: n * (seq_len + 1)].astype(np.int64)).view(n, seq_len + 1)
