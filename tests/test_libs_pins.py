"""The libraries that replaced hand-written code are installed at the versions pyproject pins."""
from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dist", ["ftfy", "datasketch", "math-verify", "tenacity"])
def test_library_pinned_and_installed(dist):
    pins = dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', (ROOT / "pyproject.toml").read_text()))
    assert dist in pins, f"{dist} is not pinned in pyproject.toml"
    assert version(dist) == pins[dist]


def test_free_port_has_one_home():
    from selftaught.net import free_port
    from tests import conftest

    assert conftest.free_port is free_port
    import socket

    port = free_port()
    with socket.socket() as s:  # free right now: binding it works
        s.bind(("127.0.0.1", port))
