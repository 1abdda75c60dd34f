"""The operator API: replicas, health report, metrics (bearer token or status-page cookie), and readiness."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from coordinator.cluster.controlplane import ControlPlane
from coordinator.ops.prometheus import Exposition
from coordinator.relay.dataplane import DerpRelay

SESSION_COOKIE = "coordinator_status"
MISSING_TOKEN = ("missing bearer token: send 'Authorization: Bearer <token>' "
                 "(see `coordinator api-token`) or log in at /status")
INVALID_TOKEN = "invalid API token"


def session_value(api_token: str) -> str:
    """What the status page's cookie holds: derived from the token, so the cookie never is the token."""
    return hmac.new(api_token.encode(), b"coordinator status page session", hashlib.sha256).hexdigest()


def token_matches(given: str, api_token: str) -> bool:
    """Constant-time comparison; an unset token (control plane not started) matches nothing."""
    return bool(api_token) and hmac.compare_digest(given.strip().encode(), api_token.encode())


def check_operator(request: Request, api_token: str) -> str | None:
    """None if the request carries the operator's bearer token or status-page cookie, else why not."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token:
        return None if token_matches(token, api_token) else INVALID_TOKEN
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        return None if api_token and hmac.compare_digest(cookie.encode(), session_value(api_token).encode()) else INVALID_TOKEN
    return MISSING_TOKEN


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


def api_routes(control: ControlPlane, relay: DerpRelay) -> list[Route]:
    exposition = Exposition(control, relay)

    def authorized(request: Request) -> JSONResponse | None:
        problem = check_operator(request, control.api_token)
        return None if problem is None else JSONResponse({"message": problem}, status_code=401)

    async def replicas(request: Request) -> Response:
        if (denied := authorized(request)) is not None:
            return denied
        reg = control.registry
        rows = reg.all_replicas() if reg else []
        mine = control.monitor.matrix_row() if control.monitor else {}
        matrix = await reg.peer_matrix_or_none() if reg else {}  # the registry's sync leaves it out
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
            "tailnet": control.tailnet.health(),
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
        return Response(exposition.render(getattr(request.app.state, "front_door", None)),
                        media_type=CONTENT_TYPE_LATEST)

    async def readyz(request: Request) -> Response:
        """Fails while this replica cannot reach Postgres or its pub/sub listener is down."""
        problems = []
        if control.registry is None or not control.registry.healthy:
            problems.append("database unreachable")
        if control.pubsub is None or not control.pubsub.connected:
            problems.append("pub/sub listener down")
        if not control.tailnet.ready:
            problems.append("peer coordinator not started")  # its first heartbeat is not written yet
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
