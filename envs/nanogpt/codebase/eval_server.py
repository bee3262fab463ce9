"""FROZEN: the evaluator's window onto the trained model. Do not edit (edits are rejected).

Run by the evaluator, sandboxed, in the job's copy of the codebase (read-only) as
``python eval_server.py --artifacts DIR``. It builds the model with model.build_model from
DIR/model_config.json, loads DIR/model.safetensors (safetensors only, strict), switches to eval
mode and answers requests on stdin/stdout until EOF, all integers and floats little-endian:

    request: int32 B, int32 t, then B*t int32 token ids (B prefixes of length t)
    reply:   int32 B, int32 V, then B*V float32: the logits at the last position of each prefix

Prefixes longer than model_config.json's ``block_size`` are cut to their last ``block_size``
tokens. stdout carries the protocol only: everything else (prints of model.py included) goes to
stderr. The evaluator never sends a token it has not already scored, and it applies its own
log_softmax to the logits.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path

MAX_REQUEST_TOKENS = 1 << 24


def read_exact(stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifacts", default="out")
    args = ap.parse_args()
    # The protocol gets private copies of fds 0 and 1; fd 1 then points at stderr and fd 0 at
    # /dev/null, so nothing the model code prints or reads (C extensions included) touches it.
    sys.stdout.flush()
    proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdout = sys.stderr

    import numpy as np
    import torch
    from safetensors.torch import load_model

    sys.path.insert(0, str(Path.cwd()))
    from model import build_model

    threads = int(os.environ.get("NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    art = Path(args.artifacts)
    cfg = json.loads((art / "model_config.json").read_text())
    model = build_model(cfg)
    load_model(model, str(art / "model.safetensors"), strict=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = model.to(device).eval()
    block = cfg.get("block_size")
    print(f"eval_server: model loaded on {device.type} from {art}", file=sys.stderr, flush=True)

    with torch.inference_mode():
        while True:
            head = read_exact(proto_in, 8)
            if len(head) < 8:
                return 0  # EOF: the evaluator is done
            B, t = struct.unpack("<ii", head)
            if B <= 0 or t <= 0 or B * t > MAX_REQUEST_TOKENS:
                print(f"eval_server: bad request header B={B} t={t}", file=sys.stderr, flush=True)
                return 2
            body = read_exact(proto_in, 4 * B * t)
            if len(body) < 4 * B * t:
                return 2
            ids = np.frombuffer(body, dtype="<i4").reshape(B, t).astype(np.int64)
            idx = torch.from_numpy(ids).to(device)
            if block and t > int(block):
                idx = idx[:, -int(block):]
            out = model(idx)
            logits = out[0] if isinstance(out, (tuple, list)) else out
            last = logits[:, -1, :].float().cpu().numpy().astype("<f4", copy=False)
            proto_out.write(struct.pack("<ii", last.shape[0], last.shape[1]))
            proto_out.write(np.ascontiguousarray(last).tobytes())
            proto_out.flush()


if __name__ == "__main__":
    sys.exit(main())
