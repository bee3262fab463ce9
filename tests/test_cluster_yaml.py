"""cluster.yaml is valid for Ray's cluster launcher (Ray's own schema and config preparation;
no cloud call) and its node types, bounds and setup commands say what docs/cluster.md says."""
import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def prepared(cluster):
    """What `ray up` works from: defaults filled in, setup commands merged per role."""
    cfg = prepare_config(copy.deepcopy(cluster))
    validate_config(cfg)
    return cfg


def pins(name):
    return [ln.strip() for ln in (ROOT / name).read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


def test_validates_against_ray_launcher_schema(cluster, prepared):
    validate_config(copy.deepcopy(cluster))
    assert prepared["provider"]["type"] == "aws"


def test_schema_rejects_a_broken_config(cluster):
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_1x"]["max_workers"] = "many"
    with pytest.raises(Exception):
        validate_config(broken)
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_1x"]["resources"]["GPU"] = 0.5  # must be an integer
    with pytest.raises(Exception):
        validate_config(broken)


def test_node_types_resources_and_bounds(cluster):
    types = cluster["available_node_types"]
    head = cluster["head_node_type"]
    assert head in types and types[head]["resources"].get("CPU") == 0
    gpus = {name: t["resources"].get("GPU", 0) for name, t in types.items()}
    assert sorted(g for g in gpus.values() if g) == [1, 8]
    assert types["gpu_1x"]["resources"]["GPU"] == 1 and types["gpu_8x"]["resources"]["GPU"] == 8
    for name in ("gpu_1x", "gpu_8x"):  # custom resource so jobs can ask for the whole node
        assert types[name]["resources"][name] == 1 and types[name]["resources"]["CPU"] > 0
    assert any(t["resources"].get("CPU", 0) > 0 and not t["resources"].get("GPU")
               for n, t in types.items() if n != head)
    min_total = 0
    for name, t in types.items():
        if name == head:
            continue
        assert isinstance(t["min_workers"], int) and isinstance(t["max_workers"], int)
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cluster["max_workers"], name
        min_total += t["min_workers"]
    assert min_total <= cluster["max_workers"]
    assert cluster["idle_timeout_minutes"] > 0 and cluster["upscaling_speed"] > 0


def test_setup_installs_this_project(cluster, prepared):
    assert cluster["file_mounts"]["/home/ubuntu/selftaught"] == "."
    types = prepared["available_node_types"]
    # Head and CPU workers: CPU torch wheel, constraints.txt, no vLLM.
    for role in ("head_setup_commands", "worker_setup_commands"):
        setup = " ".join(prepared[role])
        assert "python3 -m venv" in setup and "-c constraints.txt -e" in setup, role
        assert "download.pytorch.org/whl/cpu" in setup and "vllm" not in setup, role
    assert "worker_setup_commands" not in types["cpu_worker"]
    # GPU workers: their own list (it replaces the global one), the vllm extra, GPU constraints.
    for name in ("gpu_1x", "gpu_8x"):
        setup = " ".join(types[name]["worker_setup_commands"])
        assert "python3 -m venv" in setup and '-c constraints-gpu.txt -e ".[data,vllm]"' in setup, name
        assert "whl/cpu" not in setup and "constraints.txt" not in setup.replace("constraints-gpu.txt", "")


def test_gpu_constraints_leave_torch_to_vllm():
    gpu, cpu = pins("constraints-gpu.txt"), pins("constraints.txt")
    assert not any(p.startswith("torch") for p in gpu)  # vLLM brings the CUDA torch
    assert any(p.startswith("torch==") for p in cpu)
    assert any(p.startswith("vllm==") for p in gpu)
    for p in cpu:  # every other CPU pin holds on GPU nodes too
        if not p.startswith("torch"):
            assert p in gpu, p


def test_start_commands(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    worker = " ".join(cluster["worker_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker
    for cmd in (head, worker):  # jobs run the venv's python and put run directories on the shared mount
        assert "PATH=$HOME/venv/bin:$PATH" in cmd and "SELFTAUGHT_STORAGE=/mnt/shared/selftaught" in cmd


def test_every_node_mounts_the_shared_storage(prepared):
    types = prepared["available_node_types"]
    roles = [prepared["head_setup_commands"], prepared["worker_setup_commands"],
             *(t["worker_setup_commands"] for t in types.values() if "worker_setup_commands" in t)]
    for cmds in roles:
        assert any("/mnt/shared" in c and "mount -t nfs4" in c for c in cmds)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not available")
def test_every_command_is_valid_shell(prepared):
    """A bare ` #` in an unquoted YAML command starts a comment and silently cuts it."""
    cmds = [c for k in ("head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
                        "worker_start_ray_commands") for c in prepared[k]]
    for t in prepared["available_node_types"].values():
        cmds += t.get("worker_setup_commands", [])
    for c in cmds:
        r = subprocess.run(["bash", "-n", "-c", c], capture_output=True, text=True)
        assert r.returncode == 0, (c, r.stderr)
