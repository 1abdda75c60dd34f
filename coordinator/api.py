"""The operator API: replicas, health report, metrics (bearer token), and the public readiness check."""

from __future__ import annotations

import hmac
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from coordinator.controlplane import ControlPlane
from coordinator.derp import DerpRelay

GAUGES = {"current_connections", "current_home_connections", "clients_local", "clients_remote", "watchers", "duplicate_keys",
          "mesh_links_congested", "senders_paused"}


class RelayCollector:
    """The relay's counters as Prometheus metrics, read at scrape time."""

    def __init__(self, relay: DerpRelay):
        self.relay = relay

    def collect(self):
        stats = self.relay.stats()
        for name, value in stats.items():
            if isinstance(value, dict):
                continue
            if name in GAUGES:
                yield GaugeMetricFamily(f"coordinator_derp_{name}", f"DERP relay: {name.replace('_', ' ')}", value=value)
            else:
                yield CounterMetricFamily(f"coordinator_derp_{name}", f"DERP relay: {name.replace('_', ' ')}", value=value)
        drops = CounterMetricFamily("coordinator_derp_packets_dropped", "DERP packets dropped, by reason", labels=["reason"])
        dropped_bytes = CounterMetricFamily("coordinator_derp_bytes_dropped", "DERP bytes dropped, by reason", labels=["reason"])
        for reason, n in stats["drops"].items():
            drops.add_metric([reason], n)
            dropped_bytes.add_metric([reason], stats["drop_bytes"][reason])
        yield drops
        yield dropped_bytes


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


def api_routes(control: ControlPlane, relay: DerpRelay) -> list[Route]:
    relay_registry = CollectorRegistry()
    relay_registry.register(RelayCollector(relay))

    def authorized(request: Request) -> JSONResponse | None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return JSONResponse({"message": "missing bearer token: send 'Authorization: Bearer <token>' "
                                 "(see `coordinator api-token`)"}, status_code=401)
        if not control.api_token or not hmac.compare_digest(token.strip().encode(), control.api_token.encode()):
            return JSONResponse({"message": "invalid API token"}, status_code=401)
        return None

    async def replicas(request: Request) -> Response:
        if (denied := authorized(request)) is not None:
            return denied
        reg = control.registry
        rows = reg.all_replicas() if reg else []
        mine = control.monitor.matrix_row() if control.monitor else {}
        try:  # not part of the rows: the registry's sync leaves the matrix out
            matrix = await reg.peer_matrix() if reg and reg.db else {}
        except Exception:  # the database is away: the rows as last seen, without the matrix
            matrix = {}
        out = []
        for r in rows:
            out.append({
                "id": str(r.id),
                "hostname": r.hostname,
                "created_at": _iso(r.created_at),
                "started_at": _iso(r.started_at),
                "updated_at": _iso(r.updated_at),
                "stopped_at": _iso(r.stopped_at),
                "relay_address": r.relay_url,
                "region_id": r.region_id,
                "error": r.error,
                "database_latency": r.database_latency,
                "pubsub_latency": r.pubsub_latency,
                "version": r.version,
                "alive": r.alive,
                "self": reg is not None and r.id == reg.id,
                "peer_latencies": matrix.get(r.id, r.peer_latencies),
                # this replica's own, freshest view of its latency to that replica
                "latency_from_here": mine.get(str(r.id)),
            })
        return JSONResponse(out)

    async def health(request: Request) -> Response:
        if (denied := authorized(request)) is not None:
            return denied
        findings = control.findings()
        severity = "error" if any(f.severity == "error" for f in findings) else ("warning" if findings else "ok")
        reg = control.registry
        return JSONResponse({
            "healthy": not findings,
            "severity": severity,
            "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "replica_id": str(reg.id) if reg else None,
            "threshold_ms": control.settings.latency_threshold * 1e3,
            "findings": [f.as_dict() for f in findings],
        })

    async def status(request: Request) -> Response:
        if (denied := authorized(request)) is not None:
            return denied
        reg = control.registry
        return JSONResponse({
            "replica_id": str(reg.id) if reg else None,
            "server_key": relay.key.public_text,
            **control.status(),
            "relay": relay.stats(),
        })

    async def metrics(request: Request) -> Response:
        if (denied := authorized(request)) is not None:
            return denied
        parts = [generate_latest(relay_registry)]
        if control.pubsub is not None:
            parts.append(generate_latest(control.pubsub.registry))
        if control.monitor is not None:
            parts.append(generate_latest(control.monitor.registry))
        return Response(b"".join(parts), media_type=CONTENT_TYPE_LATEST)

    async def readyz(request: Request) -> Response:
        """Fails while this replica cannot reach Postgres or its pub/sub listener is down."""
        problems = []
        if control.registry is None or not control.registry.healthy:
            problems.append("database unreachable")
        if control.pubsub is None or not control.pubsub.connected:
            problems.append("pub/sub listener down")
        if problems:
            return JSONResponse({"ready": False, "problems": problems}, status_code=503)
        return JSONResponse({"ready": True})

    return [
        Route("/api/v2/replicas", replicas),
        Route("/api/v2/debug/health", health),
        Route("/api/v2/debug/status", status),
        Route("/metrics", metrics),
        Route("/readyz", readyz),
    ]
