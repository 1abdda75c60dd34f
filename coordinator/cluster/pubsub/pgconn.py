"""Connection options the listener and the publishers share."""

from __future__ import annotations

import math
from typing import Any


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

