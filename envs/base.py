"""The research-environment interface: ideas in, measured results out.

Every search strategy (best-of-N, evolutionary search, RL on the ideator) optimises one thing,
``env.value(ideas)``. An environment shows the ideator a context (``context()``), takes a batch
of ideas, and answers one :class:`Result` per idea: the reward our code measured, the status
(``ok``; ``idea_failed`` with the stage that failed; ``infra_failed`` when the cluster, not the
idea, broke), metrics, logs, the edit that was applied, wall time and resources used.

The interface is batched and asynchronous underneath: ``submit`` returns ids at once,
``stream`` yields results in completion order, ``gather`` returns them in submission order.
``value`` is ``submit`` + ``gather``.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import re
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Literal, Sequence

Status = Literal["ok", "idea_failed", "infra_failed"]
_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
# Where an idea failed (``Result.stage`` when status is idea_failed).
Stage = Literal["implement", "apply", "smoke", "run", "evaluate", "protected", "rejected"]


@dataclass
class Idea:
    """A research idea: free-form text (implemented by an LLM) or structured knob values
    (applied deterministically). ``id`` is stable across resumes: give one, or it is derived
    from the content (so resubmitting the same idea finds its earlier result)."""

    text: str = ""
    knobs: dict[str, Any] | None = None
    id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise ValueError(f"an idea's text must be a string, not {type(self.text).__name__}")
        if self.knobs is not None and not isinstance(self.knobs, dict):
            raise ValueError(f"an idea's knobs must be an object, not {type(self.knobs).__name__}")
        if not isinstance(self.meta, dict):
            raise ValueError(f"an idea's meta must be an object, not {type(self.meta).__name__}")
        if not self.text.strip() and self.knobs is None:
            raise ValueError("an idea needs text or knobs")
        if not self.id:
            self.id = "idea-" + self.content_hash()[:16]
        if not isinstance(self.id, str) or not _ID.match(self.id):
            raise ValueError(f"idea id {self.id!r} must be 1-128 characters of letters, digits, '.', '_' or '-' "
                             "and must not start with '.'")

    @property
    def structured(self) -> bool:
        return self.knobs is not None

    @property
    def seed(self) -> int | None:
        return self.meta.get("seed")

    def content_hash(self) -> str:
        """What the idea is: its text, its knobs and the seed it runs with (the same idea at
        another seed is another measurement)."""
        blob = json.dumps({"text": self.text.strip(), "knobs": self.knobs, "seed": self.meta.get("seed")},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def with_seed(self, seed: int) -> "Idea":
        """A copy that runs with ``seed`` (a derived id unless the caller chose one)."""
        return Idea(text=self.text, knobs=self.knobs, meta={**self.meta, "seed": seed},
                    id=f"{self.id}-s{seed}" if self.id else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def coerce(cls, x: "Idea | str | dict") -> "Idea":
        if isinstance(x, Idea):
            return x
        if isinstance(x, str):
            return cls(text=x)
        if isinstance(x, dict):
            return cls(**{k: v for k, v in x.items() if k in ("text", "knobs", "id", "meta")})
        raise TypeError(f"an idea is a str, a dict or an Idea, not {type(x).__name__}")


@dataclass
class Result:
    """What executing one idea produced. ``reward`` is 0.0 unless status is ``ok``."""

    idea_id: str
    status: Status
    reward: float = 0.0
    stage: str | None = None  # the failing stage for idea_failed / infra_failed
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)  # stage -> tail of its output
    edit: str = ""  # the applied edit, as a unified diff against the baseline
    wall_s: float = 0.0  # submission to result
    resources: dict[str, Any] = field(default_factory=dict)  # cpus, gpus, node, cpu_s, max_rss_mb, ...
    attempts: list[dict[str, Any]] = field(default_factory=list)  # implementer attempts (tokens, cost)
    env: str = ""
    finished_at: float = field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Result":
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in d.items() if k in names})


class ResearchEnv(ABC):
    """An environment the ideator improves: a context to read, a value to maximise."""

    name: str = "env"

    @abstractmethod
    def context(self) -> str:
        """What the ideator sees: the task, the baseline code or the knob space, the rules."""

    @abstractmethod
    def submit(self, ideas: Sequence[Idea | str | dict]) -> list[str]:
        """Start executing ideas; returns their ids at once."""

    @abstractmethod
    def stream(self, ids: Sequence[str] | None = None, timeout_s: float | None = None) -> Iterator[Result]:
        """Results as they finish (all submitted ids when ``ids`` is None). Bounded by
        ``timeout_s``: ids still running then come back as ``infra_failed`` (stage ``timeout``)."""

    def gather(self, ids: Sequence[str], timeout_s: float | None = None) -> list[Result]:
        got = {r.idea_id: r for r in self.stream(ids, timeout_s=timeout_s)}
        return [got[i] for i in ids]

    def value(self, ideas: Sequence[Idea | str | dict], timeout_s: float | None = None) -> list[Result]:
        """Execute a batch of ideas and return one result per idea, in order."""
        return self.gather(self.submit(ideas), timeout_s=timeout_s)

    def idea_schema(self) -> dict[str, Any] | None:
        """JSON schema of structured ideas (the knob space), or None for free-form only."""
        return None

    def result(self, idea_id: str) -> Result | None:
        """The finished result of an idea submitted earlier (this run or a previous one), or
        None while it runs or was never submitted."""
        return None

    def cancel(self, ids: Sequence[str]) -> int:
        """Stop these ideas if they are still queued or running (their results become
        ``infra_failed`` with stage ``cancelled``, so resubmitting runs them again); returns
        how many were stopped."""
        return 0

    def close(self) -> None:
        """Release workers and other resources."""


# --------------------------------------------------------------------------- registry
#: environment name -> "module:factory" (imported lazily; factories take keyword overrides)
ENVS: dict[str, str] = {
    "nanogpt": "envs.codebase:load_packaged",
    "grpo": "envs.codebase:load_packaged",
    "toy": "envs.codebase:load_packaged",
    "sim": "envs.codebase:load_packaged",
}


def register_env(name: str, target: str) -> None:
    """Register ``name`` -> ``"module:factory"``; the factory is called as
    ``factory(name, **kwargs)`` and returns a :class:`ResearchEnv`."""
    if ":" not in target:
        raise ValueError("target must look like 'package.module:factory'")
    ENVS[name] = target


def make_env(name: str, **kwargs: Any) -> ResearchEnv:
    """Build a registered environment by name (``nanogpt``, ``grpo``, or one you registered)."""
    if name not in ENVS:
        raise KeyError(f"unknown environment {name!r}; known: {', '.join(sorted(ENVS))}")
    module, factory = ENVS[name].split(":")
    return getattr(importlib.import_module(module), factory)(name, **kwargs)


def new_id(prefix: str = "job") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
