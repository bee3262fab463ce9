"""A local autoscaling Ray cluster from a cluster-launcher config (Ray's ``fake_multinode``
provider): the head runs ``ray start --head --autoscaling-config`` and the autoscaler launches
each worker node as a local raylet with its node type's declared resources, and removes it when
idle. Unlike ``ray.cluster_utils.AutoscalingCluster`` (which runs ``ray stop --force`` and so
kills every Ray on the machine, and whose example config is not shipped in the wheel), this one
uses its own port and temp dir and stops only its own processes."""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from selftaught.net import free_port

FAKE_HEAD = "ray.head.default"  # the provider's name for the head node type


def fake_config(launcher: dict[str, Any], idle_timeout_minutes: float | None = None,
                max_workers: dict[str, int] | None = None) -> dict[str, Any]:
    """``launcher`` (a cluster.yaml) for the fake provider: the same node types with the same
    declared resources and min/max workers (``max_workers`` overrides some per type), the same
    global bounds and upscaling speed; the cloud parts (provider, node_config, commands) dropped.
    The autoscaler config itself is :class:`benchmarks.elastic.LocalAutoscalingCluster`'s."""
    from benchmarks.elastic import LocalAutoscalingCluster

    head = launcher["head_node_type"]
    workers = {}
    for name, t in launcher["available_node_types"].items():
        if name == head:
            continue
        # a small object store per node: the raylets share this machine's memory
        workers[name] = {"resources": {**t.get("resources", {}), "object_store_memory": 200 << 20},
                         "min_workers": t.get("min_workers", 0),
                         "max_workers": (max_workers or {}).get(name, t.get("max_workers", 0))}
    head_res = dict(launcher["available_node_types"][head].get("resources", {}))
    idle = idle_timeout_minutes if idle_timeout_minutes is not None else launcher.get("idle_timeout_minutes", 5)
    return LocalAutoscalingCluster(
        workers, head_cpus=head_res.pop("CPU", 0), head_resources=head_res, idle_timeout_minutes=idle,
        upscaling_speed=launcher.get("upscaling_speed", 1.0), max_workers=launcher.get("max_workers"),
        cluster_name=launcher.get("cluster_name", "selftaught")).config(gcs_address="")


class FakeCluster:
    """``with FakeCluster(cfg) as c: ray.init(c.address)``."""

    def __init__(self, config: dict[str, Any], env: dict[str, str] | None = None):
        self.config, self.extra_env = copy.deepcopy(config), dict(env or {})
        self.tmp = Path(tempfile.mkdtemp(prefix="fc-", dir="/tmp"))  # short: Ray's socket paths
        self.port = free_port()
        self.address = ""

    def start(self, timeout_s: float = 90.0) -> "FakeCluster":
        import ray

        ip = ray._private.services.get_node_ip_address()
        self.address = f"{ip}:{self.port}"
        # the provider block (LocalAutoscalingCluster.config) uses node ids as IPs, since every fake
        # node has this machine's IP and the autoscaler would otherwise see no load on any of them
        # and remove busy nodes as idle, and has no updaters: there is nothing to ssh into
        self.config["provider"]["gcs_address"] = self.address
        path = self.tmp / "autoscaling.yaml"
        path.write_text(yaml.safe_dump(self.config))
        head = self.config["available_node_types"][FAKE_HEAD]["resources"]
        res = {k: v for k, v in head.items() if k not in ("CPU", "GPU")}
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", **self.extra_env}
        env.pop("RAY_ADDRESS", None)
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={self.port}",
               f"--autoscaling-config={path}", f"--temp-dir={self.tmp}", f"--num-cpus={head.get('CPU', 0)}",
               f"--num-gpus={head.get('GPU', 0)}", f"--dashboard-agent-listen-port={free_port()}",
               "--include-dashboard=false", "--disable-usage-stats", "--block"]
        if res:
            cmd.append(f"--resources={json.dumps(res)}")
        self.log = open(self.tmp / "ray-start.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        end = time.monotonic() + timeout_s
        while not list(self.tmp.glob("session_*/logs/monitor.log")):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError("the fake cluster's head did not start: "
                                   + (self.tmp / "ray-start.log").read_text()[-3000:])
            time.sleep(0.5)
        return self

    def monitor_log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.tmp.glob("session_*/logs/monitor.log"))

    def shutdown(self) -> None:
        """Stop this cluster's processes only (its head's session, then anything left that runs
        from its temp dir: the worker raylets the autoscaler launched)."""
        if getattr(self, "proc", None) is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        for sig in ("TERM", "KILL"):
            subprocess.run(["pkill", f"-{sig}", "-f", str(self.tmp)], check=False)
            time.sleep(1.0)
        if getattr(self, "log", None):
            self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "FakeCluster":
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.shutdown()
