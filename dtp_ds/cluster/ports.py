"""Local TCP ports."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on now (a lone process must not collide with other jobs on 29500)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
