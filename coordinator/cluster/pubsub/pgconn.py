"""Connection options and the socket-level abort that the listener and the publishers share."""

from __future__ import annotations

import math
from typing import Any

from coordinator.cluster.db import shut_socket


def connection_kwargs(
    connect_timeout: float, keepalive_idle: int, keepalive_interval: int, keepalive_count: int
) -> dict[str, Any]:
    """libpq options of every pub/sub connection: autocommit, bounded connect, TCP keepalives."""
    return {
        "autocommit": True,
        "connect_timeout": max(2, math.ceil(connect_timeout)),
        "keepalives": 1,
        "keepalives_idle": keepalive_idle,
        "keepalives_interval": keepalive_interval,
        "keepalives_count": keepalive_count,
        # Also bound how long sent data may stay unacknowledged (the kernel then drops the connection).
        "tcp_user_timeout": (keepalive_idle + keepalive_interval * keepalive_count) * 1000,
    }


# A hung statement must not hold up close: shutting its socket makes the pending read return EOF
# at once (psycopg's own cancel would first wait on a server-side cancel, blocking the process).
abort = shut_socket
