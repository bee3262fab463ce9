"""nanoGPT environment: data split and tokenisation, the job's smoke run, the frozen evaluator and
its defences (only prefixes are sent, replies are validated, hung servers time out, logits are
normalised by the evaluator)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from envs.nanogpt import data as ngdata

ROOT = Path(__file__).resolve().parents[1]
ENV_DIR = ROOT / "envs" / "nanogpt"
CODEBASE = ENV_DIR / "codebase"
PY = sys.executable


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("ngdata")
    stats = ngdata.prepare(out, {"max_docs": 300, "vocab_size": 384})
    return out, stats


def _job_env(tmp: Path, data_dir: Path, out_dir: Path, **extra) -> dict[str, str]:
    env = {"PATH": f"{Path(PY).parent}:/usr/bin:/bin", "HOME": str(tmp), "DATA_DIR": str(data_dir),
           "OUT_DIR": str(out_dir), "SEED": "0", "TIME_BUDGET_S": "5", "SMOKE": "1", "NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def smoke_job(prepared, tmp_path_factory):
    data_dir, _ = prepared
    tmp = tmp_path_factory.mktemp("ngjob")
    code = tmp / "code"
    shutil.copytree(CODEBASE, code)
    out = code / "out"
    t0 = time.time()
    proc = subprocess.run(["bash", "run.sh"], cwd=code, env=_job_env(tmp, data_dir / "train", out),
                          capture_output=True, text=True, timeout=120)
    return code, out, proc, time.time() - t0


def _evaluate(code: Path, artifacts: Path, val: Path, out: Path, model_cmd: list[str] | None = None,
              extra: list[str] = (), env: dict | None = None, timeout: float = 120):
    cmd = [PY, "-m", "envs.nanogpt.evaluator", "--artifacts", str(artifacts), "--val", str(val),
           "--codebase", str(code), "--out", str(out), *extra]
    if model_cmd is not None:
        cmd += ["--model-cmd", json.dumps(model_cmd)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


# --------------------------------------------------------------------------- data
def test_prepare_split_meta_and_idempotent(prepared):
    out, stats = prepared
    train_meta = json.loads((out / "train" / "meta.json").read_text())
    val_meta = json.loads((out / "val" / "meta.json").read_text())
    assert train_meta["vocab_size"] == val_meta["vocab_size"] == stats["vocab_size"] <= 384
    train = np.fromfile(out / "train" / "tokens.bin", dtype=np.uint16)
    val = np.fromfile(out / "val" / "tokens.bin", dtype=np.uint16)
    assert len(train) == train_meta["tokens"] == stats["train_tokens"]
    assert len(val) == val_meta["tokens"] == stats["val_tokens"]
    eos = train_meta["eos_id"]
    assert int((train == eos).sum()) == train_meta["docs"] and int((val == eos).sum()) == val_meta["docs"]
    assert train.max() < train_meta["vocab_size"] and val.max() < val_meta["vocab_size"]
    assert train_meta["docs"] + val_meta["docs"] == 300 and val_meta["docs"] > 0
    assert (out / "train" / "tokenizer.json").exists() and not (out / "val" / "tokenizer.json").exists()

    # the split is by document: the val stream decodes to exactly the val documents, none in train
    from tokenizers import Tokenizer

    rows = ngdata._load_docs("wiki", 300)
    tr_docs, va_docs = ngdata.split_docs(rows, 0.1, 0)
    assert not {d["id"] for d in tr_docs} & {d["id"] for d in va_docs}
    train_texts = {d["text"] for d in tr_docs}
    assert not any(d["text"] in train_texts for d in va_docs)
    tok = Tokenizer.from_file(str(out / "train" / "tokenizer.json"))
    pieces = np.split(val, np.flatnonzero(val == eos) + 1)[:-1]
    decoded = [tok.decode(p[:-1].tolist()) for p in pieces]
    assert decoded == [d["text"] for d in va_docs]

    # idempotent: same options -> nothing rewritten; other options -> rebuilt
    mtime = (out / "train" / "tokens.bin").stat().st_mtime_ns
    assert ngdata.prepare(out, {"max_docs": 300, "vocab_size": 384}) == stats
    assert (out / "train" / "tokens.bin").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError):
        ngdata.prepare(out, {"vocab_sizes": 384})


# --------------------------------------------------------------------------- spec + codebase
def test_specs_load_and_knobs_fit_the_config():
    import jsonschema

    from envs.spec import CodebaseEnvSpec

    cfg = json.loads((CODEBASE / "config.json").read_text())
    for name in ("env.yaml", "paper.yaml"):
        spec = CodebaseEnvSpec.load(ENV_DIR / name)
        assert spec.name == "nanogpt" and "eval_server.py" in spec.protected
        assert spec.evaluator.model_server == ["python", "eval_server.py"]
        merged = {**cfg, **spec.base_config}
        knob_values = {k: merged[k] for k in spec.knobs["properties"]}
        jsonschema.validate(knob_values, spec.knobs)
        assert merged["n_embd"] % merged["n_head"] == 0
    paper = CodebaseEnvSpec.load(ENV_DIR / "paper.yaml")
    assert paper.resources.gpus == 8 and paper.time_budget_s == 1500 and paper.data["vocab_size"] == 50304
    shape = {k: paper.base_config[k] for k in ("n_layer", "n_embd", "n_head", "block_size")}
    assert shape == {"n_layer": 12, "n_embd": 768, "n_head": 12, "block_size": 1024}


def test_run_sh_uses_torchrun_for_several_gpus(tmp_path):
    """run.sh starts one process per GPU under torchrun when CUDA_VISIBLE_DEVICES names several."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text("#!/bin/sh\necho \"$@\"\n")
    (fake / "python").chmod(0o755)
    base = {"PATH": f"{fake}:/usr/bin:/bin"}
    run = lambda **e: subprocess.run(["bash", str(CODEBASE / "run.sh")], env={**base, **e},  # noqa: E731
                                     capture_output=True, text=True, check=True).stdout.strip()
    assert run(CUDA_VISIBLE_DEVICES="0,1,2") == "-m torch.distributed.run --standalone --nproc_per_node=3 train.py"
    assert run(NUM_GPUS="8", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7").endswith("--nproc_per_node=8 train.py")
    assert run(CUDA_VISIBLE_DEVICES="") == "train.py"
    assert run(CUDA_VISIBLE_DEVICES="3") == "train.py"


def test_optimizers_and_schedules_step(monkeypatch):
    import torch

    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no __pycache__ in the codebase
    monkeypatch.syspath_prepend(str(CODEBASE))
    for mod in ("train", "model"):
        sys.modules.pop(mod, None)
    import train  # noqa: PLC0415 - the codebase's train.py
    from model import build_model

    cfg = json.loads((CODEBASE / "config.json").read_text())
    for name in ("adamw", "sgd", "muon"):
        torch.manual_seed(0)
        model = build_model({"vocab_size": 64, "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 32})
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opts = train.make_optimizers(model, {**cfg, "optimizer": name}, "cpu")
        x = torch.randint(0, 64, (2, 8))
        model(x).logsumexp(-1).mean().backward()
        for o in opts:
            o.step()
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert "blocks.0.attn.c_attn.weight" in changed and "wte.weight" in changed, name
    for sched in ("cosine", "linear", "constant"):
        c = {**cfg, "schedule": sched, "warmup_frac": 0.1, "min_lr_frac": 0.1}
        assert train.lr_multiplier(0.0, c) < 0.05 and abs(train.lr_multiplier(0.1, c) - 1.0) < 1e-9
        assert abs(train.lr_multiplier(1.0, c) - (1.0 if sched == "constant" else 0.1)) < 1e-9
    for mod in ("train", "model"):
        sys.modules.pop(mod, None)


def test_smoke_run_writes_artifacts(smoke_job):
    code, out, proc, seconds = smoke_job
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "model.safetensors").exists() and (out / "model_config.json").exists()
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 1 and log["smoke"] is True
    assert seconds < 30


# --------------------------------------------------------------------------- evaluator
def test_evaluator_scores_and_is_deterministic(smoke_job, prepared, tmp_path):
    code, art, proc, _ = smoke_job
    data_dir, stats = prepared
    args = ["--seqs", "4", "--seq-len", "12"]
    # as the worker calls it: the model command names --artifacts itself
    r1 = _evaluate(code, art, data_dir / "val", tmp_path / "a.json",
                   [PY, "eval_server.py", "--artifacts", str(art)], args)
    assert r1.returncode == 0, r1.stderr
    # the evaluator appends --artifacts when the command does not name it
    r2 = _evaluate(code, art, data_dir / "val", tmp_path / "b.json", [PY, "eval_server.py"], args)
    assert r2.returncode == 0, r2.stderr
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert math.isfinite(a["value"]) and a["value"] == b["value"]
    m = a["metrics"]
    assert m["tokens"] == 4 * 11 and m["seqs"] == 4 and m["seq_len"] == 12
    assert abs(a["value"] - 1 / m["val_loss"]) < 1e-12
    # one step of training: close to a uniform guess over the vocabulary
    assert 0.5 * math.log(stats["vocab_size"]) < m["val_loss"] < 2 * math.log(stats["vocab_size"])


CHEAT_MODEL = '''
import json, os
import torch

class Copycat(torch.nn.Module):
    """Puts all its mass on the LAST token it is given, and logs every request: it would score
    ~0 loss if the evaluator ever sent the token being scored. It also writes to stdout."""
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))
    def forward(self, idx):
        print("noise on stdout")  # neither print nor a raw write on fd 1 reaches the protocol
        os.write(1, b"raw noise on fd 1")
        with open(os.environ["SPY_LOG"], "a") as f:
            f.write(json.dumps(idx.tolist()) + "\\n")
        out = torch.full((*idx.shape, self.vocab), -1e4)
        out.scatter_(2, idx.unsqueeze(-1), 1e4)
        return out

def build_model(cfg):
    return Copycat(cfg["vocab_size"])
'''


def _fake_codebase(root: Path, model_src: str, cfg: dict) -> tuple[Path, Path]:
    """A codebase with the real, frozen eval_server.py and the given model.py + artefacts."""
    import importlib.util

    from safetensors.torch import save_model

    code = root / "code"
    art = code / "out"
    art.mkdir(parents=True)
    shutil.copy(CODEBASE / "eval_server.py", code / "eval_server.py")
    (code / "model.py").write_text(model_src)
    spec = importlib.util.spec_from_file_location(f"_ng_model_{root.name}", code / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    save_model(mod.build_model(cfg), str(art / "model.safetensors"))
    (art / "model_config.json").write_text(json.dumps(cfg))
    return code, art


def test_model_only_ever_sees_scored_prefixes(prepared, tmp_path):
    data_dir, stats = prepared
    code, art = _fake_codebase(tmp_path, CHEAT_MODEL, {"vocab_size": stats["vocab_size"]})
    spy = tmp_path / "spy.jsonl"
    T, N = 10, 3
    r = _evaluate(code, art, data_dir / "val", tmp_path / "r.json", [PY, "eval_server.py"],
                  ["--seqs", str(N), "--seq-len", str(T)], env={"SPY_LOG": str(spy)})
    assert r.returncode == 0, r.stderr
    from envs.nanogpt.evaluator import val_windows

    x, _ = val_windows(data_dir / "val", N, T, 1234)
    requests = [np.array(json.loads(line)) for line in spy.read_text().splitlines()]
    assert [q.shape for q in requests] == [(N, t) for t in range(1, T)]
    for t, q in enumerate(requests, start=1):
        assert (q == x[:, :t]).all()  # exactly the prefix: the scored token x[:, t] is never sent
    loss = json.loads((tmp_path / "r.json").read_text())["metrics"]["val_loss"]
    assert loss > 10  # copying the last seen token is (almost always) wrong by 2e4 logits


def test_block_size_crops_long_prefixes(prepared, tmp_path):
    data_dir, stats = prepared
    src = (CODEBASE / "model.py").read_text()
    cfg = {"vocab_size": stats["vocab_size"], "block_size": 4, "n_layer": 1, "n_head": 2, "n_embd": 32}
    code, art = _fake_codebase(tmp_path, src, cfg)
    r = _evaluate(code, art, data_dir / "val", tmp_path / "r.json", None, ["--seqs", "2", "--seq-len", "9"])
    assert r.returncode == 0, r.stderr
    assert math.isfinite(json.loads((tmp_path / "r.json").read_text())["value"])


SERVER = '''
import struct, sys, time
MODE, V = sys.argv[1], int(sys.argv[2])
inp, out = sys.stdin.buffer, sys.stdout.buffer
if MODE == "exit":
    sys.exit(0)
while True:
    head = inp.read(8)
    if len(head) < 8:
        break
    B, t = struct.unpack("<ii", head)
    inp.read(4 * B * t)
    print("request", B, t, file=sys.stderr, flush=True)
    if MODE == "hang":
        time.sleep(600)
    rows, cols = {"rows": (B + 1, V), "vocab": (B, V - 1)}.get(MODE, (B, V))
    val = {"nan": float("nan"), "huge": 3e38, "spike": 0.0}.get(MODE, 0.0)
    vals = [val] * (rows * cols)
    if MODE == "spike":  # a huge logit on token 1, huge negative elsewhere
        vals = [(3e38 if j % cols == 1 else -3e38) for j in range(rows * cols)]
    out.write(struct.pack("<ii", rows, cols) + struct.pack(f"<{rows * cols}f", *vals))
    out.flush()
'''


@pytest.mark.parametrize("mode", ["rows", "vocab", "nan", "hang", "exit"])
def test_bad_servers_fail_the_evaluation(mode, prepared, tmp_path):
    data_dir, stats = prepared
    server = tmp_path / "server.py"
    server.write_text(SERVER)
    out = tmp_path / "r.json"
    t0 = time.time()
    r = _evaluate(tmp_path, tmp_path, data_dir / "val", out, [PY, str(server), mode, str(stats["vocab_size"])],
                  ["--seqs", "2", "--seq-len", "6", "--time-limit", "3"], timeout=60)
    assert r.returncode == 1 and not out.exists(), r.stdout + r.stderr
    assert "evaluation failed" in r.stderr
    assert time.time() - t0 < 20
    if mode == "hang":
        assert "time limit" in r.stderr and "request 2 1" not in r.stderr  # the server's output never leaks
        assert "request 2 1" in (tmp_path / "model_server.log").read_text()  # it is kept for operators


@pytest.mark.parametrize("mode", ["huge", "spike"])
def test_unnormalised_logits_cannot_lower_the_loss(mode, prepared, tmp_path):
    data_dir, stats = prepared
    server = tmp_path / "server.py"
    server.write_text(SERVER)
    out = tmp_path / "r.json"
    r = _evaluate(tmp_path, tmp_path, data_dir / "val", out, [PY, str(server), mode, str(stats["vocab_size"])],
                  ["--seqs", "2", "--seq-len", "6"])
    assert r.returncode == 0, r.stderr
    loss = json.loads(out.read_text())["metrics"]["val_loss"]
    assert loss >= 0
    if mode == "huge":  # the same logit everywhere is a uniform distribution, whatever its size
        assert abs(loss - math.log(stats["vocab_size"])) < 1e-6
