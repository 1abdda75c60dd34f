"""Connection options and the socket-level abort that the listener and the publishers share."""

from __future__ import annotations

import math
import os
import socket
from typing import Any

import psycopg


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


def abort(conn: psycopg.AsyncConnection) -> None:
    """Shut the connection's socket so whatever waits on it fails now.

    Cancelling psycopg mid-query would first try a server-side cancel and wait for it, which on a
    half-open connection takes many seconds; a shut socket makes the pending read return EOF at once.
    """
    try:
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    except (OSError, psycopg.Error):
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()
