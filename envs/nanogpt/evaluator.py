"""Frozen evaluator of the nanoGPT environment: 1 / validation loss, one token at a time.

    python -m envs.nanogpt.evaluator --artifacts DIR --val DIR --codebase DIR --out FILE \
        --model-cmd JSON [--seqs N] [--seq-len T] [--seed S] [--time-limit SECONDS]

It takes N disjoint windows of T tokens from ``val/tokens.bin`` (a fixed seed), starts the
model server (``--model-cmd``: a JSON argv, normally the sandbox wrapper around
``python eval_server.py``, run with cwd = ``--codebase``; ``--artifacts DIR`` is appended
unless the argv already names it) and, for t = 1 .. T-1, sends only the prefixes x[:, :t] and
scores x[:, t] with its own log_softmax of the returned last-position logits. The model never
receives a token before it has been scored, and unnormalised logits cannot lower the loss.

Every reply is checked (shape exactly (N, V) with V >= the data's vocabulary, finite values)
and every read and write is bounded by one overall deadline (``--time-limit``), so a server
that crashes, hangs, stays silent or answers nonsense fails the evaluation: a message on
stderr, exit code 1 and no ``--out`` file. Nothing the job printed or wrote besides the model
(``train_log.json`` included) is read.

Output: ``{"value": 1 / mean_nll, "metrics": {"val_loss", "perplexity", "tokens", "seconds",
"seqs", "seq_len"}}``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

MAX_VOCAB = 1 << 20  # a reply announcing more logits than this is refused before it is read
STDERR_KEEP = 64 * 1024  # bytes of the server's stderr kept for the failure message


class EvalError(RuntimeError):
    pass


def val_windows(val_dir: Path, seqs: int, seq_len: int, seed: int) -> tuple[np.ndarray, dict]:
    """``seqs`` disjoint windows of ``seq_len`` tokens at slot boundaries, chosen by ``seed``."""
    meta = json.loads((val_dir / "meta.json").read_text())
    tokens = np.memmap(val_dir / "tokens.bin", dtype=np.uint16, mode="r")
    slots = len(tokens) // seq_len
    if seqs < 1 or seq_len < 2:
        raise EvalError("--seqs must be >= 1 and --seq-len >= 2")
    if slots < seqs:
        raise EvalError(f"validation set has {len(tokens)} tokens: too few for {seqs} windows of {seq_len}")
    chosen = np.sort(np.random.default_rng(seed).choice(slots, size=seqs, replace=False))
    x = np.stack([np.asarray(tokens[s * seq_len:(s + 1) * seq_len], dtype=np.int64) for s in chosen])
    return x, meta


class ModelServer:
    """The model server process with deadline-bounded, exact reads and writes on its pipes."""

    def __init__(self, cmd: list[str], cwd: str, deadline: float):
        self.deadline = deadline
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self._err = collections.deque()
        self._err_bytes = 0
        self._err_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._err_thread.start()
        self.wfd, self.rfd = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        os.set_blocking(self.wfd, False)
        os.set_blocking(self.rfd, False)

    def _drain_stderr(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read1(4096), b""):
            self._err.append(chunk)
            self._err_bytes += len(chunk)
            while self._err_bytes > STDERR_KEEP and len(self._err) > 1:
                self._err_bytes -= len(self._err.popleft())

    def stderr_tail(self) -> str:
        return b"".join(self._err).decode("utf-8", "replace")[-STDERR_KEEP:]

    def _remaining(self, what: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise EvalError(f"time limit reached while {what}")
        return left

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            _, w, _ = select.select([], [self.wfd], [], min(1.0, self._remaining("sending a request")))
            if not w:
                continue
            try:
                n = os.write(self.wfd, view)
            except BlockingIOError:
                continue
            except (BrokenPipeError, OSError) as e:
                raise EvalError(f"model server stopped reading ({e}); exit code {self.proc.poll()}") from e
            view = view[n:]

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            r, _, _ = select.select([self.rfd], [], [], min(1.0, self._remaining("waiting for the model server")))
            if not r:
                continue
            try:
                chunk = os.read(self.rfd, min(n - len(buf), 1 << 20))
            except BlockingIOError:
                continue
            if not chunk:
                raise EvalError(f"model server closed its output (exit code {self.proc.poll()})")
            buf += chunk
        return bytes(buf)

    def close(self, graceful: bool = True) -> None:
        """EOF and a short wait when the evaluation went through; otherwise kill at once."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        if graceful:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
            self.proc.wait()
        self._err_thread.join(timeout=2)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def evaluate(server: ModelServer, x: np.ndarray, vocab: int) -> tuple[float, int]:
    """Total NLL of x[:, 1:] given the prefixes before each token, and the token count."""
    B, T = x.shape
    rows = np.arange(B)
    ids = x.astype("<i4")
    total, count = 0.0, 0
    for t in range(1, T):
        prefix = np.ascontiguousarray(ids[:, :t])  # never a token at or after position t
        server.send(struct.pack("<ii", B, t) + prefix.tobytes())
        rb, v = struct.unpack("<ii", server.recv(8))
        if rb != B or not vocab <= v <= MAX_VOCAB:
            raise EvalError(f"reply shape ({rb}, {v}) at t={t}; expected ({B}, V) with {vocab} <= V <= {MAX_VOCAB}")
        logits = np.frombuffer(server.recv(4 * B * v), dtype="<f4").reshape(B, v)
        if not np.isfinite(logits).all():
            raise EvalError(f"non-finite logits at t={t}")
        logp = log_softmax(logits)
        total -= float(logp[rows, x[:, t]].sum())
        count += B
    return total, count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="nanoGPT frozen evaluator: 1 / validation loss")
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--codebase", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model-cmd", default=None,
                    help="JSON argv of the model server (default: this python, eval_server.py, unsandboxed)")
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--time-limit", type=float, default=300.0)
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    server = None
    try:
        x, meta = val_windows(Path(args.val), args.seqs, args.seq_len, args.seed)
        cmd = json.loads(args.model_cmd) if args.model_cmd else [sys.executable, "eval_server.py"]
        if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) for c in cmd):
            raise EvalError("--model-cmd must be a JSON list of strings")
        if "--artifacts" not in cmd:
            cmd = cmd + ["--artifacts", str(Path(args.artifacts).resolve())]
        server = ModelServer(cmd, args.codebase, t0 + args.time_limit)
        total, count = evaluate(server, x, int(meta["vocab_size"]))
    except Exception as e:  # noqa: BLE001 - any failure is a failed evaluation (exit 1, no --out)
        tail = ""
        if server:
            server.close(graceful=False)
            tail = server.stderr_tail()
        print(f"evaluation failed: {e}", file=sys.stderr)
        if tail.strip():
            # The server is the idea's code and has seen validation prefixes: what it printed
            # stays beside the evaluator's output (operators only), never in the result.
            log_file = Path(args.out).with_name("model_server.log")
            log_file.write_text(tail[-STDERR_KEEP:])
            print(f"model server output kept in {log_file.name} (not shown: it may echo evaluation data)",
                  file=sys.stderr)
        return 1
    server.close()
    loss = total / count
    result = {"value": 1.0 / max(loss, 1e-9),
              "metrics": {"val_loss": loss, "perplexity": float(np.exp(min(loss, 700.0))), "tokens": count,
                          "seconds": round(time.monotonic() - t0, 3), "seqs": args.seqs,
                          "seq_len": args.seq_len}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
