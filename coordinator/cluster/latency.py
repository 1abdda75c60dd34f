"""Continuous latency measurement: peers (HTTP and DERP), Postgres and pub/sub, against a limit.

Every replica must sit within 10 ms of every other and of Postgres. Each heartbeat this module
probes every live peer of the region in parallel, records database and pub/sub round trips, keeps a
short window per target (median and p99, so one slow sample raises no alarm), warns when a median
crosses the limit (on change, then at most once a minute), logs recovery, and turns all of it into
coded health findings and Prometheus histograms.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable

import anyio
from prometheus_client import CollectorRegistry, Histogram

from coordinator.core.errors import describe, dial_error
from coordinator.core.health import LATENCY_THRESHOLD, Finding
from coordinator.relay.httpclient import KeepAliveHttp

log = logging.getLogger("coordinator.latency")

WINDOW = 10
JUDGED_AFTER = 3  # samples a median needs before it can raise a warning or a finding
REPEAT_WARNING = 60.0
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Window:
    """The last ``size`` samples of one figure, in seconds."""

    def __init__(self, size: int = WINDOW):
        self.samples: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)

    def clear(self) -> None:
        self.samples.clear()

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def judged(self) -> float | None:
        """The median once the window holds ``JUDGED_AFTER`` samples (one slow sample raises no alarm)."""
        return self.median if len(self.samples) >= JUDGED_AFTER else None

    @property
    def p99(self) -> float | None:
        if not self.samples:
            return None
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


class Alarm:
    """Threshold state of one target: warn on change, repeat at most once a minute, log recovery."""

    def __init__(self, name: str):
        self.name = name
        self.over = False
        self.last_warned = 0.0

    def update(self, median: float | None, limit: float) -> None:
        now = time.monotonic()
        over = median is not None and median > limit
        if median is not None and over and (not self.over or now - self.last_warned >= REPEAT_WARNING):
            log.warning("latency to %s is %.1f ms (median), above the %.0f ms limit", self.name, median * 1e3, limit * 1e3,
                        extra={"peer": self.name})
            self.last_warned = now
        elif not over and self.over and median is not None:
            log.info("latency to %s recovered: %.1f ms (median), within the %.0f ms limit", self.name, median * 1e3, limit * 1e3)
        self.over = over


class HttpPinger:
    """``GET /derp/latency-check`` on a kept-alive connection, so the figure is one request round trip."""

    PATH = "/derp/latency-check"

    def __init__(self, base_url: str, timeout: float):
        self.http = KeepAliveHttp(base_url, timeout)

    async def ping(self) -> float:
        return await self.http.round_trip(self.PATH)

    async def close(self) -> None:
        await self.http.close()


class PeerState:
    def __init__(self, peer, timeout: float):
        self.peer = peer
        self.http = Window()
        self.derp = Window()
        self.pinger = HttpPinger(peer.relay_url, timeout)
        self.error: str | None = None
        self.alarm = Alarm(f"replica {peer.hostname} ({peer.relay_url})")

    def record(self) -> dict:
        ms = lambda v: None if v is None else round(v * 1e3, 3)  # noqa: E731
        return {
            "relay_url": self.peer.relay_url, "hostname": self.peer.hostname,
            "http_ms": ms(self.http.median), "derp_ms": ms(self.derp.median), "p99_ms": ms(self.http.p99),
            "error": self.error,
        }


class LatencyMonitor:
    """Measures, judges and reports; the control plane calls :meth:`measure` once per heartbeat."""

    def __init__(
        self,
        *,
        threshold: float = LATENCY_THRESHOLD,
        peer_timeout: float = 3.0,
        pubsub=None,
        derp_ping: Callable[[str], Awaitable[float | None]] | None = None,
        registry: CollectorRegistry | None = None,
    ):
        self.threshold = threshold
        self.peer_timeout = peer_timeout
        self.pubsub = pubsub
        self.derp_ping = derp_ping  # relay URL -> awaitable RTT seconds, or None without a mesh link
        self.peers: dict[str, PeerState] = {}
        self.database = Window()
        self.pubsub_window = Window()
        self.database_alarm = Alarm("PostgreSQL")
        self.pubsub_alarm = Alarm("the pub/sub (NOTIFY round trip)")
        self.database_error: str | None = None
        self.pubsub_error: str | None = None
        self.registry = registry if registry is not None else CollectorRegistry()
        self.peer_hist = Histogram(
            "coordinator_replica_peer_latency_seconds", "Round trip to a peer replica", ["peer", "kind"],
            buckets=BUCKETS, registry=self.registry,
        )
        self.db_hist = Histogram(
            "coordinator_database_latency_seconds", "Round trip to PostgreSQL", buckets=BUCKETS, registry=self.registry,
        )

    # -- samples ------------------------------------------------------------------------------

    def database_sample(self, seconds: float) -> None:
        """A database round trip (the registry's heartbeat probe)."""
        self.database.add(seconds)
        self.database_error = None
        self.db_hist.observe(seconds)
        self.database_alarm.update(self.database.judged, self.threshold)

    def database_failed(self, error: str) -> None:
        self.database_error = error

    async def measure(self, peers) -> None:
        """Probe every peer (in parallel) and the pub/sub once; update windows, alarms and errors."""
        wanted = {p.relay_url: p for p in peers if p.relay_url}
        for url in list(self.peers):
            if url not in wanted:
                await self.peers.pop(url).pinger.close()
        for url, peer in wanted.items():
            state = self.peers.get(url)
            if state is None:
                self.peers[url] = PeerState(peer, self.peer_timeout)
            else:
                state.peer = peer
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._measure_pubsub)
            for state in self.peers.values():
                tg.start_soon(self._measure_peer, state)

    async def _measure_peer(self, state: PeerState) -> None:
        url = state.peer.relay_url
        try:
            rtt = await state.pinger.ping()
        except (TimeoutError, OSError) as exc:
            state.error = describe(exc)
            state.http.clear()
            return
        state.error = None
        state.http.add(rtt)
        self.peer_hist.labels(peer=url, kind="http").observe(rtt)
        if self.derp_ping is not None:
            with contextlib.suppress(Exception):  # the mesh link reports its own errors
                with anyio.fail_after(self.peer_timeout):
                    rtt_derp = await self.derp_ping(url)
                if rtt_derp is not None:
                    state.derp.add(rtt_derp)
                    self.peer_hist.labels(peer=url, kind="derp").observe(rtt_derp)
        state.alarm.update(state.http.judged, self.threshold)

    async def _measure_pubsub(self) -> None:
        if self.pubsub is None:
            return
        try:
            _, recv = await self.pubsub.measure_latency(timeout=self.peer_timeout)
        except Exception as exc:
            self.pubsub_error = describe(exc)
            return
        self.pubsub_error = None
        self.pubsub_window.add(recv)
        self.pubsub_alarm.update(self.pubsub_window.judged, self.threshold)

    # -- reports ------------------------------------------------------------------------------

    def matrix_row(self) -> dict[str, dict]:
        """This replica's latencies to its peers, keyed by peer id, for the ``replicas`` table."""
        return {str(s.peer.id): s.record() for s in self.peers.values()}

    def peer_error(self) -> str | None:
        """Coder's wording for unreachable peers, for the ``error`` column."""
        failed = [
            f"ping sibling replica {s.peer.hostname} ({s.peer.relay_url}): {s.error}"
            for s in self.peers.values() if s.error
        ]
        return dial_error(failed)

    def findings(self, *, database_ok: bool, pubsub_connected: bool) -> list[Finding]:
        limit = self.threshold * 1e3
        out: list[Finding] = []
        if not database_ok:
            out.append(Finding("EDB01", "error", f"database unreachable: {self.database_error or 'heartbeats failing'}"))
        elif (db := self.database.judged) is not None and db > self.threshold:
            out.append(Finding("EDB02", "warning", f"database slow: {db * 1e3:.1f} ms median round trip (limit {limit:.0f} ms)"))
        for s in sorted(self.peers.values(), key=lambda s: s.peer.relay_url):
            who = f"replica {s.peer.hostname} ({s.peer.relay_url})"
            if s.error:
                out.append(Finding("EDERP01", "error", f"peer unreachable: {who}: {s.error}"))
            elif (peer := s.http.judged) is not None and peer > self.threshold:
                out.append(Finding("EDERP02", "warning", f"peer slow: {who}: {peer * 1e3:.1f} ms median (limit {limit:.0f} ms)"))
        if self.pubsub is not None:
            if not pubsub_connected:
                out.append(Finding("EPS01", "error", "pub/sub disconnected: the LISTEN connection to PostgreSQL is down"))
            elif (ps := self.pubsub_window.judged) is not None and ps > self.threshold:
                out.append(Finding("EPS02", "warning", f"pub/sub slow: {ps * 1e3:.1f} ms median round trip (limit {limit:.0f} ms)"))
        return out

    @property
    def pubsub_median(self) -> float | None:
        return self.pubsub_window.median

    async def close(self) -> None:
        for s in self.peers.values():
            await s.pinger.close()
