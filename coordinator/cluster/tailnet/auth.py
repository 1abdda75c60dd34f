"""Who may connect to the peer coordinator: the deployment's tailnet token, or the embedder's hook.

The hook is ``async (conn, peer_id) -> PeerGrant``; it raises :class:`PeerRefused` (one line, sent
to the peer as its ``error``) to refuse. The default hook checks ``Authorization: Bearer`` against
the deployment token and grants the peer ID the request names.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from starlette.requests import HTTPConnection

TOKEN_KEY = "tailnet_token"  # site_config key of the generated deployment token
MISSING_TOKEN = "missing bearer token: send 'Authorization: Bearer <token>' (see `coordinator tailnet-token`)"
INVALID_TOKEN = "invalid tailnet token"


class PeerRefused(Exception):
    """Raised by an authorization hook; ``str()`` is what the peer is told."""


def _any_peer(_: uuid.UUID) -> bool:
    return True


@dataclass(frozen=True)
class PeerGrant:
    """What a connection may do: act as ``peer_id`` and open tunnels to peers ``may_tunnel`` accepts."""

    peer_id: uuid.UUID
    may_tunnel: Callable[[uuid.UUID], bool] = field(default=_any_peer)


AuthorizePeer = Callable[[HTTPConnection, uuid.UUID], Awaitable[PeerGrant]]


def bearer_token(conn: HTTPConnection) -> str | None:
    scheme, _, token = conn.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def token_authorizer(token: Callable[[], str]) -> AuthorizePeer:
    """The default hook: the bearer token must equal ``token()`` (empty: not known yet, nothing matches)."""

    async def authorize(conn: HTTPConnection, peer_id: uuid.UUID) -> PeerGrant:
        given = bearer_token(conn)
        if given is None:
            raise PeerRefused(MISSING_TOKEN)
        expected = token()
        if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
            raise PeerRefused(INVALID_TOKEN)
        return PeerGrant(peer_id)

    return authorize
