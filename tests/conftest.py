"""Shared test fixtures: offline mode, one Ray cluster per session, a tmp run directory."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One embedded Ray for the whole session. Logical CPUs exceed the 2 real cores so that
    small actor pools and the tasks feeding them can coexist (Ray does not oversubscribe
    by itself)."""
    import ray

    from selftaught.config import RayConfig
    from selftaught.runtime import init_ray

    init_ray(RayConfig(num_cpus=4, temp_dir=os.environ.get("SELFTAUGHT_TEST_RAY_TMP")))
    yield ray
    ray.shutdown()
