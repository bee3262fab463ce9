"""Training and held-out points for the toy environment (deterministic in the options)."""
from __future__ import annotations

import json
import random
from pathlib import Path


def prepare(out_dir: Path, options: dict) -> dict:
    out_dir = Path(out_dir)
    meta = {"n_train": int(options.get("n_train", 64)), "n_val": int(options.get("n_val", 64)),
            "slope": float(options.get("slope", 2.5)), "intercept": float(options.get("intercept", -1.0)),
            "noise": float(options.get("noise", 0.1)), "seed": int(options.get("seed", 0))}
    done = out_dir / "val" / "meta.json"
    if done.exists() and json.loads(done.read_text()) == meta:
        return meta
    rng = random.Random(meta["seed"])

    def points(n: int) -> list[list[float]]:
        xs = [rng.uniform(-2, 2) for _ in range(n)]
        return [[x, meta["slope"] * x + meta["intercept"] + rng.gauss(0, meta["noise"])] for x in xs]

    for split, n in (("train", meta["n_train"]), ("val", meta["n_val"])):
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        (out_dir / split / "points.json").write_text(json.dumps(points(n)))
    (out_dir / "train" / "meta.json").write_text(json.dumps({"n": meta["n_train"]}))
    done.write_text(json.dumps(meta))
    return meta
