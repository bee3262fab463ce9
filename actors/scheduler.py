"""The research-job scheduler: slots on Ray placement groups, a queue, bounded waits, retries.

A *slot* is a placement group sized for one job (``{"CPU": c, "GPU": g}`` in one bundle,
``STRICT_PACK``: an 8-GPU job starts only when all 8 GPUs of one node are reserved) plus a
long-lived :class:`~actors.sandbox_worker.SandboxWorker` actor inside it, which runs jobs one at
a time and sees exactly the slot's GPUs. Slots are made on demand up to ``max_slots`` per
job shape; a slot whose placement group cannot be placed within ``placement_timeout_s``
is given up (the autoscaler saw the demand meanwhile), and queued jobs wait for busy slots.

Results stream back as they finish (:meth:`Scheduler.results`): the dispatcher thread waits on
every running job at once with ``ray.wait``, so a straggler never holds up the next job.

Failures are sorted by who caused them. The idea's own failures come back from the worker as
``idea_failed`` and are final. Infrastructure failures (the worker actor died, its node was
lost, the placement timed out, a job ran past its hard deadline so its worker was killed) are
retried on a fresh slot up to ``max_infra_retries`` times, then reported as ``infra_failed``.
Every wait is bounded: queueing (``queue_timeout_s``), placement, and each job's run
(its own limits plus ``grace_s``).

Gangs (:meth:`Scheduler.reserve`): one placement group of ``count`` bundles, reserved all or
nothing, whose bundles become slots held until :meth:`Scheduler.release`. RL reserves a whole
rollout group this way (G ideas x GPUs per idea), so a group never starts half-placed while it
waits for the rest of the cluster. A gang slot whose worker dies gets a fresh worker in the same
bundle. :meth:`Scheduler.cancel` stops queued or running jobs (their slots are freed at once).

Every job's slot time is traced (``Scheduler.trace``: start, end, slot, GPUs, how long it waited
for a free slot), which is what utilisation figures are computed from.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from pydantic import Field

from selftaught import metrics
from selftaught.config import Strict

log = logging.getLogger(__name__)


class SchedulerConfig(Strict):
    max_slots: int = Field(default=2, ge=1)  # workers per job shape (0 GPUs, 1 GPU, 8 GPUs ...), gangs aside
    placement_timeout_s: float = Field(default=120.0, gt=0)
    queue_timeout_s: float = Field(default=3600.0, gt=0)  # a job waiting longer fails (infra)
    max_infra_retries: int = Field(default=1, ge=0)
    grace_s: float = Field(default=60.0, ge=0)  # beyond a job's own deadlines before its worker is killed
    idle_shutdown_s: float | None = Field(default=300.0, gt=0)  # slots idle this long are released
    keep_scratch: bool = False


@dataclass
class Job:
    job_id: str
    payload: dict[str, Any]
    cpus: float
    gpus: int
    custom: dict[str, float]
    deadline_s: float  # the longest the worker may take (run + evaluation + grace)
    submitted: float = field(default_factory=time.monotonic)
    enqueued: float = field(default_factory=time.monotonic)  # last time it joined the queue (retries reset it)
    sink: "queue.Queue | None" = None  # where this job's outcome goes (default: the scheduler's own queue)
    tries: int = 0
    refunds: int = 0  # tries given back because the worker was dead before the job reached it
    history: list[str] = field(default_factory=list)
    cancelled: bool = False
    dispatch_s: float = 0.0  # last start: how long it waited while a slot of its shape was free

    @property
    def shape(self) -> tuple:
        return (self.cpus, self.gpus, tuple(sorted(self.custom.items())))


@dataclass
class Slot:
    index: int
    shape: tuple
    pg: Any
    ready_ref: Any
    created: float = field(default_factory=time.monotonic)
    actor: Any = None
    job: Job | None = None
    ref: Any = None
    started: float = 0.0
    idle_since: float = field(default_factory=time.monotonic)
    gang: str | None = None  # the reservation this slot is a bundle of (held until released)
    bundle: int = 0


@dataclass
class JobOutcome:
    job_id: str
    outcome: dict[str, Any]
    tries: int
    queued_s: float


class Scheduler:
    """Runs research jobs on sandbox-worker slots. Thread-safe ``submit``; ``results`` streams."""

    def __init__(self, cfg: SchedulerConfig | None = None):
        import ray

        if not ray.is_initialized():
            raise RuntimeError("start Ray first (selftaught.runtime.init_ray)")
        self.cfg = cfg or SchedulerConfig()
        self._lock = threading.RLock()  # re-entrant: emits happen while slots are updated
        self._pending: deque[Job] = deque()
        self._slots: list[Slot] = []
        self._done: "queue.Queue[JobOutcome]" = queue.Queue()
        self._next_slot = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.stats = {"submitted": 0, "finished": 0, "infra_retries": 0, "slots_created": 0, "slots_lost": 0,
                      "busy_s": 0.0, "placement_timeouts": 0, "cancelled": 0}
        self._gangs: dict[str, Any] = {}  # name -> placement group
        self.trace: deque[dict[str, Any]] = deque(maxlen=200_000)  # one row per job run on a slot
        self._published = (0, 0, 0)  # running, queued, slots: this scheduler's share of the gauges
        self._publish_metrics(force=True)
        self._thread = threading.Thread(target=self._loop, name="research-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public
    def submit(self, job_id: str, payload: dict[str, Any], cpus: float = 1.0, gpus: int = 0,
               custom: dict[str, float] | None = None, deadline_s: float = 600.0,
               sink: "queue.Queue | None" = None) -> str:
        """Queue a job. Its outcome goes to ``sink`` when given (several environments can share
        one scheduler, each reading its own queue), else to :meth:`results` / :meth:`get`."""
        job = Job(job_id, payload, float(cpus), int(gpus), dict(custom or {}), float(deadline_s), sink=sink)
        with self._lock:
            self._pending.append(job)
            self.stats["submitted"] += 1
        self._wake.set()
        return job_id

    def reserve(self, name: str, count: int, cpus: float = 1.0, gpus: int = 0,
                custom: dict[str, float] | None = None, strategy: str = "PACK") -> None:
        """Reserve ``count`` slots of one shape as a gang: one placement group, placed all or
        nothing (``strategy`` as Ray's: PACK, SPREAD, STRICT_SPREAD). Jobs of that shape use
        its slots first. :meth:`wait_reserved` waits for it; :meth:`release` gives it back."""
        from ray.util.placement_group import placement_group

        if count < 1:
            raise ValueError("a gang needs at least one slot")
        bundle = {"CPU": float(cpus), **({"GPU": int(gpus)} if gpus else {}), **(custom or {})}
        shape = (float(cpus), int(gpus), tuple(sorted((custom or {}).items())))
        with self._lock:
            if name in self._gangs:
                raise ValueError(f"gang {name!r} is already reserved")
            pg = placement_group([bundle] * count, strategy=strategy, name=f"selftaught-gang-{name}")
            self._gangs[name] = pg
            for i in range(count):
                self._slots.append(Slot(self._next_slot, shape, pg, pg.ready(), gang=name, bundle=i))
                self._next_slot += 1
                self.stats["slots_created"] += 1
        self._wake.set()

    def wait_reserved(self, name: str, timeout_s: float) -> float:
        """Seconds until gang ``name`` was placed and every one of its slots has a worker;
        TimeoutError (with what it needs and what the cluster has) after ``timeout_s``."""
        import ray

        t0 = time.monotonic()
        pg = self._gangs[name]
        try:
            ray.get(pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            need = pg.bundle_specs
            total: dict[str, float] = {}
            for b in need:
                for k, v in b.items():
                    total[k] = total.get(k, 0.0) + v
            raise TimeoutError(f"gang {name!r} ({len(need)} x {need[0]}, {total} in all) was not placed within "
                               f"{timeout_s:.0f}s; the cluster has {ray.cluster_resources()}") from None
        while time.monotonic() - t0 < timeout_s:
            with self._lock:
                if all(s.actor is not None for s in self._slots if s.gang == name):
                    return time.monotonic() - t0
            time.sleep(0.05)
        raise TimeoutError(f"gang {name!r}: workers not started within {timeout_s:.0f}s")

    def release(self, name: str) -> None:
        """Give gang ``name``'s reservation back (its idle workers are stopped; a job still
        running on one of its slots is cancelled)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        with self._lock:
            pg = self._gangs.pop(name, None)
            mine = [s for s in self._slots if s.gang == name]
            busy = [s.job.job_id for s in mine if s.job is not None]
        if busy:
            self.cancel(busy)
        with self._lock:
            for s in mine:
                if s in self._slots:
                    self._slots.remove(s)
        for s in mine:
            if s.actor is not None:
                ray.kill(s.actor, no_restart=True)
        if pg is not None:
            remove_placement_group(pg)

    def cancel(self, job_ids: Sequence[str], reason: str = "cancelled") -> int:
        """Stop these jobs, queued or running (a running job's worker is killed and its slot
        freed). Each gets an ``infra_failed`` outcome with stage ``cancelled``; returns how many
        were found."""
        want, n = set(job_ids), 0
        with self._lock:
            for j in [j for j in self._pending if j.job_id in want]:
                self._pending.remove(j)
                j.cancelled = True
                self._emit(j, {"status": "infra_failed", "stage": "cancelled", "error": reason})
                n += 1
            running = [s for s in self._slots if s.job is not None and s.job.job_id in want]
            for s in running:
                s.job.cancelled = True
            self.stats["cancelled"] += n + len(running)
        for s in running:
            self._lose_slot(s, reason, outcome={"status": "infra_failed", "stage": "cancelled", "error": reason})
        return n + len(running)

    def results(self, timeout_s: float | None = None) -> Iterator[JobOutcome]:
        """Outcomes as they finish, until ``timeout_s`` passes with nothing left to wait for
        or nothing arriving."""
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return
            try:
                yield self._done.get(timeout=min(left, 0.5) if left is not None else 0.5)
            except queue.Empty:
                if self.idle() and self._done.empty():
                    return

    def get(self, timeout_s: float | None = None) -> JobOutcome | None:
        try:
            return self._done.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def idle(self) -> bool:
        with self._lock:
            return not self._pending and all(s.job is None for s in self._slots)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending) + sum(1 for s in self._slots if s.job is not None)

    def utilisation(self) -> dict[str, Any]:
        with self._lock:
            return {**self.stats, "slots": len(self._slots), "busy": sum(1 for s in self._slots if s.job),
                    "queued": len(self._pending), "gangs": {g: sum(1 for s in self._slots if s.gang == g)
                                                            for g in self._gangs}}

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        with self._lock:
            for s in self._slots:
                if s.actor is not None:
                    ray.kill(s.actor, no_restart=True)
                try:
                    remove_placement_group(s.pg)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            self._slots.clear()
            gangs, self._gangs = list(self._gangs.values()), {}
        self._publish_metrics(gone=True)
        for pg in gangs:
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001
                pass

    # ------------------------------------------------------------------ the dispatcher
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:  # noqa: BLE001 - never let the dispatcher die silently
                log.exception("scheduler step failed")
                time.sleep(0.5)

    def _step(self) -> None:
        import ray

        self._place()
        self._publish_metrics()
        with self._lock:
            running = {s.ref: s for s in self._slots if s.ref is not None}
            readying = {s.ready_ref: s for s in self._slots if s.actor is None}
        refs = list(running) + list(readying)
        if not refs:
            self._wake.wait(timeout=0.2)
            self._wake.clear()
            self._expire_queue()
            self._release_idle()  # an idle scheduler too gives its slots (and their nodes) back
            return
        # short: a job submitted meanwhile waits for this call to return before it is placed
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0.02)
        now = time.monotonic()
        for ref in ready:
            if ref in running:
                self._finish(running[ref], ref)
            elif ref in readying:
                self._slot_ready(readying[ref])
        with self._lock:
            slots = list(self._slots)
        for s in slots:
            if s.actor is None and s.gang is None and now - s.created > self.cfg.placement_timeout_s:
                self._placement_timeout(s)
            elif s.job is not None and now - s.started > s.job.deadline_s + self.cfg.grace_s:
                log.warning("job %s ran past its hard deadline: killing its worker", s.job.job_id)
                self._lose_slot(s, "worker did not return before the job's hard deadline")
        self._expire_queue()
        self._release_idle()

    def _place(self) -> None:
        """Give queued jobs to idle slots of their shape; make slots where allowed."""
        from ray.util.placement_group import placement_group

        with self._lock:
            for job in list(self._pending):
                # a gang's slots first: they are held anyway
                idle = min((s for s in self._slots if s.shape == job.shape and s.actor is not None and s.job is None),
                           key=lambda s: s.gang is None, default=None)
                if idle is not None:
                    self._pending.remove(job)
                    self._start(idle, job)
                    continue
                same = [s for s in self._slots if s.shape == job.shape]
                waiting = sum(1 for j in self._pending if j.shape == job.shape)
                spare = sum(1 for s in same if s.job is None)
                if len(same) < self.cfg.max_slots and spare < waiting:
                    bundle = {"CPU": job.cpus, **({"GPU": job.gpus} if job.gpus else {}), **job.custom}
                    pg = placement_group([bundle], strategy="STRICT_PACK")
                    slot = Slot(self._next_slot, job.shape, pg, pg.ready())
                    self._next_slot += 1
                    self._slots.append(slot)
                    self.stats["slots_created"] += 1

    def _slot_ready(self, slot: Slot) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from actors.sandbox_worker import sandbox_worker_class

        cpus, gpus, custom = slot.shape
        strategy = PlacementGroupSchedulingStrategy(placement_group=slot.pg, placement_group_bundle_index=slot.bundle)
        actor = sandbox_worker_class().options(
            num_cpus=cpus, num_gpus=gpus, resources=dict(custom) or None, scheduling_strategy=strategy,
            max_restarts=0, max_concurrency=2,
        ).remote(slot.index, self.cfg.keep_scratch)
        with self._lock:
            slot.actor = actor
            slot.idle_since = time.monotonic()
        self._wake.set()

    def _start(self, slot: Slot, job: Job) -> None:
        job.tries += 1
        now = time.monotonic()
        # how long the job waited although this slot was free (the dispatcher's own overhead)
        job.dispatch_s = now - max(job.enqueued, slot.idle_since)
        slot.job, slot.started = job, now
        slot.ref = slot.actor.run.remote(job.payload)

    def _trace(self, slot: Slot, status: str, outcome: dict[str, Any] | None = None) -> None:
        job, now = slot.job, time.monotonic()
        wall = time.time()
        self.trace.append({"job_id": job.job_id, "slot": slot.index, "gang": slot.gang, "gpus": job.gpus,
                           "cpus": job.cpus, "start": wall - (now - slot.started), "end": wall, "status": status,
                           "dispatch_s": job.dispatch_s, "try": job.tries,
                           "run_s": ((outcome or {}).get("resources") or {}).get("run_s")})

    def _finish(self, slot: Slot, ref) -> None:
        import ray

        with self._lock:
            if slot.ref is not ref:  # cancelled (or lost) by another thread meanwhile
                return
            job = slot.job
        try:
            outcome = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - actor died, node lost, object lost
            if job is not None and time.monotonic() - slot.started < 0.5 and job.refunds < 3:
                # the worker was already dead when the job reached it (it died idle): that try
                # never ran, so it does not count against the job's retries
                job.tries -= 1
                job.refunds += 1
            self._lose_slot(slot, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return
        if outcome.get("status") == "infra_failed":
            # the worker's own trouble (its disk, its node's data): retry on a fresh slot
            self._lose_slot(slot, outcome.get("error", "infra failure"), outcome=outcome)
            return
        # Hand the outcome on before freeing the slot, so that at no moment the scheduler
        # looks idle while an outcome is still in flight.
        self._trace(slot, outcome.get("status", "?"), outcome)
        self._emit(job, outcome)
        with self._lock:
            self.stats["busy_s"] += time.monotonic() - slot.started
            slot.job, slot.ref, slot.idle_since = None, None, time.monotonic()
        self._wake.set()

    def _lose_slot(self, slot: Slot, reason: str, outcome: dict[str, Any] | None = None) -> None:
        """A slot whose worker died, hung or failed on its own: release it; its job is retried
        on a fresh slot (bounded), else reported as an infrastructure failure."""
        import ray
        from ray.util.placement_group import remove_placement_group

        with self._lock:
            job = slot.job
            if job is not None:
                self._trace(slot, "cancelled" if job.cancelled else "lost")
                if job.cancelled:
                    self._emit(job, outcome or {"status": "infra_failed", "stage": "cancelled", "error": reason})
                elif job.tries <= self.cfg.max_infra_retries:
                    self._retry(job, reason)
                else:
                    self._emit(job, outcome or {"status": "infra_failed", "stage": "worker", "error": reason})
            actor = slot.actor
            if slot.gang is not None and slot.gang in self._gangs:
                # a gang's bundle stays reserved: a fresh worker is started in it (Ray moves the
                # bundle to another node if its node is gone)
                slot.job, slot.ref, slot.actor = None, None, None
                slot.ready_ref, slot.created, slot.idle_since = slot.pg.ready(), time.monotonic(), time.monotonic()
                keep_pg = True
            else:
                if slot in self._slots:
                    self._slots.remove(slot)
                keep_pg = False
            self.stats["slots_lost"] += 1
        if actor is not None:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        if not keep_pg:
            try:
                remove_placement_group(slot.pg)
            except Exception:  # noqa: BLE001
                pass
        self._wake.set()

    def _retry(self, job: Job, reason: str) -> None:
        log.warning("job %s: infrastructure failure (%s); retrying on another slot", job.job_id, reason)
        job.history.append(reason)
        job.enqueued = time.monotonic()
        metrics.INFRA_RETRIES.inc()
        with self._lock:
            self.stats["infra_retries"] += 1
            self._pending.appendleft(job)
        self._wake.set()

    def _placement_timeout(self, slot: Slot) -> None:
        from ray.util.placement_group import remove_placement_group

        cpus, gpus, custom = slot.shape
        need = {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **dict(custom)}
        with self._lock:
            if slot in self._slots:
                self._slots.remove(slot)
            self.stats["placement_timeouts"] += 1
            ready = [s for s in self._slots if s.shape == slot.shape and s.actor is not None]
            stranded = [j for j in self._pending if j.shape == slot.shape] if not ready else []
            for j in stranded:
                self._pending.remove(j)
                self._emit(j, {"status": "infra_failed", "stage": "placement",
                               "error": f"no node could hold {need} within {self.cfg.placement_timeout_s:.0f}s"})
        try:
            remove_placement_group(slot.pg)
        except Exception:  # noqa: BLE001
            pass

    def _expire_queue(self) -> None:
        now = time.monotonic()
        with self._lock:
            for j in [j for j in self._pending if now - j.enqueued > self.cfg.queue_timeout_s]:
                self._pending.remove(j)
                self._emit(j, {"status": "infra_failed", "stage": "queue",
                               "error": f"waited more than {self.cfg.queue_timeout_s:.0f}s for a slot"})

    def _release_idle(self) -> None:
        if self.cfg.idle_shutdown_s is None:
            return
        import ray
        from ray.util.placement_group import remove_placement_group

        now = time.monotonic()
        with self._lock:
            if self._pending:
                return
            idle = [s for s in self._slots if s.job is None and s.actor is not None and s.gang is None
                    and now - s.idle_since > self.cfg.idle_shutdown_s]
            for s in idle:
                self._slots.remove(s)
        for s in idle:
            ray.kill(s.actor, no_restart=True)
            remove_placement_group(s.pg)

    def _emit(self, job: Job, outcome: dict[str, Any]) -> None:
        outcome = {**outcome, "infra_history": list(job.history), "dispatch_s": job.dispatch_s}
        metrics.JOBS_FINISHED.inc(1, {"status": outcome.get("status", "?")})
        with self._lock:
            self.stats["finished"] += 1
        (job.sink or self._done).put(JobOutcome(job.job_id, outcome, job.tries, time.monotonic() - job.submitted))

    def _publish_metrics(self, force: bool = False, gone: bool = False) -> None:
        """Jobs running, jobs queued and slots held, as this scheduler's share of the process's
        gauges (added, not set: two schedulers in one process sum); ``gone`` takes it back."""
        with self._lock:
            now = (0, 0, 0) if gone else (sum(1 for s in self._slots if s.job is not None), len(self._pending),
                                          len(self._slots))
            old, self._published = self._published, now
        for gauge, n, o in zip((metrics.JOBS_RUNNING, metrics.JOBS_QUEUED, metrics.SCHEDULER_SLOTS), now, old):
            if force or n != o:
                gauge.add(n - o)
