"""Budgets of the replica's listener: file descriptors, concurrent connections, accept rate, request heads.

Replicas face clients directly (an L4 load balancer hands raw TCP to them), so no single client may
take what the replica needs itself. :class:`FrontDoor` holds the limits and counters of one listener;
``coordinator.edge.protocol.DerpHttpProtocol`` asks it about every connection. The file descriptors the cap
leaves free are the replica's own: its Postgres pool, mesh links, latency probes and log files.
"""

from __future__ import annotations

import logging
import resource
import socket
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from coordinator.core.errors import ConfigError
from coordinator.core.settings import Settings

log = logging.getLogger("coordinator.frontdoor")

FD_RESERVE_MIN = 128   # fds kept for the replica's own connections, whatever the limit
FD_RESERVE_MAX = 1024


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit; return (and log) the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    log.info("open-file limit (RLIMIT_NOFILE): %d", soft)
    return soft


def fd_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def default_max_connections(limit: int) -> int:
    """Client connections allowed with ``limit`` fds: all but a reserve (a quarter, 128..1024)."""
    reserve = max(FD_RESERVE_MIN, min(FD_RESERVE_MAX, limit // 4))
    return max(16, limit - reserve)


@dataclass
class Limits:
    """What one listener allows; zero means "derived" for max_connections and "unlimited" for the rate."""

    max_connections: int = 0
    accept_rate: float = 0.0          # new connections per second
    accept_burst: int = 0             # tokens the accept bucket holds (0: max(1, rate))
    header_timeout: float = 10.0      # a request head must be complete this soon
    max_request_head: int = 64 * 1024
    head_memory: int = 64 * 1024 * 1024  # bytes all unfinished request heads may hold together

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_connections=settings.max_connections,
            accept_rate=settings.accept_connection_limit,
            accept_burst=settings.accept_connection_burst,
            header_timeout=settings.header_timeout,
            max_request_head=settings.max_request_head,
            head_memory=settings.preauth_memory,
        )


class TokenBucket:
    """``rate`` tokens a second, holding at most ``burst``."""

    def __init__(self, rate: float, burst: float):
        self.rate = rate
        self.burst = max(1.0, burst)
        self.tokens = self.burst
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class FrontDoor:
    """Limits and counters of one listener, shared by all its connections."""

    def __init__(self, limits: Limits | None = None):
        self.limits = limits or Limits()
        self.max_connections = self.limits.max_connections or default_max_connections(fd_limit())
        rate = self.limits.accept_rate
        self.bucket = TokenBucket(rate, self.limits.accept_burst or max(1.0, rate)) if rate > 0 else None
        self.head_bytes = 0   # held by request heads not yet complete, all connections together
        self.counts = dict.fromkeys(
            ("refused_connection_cap", "refused_accept_rate", "head_too_large", "head_timeout", "head_memory_full",
             "pipelined_upgrade_refused"), 0)
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    def admit(self, open_connections: int) -> str | None:
        """None to serve a new connection, else why it is refused (and counted)."""
        if open_connections >= self.max_connections:
            self.counts["refused_connection_cap"] += 1
            return f"connection limit reached ({self.max_connections})"
        if self.bucket is not None and not self.bucket.take():
            self.counts["refused_accept_rate"] += 1
            return "too many new connections"
        return None

    def count(self, what: str) -> None:
        self.counts[what] += 1

    def stats(self) -> dict:
        return {"max_connections": self.max_connections, "head_bytes": self.head_bytes, **self.counts}

    def collect(self):
        """Prometheus view (``/metrics``)."""
        yield GaugeMetricFamily("coordinator_http_max_connections", "client connections allowed at once",
                                value=self.max_connections)
        yield GaugeMetricFamily("coordinator_http_head_bytes", "bytes held by unfinished request heads",
                                value=self.head_bytes)
        refused = CounterMetricFamily("coordinator_http_refused", "connections and requests refused, by reason",
                                      labels=["reason"])
        for reason, n in self.counts.items():
            refused.add_metric([reason], n)
        yield refused


def open_listener(settings: Settings) -> socket.socket:
    """Raise the fd limit and bind the replica's listening socket now: a port in use is one line at start."""
    host, port = settings.listen
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{settings.source('address')} {settings.address}: cannot listen: "
                          f"{exc.strerror or exc}") from None
    sock.setblocking(False)
    raise_fd_limit()
    return sock
