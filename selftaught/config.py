"""Typed run configuration: pydantic models, YAML files, dotted command-line overrides.

Every run has exactly one config object; it is resolved once (file + ``--set`` overrides),
validated (unknown keys are errors, so typos never silently fall back to defaults), and saved
next to the run's outputs as ``config.yaml``.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

T = TypeVar("T", bound="Strict")


class Strict(BaseModel):
    """Base for every config section: unknown keys are rejected, values re-validated on set."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class RayConfig(Strict):
    """Where Ray runs. ``address`` (or ``RAY_ADDRESS``) attaches to a cluster; otherwise an
    embedded local Ray is started with the machine's CPUs (or ``num_cpus``)."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)
    num_gpus: int | None = Field(default=None, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    temp_dir: str | None = None
    namespace: str = "selftaught"
    include_dashboard: bool = True  # the dashboard also serves the state API Ray Train relies on


class BudgetConfig(Strict):
    """Budget forcing (s1): how long a reasoning model may think before it answers.

    The completion has two phases split by the end-of-thinking delimiter ``think_end``. While
    thinking, the model proposing to end (its first delimiter token, EOS or a stop token) is
    overruled by appending ``extension`` until ``num_extensions`` have been used and
    ``min_thinking_tokens`` are reached (with no extension string the end is simply
    forbidden until the minimum). At ``max_thinking_tokens`` the delimiter (plus
    ``answer_cue``) is forced. The answer then has its own limit. ``think_start`` is appended
    to the prompt when it does not already end with it. Defaults match our SFT format;
    ``<think>``-style models use ``think_start="<think>\n"``, ``think_end="</think>\n\n"``.
    """

    max_thinking_tokens: int | None = Field(default=None, ge=0)
    min_thinking_tokens: int = Field(default=0, ge=0)
    num_extensions: int = Field(default=0, ge=0, le=64)
    extension: str = "Wait"
    answer_cue: str = ""  # e.g. "Final Answer:" after a forced (capped) end of thinking
    max_answer_tokens: int | None = Field(default=None, ge=1)
    think_start: str = "<|im_start|>think\n"
    think_end: str = "<|im_start|>answer\n"

    @model_validator(mode="after")
    def _consistent(self) -> "BudgetConfig":
        if not self.think_end:
            raise ValueError("think_end (the end-of-thinking delimiter) must not be empty")
        if self.num_extensions and not self.extension:
            raise ValueError("num_extensions > 0 needs an extension string (e.g. 'Wait')")
        if self.max_thinking_tokens is not None and self.min_thinking_tokens > self.max_thinking_tokens:
            raise ValueError(f"min_thinking_tokens {self.min_thinking_tokens} exceeds "
                             f"max_thinking_tokens {self.max_thinking_tokens}")
        return self


class StructuredOutput(Strict):
    """Constrain a completion to a formal language (constrained decoding): a JSON schema, any
    JSON object, a regular expression, or one of fixed strings. Applied to the answer (after
    thinking, for budget-forced requests); the completion stops when the grammar is complete."""

    type: Literal["json_schema", "json_object", "regex", "choice"]
    json_schema: dict[str, Any] | None = None
    regex: str | None = Field(default=None, max_length=4096)
    choice: list[str] | None = Field(default=None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _one_spec(self) -> "StructuredOutput":
        need = {"json_schema": "json_schema", "regex": "regex", "choice": "choice"}.get(self.type)
        if need and getattr(self, need) is None:
            raise ValueError(f"response format {self.type!r} needs the field {need!r}")
        return self

    def key(self) -> str:
        """A stable text form (compiled grammars are cached by it)."""
        return json.dumps(self.model_dump(), sort_keys=True)


class SamplingConfig(Strict):
    """Decoding parameters shared by every engine backend (one request's settings).

    ``max_new_tokens`` bounds the whole completion, budget-forced ones included (thinking,
    delimiters and answer)."""

    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    max_new_tokens: int = Field(default=128, ge=1)
    min_new_tokens: int = Field(default=0, ge=0)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    n: int = Field(default=1, ge=1)
    budget: BudgetConfig | None = None  # budget forcing for reasoning models (s1)
    # Log-probabilities of the emitted tokens under the model (raw logits, before temperature
    # and masks): None = off, 0 = the chosen token's only, k = also the k most likely tokens.
    logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: StructuredOutput | None = None  # constrained decoding (JSON schema, regex, choice)


class EngineConfig(Strict):
    """Which generation backend serves a model and how it is placed on the cluster."""

    backend: Literal["auto", "transformers", "vllm"] = "auto"
    model: str = "smollm2-135m-instruct"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_batch_size: int = Field(default=32, ge=1)
    max_model_len: int | None = Field(default=None, ge=16)
    compile: bool = False  # CUDA graphs / torch.compile of the decode step (GPU path)
    num_actors: int = Field(default=1, ge=1)
    # an elastic pool: Ray Data grows it from num_actors up to max_actors while work is queued
    # and shrinks it back when idle; each actor asks for its full cpus/gpus, so the autoscaler
    # adds nodes for it (None: a fixed pool of num_actors)
    max_actors: int | None = Field(default=None, ge=1)
    cpus_per_actor: float = Field(default=1.0, gt=0)
    gpus_per_actor: float = Field(default=0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)  # custom resources per actor, e.g. {"policy_pool": 1}
    vllm: dict[str, Any] = Field(default_factory=dict)  # extra kwargs for vllm.LLM(...)

    @model_validator(mode="after")
    def _pool_bounds(self) -> "EngineConfig":
        if self.max_actors is not None and self.max_actors < self.num_actors:
            raise ValueError(f"max_actors ({self.max_actors}) is below num_actors ({self.num_actors}), "
                             "the pool's minimum")
        return self


def load_yaml(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value) with the value parsed as YAML (typed)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form key.path=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ValueError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string; users mean a number
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for item in overrides or []:
        parts, value = parse_override(item)
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def resolve(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build a validated config from an optional YAML file plus dotted overrides."""
    data = load_yaml(path) if path else {}
    return cls.model_validate(apply_overrides(data, overrides or []))


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save(cfg: BaseModel, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)
    return path


def fingerprint(obj: Any) -> str:
    """Stable short hash of a config section (or any JSON-able value)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
