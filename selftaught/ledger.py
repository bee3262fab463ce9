"""The money layer: a call cache that never pays twice for one request, and a cost ledger with
hard caps that a run can never overrun.

Both are SQLite files (WAL journal, busy timeout), so any number of threads and processes can
share them and a killed run loses nothing it has paid for:

    ledger = Ledger.for_run("runs/search-1", caps=BudgetCaps(total_usd=20, role_usd={"judge": 2},
                                                             gpu_hours=40, jobs=500))
    ideator = LLMClient(LLMConfig(model=..., cache="runs/llm_cache.sqlite"), ledger=ledger, role="ideator")
    ledger.estimate(calls=200, prompt_tokens=3000, max_tokens=1024, model=ideator.cfg)  # before it starts
    r = ledger.reserve_compute("cpu-small", cpu_hours=0.5)   # the executor, before starting a job
    ledger.add_compute("cpu-small", cpu_hours=0.2, reservation=r)   # ... and after it ran
    ledger.snapshot()   # per role and per environment

Every LLM call made through :class:`selftaught.llm.LLMClient` with a ledger first reserves its
worst-case cost (``reserve_usd``); the reservation fails with :class:`BudgetExceeded` when spent
plus reserved plus this call would pass a cap, and is replaced by the actual cost when the call
returns (``settle``) or dropped when it fails (``release``). Reservations live in the database,
so the check and the reservation are one transaction across threads and processes alike.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from selftaught import metrics
from selftaught.config import Strict

log = logging.getLogger(__name__)

_EPS = 1e-12  # float slack when comparing sums of dollars or hours against a cap
_BUSY_TIMEOUT_MS = 30_000


class BudgetError(RuntimeError):
    """Base of the money layer's errors."""


class BudgetExceeded(BudgetError):
    """Starting this LLM call or job could pass a hard cap, so it was not started.

    ``cap`` names the cap (``"total_usd"``, ``"role_usd[judge]"``, ``"gpu_hours"``, ...),
    ``limit`` is its value, ``used`` what is spent, ``reserved`` what calls and jobs in flight
    hold, and ``requested`` what this one needed.
    """

    def __init__(self, cap: str, limit: float, used: float, reserved: float, requested: float):
        self.cap, self.limit, self.used, self.reserved, self.requested = cap, limit, used, reserved, requested
        super().__init__(f"budget cap {cap}={limit:g} would be exceeded: used {used:.6g} + in flight "
                         f"{reserved:.6g} + this request {requested:.6g} > {limit:g}")


class BudgetCaps(Strict):
    """Hard caps for one run; ``None`` means no cap. Dollars count LLM calls (actual cost of
    finished calls plus the worst-case cost of calls in flight); hours and jobs count compute
    recorded with :meth:`Ledger.add_compute` plus what running jobs reserved."""

    total_usd: float | None = Field(default=None, ge=0)
    role_usd: dict[str, float] = Field(default_factory=dict)  # e.g. {"judge": 2.0}
    gpu_hours: float | None = Field(default=None, ge=0)
    cpu_hours: float | None = Field(default=None, ge=0)
    jobs: int | None = Field(default=None, ge=0)

    @field_validator("role_usd")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if x < 0}
        if bad:
            raise ValueError(f"role_usd caps must be >= 0, got {bad}")
        return v


@dataclass(frozen=True)
class Reservation:
    """What one in-flight LLM call (``kind="llm"``, ``key`` = role) or job (``kind="compute"``,
    ``key`` = environment) holds against the caps until it is settled or released."""

    id: int
    kind: str
    key: str
    usd: float = 0.0
    gpu_hours: float = 0.0
    cpu_hours: float = 0.0
    jobs: int = 0


def _connect(path: str | Path) -> sqlite3.Connection:
    """A connection for many threads (callers hold a lock) and processes (WAL, busy timeout),
    in autocommit mode so transactions are explicit ``BEGIN IMMEDIATE`` blocks."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(p), timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                          check_same_thread=False)
    con.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    return con


class _Tx:
    """``with _Tx(con, lock):`` one write transaction taken up front (BEGIN IMMEDIATE), so a
    read-check-write sequence is atomic across threads and processes."""

    def __init__(self, con: sqlite3.Connection, lock: threading.Lock):
        self.con, self.lock = con, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.con.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.con

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        try:
            self.con.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()


# ---------------------------------------------------------------------------- call cache
class LLMCache:
    """Answers of successful LLM calls keyed by a hash of the full request (see
    :func:`selftaught.llm.cache_key`). Values are the result as a JSON dict. The first answer
    stored for a key wins (later writers of the same key, e.g. another process that raced
    this one, are ignored), so every reader sees one answer per request."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._lock = threading.Lock()
        self._con = _connect(self.path)
        with self._lock:
            self._con.execute("CREATE TABLE IF NOT EXISTS llm_cache (key TEXT PRIMARY KEY, model TEXT, "
                              "created REAL, result TEXT NOT NULL)")

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._con.execute("SELECT result FROM llm_cache WHERE key=?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, result: dict[str, Any], model: str = "") -> None:
        with self._lock:
            self._con.execute("INSERT OR IGNORE INTO llm_cache (key, model, created, result) VALUES (?,?,?,?)",
                              (key, model, time.time(), json.dumps(result)))

    def __len__(self) -> int:
        with self._lock:
            return int(self._con.execute("SELECT COUNT(*) FROM llm_cache").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __getstate__(self) -> dict[str, Any]:  # picklable: reopened by path
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"LLMCache({self.path!r})"


# ---------------------------------------------------------------------------- ledger
_LLM_COLS = ("calls", "cache_hits", "errors", "prompt_tokens", "completion_tokens", "usd", "saved_usd")
_ENV_COLS = ("jobs", "gpu_hours", "cpu_hours")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS llm (role TEXT PRIMARY KEY, calls INTEGER NOT NULL DEFAULT 0,
    cache_hits INTEGER NOT NULL DEFAULT 0, errors INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    usd REAL NOT NULL DEFAULT 0, saved_usd REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS compute (env TEXT PRIMARY KEY, jobs INTEGER NOT NULL DEFAULT 0,
    gpu_hours REAL NOT NULL DEFAULT 0, cpu_hours REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS reservations (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,
    key TEXT NOT NULL, usd REAL NOT NULL DEFAULT 0, gpu_hours REAL NOT NULL DEFAULT 0,
    cpu_hours REAL NOT NULL DEFAULT 0, jobs INTEGER NOT NULL DEFAULT 0, pid INTEGER, host TEXT, created REAL);
CREATE TABLE IF NOT EXISTS charges (key TEXT PRIMARY KEY, env TEXT NOT NULL, created REAL);
"""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Ledger:
    """Per-role LLM spend and per-environment compute of one run, with hard caps.

    ``caps`` given here are stored in the file (replacing earlier ones, so a resumed run may
    raise them); opened without caps, a ledger enforces the caps stored by whoever created it.
    Opening a ledger drops reservations left by processes of this host that no longer exist
    (a killed run), so their money is not held forever.
    """

    FILENAME = "ledger.sqlite"

    def __init__(self, path: str | Path, caps: BudgetCaps | dict[str, Any] | None = None):
        self.path = str(path)
        self._lock = threading.Lock()
        self._con = _connect(self.path)
        self._host = socket.gethostname()
        with self._lock:
            self._con.executescript(_SCHEMA)
        with _Tx(self._con, self._lock) as con:
            if caps is not None:
                caps = caps if isinstance(caps, BudgetCaps) else BudgetCaps.model_validate(caps)
                con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('caps', ?)", (caps.model_dump_json(),))
            row = con.execute("SELECT value FROM meta WHERE key='caps'").fetchone()
        self.caps = BudgetCaps.model_validate_json(row[0]) if row else BudgetCaps()
        dropped = self.release_stale()
        if dropped:
            log.warning("%s: settled %d reservations of processes that are gone (an LLM call's counts as unsettled "
                        "spend at its worst case)", self.path, dropped)

    @classmethod
    def for_run(cls, run_dir: str | Path, caps: BudgetCaps | dict[str, Any] | None = None) -> "Ledger":
        """The ledger of a run directory: ``<run_dir>/ledger.sqlite``."""
        return cls(Path(run_dir) / cls.FILENAME, caps)

    def set_caps(self, caps: BudgetCaps | dict[str, Any]) -> None:
        """Replace the stored caps (e.g. raise them to resume a run that hit one)."""
        caps = caps if isinstance(caps, BudgetCaps) else BudgetCaps.model_validate(caps)
        with _Tx(self._con, self._lock) as con:
            con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('caps', ?)", (caps.model_dump_json(),))
        self.caps = caps

    def _caps(self, con: sqlite3.Connection) -> BudgetCaps:
        """The stored caps (another process may have changed them)."""
        row = con.execute("SELECT value FROM meta WHERE key='caps'").fetchone()
        self.caps = BudgetCaps.model_validate_json(row[0]) if row else BudgetCaps()
        return self.caps

    def release_stale(self, max_age_s: float | None = None) -> int:
        """Settle reservations whose process (on this host) is gone, and with ``max_age_s`` any
        older than that (e.g. from another host that died). Returns how many there were.

        A compute hold is dropped (its job's worker died with the process, or is charged when
        its result is collected). An LLM call's hold becomes *unsettled* spend, still counted
        against the caps at its worst case: the provider may have billed a call whose answer
        never came back, and a hard cap must not assume it did not."""
        with _Tx(self._con, self._lock) as con:
            rows = con.execute("SELECT id, kind, pid, host, created FROM reservations WHERE kind != 'unsettled'"
                               ).fetchall()
            now = time.time()
            stale = [(i, kind) for i, kind, pid, host, created in rows
                     if (host == self._host and pid is not None and not _pid_alive(pid))
                     or (max_age_s is not None and created is not None and now - created > max_age_s)]
            con.executemany("UPDATE reservations SET kind='unsettled', pid=NULL WHERE id=?",
                            [(i,) for i, kind in stale if kind == "llm"])
            con.executemany("DELETE FROM reservations WHERE id=?", [(i,) for i, kind in stale if kind != "llm"])
        return len(stale)

    # ------------------------------------------------------------------ LLM dollars
    @staticmethod
    def _sum(con: sqlite3.Connection, sql: str, *args: Any) -> float:
        return float(con.execute(sql, args).fetchone()[0] or 0.0)

    def _check_usd(self, con: sqlite3.Connection, role: str, usd: float) -> None:
        caps = self._caps(con)
        if caps.total_usd is not None:
            used = self._sum(con, "SELECT SUM(usd) FROM llm")
            held = self._sum(con, "SELECT SUM(usd) FROM reservations WHERE kind IN ('llm', 'unsettled')")
            if used + held + usd > caps.total_usd + _EPS:
                raise BudgetExceeded("total_usd", caps.total_usd, used, held, usd)
        if role in caps.role_usd:
            used = self._sum(con, "SELECT SUM(usd) FROM llm WHERE role=?", role)
            held = self._sum(con, "SELECT SUM(usd) FROM reservations WHERE kind IN ('llm', 'unsettled') AND key=?",
                             role)
            if used + held + usd > caps.role_usd[role] + _EPS:
                raise BudgetExceeded(f"role_usd[{role}]", caps.role_usd[role], used, held, usd)

    def check_usd(self, role: str, usd: float) -> None:
        """Raise :class:`BudgetExceeded` if spending ``usd`` more as ``role`` could pass a cap."""
        with _Tx(self._con, self._lock) as con:
            self._check_usd(con, role, usd)

    def _insert(self, con: sqlite3.Connection, kind: str, key: str, **amounts: float) -> Reservation:
        cur = con.execute("INSERT INTO reservations (kind, key, usd, gpu_hours, cpu_hours, jobs, pid, host, created) "
                          "VALUES (?,?,?,?,?,?,?,?,?)",
                          (kind, key, amounts.get("usd", 0.0), amounts.get("gpu_hours", 0.0),
                           amounts.get("cpu_hours", 0.0), int(amounts.get("jobs", 0)), os.getpid(), self._host,
                           time.time()))
        return Reservation(int(cur.lastrowid), kind, key, **amounts)  # type: ignore[arg-type]

    def reserve_usd(self, role: str, usd: float) -> Reservation:
        """Hold ``usd`` (a call's worst-case cost) for ``role``, or raise :class:`BudgetExceeded`."""
        if usd < 0:
            raise ValueError(f"cannot reserve a negative amount: {usd}")
        with _Tx(self._con, self._lock) as con:
            self._check_usd(con, role, usd)
            return self._insert(con, "llm", role, usd=float(usd))

    @staticmethod
    def _bump_llm(con: sqlite3.Connection, role: str, **add: float) -> None:
        con.execute("INSERT OR IGNORE INTO llm (role) VALUES (?)", (role,))
        sets = ", ".join(f"{k}={k}+?" for k in add)
        con.execute(f"UPDATE llm SET {sets} WHERE role=?", (*add.values(), role))

    def settle(self, reservation: Reservation | None, *, role: str | None = None, usd: float,
               prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """Record one paid call at its actual cost, replacing its reservation (if any) in the
        same transaction."""
        role = role if role is not None else (reservation.key if reservation else "default")
        if reservation is not None and usd > reservation.usd + _EPS:
            log.warning("%s: call cost %.6g USD, more than its reservation %.6g (provider counted more "
                        "prompt tokens than estimated)", role, usd, reservation.usd)
        with _Tx(self._con, self._lock) as con:
            if reservation is not None:
                con.execute("DELETE FROM reservations WHERE id=?", (reservation.id,))
            self._bump_llm(con, role, calls=1, prompt_tokens=int(prompt_tokens),
                           completion_tokens=int(completion_tokens), usd=float(usd))
            spent = self._sum(con, "SELECT usd FROM llm WHERE role=?", role) if metrics.ray_active() else None
        metrics.LLM_CALLS.inc(1, {"role": role, "result": "paid"})
        metrics.LLM_COST_USD.inc(float(usd), {"role": role})
        if spent is not None:
            metrics.LLM_SPENT_USD.set(spent, {"role": role, "ledger": Path(self.path).parent.name})

    def add_llm(self, role: str, *, usd: float, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """Record a call made outside :class:`~selftaught.llm.LLMClient` (no reservation)."""
        self.settle(None, role=role, usd=usd, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

    def release(self, reservation: Reservation, *, error: bool = False) -> None:
        """Drop a reservation whose call or job never happened (``error=True`` counts a failed call)."""
        with _Tx(self._con, self._lock) as con:
            con.execute("DELETE FROM reservations WHERE id=?", (reservation.id,))
            if error and reservation.kind == "llm":
                self._bump_llm(con, reservation.key, errors=1)
        if error and reservation.kind == "llm":
            metrics.LLM_CALLS.inc(1, {"role": reservation.key, "result": "error"})

    def record_hit(self, role: str, saved_usd: float) -> None:
        """A call answered from the cache: nothing spent, ``saved_usd`` (its original cost) saved."""
        with _Tx(self._con, self._lock) as con:
            self._bump_llm(con, role, cache_hits=1, saved_usd=float(saved_usd))
        metrics.LLM_CALLS.inc(1, {"role": role, "result": "cache_hit"})

    # ------------------------------------------------------------------ compute
    def _check_compute(self, con: sqlite3.Connection, gpu_hours: float, cpu_hours: float, jobs: int) -> None:
        caps = self._caps(con)
        for name, want in (("gpu_hours", gpu_hours), ("cpu_hours", cpu_hours), ("jobs", jobs)):
            limit = getattr(caps, name)
            if limit is None:
                continue
            used = self._sum(con, f"SELECT SUM({name}) FROM compute")
            held = self._sum(con, f"SELECT SUM({name}) FROM reservations WHERE kind='compute'")
            if used + held + want > limit + _EPS:
                raise BudgetExceeded(name, limit, used, held, want)

    def check_compute(self, env: str | None = None, *, gpu_hours: float = 0.0, cpu_hours: float = 0.0,
                      jobs: int = 1) -> None:
        """Raise :class:`BudgetExceeded` if a job of this size could pass a compute cap. The
        caps are run-wide; ``env`` is accepted for symmetry with :meth:`add_compute`."""
        del env
        with _Tx(self._con, self._lock) as con:
            self._check_compute(con, gpu_hours, cpu_hours, jobs)

    def can_start(self, env: str | None = None, *, gpu_hours: float = 0.0, cpu_hours: float = 0.0,
                  jobs: int = 1) -> bool:
        """:meth:`check_compute` as a yes/no (for a scheduler deciding what to launch)."""
        try:
            self.check_compute(env, gpu_hours=gpu_hours, cpu_hours=cpu_hours, jobs=jobs)
        except BudgetExceeded:
            return False
        return True

    def reserve_compute(self, env: str, *, gpu_hours: float = 0.0, cpu_hours: float = 0.0,
                        jobs: int = 1) -> Reservation:
        """Check and hold a job's worst case (its time limit times its devices) in one step, so
        parallel launchers cannot together pass a cap; pass the result to :meth:`add_compute`
        when the job ends (or to :meth:`release` if it never started)."""
        if min(gpu_hours, cpu_hours, jobs) < 0:
            raise ValueError("compute amounts must be >= 0")
        with _Tx(self._con, self._lock) as con:
            self._check_compute(con, gpu_hours, cpu_hours, jobs)
            return self._insert(con, "compute", env, gpu_hours=float(gpu_hours), cpu_hours=float(cpu_hours),
                                jobs=int(jobs))

    def add_compute(self, env: str, *, gpu_hours: float = 0.0, cpu_hours: float = 0.0, jobs: int = 1,
                    reservation: Reservation | None = None, key: str | None = None) -> bool:
        """Record compute used in environment ``env`` (releasing ``reservation`` if given).

        With ``key`` (for example the job's id) the charge is made at most once: a caller that
        crashed after charging and before noting it can charge again safely. Returns whether
        this call charged."""
        with _Tx(self._con, self._lock) as con:
            if reservation is not None:
                con.execute("DELETE FROM reservations WHERE id=?", (reservation.id,))
            if key is not None and con.execute("INSERT OR IGNORE INTO charges VALUES (?,?,?)",
                                               (key, env, time.time())).rowcount == 0:
                return False
            con.execute("INSERT OR IGNORE INTO compute (env) VALUES (?)", (env,))
            con.execute("UPDATE compute SET jobs=jobs+?, gpu_hours=gpu_hours+?, cpu_hours=cpu_hours+? WHERE env=?",
                        (int(jobs), float(gpu_hours), float(cpu_hours), env))
        return True

    # ------------------------------------------------------------------ reading
    def snapshot(self) -> dict[str, Any]:
        """``{"roles": {role: {...}}, "envs": {env: {...}}, "total": {...}, "caps": {...},
        "remaining": {...}}``; amounts held by calls and jobs in flight are under ``reserved_*``."""
        with _Tx(self._con, self._lock) as con:
            caps = self._caps(con)
            roles = {r[0]: dict(zip(_LLM_COLS, r[1:]))
                     for r in con.execute(f"SELECT role, {', '.join(_LLM_COLS)} FROM llm ORDER BY role")}
            envs = {r[0]: dict(zip(_ENV_COLS, r[1:]))
                    for r in con.execute(f"SELECT env, {', '.join(_ENV_COLS)} FROM compute ORDER BY env")}
            held = con.execute("SELECT kind, key, SUM(usd), SUM(gpu_hours), SUM(cpu_hours), SUM(jobs) "
                               "FROM reservations GROUP BY kind, key").fetchall()
        for r in roles.values():
            r["reserved_usd"] = r["unsettled_usd"] = 0.0
        for e in envs.values():
            e.update(reserved_jobs=0, reserved_gpu_hours=0.0, reserved_cpu_hours=0.0)
        for kind, key, usd, gh, ch, jobs in held:
            if kind in ("llm", "unsettled"):  # unsettled: calls of a dead process, maybe billed
                col = "reserved_usd" if kind == "llm" else "unsettled_usd"
                roles.setdefault(key, {**dict.fromkeys(_LLM_COLS, 0), "reserved_usd": 0.0,
                                       "unsettled_usd": 0.0})[col] = usd
            else:
                envs.setdefault(key, {**dict.fromkeys(_ENV_COLS, 0), "reserved_jobs": 0, "reserved_gpu_hours": 0.0,
                                      "reserved_cpu_hours": 0.0}).update(
                    reserved_jobs=jobs, reserved_gpu_hours=gh, reserved_cpu_hours=ch)
        total: dict[str, Any] = {c: sum(r[c] for r in roles.values())
                                 for c in (*_LLM_COLS, "reserved_usd", "unsettled_usd")}
        total.update({c: sum(e[c] for e in envs.values())
                      for c in (*_ENV_COLS, "reserved_jobs", "reserved_gpu_hours", "reserved_cpu_hours")})
        remaining: dict[str, Any] = {
            "usd": None if caps.total_usd is None else
            caps.total_usd - total["usd"] - total["reserved_usd"] - total["unsettled_usd"],
            "role_usd": {k: v - sum(roles.get(k, {}).get(c, 0.0) for c in ("usd", "reserved_usd", "unsettled_usd"))
                         for k, v in caps.role_usd.items()}}
        for c in _ENV_COLS:
            limit = getattr(caps, c)
            remaining[c] = None if limit is None else limit - total[c] - total[f"reserved_{c}"]
        return {"roles": roles, "envs": envs, "total": total, "caps": caps.model_dump(), "remaining": remaining}

    def estimate(self, calls: int, prompt_tokens: int, max_tokens: int, model: Any, *, role: str | None = None,
                 input_price_per_mtok: float | None = None,
                 output_price_per_mtok: float | None = None) -> dict[str, Any]:
        """Worst-case dollars of a planned batch before it starts: ``calls`` calls of
        ``prompt_tokens`` prompt tokens each, each allowed ``max_tokens`` completion tokens.

        ``model`` is a litellm model string or an :class:`~selftaught.llm.LLMConfig` (whose
        declared prices then apply). Returns ``per_call_usd``, ``usd``, the ``remaining_usd``
        under the total cap (and ``role_remaining_usd`` for ``role``), and ``fits``: whether the
        whole batch could run under the caps as they stand. Raises ``LLMError`` for a model with
        no known or declared price.
        """
        from selftaught.llm import worst_case_cost

        per_call = worst_case_cost(model, prompt_tokens, max_tokens, input_price_per_mtok=input_price_per_mtok,
                                   output_price_per_mtok=output_price_per_mtok)
        usd = per_call * calls
        snap = self.snapshot()
        remaining = snap["remaining"]["usd"]
        role_remaining = snap["remaining"]["role_usd"].get(role) if role is not None else None
        fits = all(r is None or usd <= r + _EPS for r in (remaining, role_remaining))
        return {"calls": calls, "per_call_usd": per_call, "usd": usd, "remaining_usd": remaining,
                "role_remaining_usd": role_remaining, "fits": fits}

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __getstate__(self) -> dict[str, Any]:  # picklable: reopened by path, enforcing the stored caps
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"Ledger({self.path!r})"
