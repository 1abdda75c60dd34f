"""An embedder's app for tests: a replica whose peer coordinator authorizes peers with its own hook.

A user names itself in ``X-User``; its peer ID is ``uuid5(NAMESPACE, user)`` and it may open
tunnels only to the peer IDs listed in ``$TAILNET_HOOK_ALLOWED`` (comma-separated).
"""

from __future__ import annotations

import os
import uuid

from starlette.requests import HTTPConnection

from coordinator import Replica, load_settings
from coordinator.cluster.tailnet.auth import PeerGrant, PeerRefused

NAMESPACE = uuid.UUID("6ba7b811-9dad-11d1-80b4-00c04fd430c8")
ALLOWED = {uuid.UUID(p) for p in os.environ.get("TAILNET_HOOK_ALLOWED", "").split(",") if p}


async def authorize(conn: HTTPConnection, peer_id: uuid.UUID) -> PeerGrant:
    user = conn.headers.get("x-user")
    if not user:
        raise PeerRefused("no X-User header")
    return PeerGrant(uuid.uuid5(NAMESPACE, user), may_tunnel=lambda other: other in ALLOWED)


replica = Replica(load_settings(), authorize_peer=authorize)
app = replica.app()
