"""Prometheus metrics: what a replica exports, and the token-free listener Coder calls
``CODER_PROMETHEUS_ADDRESS``.

The operator API serves the same text at ``/metrics`` with the token; :class:`PrometheusListener`
serves it on its own address without one, for scrapers (bind it where only they can reach it).
Names follow Prometheus conventions: base units last (``_seconds``, ``_bytes``), counters end in
``_total`` (prometheus_client appends it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import CollectorRegistry, ProcessCollector, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from coordinator.relay.dataplane import DerpRelay

log = logging.getLogger("coordinator.prometheus")
disable_created_metrics()  # no x_created series beside every counter: process_start_time_seconds says it once

GAUGES = {"current_connections", "current_home_connections", "clients_local", "clients_remote", "watchers", "duplicate_keys",
          "mesh_links_congested", "senders_paused", "admission_pending"}
# Relay counters whose stats() key does not make a conventional name (unit last).
COUNTER_NAMES = {
    "packets_in": "received_packets", "packets_out": "sent_packets",
    "bytes_in": "received_bytes", "bytes_out": "sent_bytes",
    "forwarded_in": "forwarded_in_packets", "forwarded_out": "forwarded_out_packets",
}
MAX_REQUEST = 8192  # bytes of request line and headers a scraper may send
REQUEST_TIMEOUT = 5.0


class RelayCollector:
    """The relay's counters as Prometheus metrics, read at scrape time."""

    def __init__(self, relay: DerpRelay):
        self.relay = relay

    def collect(self):
        stats = self.relay.stats()
        for name, value in stats.items():
            if isinstance(value, dict):
                continue
            doc = f"DERP relay: {name.replace('_', ' ')}"
            if name in GAUGES:
                yield GaugeMetricFamily(f"coordinator_derp_{name}", doc, value=value)
            else:
                yield CounterMetricFamily(f"coordinator_derp_{COUNTER_NAMES.get(name, name)}", doc, value=value)
        drops = CounterMetricFamily("coordinator_derp_dropped_packets", "DERP packets dropped, by reason", labels=["reason"])
        dropped_bytes = CounterMetricFamily("coordinator_derp_dropped_bytes", "DERP bytes dropped, by reason", labels=["reason"])
        for reason, n in stats["drops"].items():
            drops.add_metric([reason], n)
            dropped_bytes.add_metric([reason], stats["drop_bytes"][reason])
        yield drops
        yield dropped_bytes


class ControlCollector:
    """The replica set and this replica's database state as seen by its control plane."""

    def __init__(self, control):
        self.control = control

    def collect(self):
        reg = self.control.registry
        rows = reg.all_replicas() if reg else []
        replicas = GaugeMetricFamily("coordinator_replicas", "Rows of the replicas table, by liveness", labels=["state"])
        replicas.add_metric(["alive"], sum(1 for r in rows if r.alive))
        replicas.add_metric(["dead"], sum(1 for r in rows if not r.alive))
        yield replicas
        yield GaugeMetricFamily("coordinator_database_up", "1 while this replica's heartbeats reach PostgreSQL",
                                value=1 if reg is not None and reg.healthy else 0)
        findings = GaugeMetricFamily("coordinator_health_findings", "Health findings, by severity", labels=["severity"])
        current = self.control.findings()
        for severity in ("warning", "error"):
            findings.add_metric([severity], sum(1 for f in current if f.severity == severity))
        yield findings


class TailnetCollector:
    """The peer coordinator's ``stats()`` (docs/coordinator.md), read at scrape time."""

    def __init__(self, control):
        self.control = control

    def collect(self):
        tailnet = getattr(self.control, "tailnet", None)
        if tailnet is None:
            return
        s = tailnet.stats()
        yield GaugeMetricFamily("coordinator_tailnet_peers", "peers connected to this replica's coordinator",
                                value=s["peers"])
        yield GaugeMetricFamily("coordinator_tailnet_tunnels", "tunnels opened by this replica's peers", value=s["tunnels"])
        yield GaugeMetricFamily("coordinator_tailnet_healthy", "1 while the coordinator's heartbeats reach PostgreSQL",
                                value=1 if s["healthy"] else 0)
        yield GaugeMetricFamily("coordinator_tailnet_live_coordinators", "coordinators with a recent heartbeat",
                                value=s["live_coordinators"])
        yield CounterMetricFamily("coordinator_tailnet_updates_in", "node updates received from peers",
                                  value=s["updates_in"])
        yield CounterMetricFamily("coordinator_tailnet_updates_out", "peer updates sent to peers", value=s["updates_out"])
        yield CounterMetricFamily("coordinator_tailnet_resyncs", "full resyncs of the local peers (pub/sub gaps)",
                                  value=s["resyncs"])
        yield CounterMetricFamily("coordinator_tailnet_throttled", "peer messages delayed by the per-peer rate",
                                  value=s["throttled"])
        propagation = GaugeMetricFamily("coordinator_tailnet_propagation_seconds",
                                        "node update propagation, database commit to send (recent samples)",
                                        labels=["quantile"])
        for q in ("p50", "p99"):
            value = s[f"propagation_{q}_seconds"]
            if value is not None:
                propagation.add_metric(["0.5" if q == "p50" else "0.99"], value)
        yield propagation
        refused = CounterMetricFamily("coordinator_tailnet_refused", "peer connections and messages refused, by reason",
                                      labels=["reason"])
        for reason, n in sorted(s["refused"].items()):
            refused.add_metric([reason], n)
        yield refused


class Exposition:
    """Every metric of one replica as Prometheus text."""

    def __init__(self, control, relay: DerpRelay, front_door=None):
        self.control = control
        self.front_door = front_door  # the HTTP listener's budgets (coordinator.edge.frontdoor), if any
        self.registry = CollectorRegistry()
        self.registry.register(RelayCollector(relay))
        self.registry.register(ControlCollector(control))
        self.registry.register(TailnetCollector(control))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and friends

    def render(self, front_door=None) -> bytes:
        parts = [generate_latest(self.registry)]
        if self.control.pubsub is not None:
            parts.append(generate_latest(self.control.pubsub.registry))
        if self.control.monitor is not None:
            parts.append(generate_latest(self.control.monitor.registry))
        if (door := front_door or self.front_door) is not None:
            parts.append(generate_latest(door.registry))
        return b"".join(parts)


class PrometheusListener:
    """``GET /metrics`` on its own address, no token; anything else 404. One request per connection."""

    def __init__(self, exposition: Exposition, address: tuple[str, int]):
        self.exposition = exposition
        self.address = address
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        host, port = self.address
        try:
            self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_REQUEST)
        except OSError as exc:
            raise OSError(f"COORDINATOR_PROMETHEUS_ADDRESS (--prometheus-address) {host}:{port}: "
                          f"{exc.strerror or exc}") from None
        log.info("Prometheus metrics on http://%s:%d/metrics", host, port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            method, _, rest = head.partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0]
            if method in (b"GET", b"HEAD") and path == b"/metrics":
                body, status, ctype = self.exposition.render(), b"200 OK", CONTENT_TYPE_LATEST.encode()
            else:
                body, status, ctype = b"only GET /metrics here\n", b"404 Not Found", b"text/plain; charset=utf-8"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + (b"" if method == b"HEAD" else body))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a scraper that sends junk or stalls just loses its connection
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)


async def start_prometheus(settings, control, relay: DerpRelay, front_door=None) -> PrometheusListener | None:
    """The listener of ``--prometheus-address`` if it is set (an OSError when it cannot bind)."""
    address = settings.prometheus_listen
    if address is None:
        return None
    listener = PrometheusListener(Exposition(control, relay, front_door), address)
    await listener.start()
    return listener
