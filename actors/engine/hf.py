"""Transformers backend of the generation engine: our own batched decode loop.

Why not ``model.generate``: every request in a batch may have its own sampling settings, seed,
stop strings and length limits, finished rows are dropped from the KV cache as they end (so a
batch costs what its live rows cost), and decode policies such as budget forcing need to force
or forbid tokens per row at each step. On CUDA the loop can run on a static KV cache with a
compiled decode step (CUDA graphs), the path that makes small-model decoding fast on a GPU.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from actors.engine.base import (Completion, GenerationEngine, GenerationOutput, Prompt,
                                first_stop, per_request)
from actors.engine.budget import BudgetForcing, budget_tokens, with_think_start
from selftaught.config import EngineConfig, SamplingConfig

log = logging.getLogger(__name__)


@dataclass
class RowState:
    """Decode state of one sample (one row of a batch). Decode policies act through
    ``forced`` (tokens to emit next, in order, instead of sampling) and ``banned`` (token ids
    masked at the next sampling step)."""

    index: int  # position in the flattened (request, sample) list
    params: SamplingConfig
    prompt_len: int
    request: int = 0  # the prompt this row answers
    sample: int = 0  # which of the prompt's n samples
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    forced: deque = field(default_factory=deque)
    banned: set[int] = field(default_factory=set)
    done: bool = False
    was_forced: bool = False  # the last token came from ``forced``, not from sampling
    finish_reason: str = "length"
    stop_reason: str | int | None = None
    policy: Any = None

    @property
    def n_generated(self) -> int:
        return len(self.tokens)


class DecodePolicy:
    """Hook for per-row decode policies (budget forcing and friends). The default policy is
    plain decoding: stop on EOS / stop tokens after ``min_new_tokens``."""

    def before_step(self, row: RowState, engine: "TransformersEngine") -> None:
        if row.n_generated < row.params.min_new_tokens:
            row.banned.update(engine.stop_ids_for(row.params))

    def on_sample(self, row: RowState, token: int, engine: "TransformersEngine") -> None:
        """The model proposed ``token``; a policy may queue ``row.forced`` to replace it."""

    def stop_strings_active(self, row: RowState) -> bool:
        return True

    def text_start(self, row: RowState) -> int:
        """Index of the first generated token that stop strings are matched against."""
        return 0

    def partial(self, row: RowState, engine: "TransformersEngine") -> tuple[str | None, str]:
        """(reasoning, text) decoded so far, for streaming; plain decoding has no reasoning."""
        return None, engine.tokenizer.decode(row.tokens, skip_special_tokens=True)

    def after_token(self, row: RowState, token: int, engine: "TransformersEngine") -> bool:
        """Return True when the row is finished by ``token``."""
        p = row.params
        if token in engine.stop_ids_for(p) and row.n_generated > p.min_new_tokens - 1 and not row.forced:
            row.finish_reason, row.stop_reason = "stop", int(token)
            if token in engine.eos_ids and token not in p.stop_token_ids:
                row.tokens.pop()  # EOS is not part of the text
            return True
        return False


PLAIN = DecodePolicy()


class TransformersEngine(GenerationEngine):
    backend = "transformers"

    def __init__(self, cfg: EngineConfig, model=None, tokenizer=None):
        from selftaught.models import load_causal_lm, resolve_device, resolve_dtype

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, self.device)
        if model is None:
            tokenizer, model = load_causal_lm(cfg.model, device=self.device, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model_name = cfg.model
        self.eos_ids = self._eos_ids()
        self.max_len = cfg.max_model_len or getattr(model.config, "max_position_embeddings", 4096)
        self._gen = torch.Generator(device="cpu")
        self._gen.manual_seed(0)
        self.use_static = self.device == "cuda" or cfg.compile
        self._decode_fn = self._decode_step
        if cfg.compile and self.device == "cuda":
            self._decode_fn = torch.compile(self._decode_step, mode="reduce-overhead", fullgraph=False)

    # ------------------------------------------------------------------ helpers
    def _eos_ids(self) -> set[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gc = getattr(self.model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None) if gc is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(e) for e in eos)
        return ids

    def stop_ids_for(self, p: SamplingConfig) -> set[int]:
        ids = set(p.stop_token_ids)
        if not p.ignore_eos:
            ids |= self.eos_ids
        return ids

    def encode(self, prompt: Prompt) -> tuple[str, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = [int(t) for t in prompt]
        return self.tokenizer.decode(ids), ids

    def info(self) -> dict[str, Any]:
        return {**super().info(), "device": self.device, "dtype": str(self.model.dtype),
                "static_cache": self.use_static, "max_batch_size": self.cfg.max_batch_size}

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt],
                 sampling: SamplingConfig | Sequence[SamplingConfig] | None = None,
                 policies: Sequence[Any] | None = None,
                 on_token: Callable[[RowState], None] | None = None) -> list[GenerationOutput]:
        """Generate for each prompt. ``policies`` (one per prompt, optional) replace the plain
        decode policy for that prompt's samples; requests with ``sampling.budget`` get budget
        forcing. ``on_token(row)`` is called after every emitted token (streaming)."""
        t0 = time.perf_counter()
        params = per_request(sampling, len(prompts))
        encoded = [self.encode(p) for p in prompts]
        for i, p in enumerate(params):
            if p.budget is not None and (policies is None or policies[i] is None):
                ids = encoded[i][1]
                ids = with_think_start(ids, budget_tokens(self, p.budget, p))
                encoded[i] = (self.tokenizer.decode(ids), ids)
        rows: list[tuple[int, int, list[int], SamplingConfig, Any]] = []
        for i, ((_, ids), p) in enumerate(zip(encoded, params)):
            if len(ids) + p.max_new_tokens > self.max_len:
                raise ValueError(f"prompt {i}: {len(ids)} prompt tokens + max_new_tokens "
                                 f"{p.max_new_tokens} exceed the model's {self.max_len} positions")
            if not ids:
                ids = [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None
                       else next(iter(self.eos_ids))]
            pol = policies[i] if policies is not None else None
            for s in range(p.n):
                rows.append((i, s, ids, p, pol))
        # Longest prompts first: similar lengths batch together, so less padding.
        order = sorted(range(len(rows)), key=lambda k: -len(rows[k][2]))
        results: dict[int, RowState] = {}
        bs = self.cfg.max_batch_size
        for start in range(0, len(order), bs):
            chunk = [rows[k] for k in order[start:start + bs]]
            states = [self._make_state(order[start + j], r) for j, r in enumerate(chunk)]
            self._run_batch([r[2] for r in chunk], states, on_token)
            results.update({s.index: s for s in states})
        outs = [GenerationOutput(prompt=encoded[i][0], prompt_token_ids=list(encoded[i][1]),
                                 completions=[], request_index=i) for i in range(len(prompts))]
        for k, (i, _, _, _, _) in enumerate(rows):
            outs[i].completions.append(self._finish(results[k]))
        dt = time.perf_counter() - t0
        for o in outs:
            o.metrics = {"prompt_tokens": len(o.prompt_token_ids),
                         "completion_tokens": sum(c.num_tokens for c in o.completions),
                         "batch_seconds": dt}
        return outs

    # ------------------------------------------------------------------ decode loop
    def _make_state(self, index: int, row) -> RowState:
        i, s, ids, p, pol = row
        gen = None
        if p.seed is not None:
            gen = torch.Generator(device="cpu")
            gen.manual_seed((int(p.seed) * 1000003 + s) % 2**63)  # any int64 seed, one stream per sample
        if pol is None and p.budget is not None:
            pol = BudgetForcing(p.budget, budget_tokens(self, p.budget, p))  # per sample: it keeps counts
        st = RowState(index=index, params=p, prompt_len=len(ids), request=i, sample=s, generator=gen,
                      policy=pol or PLAIN)
        if hasattr(st.policy, "start"):
            st.policy.start(st, self)
        return st

    def _finish(self, st: RowState) -> Completion:
        if hasattr(st.policy, "completion"):
            return st.policy.completion(st, self)
        text = self.tokenizer.decode(st.tokens, skip_special_tokens=True)
        if st.params.stop:
            hit = first_stop(text, st.params.stop)
            if hit is not None:
                text = text[:hit[0]]
                st.finish_reason, st.stop_reason = "stop", hit[1]
        return Completion(text=text, token_ids=list(st.tokens), finish_reason=st.finish_reason,
                          stop_reason=st.stop_reason)

    def _decode_step(self, input_ids, attention_mask, position_ids, cache, cache_position):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, cache_position=cache_position)
        return out.logits[:, -1, :].float()

    def _run_batch(self, prompt_ids: list[list[int]], states: list[RowState],
                   on_token: Callable[[RowState], None] | None = None) -> None:
        from transformers import DynamicCache, StaticCache

        dev = self.device
        B = len(prompt_ids)
        L = max(len(x) for x in prompt_ids)
        max_new = max(s.params.max_new_tokens for s in states)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((B, L), pad, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for b, x in enumerate(prompt_ids):  # left padding: the last column is every row's last token
            ids[b, L - len(x):] = torch.tensor(x)
            mask[b, L - len(x):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        static = self.use_static
        if static:
            total = L + max_new
            cache = StaticCache(config=self.model.config, max_cache_len=total)
            full_mask = torch.zeros((B, total), dtype=torch.long, device=dev)
            full_mask[:, :L] = mask
            out = self.model(input_ids=ids, attention_mask=full_mask, position_ids=pos,
                             past_key_values=cache, use_cache=True,
                             cache_position=torch.arange(L, device=dev), logits_to_keep=1)
        else:
            cache = DynamicCache()
            full_mask = mask
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :].float()
        next_pos = pos[:, -1] + 1
        batch_rows = list(range(B))  # state index of each batch row (shrinks on the dynamic path)
        pad_tok = pad if pad is not None else 0
        step = 0
        while True:
            act = [j for j, i in enumerate(batch_rows) if not states[i].done]
            if not act:
                break
            sel = logits if len(act) == len(batch_rows) else logits[act]
            toks = self._choose(sel, [states[batch_rows[j]] for j in act])
            cur_list = [pad_tok] * len(batch_rows)
            for j, tok in zip(act, toks):
                st = states[batch_rows[j]]
                cur_list[j] = tok
                st.tokens.append(tok)
                if st.policy.after_token(st, tok, self) or (
                        st.policy.stop_strings_active(st) and self._hit_stop_string(st)):
                    st.done = True
                elif st.n_generated >= st.params.max_new_tokens and not st.forced:
                    st.done, st.finish_reason = True, "length"
                if on_token is not None:
                    on_token(st)
            step += 1
            if all(states[i].done for i in batch_rows):
                break
            cur = torch.tensor(cur_list, device=dev).view(-1, 1)
            if static:
                # Fixed shapes (graph capture): finished rows keep decoding, their output ignored.
                if L + step - 1 >= full_mask.shape[1]:
                    raise RuntimeError("decode policy forced more tokens than the static cache holds")
                full_mask[:, L + step - 1] = 1
                logits = self._decode_fn(cur, full_mask, next_pos.view(-1, 1), cache,
                                         torch.tensor([L + step - 1], device=dev))
            else:
                keep = [j for j, i in enumerate(batch_rows) if not states[i].done]
                if len(keep) < len(batch_rows):  # drop finished rows from the KV cache
                    idx = torch.tensor(keep, device=dev)
                    cache.batch_select_indices(idx)
                    full_mask, next_pos, cur = full_mask[idx], next_pos[idx], cur[idx]
                    batch_rows = [batch_rows[j] for j in keep]
                full_mask = torch.cat([full_mask, full_mask.new_ones((len(batch_rows), 1))], dim=1)
                logits = self._decode_fn(cur, full_mask, next_pos.view(-1, 1), cache, None)
            next_pos = next_pos + 1

    def _hit_stop_string(self, st: RowState) -> bool:
        stops = st.params.stop
        if not stops:
            return False
        window = max(len(s) for s in stops) + 8
        start = max(len(st.tokens) - window, st.policy.text_start(st) if hasattr(st.policy, "text_start") else 0)
        tail = self.tokenizer.decode(st.tokens[start:], skip_special_tokens=True)
        hit = first_stop(tail, stops)
        if hit is None:
            return False
        st.finish_reason, st.stop_reason = "stop", hit[1]
        return True

    def _choose(self, logits: torch.Tensor, rows: list[RowState]) -> list[int]:
        """Pick each row's next token: forced tokens first, otherwise sample or argmax."""
        B, V = logits.shape
        for r in rows:
            r.policy.before_step(r, self)
        banned = [(j, list(r.banned)) for j, r in enumerate(rows) if r.banned]
        for j, ids in banned:
            logits[j, ids] = float("-inf")
        for r in rows:
            r.banned.clear()
        temps = torch.tensor([r.params.temperature for r in rows], device=logits.device)
        greedy = temps <= 0
        choice = logits.argmax(-1)
        if not bool(greedy.all()):
            scaled = logits / temps.clamp(min=1e-5).unsqueeze(1)
            scaled = self._top_k_top_p(scaled, rows)
            probs = torch.softmax(scaled, dim=-1).cpu()
            noise = torch.empty_like(probs).exponential_(generator=self._gen)
            for j, r in enumerate(rows):
                if r.generator is not None and r.params.temperature > 0:
                    noise[j].exponential_(generator=r.generator)
            sampled = (probs / noise).argmax(-1).to(logits.device)
            choice = torch.where(greedy, choice, sampled)
        out = choice.tolist()
        for j, r in enumerate(rows):
            if not r.forced:
                r.policy.on_sample(r, out[j], self)
            r.was_forced = bool(r.forced)
            if r.was_forced:
                out[j] = int(r.forced.popleft())
        return out

    @staticmethod
    def _top_k_top_p(scaled: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
        ks = [r.params.top_k for r in rows]
        ps = [r.params.top_p for r in rows]
        if any(k > 0 for k in ks):
            V = scaled.shape[-1]
            k_t = torch.tensor([k if k > 0 else V for k in ks], device=scaled.device).clamp(max=V)
            kth = torch.sort(scaled, dim=-1, descending=True).values.gather(1, (k_t - 1).view(-1, 1))
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if any(p < 1.0 for p in ps):
            p_t = torch.tensor(ps, device=scaled.device).view(-1, 1)
            sorted_logits, sorted_idx = torch.sort(scaled, dim=-1, descending=True)
            cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            remove = (cum - torch.softmax(sorted_logits, dim=-1)) >= p_t  # keep the token crossing p
            sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
            scaled = torch.full_like(scaled, float("-inf")).scatter(1, sorted_idx, sorted_logits)
        return scaled
