"""Frozen evaluator of the ``sim`` environment: a smooth score of the knobs the job ran with,
read from its artefacts (two finite numbers in range); 1 at lr_scale 2, warm-up 0.1."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def score(lr_scale: float, warmup_frac: float) -> float:
    return math.exp(-(math.log10(lr_scale / 2.0) ** 2) / 0.18 - (warmup_frac - 0.1) ** 2 / 0.02)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--codebase")
    ap.add_argument("--val")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        path = Path(args.artifacts) / "run.json"
        if path.is_symlink() or not path.is_file():
            raise ValueError("run.json is missing or not a regular file")
        run = json.loads(path.read_bytes()[:4096])
        lr, warm = float(run["lr_scale"]), float(run["warmup_frac"])
        if not (0.1 <= lr <= 10.0 and 0.0 <= warm <= 0.5):
            raise ValueError("knobs out of range")
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"unusable artefacts: {e}", file=sys.stderr)
        return 1
    value = score(lr, warm)
    Path(args.out).write_text(json.dumps({"value": value, "metrics": {"seconds": run.get("seconds"),
                                                                       "straggler": bool(run.get("straggler"))}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
