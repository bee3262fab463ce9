"""Logging for runs: concise console lines and a full log file in the run directory."""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

FMT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"


def setup_logging(run_dir: str | Path | None = None, level: str | int | None = None) -> None:
    level = level or os.environ.get("SELFTAUGHT_LOG_LEVEL", "INFO")
    root = logging.getLogger()
    root.setLevel(level)
    if not any(getattr(h, "_selftaught", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter(FMT, datefmt="%H:%M:%S"))
        h._selftaught = True  # type: ignore[attr-defined]
        root.addHandler(h)
    if run_dir is not None:
        path = Path(run_dir) / "logs" / "selftaught.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not any(getattr(h, "baseFilename", None) == str(path) for h in root.handlers):
            fh = logging.FileHandler(path)
            fh.setFormatter(logging.Formatter(FMT))
            root.addHandler(fh)
    for noisy in ("urllib3", "filelock", "httpx", "LiteLLM", "datasets", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")


def offline_env() -> None:
    """Defaults every entry point sets: no hub downloads, local litellm cost map."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
