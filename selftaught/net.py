"""Small networking helpers shared by tests, benchmarks and trainers."""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (for Serve apps and
    torch.distributed rendezvous). The port is free when returned, not reserved: bind it soon."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
