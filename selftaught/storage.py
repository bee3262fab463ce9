"""Run directories with resumable stages.

A run directory holds one subdirectory per stage. A stage is *complete* when its marker file
``_STAGE.json`` exists and records the same hash as the stage would have now; the hash covers
the stage's own config, its declared inputs and the hashes of the stages it depends on, so a
changed config reruns exactly the stages it affects and everything downstream of them.

Data go to Parquet (pyarrow), written atomically (temporary name, then rename), so a killed job
never leaves a half-written file that looks finished. Long stages write numbered part files and
resume by skipping the parts that already exist (:class:`PartWriter`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from selftaught.config import fingerprint

log = logging.getLogger(__name__)

MARKER = "_STAGE.json"


def write_parquet(table: pa.Table | list[dict] | dict[str, list], path: str | Path,
                  schema: pa.Schema | None = None) -> Path:
    """Write a table atomically; accepts a pyarrow Table, a list of rows or a dict of columns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(table, list):
        table = pa.Table.from_pylist(table, schema=schema)
    elif isinstance(table, dict):
        table = pa.Table.from_pydict(table, schema=schema)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def read_parquet(path: str | Path, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a Parquet file or a directory of part files (hidden temp files are ignored)."""
    path = Path(path)
    if path.is_dir():
        parts = sorted(p for p in path.glob("*.parquet") if not p.name.startswith("."))
        if not parts:
            raise FileNotFoundError(f"no Parquet files in {path}")
        return pa.concat_tables([pq.read_table(p, columns=columns) for p in parts],
                                promote_options="default")
    return pq.read_table(path, columns=columns)


def file_fingerprint(path: str | Path) -> str:
    """Cheap identity of an input file or directory: names, sizes and mtimes."""
    path = Path(path)
    if not path.exists():
        return "missing"
    items = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return fingerprint([(str(p.relative_to(path.parent)), p.stat().st_size, int(p.stat().st_mtime))
                        for p in items])


@dataclass
class Stage:
    """One resumable step of a run. Use :meth:`RunDir.stage` to make one."""

    name: str
    path: Path
    hash: str
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    def record(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.marker.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    @property
    def complete(self) -> bool:
        rec = self.record()
        return rec is not None and rec.get("hash") == self.hash

    def up_to_date(self) -> bool:
        """``complete``, and says so in the log (so a re-run tells what it skipped)."""
        if self.complete:
            log.info("stage %s: up to date, skipped", self.name)
            return True
        return False

    @property
    def outputs(self) -> dict[str, Any]:
        rec = self.record() or {}
        return rec.get("outputs", {})

    @property
    def seconds(self) -> float | None:
        """Wall-clock seconds of the attempt that finished the stage (None: not recorded)."""
        return (self.record() or {}).get("seconds")

    def begin(self, keep_partial: bool = True) -> Path:
        """Prepare the directory. A stale marker (other hash) means the stage's inputs changed:
        its old outputs are removed. Partial outputs of the same hash are kept for resuming."""
        rec = self.record()
        stale = rec is not None and rec.get("hash") != self.hash
        started = self.path / "_STARTED.json"
        if started.exists():
            try:
                if json.loads(started.read_text()).get("hash") != self.hash:
                    stale = True
            except json.JSONDecodeError:
                stale = True
        if stale or not keep_partial:
            if self.path.exists():
                log.info("stage %s: inputs or config changed, clearing old outputs", self.name)
                shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        started.write_text(json.dumps({"hash": self.hash, "time": time.time()}))
        return self.path

    def finish(self, **outputs: Any) -> None:
        """Write the marker: outputs, and ``seconds`` since the last :meth:`begin` (the attempt
        that finished; a resumed stage's earlier attempts are not counted)."""
        rec = {"stage": self.name, "hash": self.hash, "inputs": self.inputs,
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "outputs": outputs}
        try:
            rec["seconds"] = round(time.time() - json.loads((self.path / "_STARTED.json").read_text())["time"], 1)
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            pass
        tmp = self.path / f".{MARKER}.tmp"
        tmp.write_text(json.dumps(rec, indent=2, default=str))
        tmp.replace(self.marker)
        (self.path / "_STARTED.json").unlink(missing_ok=True)
        log.info("stage %s: finished %s", self.name, _short(outputs))

    def parts(self, subdir: str = "parts") -> "PartWriter":
        return PartWriter(self.path / subdir)


class PartWriter:
    """Numbered Parquet part files; ``done(i)`` tells a resumed job which parts to skip."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.dir / f"part-{index:05d}.parquet"

    def done(self, index: int) -> bool:
        return self.path(index).exists()

    def completed(self) -> set[int]:
        return {int(p.stem.split("-")[1]) for p in self.dir.glob("part-*.parquet")}

    def write(self, index: int, table: pa.Table | list[dict] | dict[str, list],
              schema: pa.Schema | None = None) -> Path:
        return write_parquet(table, self.path(index), schema=schema)

    def read(self, columns: Sequence[str] | None = None) -> pa.Table:
        return read_parquet(self.dir, columns=columns)


class RunDir:
    """A run's directory: ``config.yaml``, ``logs/``, and one folder per stage."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def stage(self, name: str, config: Any = None, deps: Iterable[Stage] = (),
              inputs: dict[str, Any] | None = None) -> Stage:
        inputs = dict(inputs or {})
        h = fingerprint({"config": fingerprint(config) if config is not None else None,
                         "deps": {d.name: d.hash for d in deps}, "inputs": inputs})
        return Stage(name=name, path=self.root / name, hash=h,
                     inputs={**inputs, "deps": [d.name for d in deps]})

    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


def _short(d: dict[str, Any], limit: int = 200) -> str:
    s = json.dumps(d, default=str)
    return s if len(s) <= limit else s[:limit] + "..."


class SqliteJournal:
    """A run's SQLite journal: one connection shared by threads under a lock, WAL so readers
    in other processes never block it, autocommit so every statement is its own transaction.
    Pipelines subclass it with their schema and queries."""

    def __init__(self, path: str | Path, schema: str):
        self._lock = threading.Lock()
        self.db = sqlite3.connect(str(path), check_same_thread=False, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(schema)

    def x(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Run one statement and return its rows."""
        with self._lock:
            return self.db.execute(sql, args).fetchall()
