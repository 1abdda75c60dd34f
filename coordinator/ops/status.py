"""The operator's status page at ``/status``: replica set, mesh grid, latency heatmap, findings, relay.

The page is static HTML, CSS and JavaScript shipped in ``coordinator/ops/static/`` (no external assets;
a strict Content-Security-Policy keeps it that way); its script polls ``/status/data`` once a
second and redraws. Everything but the login form and the static files needs the operator: the
API token entered once on the login form (kept as a derived value in an HttpOnly, SameSite=Strict
cookie) or ``Authorization: Bearer``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from coordinator.cluster.controlplane import ControlPlane
from coordinator.cluster.registry import OperatorView
from coordinator.core.health import overall
from coordinator.core.timestamps import iso_utc
from coordinator.core.urls import derp_url
from coordinator.ops.api import SESSION_COOKIE, check_operator, session_value, token_matches
from coordinator.ops.relays import derp_view
from coordinator.ops.tailnet_status import tailnet_snapshot
from coordinator.relay.dataplane import DerpRelay

log = logging.getLogger("coordinator.status")

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {"status.js": "text/javascript; charset=utf-8", "status.css": "text/css; charset=utf-8"}
MAX_LOGIN_BODY = 4096
SESSION_MAX_AGE = 30 * 24 * 3600
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
LOGIN_MESSAGES = {"": "", "invalid": '<p class="error" id="login-error">That token is not valid.</p>'}


def _asset(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


def _ms(microseconds: int | None) -> float | None:
    return None if not microseconds else round(microseconds / 1000.0, 3)


def _measured(latencies, peer_id: str) -> dict:
    """One replica's stored figures for one peer; {} when absent or malformed (rows are other processes' writes)."""
    entry = latencies.get(peer_id) if isinstance(latencies, dict) else None
    return entry if isinstance(entry, dict) else {}


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def mesh_state(seen: dict, peer, mine: bool, links: dict, alive: bool) -> dict:
    """The link to ``peer`` from a replica that measured ``seen``: live for this replica, as reported for the others."""
    if not alive:
        return {"state": "dead"}
    if not peer.relay_url:
        return {"state": "no relay URL"}
    if mine:
        link = links.get(derp_url(peer.relay_url) or "")
        if link is None:
            return {"state": "none"}
        return {"state": "up" if link["connected"] else "down", "error": link["error"]}
    seen = _measured(seen, str(peer.id))
    if not seen:
        return {"state": "unknown"}
    if seen.get("error"):
        return {"state": "down", "error": str(seen["error"])}
    return {"state": "up" if seen.get("derp_ms") is not None else "unknown"}


async def snapshot(control: ControlPlane, relay: DerpRelay) -> dict:
    """Everything the page shows, in one JSON document."""
    reg = control.registry
    rows = sorted(reg.all_replicas() if reg else [], key=lambda r: (not r.alive, r.hostname, str(r.id)))
    links = control.mesh.status() if control.mesh else {}
    mine = control.monitor.matrix_row() if control.monitor else {}
    view = await reg.operator_view() if reg else OperatorView()
    findings = control.findings()
    replicas, mesh, latency = [], {}, {}
    for row in rows:
        rid, is_self = str(row.id), reg is not None and row.id == reg.id
        replicas.append({
            "id": rid, "hostname": row.hostname, "relay_url": row.relay_url, "version": row.version,
            "region_id": row.region_id, "alive": row.alive, "self": is_self, "error": row.error or None,
            "heartbeat_age_s": view.ages.get(row.id), "heartbeat_s": row.heartbeat,
        })
        seen = mine if is_self else view.matrix.get(row.id, row.peer_latencies)
        mesh[rid] = {str(p.id): mesh_state(seen, p, is_self, links, row.alive and p.alive) for p in rows if p.id != row.id}
        cells = {str(p.id): _number(_measured(seen, str(p.id)).get("http_ms")) for p in rows if p.id != row.id}
        if row.alive:
            cells["database"] = _ms(row.database_latency)
            cells["pubsub"] = _ms(row.pubsub_latency)
        latency[rid] = cells if row.alive else {}
    stats = relay.stats()
    return {
        "time": iso_utc(),
        "replica_id": str(reg.id) if reg else None,
        "threshold_ms": control.settings.latency_threshold * 1e3,
        "database": bool(reg and reg.healthy),
        "pubsub": bool(control.pubsub and control.pubsub.connected),
        "replicas": replicas,
        "mesh": mesh,
        "latency": latency,
        "severity": overall(findings),
        "findings": [f.as_dict() for f in findings],
        "relay": {
            "clients": stats["clients_local"], "connections": stats["current_connections"],
            "remote_clients": stats["clients_remote"], "packets_in": stats["packets_in"],
            "packets_out": stats["packets_out"], "forwarded_in": stats["forwarded_in"],
            "forwarded_out": stats["forwarded_out"], "drops": stats["drops"],
        },
        "derp": derp_view(control),
        "tailnet": await tailnet_snapshot(control.tailnet, control.db),
    }


def status_routes(control: ControlPlane, relay: DerpRelay) -> list[Route]:
    page = _asset("status.html")
    login = _asset("login.html")
    assets = {name: _asset(name) for name in ASSETS}

    def login_page(message: str = "", status_code: int = 401) -> Response:
        body = login.replace("<!--message-->", LOGIN_MESSAGES[message])
        return Response(body, status_code=status_code, media_type="text/html; charset=utf-8", headers=HEADERS)

    async def status(request: Request) -> Response:
        if check_operator(request, control.api_token) is not None:
            return login_page()
        return Response(page, media_type="text/html; charset=utf-8", headers=HEADERS)

    async def do_login(request: Request) -> Response:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_LOGIN_BODY:
                return login_page("invalid", 413)
        token = parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0]
        if not token_matches(token, control.api_token):
            log.info("status page: rejected a login from %s", request.client.host if request.client else "?")
            return login_page("invalid")
        response = RedirectResponse("/status", status_code=303, headers=HEADERS)
        response.set_cookie(SESSION_COOKIE, session_value(control.api_token), max_age=SESSION_MAX_AGE, path="/",
                            httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return response

    async def logout(request: Request) -> Response:
        response = RedirectResponse("/status", status_code=303, headers=HEADERS)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    async def data(request: Request) -> Response:
        if (problem := check_operator(request, control.api_token)) is not None:
            return JSONResponse({"message": problem}, status_code=401, headers=HEADERS)
        return JSONResponse(await snapshot(control, relay), headers=HEADERS)

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in assets:
            return Response("not found", status_code=404, media_type="text/plain")
        return Response(assets[name], media_type=ASSETS[name], headers=HEADERS)

    return [
        Route("/status", status),
        Route("/status/login", do_login, methods=["POST"]),
        Route("/status/logout", logout, methods=["POST"]),
        Route("/status/data", data),
        Route("/status/static/{name}", asset),
    ]
