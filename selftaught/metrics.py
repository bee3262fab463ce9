"""Our own metrics on Ray's metrics pipeline (``ray.util.metrics``), so the Ray dashboard and
Prometheus/Grafana show generation, scheduling and spending next to Ray's own metrics.

Why a layer of our own:

- The engine and the trainer core also run without Ray (a GPU box with only torch, a unit
  test): every call here is a no-op unless Ray is imported *and* initialised in this process
  (a driver after ``ray.init``, or any Ray worker). Ray is never imported from here, so code
  that does not use Ray pays nothing and needs no Ray installed.
- Ray metric objects must be created inside the process that records them (an actor's
  process, not the driver that defined the class): each one is made lazily, once per process,
  on its first record.
- Recording must never break the caller: a failed record is logged once and dropped.
- Ray's exporter forgets a gauge value that is not recorded again within two report intervals
  (``RAY_metrics_report_interval_ms``, 10 s by default), so an idle queue would vanish from
  the dashboard instead of reading 0: each process re-records its gauges' last values from
  one daemon thread, at that interval.

Names are prefixed ``selftaught_``; Ray's exporter puts ``ray_`` in front and ``_total`` after
a counter's name (``ray_selftaught_generated_tokens_total``). Tag keys (label names) used:

- ``model``: the engine's model name or path; ``kind``: who served a generation request
  (``actor``: a generator actor of an :class:`~actors.generator.EnginePool`, ``batch``: a Ray
  Data ``GenerateBatch`` pool, ``serve``: an :class:`~actors.engine.runner.EngineLoop` of a
  Serve replica).
- ``status``: ``ok`` / ``idea_failed`` / ``infra_failed`` (jobs and ideas); ``env``: the
  research environment's name.
- ``role``: the LLM role of a ledger entry (``ideator``, ``judge`` ...); ``result``: ``paid``
  / ``cache_hit`` / ``error``; ``ledger``: the run directory holding the ledger file.

Ray adds its own labels on export (node address, session, and for worker processes the
worker id), so one gauge recorded by several actors stays several series.

See ``docs/observability.md`` for every metric and how to view them.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

log = logging.getLogger(__name__)

PREFIX = "selftaught_"
# Seconds: from a one-token reply on a GPU to a long CPU batch.
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


def ray_active() -> bool:
    """Ray is imported and initialised in this process (a driver after ``ray.init``, or a worker)."""
    ray = sys.modules.get("ray")  # never import Ray here: without it, metrics are simply off
    if ray is None:
        return False
    try:
        return bool(ray.is_initialized())
    except Exception:  # noqa: BLE001 - a half-imported or broken Ray counts as none
        return False


class _Metric:
    """One named metric; the Ray object behind it is created on first use in each process."""

    _ray_type = ""

    def __init__(self, name: str, description: str, tag_keys: Sequence[str] = (), **kw: Any):
        self.name = name if name.startswith(PREFIX) else PREFIX + name
        self.description, self.tag_keys, self._kw = description, tuple(tag_keys), kw
        self._impl: Any = None
        self._pid = -1
        self._lock = threading.RLock()
        self._failed = False

    def _get(self) -> Any:
        if not ray_active():
            return None
        if self._impl is None or self._pid != os.getpid():  # a forked child makes its own
            with self._lock:
                if self._impl is None or self._pid != os.getpid():
                    try:
                        from ray.util import metrics as ray_metrics
                    except ImportError:
                        return None
                    self._impl = getattr(ray_metrics, self._ray_type)(
                        self.name, description=self.description, tag_keys=self.tag_keys, **self._kw)
                    self._pid = os.getpid()
        return self._impl

    def _record(self, method: str, value: float, tags: Mapping[str, Any] | None) -> None:
        try:
            impl = self._get()
            if impl is not None:
                getattr(impl, method)(float(value), tags={k: str(v) for k, v in (tags or {}).items()})
        except Exception as e:  # noqa: BLE001 - metrics never break the code they observe
            if not self._failed:
                self._failed = True
                log.warning("metric %s: recording failed (%s); further failures are not logged", self.name, e)


class Counter(_Metric):
    """Monotonic count (requests, tokens, dollars); Prometheus gets ``<name>_total``."""

    _ray_type = "Counter"

    def inc(self, value: float = 1.0, tags: Mapping[str, Any] | None = None) -> None:
        if value > 0:  # Ray refuses increments <= 0; nothing happened anyway
            self._record("inc", value, tags)


class Gauge(_Metric):
    """Last value wins (queue depth, jobs running, dollars so far); kept alive (see the top)."""

    _ray_type = "Gauge"

    def __init__(self, name: str, description: str, tag_keys: Sequence[str] = ()):
        super().__init__(name, description, tag_keys)
        self._last: dict[tuple, float] = {}  # tags -> last value set in this process

    def set(self, value: float, tags: Mapping[str, Any] | None = None) -> None:
        self._update(tags, lambda _: float(value))

    def add(self, delta: float, tags: Mapping[str, Any] | None = None) -> None:
        """Move this process's value by ``delta``: several owners in one process (two schedulers,
        concurrent engine calls) each add their share instead of overwriting each other."""
        self._update(tags, lambda old: old + delta)

    def _update(self, tags: Mapping[str, Any] | None, fn: Any) -> None:
        if not ray_active():
            return
        key = tuple(sorted((tags or {}).items()))
        with self._lock:  # re-entrant: _record takes it too; ordered records, no lost updates
            value = self._last[key] = fn(self._last.get(key, 0.0))
            self._record("set", value, tags)
        _keep_alive(self)

    def _refresh(self) -> None:
        with self._lock:  # never after (so over) a newer value
            for tags, value in self._last.items():
                self._record("set", value, dict(tags))


_live: list[Gauge] = []
_live_lock = threading.Lock()
_refresher_pid = -1


def _keep_alive(g: Gauge) -> None:
    """Start (once per process) the thread that re-records every gauge set here."""
    global _refresher_pid
    with _live_lock:
        if g not in _live:
            _live.append(g)
        if _refresher_pid == os.getpid():
            return
        _refresher_pid = os.getpid()
    threading.Thread(target=_refresh_loop, name="selftaught-metrics", daemon=True).start()


def _refresh_loop() -> None:
    while True:
        try:
            import ray

            interval = max(ray._config.metrics_report_interval_ms(), 1000) / 1000.0
        except Exception:  # noqa: BLE001 - a Ray without that config: Ray's default
            interval = 10.0
        time.sleep(interval)
        if not ray_active():
            continue
        with _live_lock:
            gauges = list(_live)
        for g in gauges:
            g._refresh()


class Histogram(_Metric):
    """Distribution in fixed buckets (latencies); Prometheus gets ``_bucket``, ``_sum``, ``_count``."""

    _ray_type = "Histogram"

    def __init__(self, name: str, description: str, tag_keys: Sequence[str] = (),
                 boundaries: Sequence[float] = LATENCY_BUCKETS_S):
        super().__init__(name, description, tag_keys, boundaries=list(boundaries))

    def observe(self, value: float, tags: Mapping[str, Any] | None = None) -> None:
        self._record("observe", value, tags)


@contextmanager
def engine_call(model: str, kind: str, requests: int) -> Iterator[Callable[[Sequence[Any]], None]]:
    """Around one batch call of an engine: in-flight requests up for its duration, its latency,
    and, through the function it yields (given the call's outputs), requests served and
    completion tokens generated. Outputs without ``completions`` (a failed row) are skipped."""
    tags = {"model": model, "kind": kind}
    ENGINE_INFLIGHT.add(requests, tags)
    t0 = time.monotonic()

    def served(outputs: Sequence[Any]) -> None:
        if not ray_active():
            return
        try:
            done = [o for o in outputs if hasattr(o, "completions")]
            ENGINE_REQUESTS.inc(len(done), tags)
            GENERATED_TOKENS.inc(sum(len(c.token_ids) for o in done for c in o.completions), tags)
        except Exception:  # noqa: BLE001 - metrics never break the code they observe
            log.debug("engine metrics: could not count outputs", exc_info=True)

    try:
        yield served
    finally:
        ENGINE_INFLIGHT.add(-requests, tags)
        ENGINE_BATCH_LATENCY.observe(time.monotonic() - t0, tags)


# ---------------------------------------------------------------------------- the metrics
# generation (actors/generator.py, actors/engine/runner.py)
ENGINE_REQUESTS = Counter("engine_requests", "Generation requests (prompts) answered by an engine",
                          ("model", "kind"))
GENERATED_TOKENS = Counter("generated_tokens", "Completion tokens generated (rate() of it is tokens/s)",
                           ("model", "kind"))
ENGINE_BATCH_LATENCY = Histogram("engine_batch_latency_s", "Seconds to answer one batch call of a "
                                 "generator actor or one Ray Data batch", ("model", "kind"))
ENGINE_INFLIGHT = Gauge("engine_inflight_requests", "Requests inside a generator actor's or Ray Data "
                        "batch's engine call right now", ("model", "kind"))
ENGINE_QUEUE_DEPTH = Gauge("engine_queue_depth", "Requests an EngineLoop (Serve replica) has admitted "
                           "and not finished: queued plus running", ("model", "kind"))
# research jobs (actors/scheduler.py)
JOBS_RUNNING = Gauge("jobs_running", "Research jobs running on a sandbox-worker slot")
JOBS_QUEUED = Gauge("jobs_queued", "Research jobs waiting for a slot")
SCHEDULER_SLOTS = Gauge("scheduler_slots", "Sandbox-worker slots (placement groups) held, busy or idle")
JOBS_FINISHED = Counter("jobs_finished", "Research jobs finished, by status", ("status",))
INFRA_RETRIES = Counter("job_infra_retries", "Research jobs retried after an infrastructure failure")
# ideas (envs/base.py)
IDEAS_EVALUATED = Counter("ideas_evaluated", "Ideas whose result an environment delivered, by status",
                          ("env", "status"))
# money (selftaught/ledger.py)
LLM_CALLS = Counter("llm_calls", "LLM calls recorded in a cost ledger, by role and result "
                    "(paid, cache_hit, error)", ("role", "result"))
LLM_COST_USD = Counter("llm_cost_usd", "Dollars paid for LLM calls by this process, by role", ("role",))
LLM_SPENT_USD = Gauge("llm_spent_usd", "Dollars spent so far per role according to the ledger file "
                      "(includes earlier runs of the same run directory)", ("role", "ledger"))
