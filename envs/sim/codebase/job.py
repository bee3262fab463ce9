"""Hold the job's resources for a duration drawn from config.json's ``durations`` (deterministic
in the knobs and $SEED), then write the knobs it ran with to $OUT_DIR/run.json."""
import hashlib
import json
import os
import random
import sys
import time

KNOBS = ("lr_scale", "warmup_frac")


def draw(cfg: dict, seed: str) -> dict:
    """This job's duration and fate: start-up + budget x lognormal jitter; a straggler runs
    ``straggler_slowdown`` times as long; a failing job dies at a uniform point of its run."""
    d = cfg.get("durations", {})
    key = json.dumps({"knobs": {k: cfg.get(k) for k in KNOBS}, "seed": str(seed)}, sort_keys=True)
    rng = random.Random(int(hashlib.sha256(key.encode()).hexdigest()[:12], 16))
    seconds = float(d.get("startup_s", 0.0)) + float(d.get("budget_s", 2.0)) * rng.lognormvariate(0.0, float(d.get("jitter", 0.0)))
    straggler = rng.random() < float(d.get("straggler_rate", 0.0))
    if straggler:
        lo, hi = d.get("straggler_slowdown", [2.0, 4.0])
        seconds *= rng.uniform(float(lo), float(hi))
    fails = rng.random() < float(d.get("fail_rate", 0.0))
    return {"seconds": seconds * rng.random() if fails else seconds, "fails": fails, "straggler": straggler}


def main() -> int:
    cfg = json.load(open("config.json"))
    fate = draw(cfg, os.environ.get("SEED", "0"))
    if os.environ.get("SMOKE") == "1":
        fate = {"seconds": 0.0, "fails": False, "straggler": False}
    time.sleep(fate["seconds"])
    if fate["fails"]:
        print("diverged: loss is nan", file=sys.stderr)
        return 1
    os.makedirs(os.environ["OUT_DIR"], exist_ok=True)
    with open(os.path.join(os.environ["OUT_DIR"], "run.json"), "w") as f:
        json.dump({**{k: cfg[k] for k in KNOBS}, "seconds": fate["seconds"], "straggler": fate["straggler"]}, f)
    print(f"trained for {fate['seconds']:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
