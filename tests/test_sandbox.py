"""The sandbox on its own (no Ray): a clean environment, its own loopback and shared memory,
read-only system and code views, and the limits both with cgroups and with the rlimit and
watchdog fallback used where a node has no writable cgroups."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from actors.sandbox import Limits, Mount, Sandbox, check_env_name, make_private_dir


@pytest.fixture
def sb():
    box = Sandbox()
    yield box
    box.close()


@pytest.fixture
def job(tmp_path: Path, sb) -> Path:
    return make_private_dir(tmp_path / "job", sb.uid)


def _py(sb: Sandbox, job: Path, code: str, **kw) -> object:
    limits = Limits(**{"wall_s": 10, "memory_mb": 256, "max_processes": 32, "output_limit_mb": 1, **kw.pop("limits", {})})
    return sb.run(["python", "-c", code], job, limits=limits, **kw)


def test_environment_is_built_from_scratch(sb, job, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-never-inside")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    out = _py(sb, job, "import os, json; print(json.dumps(dict(os.environ)))", env={"SEED": "3"})
    assert out.ok, out.stderr_tail
    assert "sk-test-never-inside" not in out.stdout_tail and "RAY_ADDRESS" not in out.stdout_tail
    assert '"SEED": "3"' in out.stdout_tail and '"HOME": "/tmp"' in out.stdout_tail
    with pytest.raises(ValueError, match="credential"):
        check_env_name("HF_TOKEN")


def test_loopback_shm_and_read_only_views(sb, job, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.txt").write_text("hello")
    os.chmod(data, 0o755)
    code = """
import os, socket
open('/dev/shm/a', 'w').write('1')
s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); socket.create_connection(s.getsockname()).close()
print(open('/data/x.txt').read())
for p in ('/data/y', '/usr/z', '/job/ok'):
    try:
        open(p, 'w').write('1'); print('wrote', p)
    except OSError as e:
        print('refused', p)
print('uid', os.getuid())
"""
    out = _py(sb, job, code, mounts=[Mount(str(data), "/data")])
    assert out.ok, out.stderr_tail
    assert "hello" in out.stdout_tail and "refused /data/y" in out.stdout_tail and "refused /usr/z" in out.stdout_tail
    assert "wrote /job/ok" in out.stdout_tail
    if os.geteuid() == 0:
        assert f"uid {sb.uid}" in out.stdout_tail
    ro = sb.run(["python", "-c", "open('/job/nope', 'w')"], job, limits=Limits(wall_s=10), workdir_writable=False)
    assert ro.rc != 0 and "Read-only" in ro.stderr_tail


@pytest.mark.parametrize("cgroups", [True, False])
def test_limits_with_and_without_cgroups(sb, job, cgroups):
    sb.use_cgroups = cgroups
    mem = _py(sb, job, "a = []\nwhile True: a.append(bytearray(32 * 2**20))")
    assert mem.killed == "memory" or (not cgroups and mem.rc != 0 and "MemoryError" in mem.stderr_tail), mem
    slow = _py(sb, job, "import time; time.sleep(60)", limits={"wall_s": 1.5})
    assert slow.killed == "deadline" and slow.seconds < 8
    flood = _py(sb, job, "while True: print('x' * 4096)")
    assert flood.killed == "output" and flood.output_bytes >= 2**20
    procs = _py(sb, job, "import os, time\nfor _ in range(100):\n    os.fork() == 0 and time.sleep(30)\n",
                limits={"wall_s": 4, "max_processes": 16})
    assert not procs.ok
    assert (sb.use_cgroups and procs.limits_by.startswith("cgroup")) or procs.limits_by == "rlimit"
    ok = _py(sb, job, "print('fine')")
    assert ok.ok and ok.stdout_tail.strip() == "fine"


def test_keyrings_and_kernel_interfaces_are_refused(sb, job):
    """Kernel keyrings are per-uid state that would outlive a job (a channel to the next one)."""
    code = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
calls = {"add_key": 248, "keyctl": 250, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323}
if os.uname().machine == "aarch64":
    calls = {"add_key": 217, "keyctl": 219, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282}
for name, nr in calls.items():
    r = libc.syscall(nr, 0, 0, 0, 0, 0)
    print(name, r, ctypes.get_errno())
"""
    out = _py(sb, job, code)
    assert out.ok, out.stderr_tail
    for line in out.stdout_tail.strip().splitlines():
        name, r, errno = line.split()
        assert r == "-1" and errno == "1", line  # EPERM from the filter


def test_uids_are_leased_one_per_sandbox():
    boxes = [Sandbox() for _ in range(3)]
    try:
        if os.geteuid() == 0:
            assert len({b.uid for b in boxes}) == 3
    finally:
        for b in boxes:
            b.close()


@pytest.mark.gpu
def test_sandboxed_job_sees_only_its_gpu(sb, job):
    """On a GPU node: a job assigned GPU 0 sees exactly one CUDA device and can use it."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out = sb.run(["python", "-c", "import torch; x = torch.ones(256, 256, device='cuda'); "
                  "print(torch.cuda.device_count(), float((x @ x).sum()))"], job,
                 limits=Limits(wall_s=120, memory_mb=16384, max_processes=512), gpus=[0])
    assert out.ok, out.stderr_tail
    assert out.stdout_tail.split()[0] == "1"
