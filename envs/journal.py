"""The research journal: every idea's life in SQLite, so a killed driver resumes.

One row per (environment fingerprint, idea id) holds the idea, its state (``submitted``,
``implementing``, ``implemented``, ``queued``, ``running``, ``finished``), the job id, the
applied edit (files and diff, so a resumed run never pays the implementer twice) and the final
result. An append-only ``events`` table keeps the history with timestamps. Writes are
transactions in WAL mode: a crash loses at most the event being written, never a finished
result.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS ideas (
  env_fp TEXT NOT NULL, idea_id TEXT NOT NULL, env TEXT NOT NULL, idea TEXT NOT NULL,
  state TEXT NOT NULL, job_id TEXT, edit TEXT, result TEXT,
  created REAL NOT NULL, updated REAL NOT NULL,
  PRIMARY KEY (env_fp, idea_id));
CREATE TABLE IF NOT EXISTS events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, env_fp TEXT NOT NULL, idea_id TEXT NOT NULL,
  time REAL NOT NULL, event TEXT NOT NULL, data TEXT);
CREATE INDEX IF NOT EXISTS events_idea ON events (env_fp, idea_id);
"""

STATES = ("submitted", "implementing", "implemented", "queued", "running", "finished")


class Journal:
    """Thread-safe SQLite journal of one run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self, statements: list[tuple[str, tuple]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _event(self, env_fp: str, idea_id: str, event: str, data: Any) -> tuple[str, tuple]:
        return ("INSERT INTO events (env_fp, idea_id, time, event, data) VALUES (?,?,?,?,?)",
                (env_fp, idea_id, time.time(), event, json.dumps(data, default=str) if data is not None else None))

    # ------------------------------------------------------------------ writes
    def submit(self, env_fp: str, env: str, idea: dict[str, Any]) -> None:
        now = time.time()
        self._tx([("INSERT OR IGNORE INTO ideas (env_fp, idea_id, env, idea, state, created, updated) "
                   "VALUES (?,?,?,?,?,?,?)", (env_fp, idea["id"], env, json.dumps(idea), "submitted", now, now)),
                  self._event(env_fp, idea["id"], "submitted", None)])

    def set_state(self, env_fp: str, idea_id: str, state: str, data: Any = None, *, job_id: str | None = None,
                  edit: dict[str, Any] | None = None) -> None:
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        sets, args = ["state=?", "updated=?"], [state, time.time()]
        if job_id is not None:
            sets.append("job_id=?")
            args.append(job_id)
        if edit is not None:
            sets.append("edit=?")
            args.append(json.dumps(edit, default=str))
        self._tx([(f"UPDATE ideas SET {', '.join(sets)} WHERE env_fp=? AND idea_id=?", (*args, env_fp, idea_id)),
                  self._event(env_fp, idea_id, state, data)])

    def event(self, env_fp: str, idea_id: str, event: str, data: Any = None) -> None:
        self._tx([self._event(env_fp, idea_id, event, data)])

    def finish(self, env_fp: str, idea_id: str, result: dict[str, Any]) -> None:
        self._tx([("UPDATE ideas SET state='finished', result=?, updated=? WHERE env_fp=? AND idea_id=?",
                   (json.dumps(result, default=str), time.time(), env_fp, idea_id)),
                  self._event(env_fp, idea_id, "finished", {"status": result.get("status"),
                                                            "reward": result.get("reward")})])

    # ------------------------------------------------------------------ reads
    def get(self, env_fp: str, idea_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT idea_id, env, idea, state, job_id, edit, result, created, updated "
                                   "FROM ideas WHERE env_fp=? AND idea_id=?", (env_fp, idea_id)).fetchone()
        return _row(row) if row else None

    def rows(self, env_fp: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT idea_id, env, idea, state, job_id, edit, result, created, updated FROM ideas"
        cond, args = [], []
        if env_fp is not None:
            cond.append("env_fp=?")
            args.append(env_fp)
        if state is not None:
            cond.append("state=?")
            args.append(state)
        if cond:
            sql += " WHERE " + " AND ".join(cond)
        with self._lock:
            return [_row(r) for r in self._db.execute(sql + " ORDER BY created", args).fetchall()]

    def events(self, env_fp: str, idea_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT time, event, data FROM events WHERE env_fp=? AND idea_id=? ORDER BY seq",
                                    (env_fp, idea_id)).fetchall()
        return [{"time": t, "event": e, "data": json.loads(d) if d else None} for t, e, d in rows]


def _row(r: tuple) -> dict[str, Any]:
    idea_id, env, idea, state, job_id, edit, result, created, updated = r
    return {"idea_id": idea_id, "env": env, "idea": json.loads(idea), "state": state, "job_id": job_id,
            "edit": json.loads(edit) if edit else None, "result": json.loads(result) if result else None,
            "created": created, "updated": updated}
