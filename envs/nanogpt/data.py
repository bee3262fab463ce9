"""Data for the nanoGPT environment: token streams of Wikipedia summaries.

``prepare(out_dir, options)`` splits the corpus by document (a stable hash of the document id,
salted with the seed: a validation document is never in the training stream), trains a
byte-level BPE on the training documents only, and writes

- ``out_dir/train/tokens.bin``: np.uint16 token ids, every document followed by EOS
  (mounted read-only into the job as ``$DATA_DIR``), ``tokenizer.json`` (and the Hugging Face
  files around it), ``meta.json`` ``{vocab_size, tokens, docs, eos_id, options}``;
- ``out_dir/val/tokens.bin`` and ``meta.json``: seen only by the frozen evaluator.

Idempotent: a second call with the same options returns the counts recorded by the first.
``val/meta.json`` is written last, so an interrupted preparation is redone.

Options (all optional): ``vocab_size`` (2048), ``max_docs`` (cap on documents read, in file
order; None = all), ``val_fraction`` (0.1), ``seed`` (0, salts the split), ``min_frequency``
(2, BPE merges), ``corpus`` (``"wiki"``: the bundled 10k Wikipedia summaries; or a path to a
``.jsonl`` file with a ``text`` field per line, for a real pretraining corpus on a cluster).
"""
from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import Any, Iterable

import numpy as np

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the produced files change, so prepared data is rebuilt
DEFAULTS: dict[str, Any] = {
    "corpus": "wiki",
    "vocab_size": 2048,
    "max_docs": None,
    "val_fraction": 0.1,
    "seed": 0,
    "min_frequency": 2,
}


def _options(options: dict[str, Any] | None) -> dict[str, Any]:
    opts = dict(DEFAULTS)
    unknown = set(options or {}) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown nanogpt data options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    opts.update(options or {})
    if not 256 < int(opts["vocab_size"]) <= 65_536:
        raise ValueError("vocab_size must be in (256, 65536] (tokens are stored as uint16)")
    if not 0.0 < float(opts["val_fraction"]) < 1.0:
        raise ValueError("val_fraction must be in (0, 1)")
    opts["format"] = FORMAT
    return opts


def _load_docs(corpus: str, max_docs: int | None) -> list[dict]:
    """Rows ``{"id", "text"}`` in source order."""
    if corpus == "wiki":
        from selftaught.data.wiki import build_wiki

        rows, _ = build_wiki(limit=max_docs)
        return [{"id": r["id"], "text": r["text"]} for r in rows]
    path = Path(corpus)
    if path.suffix != ".jsonl":
        raise ValueError(f"corpus must be 'wiki' or a .jsonl file with a 'text' field, got {corpus!r}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            rec = json.loads(line)
            if isinstance(rec.get("text"), str) and rec["text"].strip():
                rows.append({"id": str(rec.get("id", f"{path.name}/{i}")), "text": rec["text"]})
                if max_docs and len(rows) >= max_docs:
                    break
    return rows


def split_docs(rows: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Train / val by a stable hash of the document id salted with the seed."""
    train, val = [], []
    for r in rows:
        bucket = zlib.crc32(f"nanogpt-{seed}:{r['id']}".encode()) % 100_000
        (val if bucket < val_fraction * 100_000 else train).append(r)
    return train, val


def _write_tokens(tokenizer, texts: Iterable[str], eos_id: int, path: Path, chunk: int = 2000) -> int:
    """Encode ``texts`` in chunks and append ``ids + [eos]`` per document as uint16."""
    texts = list(texts)
    n = 0
    with open(path, "wb") as f:
        for i in range(0, len(texts), chunk):
            encs = tokenizer.encode_batch(texts[i:i + chunk], add_special_tokens=False)
            ids = np.fromiter((t for e in encs for t in (*e.ids, eos_id)), dtype=np.int64)
            if ids.size and int(ids.max()) > np.iinfo(np.uint16).max:
                raise ValueError("token id does not fit in uint16")
            ids.astype(np.uint16).tofile(f)
            n += int(ids.size)
    return n


def _done(out_dir: Path, opts: dict[str, Any]) -> dict[str, Any] | None:
    try:
        val = json.loads((out_dir / "val" / "meta.json").read_text())
        train = json.loads((out_dir / "train" / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if val.get("options") != opts or train.get("options") != opts:
        return None
    if not (out_dir / "train" / "tokens.bin").exists() or not (out_dir / "val" / "tokens.bin").exists():
        return None
    return _counts(train, val)


def _counts(train: dict, val: dict) -> dict[str, Any]:
    return {"vocab_size": train["vocab_size"], "eos_id": train["eos_id"],
            "train_tokens": train["tokens"], "train_docs": train["docs"],
            "val_tokens": val["tokens"], "val_docs": val["docs"]}


def prepare(out_dir: str | Path, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``out_dir/train`` and ``out_dir/val`` (see the module docstring); returns the
    counts ``{vocab_size, eos_id, train_tokens, train_docs, val_tokens, val_docs}``."""
    from filelock import FileLock

    out_dir = Path(out_dir)
    opts = _options(options)
    if (got := _done(out_dir, opts)) is not None:
        return got
    out_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir / ".prepare.lock")):
        if (got := _done(out_dir, opts)) is not None:
            return got
        from selftaught.models import EOS, train_bpe_tokenizer

        rows = _load_docs(str(opts["corpus"]), opts["max_docs"])
        train_docs, val_docs = split_docs(rows, float(opts["val_fraction"]), int(opts["seed"]))
        if not train_docs or not val_docs:
            raise ValueError(f"split left {len(train_docs)} train and {len(val_docs)} val documents; "
                             "raise max_docs or change val_fraction")
        (out_dir / "val" / "meta.json").unlink(missing_ok=True)  # the completion marker goes last
        train_dir, val_dir = out_dir / "train", out_dir / "val"
        train_dir.mkdir(exist_ok=True)
        val_dir.mkdir(exist_ok=True)
        tok = train_bpe_tokenizer((d["text"] for d in train_docs), int(opts["vocab_size"]), train_dir,
                                  min_frequency=int(opts["min_frequency"]))
        backend = tok.backend_tokenizer
        eos_id = int(tok.convert_tokens_to_ids(EOS))
        vocab = int(backend.get_vocab_size())
        n_train = _write_tokens(backend, (d["text"] for d in train_docs), eos_id, train_dir / "tokens.bin")
        n_val = _write_tokens(backend, (d["text"] for d in val_docs), eos_id, val_dir / "tokens.bin")
        train = {"vocab_size": vocab, "tokens": n_train, "docs": len(train_docs), "eos_id": eos_id,
                 "dtype": "uint16", "options": opts}
        val = {"vocab_size": vocab, "tokens": n_val, "docs": len(val_docs), "eos_id": eos_id,
               "dtype": "uint16", "options": opts}
        (train_dir / "meta.json").write_text(json.dumps(train, indent=1))
        (val_dir / "meta.json").write_text(json.dumps(val, indent=1))
        log.info("nanogpt data: %d train docs (%d tokens), %d val docs (%d tokens), vocab %d",
                 len(train_docs), n_train, len(val_docs), n_val, vocab)
        return _counts(train, val)
