"""Weight updates in place: how long ``engine.update_weights`` takes to load a new state dict
(from memory, as an RL trainer hands it over, and from a safetensors checkpoint directory)
into a live transformers engine, and that generation keeps working right after.

    python benchmarks/engine_weights.py                    # CPU: SmolLM2-135M
    python benchmarks/engine_weights.py --device cuda      # GPU box

Writes ``benchmarks/results/engine_weights.json``. Runs without Ray.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from selftaught.config import EngineConfig, SamplingConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "engine_weights.json"))
    args = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    from actors.engine import create_engine

    engine = create_engine(EngineConfig(model=args.model, backend="transformers", device=args.device))
    sd = {k: v.detach().clone() + 0.0 for k, v in engine.model.state_dict().items()}
    nbytes = sum(v.numel() * v.element_size() for v in {v.data_ptr(): v for v in sd.values()}.values())
    mem = []
    for _ in range(args.repeats):
        mem.append(engine.update_weights(sd)["seconds"])
    with tempfile.TemporaryDirectory() as d:
        seen, unique = set(), {}
        for k, v in sd.items():  # safetensors refuses shared storage (tied embeddings)
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                unique[k] = v.contiguous()
        save_file(unique, str(Path(d) / "model.safetensors"))
        disk = [engine.update_weights(d)["seconds"] for _ in range(args.repeats)]
    t = time.perf_counter()
    out = engine.generate(["The capital of France is"], SamplingConfig(temperature=0, max_new_tokens=8))
    gen_s = time.perf_counter() - t
    res = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": args.device,
                       "torch": torch.__version__},
           "model": args.model, "tensors": len(sd), "bytes": nbytes,
           "from_memory_s": statistics.median(mem), "from_memory_all_s": mem,
           "from_memory_gb_per_s": nbytes / statistics.median(mem) / 1e9,
           "from_safetensors_dir_s": statistics.median(disk), "from_safetensors_dir_all_s": disk,
           "generate_after_update_s": gen_s, "text_after_update": out[0].completions[0].text,
           "weights_version": engine.weights_version}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if not k.endswith("_all_s")}, indent=1))


if __name__ == "__main__":
    main()
