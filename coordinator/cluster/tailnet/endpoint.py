"""``/api/v2/tailnet/coordinate``: the WebSocket route peers connect to, on every replica.

The upgrade is always accepted, so that a refused peer learns why: one ``error`` frame, then the
close code of ``messages`` (1013: try again later or elsewhere; 1008: fix the request; 1001: the
replica is stopping). Every refusal is counted by reason.
"""

from __future__ import annotations

import contextlib
import logging
import uuid

import anyio
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from coordinator.cluster.tailnet.auth import AuthorizePeer, PeerRefused
from coordinator.cluster.tailnet.core import TailnetCoordinator
from coordinator.cluster.tailnet.messages import (
    CLOSE_POLICY,
    CLOSE_TRY_AGAIN,
    COORDINATE_PATH,
    PEER_ID_PARAM,
    encode_error,
    one_line,
)
from coordinator.cluster.tailnet.peer import CLOSE_TIMEOUT, PeerConnection
from coordinator.edge.frontdoor import FrontDoor, default_max_connections, fd_limit

log = logging.getLogger("coordinator.tailnet")

AUTHORIZE_TIMEOUT = 10.0  # seconds the authorization hook may take
PEER_SHARE = 0.5  # default peer budget: this share of the replica's connection budget (DERP clients keep the rest)


def peer_budget(coordinator: TailnetCoordinator, websocket: WebSocket) -> int:
    """Peers this replica serves at once: ``--tailnet-max-peers``, else a share of its connection budget."""
    if coordinator.max_peers > 0:
        return coordinator.max_peers
    door = getattr(websocket.app.state, "front_door", None) if websocket.app is not None else None
    connections = door.max_connections if isinstance(door, FrontDoor) else default_max_connections(fd_limit())
    return max(1, int(connections * PEER_SHARE))


async def _refuse(coordinator: TailnetCoordinator, websocket: WebSocket, reason: str, code: int, message: str) -> None:
    coordinator.refused[reason] += 1
    with anyio.move_on_after(CLOSE_TIMEOUT), contextlib.suppress(Exception):
        await websocket.send_text(encode_error(message))
        await websocket.close(code)


def tailnet_routes(coordinator: TailnetCoordinator, authorize: AuthorizePeer) -> list[WebSocketRoute]:
    async def coordinate(websocket: WebSocket) -> None:
        await websocket.accept()
        problem = coordinator.refusal()
        if problem is not None:
            code, message = problem
            await _refuse(coordinator, websocket, "unavailable", code, message)
            return
        raw = websocket.query_params.get(PEER_ID_PARAM, "")
        try:
            peer_id = uuid.UUID(raw)
        except ValueError:
            await _refuse(coordinator, websocket, "bad_peer_id", CLOSE_POLICY,
                          f"query parameter {PEER_ID_PARAM} must be the peer's UUID, not {raw[:40]!r}")
            return
        try:
            with anyio.fail_after(AUTHORIZE_TIMEOUT):
                grant = await authorize(websocket, peer_id)
        except PeerRefused as exc:
            await _refuse(coordinator, websocket, "unauthorized", CLOSE_POLICY, str(exc) or "not authorized")
            return
        except TimeoutError:
            await _refuse(coordinator, websocket, "authorize_timeout", CLOSE_TRY_AGAIN,
                          f"authorization took over {AUTHORIZE_TIMEOUT:g} s; try again")
            return
        except Exception as exc:  # an embedder's hook failing must not take the route down
            log.exception("tailnet authorization hook failed")
            await _refuse(coordinator, websocket, "authorize_error", CLOSE_TRY_AGAIN,
                          f"authorization failed: {one_line(str(exc)) or type(exc).__name__}")
            return
        if grant.peer_id != peer_id:
            await _refuse(coordinator, websocket, "peer_id_denied", CLOSE_POLICY,
                          f"this connection may not claim peer ID {peer_id}")
            return
        budget = peer_budget(coordinator, websocket)
        if len(coordinator.peers) >= budget and peer_id not in coordinator.peers:
            await _refuse(coordinator, websocket, "peer_budget", CLOSE_TRY_AGAIN,
                          f"this replica serves at most {budget} peers; try again (another replica may have room)")
            return
        problem = coordinator.refusal()  # the hook may have taken a while
        if problem is not None:
            await _refuse(coordinator, websocket, "unavailable", *problem)
            return
        await PeerConnection(coordinator, websocket, grant).serve()

    return [WebSocketRoute(COORDINATE_PATH, coordinate)]
