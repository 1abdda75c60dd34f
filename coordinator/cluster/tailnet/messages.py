"""The peer coordinator's wire protocol: message types, limits and their validation, in one place.

Both ends import this module: the server (``coordinator.cluster.tailnet.endpoint``) and the Python
client in the library API. A WebSocket at :data:`COORDINATE_PATH` carries text frames, one JSON
object each, each with a ``"type"``. ``docs/coordinator.md`` documents the same with a JSON schema.

From a peer (:data:`Request`): ``update`` (its node, an opaque JSON object), ``add_tunnel`` /
``remove_tunnel`` / ``ready_for_handshake`` (another peer's UUID), ``disconnect`` (a graceful leave).
To a peer (:data:`Response`): ``peer_update`` (kind ``node`` with the node, ``disconnected``,
``lost`` or ``ready_for_handshake``) and ``error`` (one line, sent just before the server closes).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Final, Literal

COORDINATE_PATH = "/api/v2/tailnet/coordinate"
PEER_ID_PARAM = "peer_id"  # query parameter naming the connecting peer (a UUID)

# -- limits (one home for each) ---------------------------------------------------------------------
MAX_NODE_BYTES = 8 * 1024          # a node, serialized compactly as JSON (json_text)
MAX_MESSAGE_BYTES = 16 * 1024      # one text frame from a peer; larger is refused before parsing
MAX_TUNNELS_PER_PEER = 512         # tunnels one peer may open (as source); Coder sets no bound
UPDATES_PER_SECOND = 20.0          # messages a peer may send per second, sustained...
UPDATE_BURST = 60                  # ...and at once; beyond that the server reads no faster (backpressure)
SEND_QUEUE_SIZE = 1024             # distinct pending updates to one peer (coalesced: newest per peer wins)
MAX_ERROR_CHARS = 300              # an error message is one line of at most this many characters

# -- WebSocket close codes --------------------------------------------------------------------------
CLOSE_NORMAL = 1000         # the peer sent ``disconnect``
CLOSE_GOING_AWAY = 1001     # graceful replica stop: reconnect (through the load balancer) to another
CLOSE_POLICY = 1008         # bad input, refused authorization, a replaced connection
CLOSE_TRY_AGAIN = 1013      # coordinator unhealthy, starting, or out of peer slots: reconnect later/elsewhere

# -- peer update kinds ------------------------------------------------------------------------------
NODE: Final = "node"
DISCONNECTED: Final = "disconnected"
LOST: Final = "lost"
READY_FOR_HANDSHAKE: Final = "ready_for_handshake"
KINDS = (NODE, DISCONNECTED, LOST, READY_FOR_HANDSHAKE)
Kind = Literal["node", "disconnected", "lost", "ready_for_handshake"]


class ProtocolError(ValueError):
    """A message that breaks the protocol; ``reason`` is a short metric label, ``str()`` one line."""

    def __init__(self, reason: str, message: str):
        super().__init__(one_line(message))
        self.reason = reason


def one_line(text: str) -> str:
    """``text`` as one line of at most :data:`MAX_ERROR_CHARS` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= MAX_ERROR_CHARS else flat[: MAX_ERROR_CHARS - 3] + "..."


def json_text(value: Any) -> str:
    """Compact JSON, the form limits are measured in and nodes are stored in."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def parse_uuid(value: Any, what: str = "peer") -> uuid.UUID:
    """A canonical UUID from its text form, else ProtocolError (reason ``bad_uuid``)."""
    if not isinstance(value, str) or len(value) > 64:
        raise ProtocolError("bad_uuid", f"{what} must be a UUID string")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ProtocolError("bad_uuid", f"{what} {value[:40]!r} is not a UUID") from None


# -- requests (peer -> coordinator) -------------------------------------------------------------------


@dataclass(frozen=True)
class Update:
    """The peer's own node: opaque to the coordinator, at most :data:`MAX_NODE_BYTES` as compact JSON."""

    node: dict[str, Any]
    type: Literal["update"] = "update"


@dataclass(frozen=True)
class AddTunnel:
    peer: uuid.UUID
    type: Literal["add_tunnel"] = "add_tunnel"


@dataclass(frozen=True)
class RemoveTunnel:
    peer: uuid.UUID
    type: Literal["remove_tunnel"] = "remove_tunnel"


@dataclass(frozen=True)
class ReadyForHandshake:
    """Tell ``peer`` (which must share a tunnel with the sender) that the sender is ready for it."""

    peer: uuid.UUID
    type: Literal["ready_for_handshake"] = "ready_for_handshake"


@dataclass(frozen=True)
class Disconnect:
    """A graceful leave: the peer's row and tunnels go; others see ``disconnected``."""

    type: Literal["disconnect"] = "disconnect"


Request = Update | AddTunnel | RemoveTunnel | ReadyForHandshake | Disconnect
_TUNNEL_REQUESTS: dict[str, type[AddTunnel] | type[RemoveTunnel] | type[ReadyForHandshake]] = {
    "add_tunnel": AddTunnel, "remove_tunnel": RemoveTunnel, "ready_for_handshake": ReadyForHandshake,
}
REQUEST_TYPES = ("update", *_TUNNEL_REQUESTS, "disconnect")


def check_node(node: Any) -> dict[str, Any]:
    """``node`` if it is a JSON object within :data:`MAX_NODE_BYTES`, else ProtocolError."""
    if not isinstance(node, dict):
        raise ProtocolError("bad_node", "update: node must be a JSON object")
    size = len(json_text(node).encode())
    if size > MAX_NODE_BYTES:
        raise ProtocolError("node_too_large", f"update: node is {size} bytes; the limit is {MAX_NODE_BYTES}")
    return node


def _object(text: str | bytes, size_limit: int) -> dict[str, Any]:
    if isinstance(text, bytes | bytearray):
        raise ProtocolError("binary_frame", "send text frames (JSON), not binary ones")
    if len(text) > size_limit or len(text.encode()) > size_limit:
        raise ProtocolError("message_too_large", f"message is over {size_limit} bytes")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError("not_json", "message is not JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError("not_object", "message must be a JSON object with a \"type\"")
    return value


def parse_request(text: str | bytes, sender: uuid.UUID | None = None) -> Request:
    """Validate one frame from a peer; ``sender`` (the peer's own ID) refuses tunnels to itself."""
    msg = _object(text, MAX_MESSAGE_BYTES)
    kind = msg.get("type")
    if kind == "update":
        return Update(check_node(msg.get("node")))
    if kind == "disconnect":
        return Disconnect()
    cls = _TUNNEL_REQUESTS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        shown = repr(kind)[:40] if kind is not None else "missing"
        raise ProtocolError("unknown_type", f"unknown message type {shown}; expected one of {', '.join(REQUEST_TYPES)}")
    peer = parse_uuid(msg.get("peer"), f"{kind}: peer")
    if sender is not None and peer == sender:
        raise ProtocolError("self_tunnel", f"{kind}: a peer cannot name itself")
    return cls(peer)


def encode_request(request: Request) -> str:
    """The frame a client sends for ``request``."""
    if isinstance(request, Update):
        return json_text({"type": "update", "node": request.node})
    if isinstance(request, Disconnect):
        return json_text({"type": "disconnect"})
    return json_text({"type": request.type, "peer": str(request.peer)})


# -- responses (coordinator -> peer) --------------------------------------------------------------------


@dataclass(frozen=True)
class PeerUpdate:
    """What the coordinator tells a peer about another: ``node`` only with kind ``node``."""

    peer: uuid.UUID
    kind: Kind
    node: dict[str, Any] | None = None
    type: Literal["peer_update"] = "peer_update"


@dataclass(frozen=True)
class Error:
    message: str
    type: Literal["error"] = "error"


Response = PeerUpdate | Error


def encode_peer_update(peer: uuid.UUID, kind: Kind, node_json: str | None = None) -> str:
    """A ``peer_update`` frame; ``node_json`` is the node as stored (already compact JSON text)."""
    if kind == NODE:
        return f'{{"type":"peer_update","peer":"{peer}","kind":"node","node":{node_json}}}'
    return f'{{"type":"peer_update","peer":"{peer}","kind":"{kind}"}}'


def encode_error(message: str) -> str:
    return json_text({"type": "error", "message": one_line(message)})


def encode_response(response: Response) -> str:
    if isinstance(response, Error):
        return encode_error(response.message)
    return encode_peer_update(response.peer, response.kind,
                              json_text(response.node) if response.kind == NODE else None)


def parse_response(text: str | bytes) -> Response:
    """Validate one frame from the coordinator (what the client does with every frame it reads)."""
    msg = _object(text, MAX_MESSAGE_BYTES)
    kind = msg.get("type")
    if kind == "error":
        message = msg.get("message")
        if not isinstance(message, str):
            raise ProtocolError("bad_error", "error: message must be a string")
        return Error(message)
    if kind != "peer_update":
        raise ProtocolError("unknown_type", f"unknown message type {repr(kind)[:40]}; expected peer_update or error")
    peer = parse_uuid(msg.get("peer"))
    update_kind = msg.get("kind")
    if update_kind not in KINDS:
        raise ProtocolError("bad_kind", f"peer_update: kind {repr(update_kind)[:40]} is not one of {', '.join(KINDS)}")
    if update_kind == NODE:
        return PeerUpdate(peer, NODE, check_node(msg.get("node")))
    return PeerUpdate(peer, update_kind)
