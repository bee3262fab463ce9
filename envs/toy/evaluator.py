"""Frozen evaluator of the toy environment: validation MSE of the saved line parameters.

Reads only ``model.json`` from the artefacts (two finite numbers); anything else the job left
behind, printed or wrote is ignored."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--codebase")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        path = Path(args.artifacts) / "model.json"
        if path.is_symlink() or not path.is_file():
            raise ValueError("model.json is missing or not a regular file")
        with open(path, "rb") as f:
            model = json.loads(f.read(4096))
        w, b = float(model["w"]), float(model["b"])
        if not (math.isfinite(w) and math.isfinite(b)):
            raise ValueError("parameters are not finite")
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"unusable artefacts: {e}", file=sys.stderr)
        return 1
    pts = json.loads((Path(args.val) / "points.json").read_text())
    mse = sum((w * x + b - y) ** 2 for x, y in pts) / len(pts)
    Path(args.out).write_text(json.dumps({"value": 1.0 / (1.0 + mse), "metrics": {"val_mse": mse, "w": w, "b": b}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
