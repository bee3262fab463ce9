"""End-to-end jobs. Each pipeline module exposes a config class and ``run(cfg) -> dict``;
``selftaught run --config X.yaml`` picks one by the file's ``pipeline:`` key."""
from __future__ import annotations

import importlib
from typing import Any, Callable

#: pipeline name -> module path (imported lazily: pipelines pull in heavy dependencies)
PIPELINES: dict[str, str] = {
    "quickstart": "pipelines.quickstart",
    "sbp": "pipelines.sbp",
    "s1": "pipelines.s1",
    "research_search": "pipelines.research_search",
    "research_rl": "pipelines.research_rl",
    "entigraph": "pipelines.entigraph",
}


def get_pipeline(name: str) -> tuple[type, Callable[[Any], dict]]:
    if name not in PIPELINES:
        raise KeyError(f"unknown pipeline {name!r}; known: {', '.join(sorted(PIPELINES))}")
    mod = importlib.import_module(PIPELINES[name])
    return mod.CONFIG, mod.run
