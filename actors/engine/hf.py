"""Transformers backend of the generation engine: our own continuous-batching decode loop.

Why not ``model.generate`` (or transformers' own continuous-batching manager): every request
may have its own sampling settings, seed, stop strings, grammar and length limits, and decode
policies such as budget forcing need to force, forbid or take back tokens per row at each
step; transformers' manager applies one generation config to all requests and has no per-row
hooks. So the loop is ours, on transformers' KV cache:

- one running batch on a ``DynamicCache``; between decode steps queued requests are prefilled
  (together, left-padded) and merged into it, and finished or aborted rows are dropped from it,
  so a batch costs what its live rows cost and nobody waits for a batch to drain;
- a row's sequence is left-padded to the batch's width; columns every row pads are trimmed, and
  positions are per row, so rows admitted at different times decode side by side;
- a failure while prefilling a request fails that request alone; a failure in a row's own
  post-processing (its policy, grammar, text) fails that row alone.
"""
from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from actors.engine.base import (PLAIN, Completion, DecodePolicy, EventSink, GenerationEngine,
                                IncrementalDetokenizer, Prompt, RequestError, RowState, StreamEvent,
                                dispatch_events, eos_ids_of, first_stop, sample_seed,
                                sample_usage)
from actors.engine.attention import use_gqa_sdpa_on_cpu
from actors.engine.budget import BudgetForcing, with_think_start
from selftaught.config import EngineConfig, SamplingConfig

log = logging.getLogger(__name__)


@dataclass
class _Request:
    id: str
    prompt_ids: list[int]
    params: SamplingConfig
    sink: EventSink | None
    rows: list["_Row"] = field(default_factory=list)
    open: int = 0  # samples not finished yet


@dataclass
class _Row(RowState):
    """A row plus what the engine streams from it (never touched outside this module)."""

    logprobs: list[float] | None = None
    top: list | None = None
    pending_lp: tuple | None = None  # (log-prob, top-k) of the token being appended
    lp_ring: Any = None  # recent next-token distributions of a row whose policy may retract
    constraint: Any = None
    pushed: int = 0  # tokens already given to the detokenizer (streamed)
    seg_phase: str | None = None
    seg: IncrementalDetokenizer | None = None
    seg_text: str = ""  # text of the current phase segment so far
    seg_sent: int = 0  # characters of ``seg_text`` already sent
    error: str | None = None


class TransformersEngine(GenerationEngine):
    backend = "transformers"

    def __init__(self, cfg: EngineConfig, model=None, tokenizer=None):
        from selftaught.models import load_causal_lm, resolve_device, resolve_dtype

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, self.device)
        own = model is None
        if own:
            tokenizer, model = load_causal_lm(cfg.model, device=self.device, dtype=dtype)
        self.model = model.to(self.device).eval()
        # a model handed in may be shared (a trainer's): its attention is left as it is
        self.gqa_sdpa = own and use_gqa_sdpa_on_cpu(self.model)
        self.tokenizer = tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model_name = cfg.model
        self.eos_ids = eos_ids_of(tokenizer, getattr(getattr(model, "generation_config", None), "eos_token_id", None))
        self.max_len = int(cfg.max_model_len or getattr(model.config, "max_position_embeddings", 4096))
        self.vocab_size = int(self.model.get_input_embeddings().num_embeddings)
        self.weights_version = 0
        self._gen = torch.Generator(device="cpu")
        self._gen.manual_seed(0)
        self._forward = self._decode_step
        if cfg.compile and self.device == "cuda":
            self._forward = torch.compile(self._decode_step, dynamic=True)
        self._step_lock = threading.RLock()  # one stepping thread at a time; weights swap between steps
        self._inbox = threading.Lock()
        self._waiting: deque[_Request] = deque()
        self._requests: dict[str, _Request] = {}
        self._aborts: set[str] = set()
        self._grammars = None
        # the running batch
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # [B, T] 1 where a row has a real token
        self._pos: torch.Tensor | None = None  # [B] position of each row's next token
        self._logits: torch.Tensor | None = None  # [B, V] distribution of each row's next token
        self.stats = {"steps": 0, "prefills": 0, "admitted": 0, "finished": 0, "aborted": 0,
                      "failed_requests": 0, "failed_rows": 0, "max_running": 0}

    # ------------------------------------------------------------------ helpers
    def info(self) -> dict[str, Any]:
        return {**super().info(), "device": self.device, "dtype": str(self.model.dtype),
                "max_batch_size": self.cfg.max_batch_size, "continuous_batching": True,
                "weights_version": self.weights_version}

    def grammar_cache(self):
        if self._grammars is None:
            from actors.engine.structured import GrammarCache

            self._grammars = GrammarCache(self.tokenizer, self.vocab_size, stop_token_ids=sorted(self.eos_ids))
        return self._grammars

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: Prompt, sampling: SamplingConfig | None = None,
                    on_event: EventSink | None = None,
                    policy: DecodePolicy | Callable[[], DecodePolicy] | None = None) -> list[int]:
        p = sampling or SamplingConfig()
        with self._step_lock:  # the engine's tokenizer is used by one thread at a time
            ids = self.encode(prompt)
            if p.budget is not None and policy is None:
                try:
                    toks = self.budget_token_ids(p.budget, p)
                except ValueError as e:
                    raise RequestError(str(e)) from None
                ids = with_think_start(ids, toks)
            if not ids:
                ids = [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None
                       else next(iter(self.eos_ids))]
            self.check_request(ids, p)
            grammar = None
            if p.response_format is not None:
                try:
                    grammar = self.grammar_cache()
                    grammar.constraint(p.response_format)  # compile now: a bad schema is this request's 400
                except ValueError as e:
                    raise RequestError(f"response_format: {e}") from None
            req = _Request(request_id, list(ids), p, on_event, open=p.n)
            for s in range(p.n):
                gen = None
                if p.seed is not None:
                    gen = torch.Generator(device="cpu")
                    gen.manual_seed(sample_seed(p.seed, s))
                req.rows.append(_Row(params=p, prompt_len=len(ids), request=request_id,
                                     sample=s, generator=gen, policy=self._policy(policy, p),
                                     logprobs=[] if p.logprobs is not None else None,
                                     top=[] if p.logprobs else None,
                                     constraint=grammar.constraint(p.response_format) if grammar else None))
        with self._inbox:
            if request_id in self._requests:
                raise RequestError(f"request id {request_id!r} is already running")
            self._requests[request_id] = req
            self._waiting.append(req)
        return list(ids)

    def _policy(self, policy, p: SamplingConfig) -> DecodePolicy:
        if policy is None:
            if p.budget is not None:
                return BudgetForcing(p.budget, self.budget_token_ids(p.budget, p))
            return PLAIN
        if callable(policy) and not isinstance(policy, DecodePolicy):
            return policy()
        return copy.deepcopy(policy)  # policies keep per-sample counts

    def abort(self, request_id: str) -> bool:
        with self._inbox:
            if request_id not in self._requests:
                return False
            self._aborts.add(request_id)
            return True

    def has_unfinished(self) -> bool:
        with self._inbox:
            return bool(self._requests)

    def running(self) -> int:
        return len(self._rows)

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self) -> list[StreamEvent]:
        with self._step_lock:
            events: list[StreamEvent] = []
            try:
                self._apply_aborts(events)
                self._admit(events)
                if self._rows:
                    self._decode(events)
            except Exception as e:  # noqa: BLE001 - e.g. the batch forward failed (OOM)
                log.exception("engine step failed; failing the %d running rows", len(self._rows))
                for row in self._rows:
                    if not row.done:
                        self._row_failed(row, e, events)
                self._rows, self._cache, self._mask, self._pos, self._logits = [], None, None, None, None
            self.stats["steps"] += 1
            # in step order, even when several threads step the engine
            dispatch_events(events, self._requests, self._inbox)
        return events

    def _apply_aborts(self, events: list[StreamEvent]) -> None:
        with self._inbox:
            aborts, self._aborts = self._aborts, set()
            if not aborts:
                return
            queued = [r for r in self._waiting if r.id in aborts]
            self._waiting = deque(r for r in self._waiting if r.id not in aborts)
        for req in queued:
            for row in req.rows:
                row.finish_reason = "abort"
                events += self._finish(row)
        for row in self._rows:
            if row.request in aborts and not row.done:
                row.done, row.finish_reason = True, "abort"
                events += self._finish(row)
        self.stats["aborted"] += len(aborts)
        self._retire()

    def _admit(self, events: list[StreamEvent]) -> None:
        cap = self.cfg.max_batch_size
        budget = max(self.cfg.max_batch_size * 512, 4096)  # padded prompt tokens per prefill
        new: list[_Request] = []
        with self._inbox:
            while self._waiting:
                req = self._waiting[0]
                rows = len(self._rows) + sum(r.params.n for r in new)
                width = max([len(r.prompt_ids) for r in new] + [len(req.prompt_ids)])
                fits = rows + req.params.n <= cap and width * (len(new) + 1) <= budget
                if not fits and (new or self._rows):
                    break
                new.append(self._waiting.popleft())
        if not new:
            return
        try:
            self._prefill(new)
        except Exception:  # noqa: BLE001 - find the request at fault: each is prefilled alone
            if len(new) == 1:
                self._fail_request(new[0], events)
                return
            log.exception("prefill of %d requests failed; prefilling them one by one", len(new))
            for req in new:
                try:
                    self._prefill([req])
                except Exception:  # noqa: BLE001
                    self._fail_request(req, events)

    def _fail_request(self, req: _Request, events: list[StreamEvent]) -> None:
        import traceback

        err = traceback.format_exc(limit=2).strip().splitlines()[-1]
        log.warning("request %s failed alone: %s", req.id, err)
        self.stats["failed_requests"] += 1
        for row in req.rows:
            row.finish_reason, row.error = "error", f"generation failed: {err}"
            events += self._finish(row)

    def _prefill(self, reqs: list[_Request]) -> None:
        from transformers import DynamicCache

        dev = self.device
        prompts = [r.prompt_ids for r in reqs]
        B, L = len(prompts), max(len(x) for x in prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((B, L), pad, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for b, x in enumerate(prompts):  # left padding: the last column is every row's last token
            ids[b, L - len(x):] = torch.tensor(x)
            mask[b, L - len(x):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :].float()
        rows = [row for r in reqs for row in r.rows]
        expand = [b for b, r in enumerate(reqs) for _ in r.rows]  # n samples share one prefill
        if expand != list(range(B)):
            idx = torch.tensor(expand, device=dev)
            cache.batch_select_indices(idx)
            mask, logits = mask[idx], logits[idx]
        nxt = torch.tensor([len(prompts[b]) for b in expand], device=dev)
        for row in rows:
            row.policy.start(row, self)
        self._merge(rows, cache, mask, nxt, logits)
        self.stats["prefills"] += 1
        self.stats["admitted"] += len(reqs)
        self.stats["max_running"] = max(self.stats["max_running"], len(self._rows))

    def _merge(self, rows: list[_Row], cache, mask: torch.Tensor, nxt: torch.Tensor, logits: torch.Tensor) -> None:
        """Join freshly prefilled rows to the running batch (left-padding the narrower side)."""
        if not self._rows:
            self._rows, self._cache, self._mask, self._pos, self._logits = rows, cache, mask, nxt, logits
            return
        T, P = self._mask.shape[1], mask.shape[1]
        W = max(T, P)
        # build every layer first and swap at the end: a failure (out of memory) leaves the
        # running batch as it was, and only the new requests fail
        joined = [(torch.cat([F.pad(la.keys, (0, 0, W - T, 0)), F.pad(lb.keys, (0, 0, W - P, 0))]),
                   torch.cat([F.pad(la.values, (0, 0, W - T, 0)), F.pad(lb.values, (0, 0, W - P, 0))]))
                  for la, lb in zip(self._cache.layers, cache.layers)]
        new_mask = torch.cat([F.pad(self._mask, (W - T, 0)), F.pad(mask, (W - P, 0))])
        for layer, (k, v) in zip(self._cache.layers, joined):
            layer.keys, layer.values = k, v
        self._mask = new_mask
        self._pos = torch.cat([self._pos, nxt])
        self._logits = torch.cat([self._logits, logits])
        self._rows = self._rows + rows

    def _retire(self) -> None:
        """Drop finished rows from the batch and the columns every remaining row pads."""
        keep = [b for b, r in enumerate(self._rows) if not r.done]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask, self._pos, self._logits = [], None, None, None, None
            return
        idx = torch.tensor(keep, device=self._mask.device)
        self._cache.batch_select_indices(idx)
        self._rows = [self._rows[b] for b in keep]
        self._mask, self._pos = self._mask[idx], self._pos[idx]
        if self._logits is not None:
            self._logits = self._logits[idx]
        used = self._mask.any(0)
        first = int(used.to(torch.int8).argmax()) if bool(used.any()) else 0
        if first > 0:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self._mask = self._mask[:, first:]

    def _decode(self, events: list[StreamEvent]) -> None:
        rows = self._rows
        toks = self._choose(self._logits, rows, events)
        retract: list[tuple[int, int]] = []
        for b, (row, tok) in enumerate(zip(rows, toks)):
            if row.done:
                continue
            try:
                if row.retract:
                    k, row.retract = row.retract, 0
                    del row.tokens[-k:]
                    if row.logprobs is not None:
                        del row.logprobs[-k:]
                    if row.top is not None:
                        del row.top[-k:]
                    retract.append((b, k))
                row.tokens.append(tok)
                if row.logprobs is not None:
                    row.logprobs.append(row.pending_lp[0])
                    if row.top is not None:
                        row.top.append(row.pending_lp[1])
                done = row.policy.after_token(row, tok, self)
                if row.logprobs is not None and len(row.logprobs) > len(row.tokens):  # EOS dropped
                    del row.logprobs[len(row.tokens):]
                    if row.top is not None:
                        del row.top[len(row.tokens):]
                if not done and row.n_generated >= row.params.max_new_tokens and not row.forced:
                    done, row.finish_reason = True, "length"
                row.done = done
                events += self._stream(row)
            except Exception as e:  # noqa: BLE001 - this row's fault: it fails alone
                self._row_failed(row, e, events)
        for b, k in retract:  # the taken-back tokens leave the row's attention and positions
            self._mask[b, -k:] = 0
            self._pos[b] -= k
        cur = torch.tensor(toks, device=self._mask.device)
        live = [b for b, r in enumerate(rows) if not r.done]
        if len(live) < len(rows):
            cur = cur[torch.tensor(live, device=cur.device)] if live else cur[:0]
        self._logits = None
        self._retire()
        if not self._rows:
            return
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=1)
        self._logits = self._forward(cur.view(-1, 1), self._mask, self._pos.view(-1, 1), self._cache)
        self._pos = self._pos + 1

    def _row_failed(self, row: _Row, e: Exception, events: list[StreamEvent]) -> None:
        log.warning("row %s/%d failed alone: %r", row.request, row.sample, e)
        self.stats["failed_rows"] += 1
        row.done, row.finish_reason, row.error = True, "error", f"generation failed: {e!r}"
        events += self._finish(row)

    def _decode_step(self, input_ids, attention_mask, position_ids, cache):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        return out.logits[:, -1, :].float()

    # ------------------------------------------------------------------ streaming text
    def _stream(self, row: _Row) -> list[StreamEvent]:
        """Events for the tokens of ``row`` that are decided (held-back tail excluded); on the
        row's last token, its final event."""
        events: list[StreamEvent] = []
        upto = len(row.tokens) - (0 if row.done else row.policy.held_back(row))
        while upto > row.pushed:  # one event per run of tokens of one phase
            start, phase = row.pushed, row.policy.phase_at(row, row.pushed)
            end = start + 1
            while end < upto and row.policy.phase_at(row, end) == phase:
                end += 1
            new = row.tokens[start:end]
            lps = row.logprobs[start:end] if row.logprobs is not None else None
            tops = row.top[start:end] if row.top is not None else None
            row.pushed = end
            if phase != row.seg_phase:
                if row.seg_phase is not None:
                    events += self._flush_segment(row)
                row.seg_phase, row.seg, row.seg_text, row.seg_sent = phase, IncrementalDetokenizer(self.tokenizer), "", 0
            row.seg_text += row.seg.push(new)
            text = self._sendable(row)
            events.append(StreamEvent(request_id=row.request, index=row.sample, text=text, token_ids=list(new),
                                      logprobs=lps, top_logprobs=tops, phase=phase))
        if row.done:
            events += self._finish(row)
        return events

    def _sendable(self, row: _Row) -> str:
        """New final text of the current segment; answers end at a stop string and keep back a
        tail that could still become one."""
        stops = row.params.stop
        if row.seg_phase == "answer" and stops:
            hit = first_stop(row.seg_text[max(0, row.seg_sent - max(map(len, stops))):], stops)
            if hit is not None:
                end = max(0, row.seg_sent - max(map(len, stops))) + hit[0]
                row.done, row.finish_reason, row.stop_reason = True, "stop", hit[1]
                row.seg_text = row.seg_text[:end]
            else:
                end = max(row.seg_sent, len(row.seg_text) - (max(map(len, stops)) - 1))
        else:
            end = len(row.seg_text)
        text = row.seg_text[row.seg_sent:end]
        row.seg_sent = max(row.seg_sent, end)
        return text

    def _flush_segment(self, row: _Row) -> list[StreamEvent]:
        """The rest of a reasoning or control segment when its phase ends (a character the
        incremental decoder was still completing)."""
        full = self.tokenizer.decode(row.seg.ids, skip_special_tokens=True)
        if len(full) > len(row.seg_text) and full.startswith(row.seg_text):
            row.seg_text = full
        text = row.seg_text[row.seg_sent:]
        row.seg_sent = len(row.seg_text)
        return [StreamEvent(request_id=row.request, index=row.sample, text=text, phase=row.seg_phase)] if text else []

    def _finish(self, row: _Row) -> list[StreamEvent]:
        """The row's final event: the whole completion, and the answer text still unsent."""
        row.done = True
        events: list[StreamEvent] = []
        if row.finish_reason in ("abort", "error"):
            comp = Completion(text="", token_ids=list(row.tokens), finish_reason=row.finish_reason,
                              error=row.error)
        else:
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            if row.params.stop and row.params.budget is None:
                hit = first_stop(text, row.params.stop)
                if hit is not None:
                    text = text[:hit[0]]
                    row.finish_reason, row.stop_reason = "stop", hit[1]
            comp = row.policy.completion(row, self, text)
        if row.logprobs is not None:
            comp.logprobs = row.logprobs[:comp.num_tokens]
            comp.top_logprobs = row.top[:comp.num_tokens] if row.top is not None else None
        tail = ""
        if comp.finish_reason not in ("abort", "error"):
            if row.seg_phase not in (None, "answer"):
                events += self._flush_segment(row)
            final = comp.answer if comp.answer is not None else comp.text
            sent = row.seg_text[:row.seg_sent] if row.seg_phase == "answer" else ""
            if final.startswith(sent):
                tail = final[len(sent):]
            else:
                log.warning("streamed text of %s/%d differs from its final decode", row.request, row.sample)
        self.stats["finished"] += 1
        events.append(StreamEvent(request_id=row.request, index=row.sample, text=tail, phase="answer",
                                  finish_reason=comp.finish_reason, usage=sample_usage(row.prompt_len, comp),
                                  completion=comp, error=row.error))
        return events

    # ------------------------------------------------------------------ choosing tokens
    def _choose(self, logits: torch.Tensor, rows: list[_Row], events: list[StreamEvent]) -> list[int]:
        """Pick each row's next token: forced tokens first, otherwise sample or argmax under the
        row's masks (policy bans, grammar); records log-probs of what is emitted."""
        for r in rows:
            try:
                r.policy.before_step(r, self)
            except Exception as e:  # noqa: BLE001 - this row's policy: it fails alone
                self._row_failed(r, e, events)
        want_lp = [j for j, r in enumerate(rows) if r.params.logprobs is not None and not r.done]
        lp = torch.log_softmax(logits[want_lp], dim=-1) if want_lp else None  # raw model distribution
        if lp is not None and any(rows[j].policy.max_retract for j in want_lp):
            lp = lp.clone()  # rows of it are kept and replaced
        # all rows' bans in one scatter, keeping only the banned values (not whole rows) for the
        # fallback below: per-row indexing and copies cost a round trip per row and step on GPUs
        # and whole-vocabulary copies on CPUs
        bans = {j: sorted(r.banned) for j, r in enumerate(rows) if r.banned}
        if bans:
            pos = torch.tensor([j for j, c in bans.items() for _ in c], device=logits.device)
            cols = torch.tensor([t for c in bans.values() for t in c], device=logits.device)
            before_bans = logits[pos, cols]
            logits[pos, cols] = float("-inf")
            for j in bans:
                rows[j].banned.clear()
        constrained = [r.constraint if (r.constraint is not None and not r.done and not r.forced
                                        and r.policy.answer_started(r)) else None for r in rows]
        if any(c is not None for c in constrained):
            from actors.engine.structured import apply_constraints

            apply_constraints(logits, constrained)
        choice = logits.argmax(-1)
        if bans:  # bans are preferences: never leave a row nothing to pick (its best logit is -inf)
            best = logits.gather(1, choice.unsqueeze(1)).squeeze(1).tolist()
            start = 0
            for j, c in bans.items():
                if best[j] == float("-inf"):  # the bans took its last choice: lift them, keep the grammar
                    logits[j, c] = before_bans[start:start + len(c)]
                    if constrained[j] is not None:
                        from actors.engine.structured import apply_constraints

                        apply_constraints(logits[j:j + 1], [constrained[j]])
                    choice[j] = logits[j].argmax()
                start += len(c)
        temps = torch.tensor([r.params.temperature for r in rows], device=logits.device)
        greedy = temps <= 0
        if not bool(greedy.all()):
            scaled = logits / temps.clamp(min=1e-5).unsqueeze(1)
            scaled = self._top_k_top_p(scaled, rows)
            probs = torch.softmax(scaled, dim=-1).cpu()
            own = [j for j, r in enumerate(rows) if r.generator is not None and r.params.temperature > 0]
            # the engine's stream for rows without their own seed; skipped when every row has one
            noise = torch.empty_like(probs)
            if len(own) < len(rows):
                noise.exponential_(generator=self._gen)
            for j in own:
                noise[j].exponential_(generator=rows[j].generator)
            sampled = (probs / noise).argmax(-1).to(logits.device)
            choice = torch.where(greedy, choice, sampled)
        out = choice.tolist()
        for j, r in enumerate(rows):
            if r.done:
                continue
            try:
                if not r.forced:
                    r.policy.on_sample(r, out[j], self)
                r.was_forced = bool(r.forced)
                if r.was_forced:
                    out[j] = int(r.forced.popleft())
                if constrained[j] is not None and not r.was_forced and not constrained[j].accept(out[j]):
                    raise RuntimeError(f"the grammar refused token {out[j]}")
            except Exception as e:  # noqa: BLE001
                self._row_failed(r, e, events)
        if want_lp:
            for n, j in enumerate(want_lp):
                r = rows[j]
                if r.policy.max_retract:  # keep recent distributions: a retraction rewinds to one
                    if r.lp_ring is None:
                        r.lp_ring = deque(maxlen=r.policy.max_retract + 1)
                    r.lp_ring.append(lp[n].clone())
                    if r.retract:
                        lp[n] = r.lp_ring[-1 - r.retract]
            chosen = torch.tensor([out[j] for j in want_lp], device=lp.device)
            picked = lp.gather(1, chosen.view(-1, 1)).view(-1).tolist()
            k = max(rows[j].params.logprobs for j in want_lp)
            top = torch.topk(lp, k) if k > 0 else None
            for n, j in enumerate(want_lp):
                kk = rows[j].params.logprobs
                alts = None
                if kk and top is not None:
                    alts = list(zip(top.indices[n, :kk].tolist(), top.values[n, :kk].tolist()))
                rows[j].pending_lp = (picked[n], alts)
        return out

    TOP_P_CANDIDATES = 1024  # top-p looks at the best this many first; sorts everything only if p is not reached

    @classmethod
    def _top_k_top_p(cls, scaled: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
        """Top-k, then top-p (nucleus: the fewest best tokens whose mass reaches p, the token
        crossing p kept). Exact; sorting the whole vocabulary per row per step was a tenth of a
        CPU decode step, so the candidates come from ``topk`` and the full sort is the fallback
        for a row whose nucleus is wider than them."""
        ks = [r.params.top_k for r in rows]
        ps = [r.params.top_p for r in rows]
        V = scaled.shape[-1]
        if any(k > 0 for k in ks):
            k_t = torch.tensor([k if k > 0 else V for k in ks], device=scaled.device).clamp(max=V)
            kth = torch.topk(scaled, int(k_t.max()), dim=-1).values.gather(1, (k_t - 1).view(-1, 1))
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        nucleus = [j for j, p in enumerate(ps) if p < 1.0]
        if not nucleus:
            return scaled
        sel = torch.tensor(nucleus, device=scaled.device)
        sub = scaled[sel]
        p_t = torch.tensor([ps[j] for j in nucleus], device=scaled.device, dtype=sub.dtype).view(-1, 1)
        lse = torch.logsumexp(sub, dim=-1, keepdim=True)

        def ranked(k: int):  # the best k of each row, their probabilities and running mass
            vals, idx = torch.topk(sub, k, dim=-1) if k < V else torch.sort(sub, dim=-1, descending=True)
            probs = (vals - lse).exp()
            return vals, idx, probs, probs.cumsum(-1)

        vals, idx, probs, cum = ranked(min(V, cls.TOP_P_CANDIDATES))
        if vals.shape[-1] < V and not bool((cum[:, -1:] >= p_t).all()):  # a nucleus wider than the candidates
            vals, idx, probs, cum = ranked(V)
        vals = vals.masked_fill((cum - probs) >= p_t, float("-inf"))  # keep the token crossing p
        out = scaled.clone()
        out[sel] = torch.full_like(sub, float("-inf")).scatter(1, idx, vals)
        return out

    # ------------------------------------------------------------------ weights
    def update_weights(self, weights: Mapping[str, Any] | str | Path, strict: bool = True) -> dict[str, Any]:
        """Copy new weights into the live model in place (same tensors, so nothing that holds
        them is invalidated), between two steps. ``weights``: a state dict (names as in
        ``model.state_dict()``), a ``.safetensors`` file or a directory of them. ``strict``:
        every tensor of the model must be given; otherwise a subset is fine. Requests in flight
        continue under the new weights from the next step."""
        t0 = time.perf_counter()
        sd = load_weights(weights) if isinstance(weights, (str, Path)) else dict(weights)
        target = self.model.state_dict()
        unknown = sorted(set(sd) - set(target))
        if unknown:
            raise ValueError(f"{len(unknown)} tensors are not in the model, e.g. {unknown[:3]}")
        missing = sorted(set(target) - set(sd))
        if strict and missing:
            # tied weights (lm_head = embeddings) may be given once
            tied = {k for k in missing if any(target[k].data_ptr() == target[g].data_ptr() for g in sd)}
            missing = [k for k in missing if k not in tied]
            if missing:
                raise ValueError(f"{len(missing)} model tensors are missing, e.g. {missing[:3]} (strict=False loads a subset)")
        for k, v in sd.items():
            if tuple(v.shape) != tuple(target[k].shape):
                raise ValueError(f"{k}: shape {tuple(v.shape)} does not match the model's {tuple(target[k].shape)}")
        nbytes = 0
        with self._step_lock, torch.no_grad():
            for k, v in sd.items():
                target[k].copy_(v.to(device=target[k].device, dtype=target[k].dtype), non_blocking=True)
                nbytes += v.numel() * v.element_size()
            if self.device == "cuda":
                torch.cuda.synchronize()
            self.weights_version += 1
        return {"version": self.weights_version, "tensors": len(sd), "bytes": nbytes,
                "seconds": time.perf_counter() - t0}


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file, a directory of them (a saved checkpoint), or a
    ``.pt``/``.bin`` file read with ``weights_only`` (no pickled code)."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{p}: no .safetensors files")
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(f)))
        return sd
    if p.suffix == ".safetensors":
        return load_file(str(p))
    return torch.load(str(p), map_location="cpu", weights_only=True)
