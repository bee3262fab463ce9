"""cluster.yaml is valid for Ray's cluster launcher (Ray's own schema; no cloud call)."""
import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_validates_against_ray_launcher_schema(cluster):
    validate_config(copy.deepcopy(cluster))


def test_worker_types_and_bounds(cluster):
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types and types["head"]["resources"].get("CPU") == 0
    gpus = {name: t["resources"].get("GPU", 0) for name, t in types.items()}
    assert sorted(g for g in gpus.values() if g) == [1, 8]
    assert any(t["resources"].get("CPU", 0) > 0 and not t["resources"].get("GPU") for t in types.values())
    total = 0
    for name, t in types.items():
        if name == cluster["head_node_type"]:
            continue
        assert 0 <= t["min_workers"] <= t["max_workers"]
        total += t["min_workers"]
    assert total <= cluster["max_workers"]


def test_setup_installs_this_project(cluster):
    setup = " ".join(cluster["setup_commands"])
    assert "constraints.txt" in setup and "constraints-gpu.txt" in setup and '-e ".[data' in setup
    assert (ROOT / "constraints-gpu.txt").exists()
    pins = [ln for ln in (ROOT / "constraints-gpu.txt").read_text().splitlines() if not ln.startswith("#")]
    assert not any(ln.startswith("torch") for ln in pins)  # vLLM chooses the CUDA torch
    assert cluster["file_mounts"]["/home/ubuntu/selftaught"] == "."


def test_schema_rejects_a_broken_config(cluster):
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_1x"]["max_workers"] = "many"
    with pytest.raises(Exception):
        validate_config(broken)
