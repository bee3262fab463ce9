"""Fit y = w * x + b to the training points by gradient descent; save w and b.

Contract: read $DATA_DIR/points.json, write $OUT_DIR/model.json as {"w": float, "b": float}."""
import json
import os
import random
import time

cfg = json.load(open("config.json"))
random.seed(int(os.environ.get("SEED", "0")))
points = json.load(open(os.path.join(os.environ["DATA_DIR"], "points.json")))
steps = 1 if os.environ.get("SMOKE") == "1" else int(cfg["steps"])
w, b = random.uniform(-0.1, 0.1), 0.0
for step in range(steps):
    gw = sum(2 * (w * x + b - y) * x for x, y in points) / len(points)
    gb = sum(2 * (w * x + b - y) for x, y in points) / len(points)
    w, b = w - cfg["lr"] * gw, b - cfg["lr"] * gb
if os.environ.get("SMOKE") != "1":
    time.sleep(float(cfg.get("sleep_s", 0.0)))
os.makedirs(os.environ["OUT_DIR"], exist_ok=True)
json.dump({"w": w, "b": b}, open(os.path.join(os.environ["OUT_DIR"], "model.json"), "w"))
print(f"fitted w={w:.4f} b={b:.4f} after {steps} steps")
